"""Providers written in Python end to end (issue 16 item 1): examples/webhook_provider.py as a
backend of a real ejabberd, devices registered by ad-hoc command, a local HTTP webhook
receiving the JSON; retries (also across a SIGKILL of Python), a gone channel, a reload."""

from __future__ import annotations

import asyncio
import http.server
import json
import os
import re
import shutil
import signal
import tempfile
import threading
import xml.etree.ElementTree as ET
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from slixmpp.exceptions import IqError

from devtools.instance import Instance
from tests.conftest import Scenario
from tests.xmpp_peers import NS_DATA, PROPOSE, Client, Peers, form_fields

pytestmark = pytest.mark.e2e

EXAMPLE = Path(__file__).resolve().parent.parent.parent / "examples" / "webhook_provider.py"
TOKEN = "webhook-bearer-4d8f2a"  # the backend's own option: never in the log
TIMEOUT = 30.0


class Webhook(http.server.ThreadingHTTPServer):
    """Records each POST; answers with the next queued (status, headers), else 200."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.received: list[tuple[int, dict[str, str], dict[str, Any]]] = []
        self.answers: deque[tuple[int, dict[str, str]]] = deque()
        self.changed = threading.Condition()

    def answer(self) -> tuple[int, dict[str, str]]:
        with self.changed:
            return self.answers.popleft() if self.answers else (200, {})

    def record(self, status: int, headers: dict[str, str], body: dict[str, Any]) -> None:
        with self.changed:
            self.received.append((status, headers, body))
            self.changed.notify_all()

    async def wait_for(self, count: int, channel: str) -> list[tuple[int, dict[str, Any]]]:
        """The first ``count`` requests for ``channel``: (status answered, JSON)."""
        def wait() -> list[tuple[int, dict[str, Any]]]:
            with self.changed:
                self.changed.wait_for(lambda: len(self.of(channel)) >= count, TIMEOUT)
                return self.of(channel)
        found = await asyncio.to_thread(wait)
        assert len(found) >= count, found
        return found

    def of(self, channel: str) -> list[tuple[int, dict[str, Any]]]:
        return [(status, body) for status, _, body in self.received
                if body.get("channel") == channel]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/hook"


class _Handler(http.server.BaseHTTPRequestHandler):
    server: Webhook

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        status, headers = self.server.answer()
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("content-length", "0")
        self.end_headers()
        self.server.record(status, {k.lower(): v for k, v in self.headers.items()}, body)

    def log_message(self, *args: object) -> None:
        pass


@dataclass
class Setup:
    scenario: Scenario
    webhook: Webhook
    editable: Path  # the second backend's module, a copy that a test edits


@pytest.fixture(scope="module")
def setup() -> Iterator[Setup]:
    folder = Path(tempfile.mkdtemp(prefix="pymod_push-pyprovider-"))
    folder.chmod(0o755)
    editable = folder / "editable_hook.py"
    shutil.copy(EXAMPLE, editable)
    editable.chmod(0o644)
    webhook = Webhook()
    threading.Thread(target=webhook.serve_forever, daemon=True).start()
    common = {"type": "python", "register_host": "localhost", "pubsub_host": "pubsub.localhost",
              "url": webhook.url}
    instance = Instance(folder, options={
        "include_message_bodies": True, "include_senders": True,
        "backends": [{**common, "module": str(EXAMPLE), "name": "webhook", "token": TOKEN},
                     {**common, "module": str(editable)}]})
    instance.write_config()
    try:
        instance.start()
        yield Setup(Scenario(instance), webhook, editable)
    finally:
        instance.discard()
        webhook.shutdown()
        shutil.rmtree(folder, ignore_errors=True)


async def _registered(phone: Client, channel: str, command: str = "register-push-webhook"
                      ) -> tuple[str, str]:
    result = await phone.command("localhost", command, {"channel": channel,
                                                        "device-name": "Phone"})
    assert result.get("status") == "completed"
    fields = form_fields(result.find(f"{{{NS_DATA}}}x"))
    assert fields["jid"] == ["pubsub.localhost"]
    return fields["node"][0], fields["secret"][0]


async def _pending_with(setup: Setup, peers: Peers, channel: str,
                        command: str = "register-push-webhook") -> tuple[Client, Client]:
    _, phone, sender = await setup.scenario.cast(peers)
    node, secret = await _registered(phone, channel, command)
    await phone.enable_push("pubsub.localhost", node, secret=secret)
    await setup.scenario.go_pending(phone)
    return phone, sender


def test_the_example_webhook_gets_each_notification(setup: Setup) -> None:
    instance = setup.scenario.instance

    async def run(peers: Peers) -> None:
        _, phone, sender = await setup.scenario.cast(peers)
        # A client that asks first gets the form with the module's declared field.
        form = (await phone.command("localhost", "register-push-webhook")).find(
            f"{{{NS_DATA}}}x")
        assert form is not None
        labels = {f.get("var"): f.get("label") for f in form.findall(f"{{{NS_DATA}}}field")}
        assert labels["channel"] == "Where the webhook takes this device's notifications"
        assert {"device-id", "device-name"} <= set(labels)
        items = await phone.plugin["xep_0030"].get_items(
            jid="localhost", node="http://jabber.org/protocol/commands")
        assert {"register-push-webhook", "register-push-editable_hook"} <= {
            node for _, node, _ in items["disco_items"]["items"]}
        for fields, text in [({"device-name": "x"}, "field 'channel' is required"),
                             ({"channel": "c" * 300}, "longer than 256 characters")]:
            with pytest.raises(IqError) as caught:
                await phone.command("localhost", "register-push-webhook", fields)
            assert caught.value.iq["error"]["condition"] == "bad-request"
            assert text in caught.value.iq["error"]["text"]

        node, secret = await _registered(phone, "chan-hello")
        await phone.enable_push("pubsub.localhost", node, secret=secret)
        await setup.scenario.go_pending(phone)
        sender.send_message(mto=phone.boundjid.full, mbody="hello webhook", mtype="chat")
        ((status, body),) = await setup.webhook.wait_for(1, "chan-hello")
        assert status == 200
        assert body["user"] == phone.boundjid.bare and body["device"] == phone.boundjid.resource
        assert body["title"] == sender.boundjid.bare and body["text"] == "hello webhook"
        assert body["urgent"] is False and body["summary"]["message-count"] == "1"
        headers = setup.webhook.received[-1][1]
        assert headers["authorization"] == f"Bearer {TOKEN}"
        # A call is urgent.
        call = sender.make_message(mto=phone.boundjid.full, mtype="chat")
        call.append(ET.fromstring(PROPOSE.format(id="call-1")))
        call.send()
        (_, (status, body)) = await setup.webhook.wait_for(2, "chan-hello")
        assert body["urgent"] is True and body["text"] == "Incoming call"
        status_text = await asyncio.to_thread(instance.ctl, "push_status", "localhost")
        assert re.search(r"pushes via webhook: .*delivered \d", status_text), status_text
        log = instance.log_file.read_text(errors="replace")
        for secret_text in (TOKEN, "chan-hello", "hello webhook", secret):
            assert secret_text not in log

    setup.scenario.run(run)


def test_a_busy_webhook_is_retried_and_survives_a_sigkill_of_python(setup: Setup) -> None:
    """503 first: the push waits in the provider queue; Python is SIGKILLed right then; the
    next process sends it again, and it is delivered exactly once."""
    instance = setup.scenario.instance

    async def run(peers: Peers) -> None:
        phone, sender = await _pending_with(setup, peers, "chan-busy")
        setup.webhook.answers.append((503, {"retry-after": "2"}))
        sender.send_message(mto=phone.boundjid.full, mbody="busy at first", mtype="chat")
        ((status, _),) = await setup.webhook.wait_for(1, "chan-busy")
        assert status == 503
        await asyncio.to_thread(instance.wait_for_log, "push to .* deferred")
        pid = int(re.search(r"pid (\d+)", await asyncio.to_thread(  # type: ignore[union-attr]
            instance.ctl, "push_status", "localhost")).group(1))
        mark = instance.log_mark()
        os.kill(pid, signal.SIGKILL)
        await asyncio.to_thread(instance.wait_for_log, "ready for localhost", mark)
        found = await setup.webhook.wait_for(2, "chan-busy")
        assert [s for s, _ in found[:2]] == [503, 200]
        assert found[1][1]["text"] == "busy at first"
        # Nothing more of it comes: the next message is the next request.
        sender.send_message(mto=phone.boundjid.full, mbody="next one", mtype="chat")
        found = await setup.webhook.wait_for(3, "chan-busy")
        assert [body["text"] for _, body in found] == ["busy at first", "busy at first",
                                                      "next one"]

    setup.scenario.run(run)


def test_a_gone_channel_unregisters_the_device(setup: Setup) -> None:
    instance = setup.scenario.instance

    async def run(peers: Peers) -> None:
        phone, sender = await _pending_with(setup, peers, "chan-gone")
        user, host = phone.boundjid.user, phone.boundjid.domain
        assert "device " in await asyncio.to_thread(instance.ctl, "push_list", user, host)
        mark = instance.log_mark()
        setup.webhook.answers.append((410, {}))
        sender.send_message(mto=phone.boundjid.full, mbody="to nowhere", mtype="chat")
        ((status, _),) = await setup.webhook.wait_for(1, "chan-gone")
        assert status == 410
        await asyncio.to_thread(instance.wait_for_log, "says .* is gone .*registration removed",
                                mark)
        listed = await asyncio.to_thread(instance.ctl, "push_list", user, host)
        assert not re.search(r"^device ", listed, re.MULTILINE), listed

    setup.scenario.run(run)


def test_reloading_a_python_provider_without_a_restart(setup: Setup) -> None:
    instance = setup.scenario.instance
    original = setup.editable.read_text()

    async def run(peers: Peers) -> None:
        phone, sender = await _pending_with(setup, peers, "chan-edit",
                                            "register-push-editable_hook")
        sender.send_message(mto=phone.boundjid.full, mbody="before", mtype="chat")
        ((_, body),) = await setup.webhook.wait_for(1, "chan-edit")
        assert "edited" not in body
        setup.editable.write_text(original.replace('"urgent": notification.urgent,',
                                                   '"urgent": notification.urgent, '
                                                   '"edited": True,'))
        answer = await asyncio.to_thread(instance.ctl, "push_reload_logic", "localhost")
        assert answer.strip() == "python providers reloaded: webhook, editable_hook"
        sender.send_message(mto=phone.boundjid.full, mbody="after", mtype="chat")
        found = await setup.webhook.wait_for(2, "chan-edit")
        assert found[1][1]["edited"] is True
        for broken, reason in [("async def send(:\n", "does not import (SyntaxError"),
                               ("def send(device, notification):\n    pass\n",
                                "has no 'async def send")]:
            setup.editable.write_text(broken)
            mark = instance.log_mark()
            answer = await asyncio.to_thread(instance.ctl, "push_reload_logic", "localhost",
                                             check=False)
            assert answer.startswith("error: push logic not reloaded: python provider "
                                     "editable_hook: "), answer
            assert reason in answer and "the running one stays" in answer
            await asyncio.to_thread(instance.wait_for_log, "not reloaded: .*" + re.escape(
                reason), mark)
        sender.send_message(mto=phone.boundjid.full, mbody="still edited", mtype="chat")
        found = await setup.webhook.wait_for(3, "chan-edit")
        assert found[2][1]["edited"] is True and found[2][1]["text"] == "still edited"

    try:
        setup.scenario.run(run)
    finally:
        setup.editable.write_text(original)
