"""The cookbook's recipes (docs/cookbook.md, examples/cookbook/), each run through the push
service as the server would run it (pymod-push logic check's machinery)."""

from __future__ import annotations

import asyncio
import http.server
import json
import re
import threading
import urllib.parse
from pathlib import Path

import pytest

from pymod_push import logic_check
from pymod_push.core.config import Backend
from pymod_push.core.xmpp import RequestError
from pymod_push.providers import DeliveryOutcome
from pymod_push.python_provider import PushDevice, load_provider
from tests.builders import OPEN, payload_sizes, sections

COOKBOOK = Path(__file__).resolve().parent.parent.parent / "examples" / "cookbook"
def checked(recipe: str, user: str, extra: list[str] | None = None,
            **options: object) -> dict[str, str]:
    lines: list[str] = []
    stanzas = list(logic_check.SAMPLES) + [logic_check.Sample(f"your stanza {n}", xml)
                                           for n, xml in enumerate(extra or [], start=1)]
    status = logic_check.check(str(COOKBOOK / recipe), {**OPEN, **options}, stanzas,
                               lines.append, user)
    out = "\n".join(lines)
    assert status == 0, out
    return sections(out)


def urgent(section: str) -> bool:
    return "last-message-priority='high'" in section and ", urgent: " in section


def test_vip_senders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    vips = tmp_path / "vips.json"
    vips.write_text(json.dumps({"Juliet@example.org": ["romeo@example.net",
                                                       "capulets@rooms.example.org"]}))
    monkeypatch.setenv("PYMOD_PUSH_VIP_FILE", str(vips))
    found = checked("vip_senders.py", "juliet@example.org", [
        "<message type='chat' from='tybalt@example.net/x' id='t'><body>hi</body></message>"])
    assert urgent(found["chat message"])  # romeo is a VIP
    assert "decision: push (without the module: no push)" in found[
        "group chat, not mentioning the user"]  # the room is a VIP: every message pushes
    assert urgent(found["group chat, not mentioning the user"])
    assert not urgent(found["your stanza 1"])  # tybalt is not
    assert "decision: push" in found["your stanza 1"]
    assert not urgent(found["subscription request"])
    # Someone else's list is not Juliet's.
    other = checked("vip_senders.py", "nurse@example.org")
    assert not urgent(other["chat message"])
    assert "decision: no push" in other["group chat, not mentioning the user"]


def test_routing_by_domain() -> None:
    clinic = checked("by_domain.py", "juliet@clinic.example.org")
    for name, section in clinic.items():
        assert "Hello Juliet" not in section and "romeo@" not in section, name
        for kind in payload_sizes(section):
            line = re.search(rf"^{kind}: .*$", section, re.M)
            assert line is not None and "clinic" in line[0], (name, kind)
    verona = checked("by_domain.py", "juliet@example.org")["chat message"]
    assert "last-message-body='Hello Juliet, are you there?'" in verona
    assert '"tenant":"verona"' in re.search(r"^fcm: .*$", verona, re.M)[0]
    elsewhere = checked("by_domain.py", "juliet@elsewhere.example")["chat message"]
    assert "tenant" not in elsewhere and "Hello Juliet" in elsewhere


def test_quiet_hours_from_an_http_service(monkeypatch: pytest.MonkeyPatch) -> None:
    """The recipe asks a local HTTP service (async should_push): quiet users get no pushes
    but calls; others, and everyone when the service is down, get the defaults."""
    asked: list[str] = []

    class Quiet(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            user = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)["user"][0]
            asked.append(user)
            body = json.dumps({"quiet": user == "juliet@example.org"}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("PYMOD_PUSH_QUIET_HOURS_URL",
                           f"http://127.0.0.1:{server.server_port}/quiet")
        quiet = checked("quiet_hours.py", "juliet@example.org", logic_budget=2000)
        assert "decision: no push (without the module: push)" in quiet["chat message"]
        assert "decision: push" in quiet["call (Jingle Message Initiation)"]
        assert asked == ["juliet@example.org"]  # once: the answer is kept
        awake = checked("quiet_hours.py", "nurse@example.org", logic_budget=2000)
        assert "decision: push (without the module: push)" in awake["chat message"]
    finally:
        server.shutdown()
        server.server_close()
    monkeypatch.setenv("PYMOD_PUSH_QUIET_HOURS_URL", f"http://127.0.0.1:{server.server_port}/q")
    down = checked("quiet_hours.py", "romeo@example.org")  # nobody answers: the defaults
    assert "decision: push (without the module: push)" in down["chat message"]


def test_calls_by_sms_through_a_gateway() -> None:
    """The recipe is a provider written in Python: registrations need an E.164 number;
    only urgent pushes (calls) reach the gateway, one per number and minute; a busy gateway
    means a retry."""
    texts: list[dict[str, str]] = []
    statuses = [503]

    class Gateway(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            texts.append(json.loads(self.rfile.read(int(self.headers["content-length"]))))
            self.send_response(statuses.pop() if statuses else 200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Gateway)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    backend = Backend(0, "python", "any", "localhost", "pubsub.localhost", {
        "module": str(COOKBOOK / "missed_calls.py"), "name": "sms",
        "url": f"http://127.0.0.1:{server.server_port}/send", "token": "k"})
    try:
        provider = load_provider(backend)
        assert provider.registration({"phone": "+33 6 12 34 56 78"}) == {"phone": "+33612345678"}
        with pytest.raises(RequestError, match="E.164"):
            provider.registration({"phone": "0612345678"})
        device = PushDevice("juliet@example.org", "phone", "", "any", "n1",
                            {"phone": "+33612345678"})
        call = {"message-count": "1", "last-message-sender": "romeo@example.net/orchard",
                "last-message-priority": "high", "last-message-body": "Incoming call"}

        def deliver(summary: dict[str, str], urgent: bool) -> DeliveryOutcome:
            return asyncio.run(provider.deliver(device, summary, urgent)).outcome

        assert deliver({"message-count": "2"}, False) is DeliveryOutcome.DELIVERED
        assert texts == []  # a message: nothing sent
        assert deliver(call, True) is DeliveryOutcome.RETRY  # the gateway is busy
        assert deliver(call, True) is DeliveryOutcome.DELIVERED
        assert texts == [{"to": "+33612345678", "text": "Call from romeo@example.net on XMPP"}] * 2
        assert deliver(call, True) is DeliveryOutcome.DELIVERED  # again within the minute: no text
        assert len(texts) == 2
    finally:
        server.shutdown()
        server.server_close()
