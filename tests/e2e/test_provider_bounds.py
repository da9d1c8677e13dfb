"""Bounded work per device at the provider edge, end to end (issue 29, rows 3 and 8): a real
ejabberd with the built-in app server, Web Push endpoints of a fake push service on
127.0.0.1 (allowed with endpoint_allow_ips) that answer as each test says, publishes sent
to the pubsub host as a user's server would."""

from __future__ import annotations

import asyncio
import base64
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from slixmpp.exceptions import IqError

from devtools.instance import Instance, free_port
from pymod_push.appserver.server import PUBLISH_BURST
from pymod_push.delivery.dispatcher import MAX_WAITING_PER_DEVICE
from tests.conftest import Scenario
from tests.fake_providers import FakeProvider, LoopbackCA, serve_in_thread
from tests.xmpp_peers import NS_DATA, NS_PUSH, Peers, form_fields

pytestmark = pytest.mark.e2e


@dataclass
class Setup:
    scenario: Scenario
    endpoints: FakeProvider
    base: str  # the fake push service's URL


@pytest.fixture(scope="module")
def setup() -> Iterator[Setup]:
    folder = Path(tempfile.mkdtemp(prefix="pymod_push-bounds-"))
    folder.chmod(0o755)
    ca = LoopbackCA(folder / "tls")
    vapid = ec.generate_private_key(ec.SECP256R1())
    (folder / "vapid.pem").write_bytes(vapid.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    port = free_port()
    instance = Instance(folder, options={
        "endpoint_allow_ips": ["127.0.0.0/8", "::1/128"],
        "backends": [{"type": "webpush", "register_host": "localhost",
                      "pubsub_host": "pubsub.localhost", "cafile": str(ca.cafile),
                      "vapid_private_key_file": str(folder / "vapid.pem"),
                      "vapid_subject": "mailto:admin@localhost"}]})
    instance.write_config()
    endpoints = FakeProvider()
    serve_in_thread(endpoints, ca, port)
    try:
        instance.start()
        yield Setup(Scenario(instance), endpoints, f"https://127.0.0.1:{port}")
    finally:
        instance.discard()
        shutil.rmtree(folder, ignore_errors=True)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


RECEIVER = ec.generate_private_key(ec.SECP256R1())
P256DH = _b64(RECEIVER.public_key().public_bytes(serialization.Encoding.X962,
                                                 serialization.PublicFormat.UncompressedPoint))
AUTH = _b64(b"0123456789abcdef")
NOT_A_KEY = _b64(b"\x04" + b"\x01" * 64)  # base64url, 65 bytes, no point of P-256


async def _register(phone: object, endpoint: str, p256dh: str = P256DH) -> tuple[str, str]:
    """A Web Push device of the phone's account: its node and secret."""
    result = await phone.command(  # type: ignore[attr-defined]
        "localhost", "register-push-webpush", {"endpoint": endpoint, "p256dh": p256dh,
                                               "auth": AUTH, "device-id": endpoint})
    fields = form_fields(result.find(f"{{{NS_DATA}}}x"))
    return fields["node"][0], fields["secret"][0]


def _publish_xml(node: str, secret: str, count: int) -> str:
    return (f"<pubsub xmlns='http://jabber.org/protocol/pubsub'><publish node='{node}'><item>"
            f"<notification xmlns='{NS_PUSH}'><x xmlns='{NS_DATA}' type='submit'>"
            "<field var='FORM_TYPE'><value>urn:xmpp:push:summary</value></field>"
            f"<field var='message-count'><value>{count}</value></field></x></notification>"
            f"</item></publish><publish-options><x xmlns='{NS_DATA}' type='submit'>"
            "<field var='FORM_TYPE'><value>http://jabber.org/protocol/pubsub#publish-options"
            f"</value></field><field var='secret'><value>{secret}</value></field></x>"
            "</publish-options></pubsub>")


def _status(instance: Instance) -> tuple[int, dict[str, int]]:
    """push_status: the pushes deferred by providers, and the Web Push counters."""
    status = instance.ctl("push_status", instance.host)
    deferred = re.search(r"deferred by providers: (\d+) \(at most (\d+) per device\)", status)
    assert deferred is not None, status
    assert int(deferred[2]) == MAX_WAITING_PER_DEVICE
    line = re.search(r"pushes via webpush: ([^;\n]*)", status)
    counters = {} if line is None else {
        name: int(n) for name, n in re.findall(r"(\w+) (\d+)", line[1])}
    return int(deferred[1]), counters


def test_an_endpoint_answering_503_forever_keeps_a_few_pushes_per_device(setup: Setup) -> None:
    """Every publish to a device whose endpoint answers 503 is answered (accepted: queued),
    but at most MAX_WAITING_PER_DEVICE of them wait at the provider, the newest; the others
    are superseded and counted. So it stays across a restart (the next process resumes
    the provider queue)."""
    scenario, instance = setup.scenario, setup.scenario.instance
    setup.endpoints.answers["/sub/busy"] = (503, {})
    publishes = PUBLISH_BURST  # at once; more would be refused by the per-device rate

    async def run(peers: Peers) -> None:
        server, phone, _ = await scenario.cast(peers)
        node, secret = await _register(phone, f"{setup.base}/sub/busy")
        answers = await asyncio.gather(
            *(server.push_iq(_publish_xml(node, secret, n), to="pubsub.localhost")
              for n in range(1, publishes + 1)))
        assert [answer["type"] for answer in answers] == ["result"] * publishes

    deferred_before, counters_before = _status(instance)
    scenario.run(run)
    deferred, counters = _status(instance)
    assert deferred - deferred_before == MAX_WAITING_PER_DEVICE
    superseded = counters.get("superseded", 0) - counters_before.get("superseded", 0)
    assert superseded == publishes - MAX_WAITING_PER_DEVICE
    busy = [r for r in setup.endpoints.received if r.path == "/sub/busy"]
    assert len(busy) >= publishes  # each got its first attempt

    mark = instance.log_mark()
    instance.stop()
    instance.start()
    instance.wait_for_log(r"push\(es\) deferred by providers before the restart are queued "
                          "again", mark)
    assert _status(instance)[0] == deferred


def test_what_no_retry_can_mend_fails_at_once_and_is_not_retried(setup: Setup) -> None:
    """An endpoint answering 408 or 400, and keys no request can be made with: each publish
    gets its error at once, nothing is queued, the endpoint is asked once per publish."""
    scenario, instance = setup.scenario, setup.scenario.instance
    setup.endpoints.answers["/sub/timeout"] = (408, {})
    setup.endpoints.answers["/sub/bad"] = (400, {})
    rounds = 3

    async def run(peers: Peers) -> None:
        server, phone, _ = await scenario.cast(peers)
        devices = [await _register(phone, f"{setup.base}/sub/timeout"),
                   await _register(phone, f"{setup.base}/sub/bad"),
                   await _register(phone, f"{setup.base}/sub/keys", NOT_A_KEY)]
        for n in range(rounds):
            for node, secret in devices:
                with pytest.raises(IqError) as caught:
                    await server.push_iq(_publish_xml(node, secret, n), to="pubsub.localhost")
                assert caught.value.iq["error"]["condition"] == "internal-server-error"

    deferred_before, counters_before = _status(instance)
    setup.endpoints.reset()
    setup.endpoints.answers["/sub/timeout"] = (408, {})
    setup.endpoints.answers["/sub/bad"] = (400, {})
    scenario.run(run)
    deferred, counters = _status(instance)
    assert deferred == deferred_before  # nothing waits: no retry can come
    assert counters["failed"] - counters_before.get("failed", 0) == 3 * rounds
    paths = [r.path for r in setup.endpoints.received]
    assert paths.count("/sub/timeout") == paths.count("/sub/bad") == rounds
    assert "/sub/keys" not in paths


@pytest.mark.parametrize("value", ["\u00b2", "-1", "99999999999999999999",
                                   "Wed, 21 Oct 2015 07:28:00 GMT"])
def test_a_wrong_retry_after_gets_the_default_delay(setup: Setup, value: str) -> None:
    """503 with a Retry-After that is no number of ASCII digits (or a huge one): the push
    is tried again after the default delay (about a second the first time) and delivered;
    never a dead retry (the push stuck until a restart) nor one 600 s later."""
    scenario = setup.scenario
    path = f"/sub/later-{len(value)}"
    setup.endpoints.next_answers[path] = [(503, {"retry-after": value})]

    async def run(peers: Peers) -> None:
        server, phone, _ = await scenario.cast(peers)
        node, secret = await _register(phone, f"{setup.base}{path}")
        await server.push_iq(_publish_xml(node, secret, 1), to="pubsub.localhost")
        deadline = time.monotonic() + 30
        while [r.status for r in setup.endpoints.received if r.path == path] != [503, 200]:
            assert time.monotonic() < deadline, "not retried"
            await setup.endpoints.wait_for(len(setup.endpoints.received) + 1,
                                           timeout=max(0.1, deadline - time.monotonic()))

    scenario.run(run)
