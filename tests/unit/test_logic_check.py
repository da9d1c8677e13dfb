"""pymod-push logic check: an admin's push logic tried on sample stanzas, offline."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from pymod_push import install, logic_check
from tests.builders import payload_sizes, sections

ROOT = Path(__file__).resolve().parent.parent.parent
EXAMPLE = str(ROOT / "examples" / "push_logic.py")


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = install.main(["logic", "check", *argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Any attempt to open a network connection is recorded and fails."""
    attempts: list[Any] = []

    def refuse(self: socket.socket, address: Any) -> None:
        attempts.append(address)
        raise OSError("the check must not contact anything")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    return attempts


def test_the_example_logic_on_every_sample_and_a_stanza_of_ones_own(
        capsys: pytest.CaptureFixture[str], offline: list[Any]) -> None:
    status, out, _ = run(capsys, EXAMPLE, "--option", "include_message_bodies=true",
                         "--option", "include_senders=true",
                         "--stanza", "<message type='chat' from='bot7@example.net' id='b'>"
                                     "<body>ping</body></message>")
    assert status == 0 and offline == []
    found = sections(out)
    assert set(found) == {s.name for s in logic_check.SAMPLES} | {"your stanza 1"}
    assert "should_push, summary, provider_data" in out.splitlines()[0]
    for name, section in found.items():
        push = "decision: push" in section
        sizes = payload_sizes(section)
        # A push reaches each provider, within its limit; no push, no payload.
        assert sorted(sizes) == (["apns", "fcm", "ubuntu", "webpush", "wns"] if push else [])
        assert "OVER THE LIMIT" not in section, name
        assert all(size <= 5120 for size in sizes.values())
    assert "decision: no push (without the module: no push)" in found[
        "group chat, not mentioning the user"]
    # The example's should_push: bots never push, whatever the default says.
    assert "decision: no push (without the module: push)" in found["your stanza 1"]
    chat = found["chat message"]
    assert "last-message-body='Hello Juliet, are you there?'" in chat
    assert '"channel":"messages"' in re.search(r"^fcm: .*$", chat, re.M)[0]  # provider_data
    # Web Push is shown as the device decrypts it.
    assert re.search(r'^webpush: \d+ bytes: \{"message-count":"1"', chat, re.M)
    assert "last-message-body='Encrypted message'" in found["OMEMO-encrypted message"]
    assert ", urgent: " in found["call (Jingle Message Initiation)"]
    big = found["1 MB body"]
    assert "…" in re.search(r"^summary: .*$", big, re.M)[0]  # cut, and marked so
    assert out.rstrip().endswith("every function ran as it should")


def test_the_defaults_withhold_bodies_and_senders(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(capsys, EXAMPLE)
    assert status == 0
    chat = sections(out)["chat message"]
    assert "Hello Juliet" not in chat and "romeo@" not in chat


def test_a_failing_function_is_reported_and_the_defaults_shown(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    module = tmp_path / "broken.py"
    module.write_text("def summary(message, recipient, fields):\n"
                      "    raise KeyError('oops')\n"
                      "def should_push(message, recipient, default):\n"
                      "    return 'yes'\n")
    status, out, _ = run(capsys, str(module))
    assert status == 1
    assert "PROBLEM: push logic pymod_push_logic.summary raised KeyError" in out
    assert "PROBLEM: push logic pymod_push_logic.should_push returned str, not bool" in out
    assert "decision: push (without the module: push)" in sections(out)["chat message"]
    assert "some functions failed" in out


@pytest.mark.parametrize("argv, reason", [
    (["{module}"], "could not be loaded"),
    ([EXAMPLE, "--stanza", "<message"], "not a stanza"),
    ([EXAMPLE, "--stanza", "<iq type='get'/>"], "a <message/> or <presence/> is needed"),
    ([EXAMPLE, "--option", "include_senders"], "--option takes NAME=VALUE"),
])
def test_what_cannot_be_checked_says_why(argv: list[str], reason: str, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    module = tmp_path / "syntax.py"
    module.write_text("def should_push(:\n")
    status, out, err = run(capsys, *[a.format(module=module) for a in argv])
    assert status == 2 and reason in err and out == ""


def test_python_m_pymod_push_logic_check_check() -> None:
    result = subprocess.run([sys.executable, "-m", "pymod_push.logic_check", "check", EXAMPLE],
                            capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "every function ran as it should" in result.stdout


def test_async_functions_are_awaited_as_the_server_would(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    module = tmp_path / "asking.py"
    module.write_text("import asyncio\n"
                      "async def should_push(message, recipient, default):\n"
                      "    await asyncio.sleep(0.001)\n"
                      "    return default and 'secret' not in message.body\n"
                      "async def summary(message, recipient, fields):\n"
                      "    return {**fields, 'asked': 'yes'}\n")
    status, out, _ = run(capsys, str(module), "--stanza",
                         "<message type='chat' from='a@b.example' id='s'><body>a secret</body>"
                         "</message>")
    assert status == 0
    found = sections(out)
    assert "asked='yes'" in found["chat message"]
    assert "decision: no push (without the module: push)" in found["your stanza 1"]


def test_python_providers_of_the_config_are_checked_and_not_called(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], offline: list[Any]) -> None:
    broken = tmp_path / "broken_provider.py"
    broken.write_text("def send(device, notification):\n    pass\n")
    config = tmp_path / "ejabberd.yml"
    hosts = {"register_host": "example.org", "pubsub_host": "push.example.org"}
    config.write_text(yaml.safe_dump({"modules": {"mod_push_py": {
        "include_message_bodies": True, "include_senders": True, "backends": [
            {"type": "python", "module": str(ROOT / "examples" / "webhook_provider.py"),
             "name": "webhook", "url": "https://hooks.invalid/x", **hosts},
            {"type": "python", "module": str(broken), **hosts}]}}}))
    status, out, _ = run(capsys, EXAMPLE, "--config", str(config))
    assert status == 1 and offline == []
    assert "python provider webhook: registers channel" in out
    assert "PROBLEM: python provider broken_provider: it has no 'async def send" in out
    found = sections(out)
    assert ("webhook (python, not called): title='romeo@example.net', "
            "text='Hello Juliet, are you there?', urgent=False") in found["chat message"]
    assert "urgent=True" in found["call (Jingle Message Initiation)"]
    assert "webhook (python" not in found["group chat, not mentioning the user"]
