"""The admin's push logic module: the example's decisions, and containment of a module that
raises, returns the wrong thing, is slow or does not load."""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path

import pytest

from pymod_push import logic
from pymod_push.protocol import StanzaToPending
from pymod_push.service.decisions import PushService
from pymod_push.store import Store
from tests.builders import PHONE, enable, fields, make_service, message

MESSAGE = logic.Message("message", "chat", "romeo@example.net/a", "hi", False, False, "")
RECIPIENT = logic.Recipient("juliet", "example.org", "phone")

EXAMPLE = str(Path(__file__).resolve().parent.parent.parent / "examples" / "push_logic.py")


def with_logic(module: logic.Logic, **options: object) -> PushService:
    plain = make_service(**options)
    return PushService(plain.config, Store(":memory:"), module)


def test_the_example_module_decides_and_shapes() -> None:
    service = with_logic(logic.load(EXAMPLE))
    service.handle(enable(), 0)
    assert service.handle(StanzaToPending(PHONE, message(sender="bot7@example.org/x")), 0) == []
    (push,) = service.handle(StanzaToPending(PHONE, message(body="this is URGENT")), 0)
    assert fields(push)["last-message-priority"] == "high"
    assert fields(push)["message-count"] == "1"  # the bot's message was not counted
    (plain,) = service.handle(StanzaToPending(PHONE, message(body="hi", stanza_id="m2")), 0)
    assert "last-message-priority" not in fields(plain)


def test_the_example_shapes_fcm_data_only() -> None:
    loaded = logic.load(EXAMPLE)
    fcm = logic.Device("alice@example.org", "fcm", "app", "phone", "")
    apns = logic.Device("alice@example.org", "apns", "app", "phone", "")
    assert loaded.provider_data(fcm, {"message-count": "1"}) == {
        "message-count": "1", "channel": "messages"}
    assert loaded.provider_data(apns, {"message-count": "1"}) == {"message-count": "1"}


def write(tmp_path: Path, source: str) -> str:
    path = tmp_path / "admin_logic.py"
    path.write_text(source)
    return str(path)


def test_a_raising_function_is_contained_then_switched_off(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    calls = tmp_path / "calls"
    module = logic.load(write(tmp_path, f"""
def should_push(message, recipient, default):
    open({str(calls)!r}, "a").write("x")
    raise RuntimeError("oops")
"""))
    service = with_logic(module)
    service.handle(enable(), 0)
    with caplog.at_level(logging.ERROR, logger="pymod_push"):
        pushes = [service.handle(StanzaToPending(PHONE, message(stanza_id=str(n))), 0)
                  for n in range(5)]
    assert all(len(p) == 1 for p in pushes)  # the default decision, every time
    assert calls.read_text() == "x" * logic.STRIKES  # then it is not called any more
    assert "raised RuntimeError: oops" in caplog.text and "switched off" in caplog.text


def test_wrong_types_and_slow_functions_are_contained(tmp_path: Path) -> None:
    module = logic.load(write(tmp_path, """
import time
def should_push(message, recipient, default):
    return "yes"
def summary(message, recipient, fields):
    time.sleep(0.06)
    return fields
"""))
    service = with_logic(module)
    service.handle(enable(), 0)
    for n in range(logic.STRIKES):
        (push,) = service.handle(StanzaToPending(PHONE, message(stanza_id=str(n))), 0)
        assert fields(push)["message-count"] == str(n + 1)
    assert not module.has("should_push") and not module.has("summary")
    started = time.perf_counter()
    service.handle(StanzaToPending(PHONE, message(stanza_id="fast")), 0)
    assert time.perf_counter() - started < 0.05  # the slow function is not called


def test_a_module_that_does_not_load_leaves_the_defaults(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="pymod_push"):
        broken = logic.load(write(tmp_path, "this is not python"))
        missing = logic.load("no_such_module_anywhere")
    assert broken.module is None and missing.module is None
    assert caplog.text.count("could not be loaded") == 2
    service = with_logic(broken)
    service.handle(enable(), 0)
    assert len(service.handle(StanzaToPending(PHONE, message()), 0)) == 1


def test_a_module_can_push_what_we_would_not() -> None:
    service = with_logic(logic.Logic(type("M", (), {
        "should_push": staticmethod(lambda m, r, d: True)})))  # type: ignore[arg-type]
    service.handle(enable(), 0)
    (push,) = service.handle(StanzaToPending(PHONE, message(body="")), 0)
    assert fields(push)["message-count"] == "1"


def test_a_reload_checks_the_module_before_it_is_used(tmp_path: Path) -> None:
    module = tmp_path / "mine.py"
    module.write_text("def should_push(message, recipient, default):\n    return False\n")
    first = logic.load_checked(str(module))
    assert first.has("should_push") and not first.has("summary")
    for source, reason in [
        ("def should_push(:\n", "does not import (SyntaxError"),
        ("import no_such_module_anywhere\n", "does not import (ModuleNotFoundError"),
        ("raise SystemExit(3)\n", "does not import (SystemExit"),
        ("should_push = 3\n", "should_push is not a function"),
        ("def summary(message, recipient, fields):\n    return fields['nope']\n",
         "summary raised KeyError"),
        ("def provider_data(device, data):\n    return 'text'\n",
         "provider_data returned str, not Mapping"),
        ("import time\ndef should_push(message, recipient, default):\n"
         "    time.sleep(0.2)\n    return default\n", "should_push took"),
    ]:
        module.write_text(source)
        with pytest.raises(logic.LogicError, match=re.escape(reason)):
            logic.load_checked(str(module))
    with pytest.raises(logic.LogicError, match="no 'logic' module"):
        logic.load_checked(None)
    # The module loaded first is untouched by the failed attempts.
    assert first.should_push(MESSAGE, RECIPIENT, True) is False


def test_a_reload_by_import_name_leaves_the_running_module_alone(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    package = tmp_path / "site_logic.py"
    package.write_text("VERSION = 1\ndef should_push(message, recipient, default):\n"
                       "    return False\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    running = logic.load("site_logic")
    package.write_text("VERSION = 2\ndef should_push(:\n")
    with pytest.raises(logic.LogicError):
        logic.load_checked("site_logic")
    assert running.module is not None and running.module.VERSION == 1
    package.write_text("VERSION = 3\ndef should_push(message, recipient, default):\n"
                       "    return True\n")
    again = logic.load_checked("site_logic")
    assert again.module is not None and again.module.VERSION == 3 and running.module.VERSION == 1
