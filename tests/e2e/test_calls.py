"""Calls end to end on a real ejabberd: a stale proposal is a missed call (never urgent), and a
call that ends before it is answered (retracted by the caller, answered on another of the
callee's devices) stops exactly the devices its urgent push reached, with one push each: APNs
(background, never VoIP), FCM (a data message) and an external XEP-0357 app server (the
summary's call-ended field)."""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from devtools.instance import Instance, free_port
from tests.conftest import Scenario
from tests.fake_providers import (
    FakeProvider,
    LoopbackCA,
    Received,
    fake_apns,
    fcm_check,
    serve_in_thread,
)
from tests.xmpp_peers import (
    BODIES,
    NS_DATA,
    PROPOSE,
    TIMEOUT,
    AppServer,
    Client,
    Peers,
    Publish,
    form_fields,
    round_trip,
    send,
)

pytestmark = pytest.mark.e2e

TOPIC = "org.example.calls"
APNS_TOKEN = "ab" * 32
VOIP_TOKEN = "cd" * 32
FCM_TOKEN = "fcm-calls-token"
PUBSUB = "pubsub.localhost"
CARBONS = "<enable xmlns='urn:xmpp:carbons:2'/>"


def jmi(action: str, sid: str) -> str:
    return f"<{action} xmlns='urn:xmpp:jingle-message:0' id='{sid}'/>"


@dataclass
class Setup:
    scenario: Scenario
    apns: FakeProvider
    fcm: FakeProvider


@pytest.fixture(scope="module")
def setup() -> Iterator[Setup]:
    folder = Path(tempfile.mkdtemp(prefix="pymod_push-calls-"))
    folder.chmod(0o755)
    apns, apns_backend = fake_apns(folder, "callapp", TOPIC)
    fcm_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    fcm_port = free_port()
    email = "push@fake-project.iam.gserviceaccount.com"
    account = folder / "service-account.json"
    account.write_text(json.dumps({
        "type": "service_account", "project_id": "fake-project", "client_email": email,
        "private_key": fcm_key.private_bytes(serialization.Encoding.PEM,
                                             serialization.PrivateFormat.PKCS8,
                                             serialization.NoEncryption()).decode(),
        "token_uri": f"https://127.0.0.1:{fcm_port}/token"}))
    account.chmod(0o644)
    fcm = FakeProvider(fcm_check(fcm_key.public_key(), email, "fake-project", fcm_port))
    fcm_ca = LoopbackCA(folder / "tls-fcm")
    serve_in_thread(fcm, fcm_ca, fcm_port)
    instance = Instance(folder, options={"backends": [
        {**apns_backend, "voip_topic": f"{TOPIC}.voip"},
        {"type": "fcm", "app_name": "callapp", "register_host": "localhost",
         "pubsub_host": PUBSUB, "service_account_file": str(account),
         "endpoint": f"https://127.0.0.1:{fcm_port}", "cafile": str(fcm_ca.cafile)}]})
    instance.write_config()
    try:
        instance.start()
        yield Setup(Scenario(instance), apns, fcm)
    finally:
        instance.discard()
        shutil.rmtree(folder, ignore_errors=True)


@dataclass
class Callee:
    """One user's devices: an iPhone (APNs with a VoIP token), an Android phone (FCM), a
    client of an external app server (XEP-0357), all pending; a desktop online."""

    iphone: Client
    android: Client
    xep: Client
    desktop: Client
    app: AppServer
    caller: Client


async def _register(client: Client, command: str, fields: dict[str, str]) -> None:
    result = await client.command("localhost", command, fields)
    values = form_fields(result.find(f"{{{NS_DATA}}}x"))
    await client.enable_push(PUBSUB, values["node"][0], secret=values["secret"][0])


async def _callee(setup: Setup, peers: Peers) -> Callee:
    scenario = setup.scenario
    app, iphone, caller = await scenario.cast(peers)
    password = "secret-" + iphone.boundjid.user
    android = await peers.user(iphone.boundjid.bare, password)
    xep = await peers.user(iphone.boundjid.bare, password)
    desktop = await peers.user(iphone.boundjid.bare, password)
    for client in (iphone, android, xep, desktop):
        await client.push_iq(CARBONS)
    await _register(iphone, "register-push-apns", {"token": APNS_TOKEN,
                                                   "voip-token": VOIP_TOKEN})
    await _register(android, "register-push-fcm", {"token": FCM_TOKEN})
    await xep.enable_push(app.boundjid.full, "xep", options=BODIES)
    for client in (iphone, android, xep):
        await scenario.go_pending(client)
    return Callee(iphone, android, xep, desktop, app, caller)


async def _fcm_sends(fcm: FakeProvider, count: int) -> list[Received]:
    """The FCM messages (the OAuth token requests left out), once count have come."""
    deadline = asyncio.get_running_loop().time() + TIMEOUT
    while True:
        sends = [r for r in fcm.received if r.path != "/token"]
        if len(sends) >= count:
            return sends
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError(f"{len(sends)} FCM messages, waited for {count}")
        await fcm.wait_for(len(fcm.received) + 1, timeout=TIMEOUT)


def _ended(publish: Publish) -> str | None:
    return publish.summary.get("call-ended")


async def _ring(setup: Setup, callee: Callee, sid: str) -> None:
    """The caller proposes a call: each pending device gets one urgent push."""
    send(callee.caller, callee.iphone.boundjid.bare, payload=PROPOSE.format(id=sid))
    (voip,) = await setup.apns.wait_for(1)
    assert voip.path == f"/3/device/{VOIP_TOKEN}" and voip.headers["apns-push-type"] == "voip"
    (android,) = await _fcm_sends(setup.fcm, 1)
    assert android.json()["message"]["android"]["priority"] == "high"
    (xep,) = await callee.app.wait_for("xep", 1)
    assert xep.summary["last-message-priority"] == "high"


async def _stopped(setup: Setup, callee: Callee, reason: str, sid: str,
                   late: Client | None = None) -> None:
    """Each device that rang got exactly one push that stops it, none VoIP: the caller's next
    message, which pushes to every device after whatever the call's end caused, shows that
    no second one came; the device that did not ring (late) got only that message."""
    requests = await setup.apns.wait_for(2)
    stop = requests[1]
    assert stop.path == f"/3/device/{APNS_TOKEN}" and not stop.refused
    assert (stop.headers["apns-push-type"], stop.headers["apns-priority"]) == ("background", "5")
    assert stop.headers["apns-topic"] == TOPIC
    assert stop.json() == {"aps": {"content-available": 1}, "call-ended": reason,
                           "call-sid": sid}
    sends = await _fcm_sends(setup.fcm, 2)
    message = sends[1].json()["message"]
    assert message["data"] == {"call-ended": reason, "call-sid": sid}
    assert message["android"]["priority"] == "normal" and message["android"]["ttl"] == "60s"
    publishes = await callee.app.wait_for("xep", 2)
    assert publishes[1].summary["call-ended"] == reason
    assert publishes[1].summary["call-sid"] == sid
    assert "last-message-priority" not in publishes[1].summary
    # the barrier: an ordinary message to every device
    send(callee.caller, callee.iphone.boundjid.bare, "are you there?")
    requests = await setup.apns.wait_for(3)
    await _fcm_sends(setup.fcm, 3)
    publishes = await callee.app.wait_for("xep", 3)
    assert [_ended(p) for p in publishes] == [None, reason, None]
    assert ["call-ended" in r.body.decode() for r in requests] == [False, True, False]
    assert ["call-ended" in r.body.decode()
            for r in setup.fcm.received if r.path != "/token"] == [False, True, False]
    if late is not None:
        (only,) = await callee.app.wait_for("late", 1)
        assert "call-ended" not in only.summary and only.summary["message-count"] == "1"
    assert len(setup.apns.received) == 3 and len(callee.app.received["xep"]) == 3


def test_a_retracted_call_stops_the_devices_that_rang_once(setup: Setup) -> None:
    setup.apns.reset()
    setup.fcm.reset()

    async def run(peers: Peers) -> None:
        callee = await _callee(setup, peers)
        await _ring(setup, callee, "call-r1")
        # The desktop was online when the call rang (no push): it goes away with push now.
        await callee.desktop.enable_push(callee.app.boundjid.full, "late", options=BODIES)
        await setup.scenario.go_pending(callee.desktop)
        send(callee.caller, callee.iphone.boundjid.bare, payload=jmi("retract", "call-r1"))
        await _stopped(setup, callee, "retracted", "call-r1", late=callee.desktop)

    setup.scenario.run(run)


def test_a_call_answered_on_another_device_stops_the_others(setup: Setup) -> None:
    setup.apns.reset()
    setup.fcm.reset()

    async def run(peers: Peers) -> None:
        callee = await _callee(setup, peers)
        await _ring(setup, callee, "call-a1")
        # The desktop answers: <proceed/> to the caller, its sent carbon to the pending
        # sessions (then Conversations' <accept/> to its own bare JID: nothing more).
        message = callee.desktop.make_message(mto=callee.caller.boundjid.full, mtype="chat")
        message.append(ET.fromstring(jmi("proceed", "call-a1")))
        message.send()
        accept = callee.desktop.make_message(mto=callee.desktop.boundjid.bare, mtype="chat")
        accept.append(ET.fromstring(jmi("accept", "call-a1")))
        accept.send()
        await round_trip(callee.desktop)
        await _stopped(setup, callee, "answered-elsewhere", "call-a1")

    setup.scenario.run(run)


def test_a_stale_proposal_is_a_missed_call_never_urgent(setup: Setup) -> None:
    setup.apns.reset()
    setup.fcm.reset()

    async def run(peers: Peers) -> None:
        callee = await _callee(setup, peers)
        # re-sent late, as ejabberd does after a stream-management timeout ('Resent')
        stale = callee.caller.make_message(mto=callee.iphone.boundjid.bare, mtype="chat")
        stale.append(ET.fromstring(PROPOSE.format(id="call-s1")))
        stale.append(ET.fromstring("<delay xmlns='urn:xmpp:delay' from='localhost' "
                                   "stamp='2020-01-01T00:00:00Z'>Resent</delay>"))
        stale.send()
        (push,) = await callee.app.wait_for("xep", 1)
        assert "last-message-priority" not in push.summary
        assert push.summary["call-missed"] == "call-s1"
        (apns,) = await setup.apns.wait_for(1)
        assert apns.path == f"/3/device/{APNS_TOKEN}"  # not the VoIP token
        assert apns.headers["apns-push-type"] == "alert"
        assert "interruption-level" not in apns.json()["aps"]
        (android,) = await _fcm_sends(setup.fcm, 1)
        assert android.json()["message"]["android"]["priority"] == "normal"
        assert android.json()["message"]["data"]["call-missed"] == "call-s1"
        # it rang nowhere: its retract stops nothing (the next message shows it)
        send(callee.caller, callee.iphone.boundjid.bare, payload=jmi("retract", "call-s1"))
        send(callee.caller, callee.iphone.boundjid.bare, "call me")
        publishes = await callee.app.wait_for("xep", 2)
        assert "call-ended" not in publishes[1].summary
        assert publishes[1].summary["message-count"] == "2"
        assert len(await setup.apns.wait_for(2)) == 2

    setup.scenario.run(run)


def test_a_call_answered_on_another_device_stops_devices_without_a_session(
        setup: Setup) -> None:
    """The phones had no session (the app was killed): the call reached them from offline
    storage; the one that answers connects and sends <proceed/>, which no carbon brings to the
    others: its copy in the archive (sent) does."""
    setup.apns.reset()

    async def run(peers: Peers) -> None:
        app, iphone, caller = await setup.scenario.cast(peers)
        password = "secret-" + iphone.boundjid.user
        xep = await peers.user(iphone.boundjid.bare, password)
        await _register(iphone, "register-push-apns", {"token": APNS_TOKEN,
                                                       "voip-token": VOIP_TOKEN})
        await xep.enable_push(app.boundjid.full, "xep")
        await iphone.go_offline()
        await xep.go_offline()
        send(caller, iphone.boundjid.bare, payload=PROPOSE.format(id="call-o1"))
        (voip,) = await setup.apns.wait_for(1)
        assert voip.path == f"/3/device/{VOIP_TOKEN}"
        (urgent,) = await app.wait_for("xep", 1)
        assert urgent.summary["last-message-priority"] == "high"
        desktop = await peers.user(iphone.boundjid.bare, password)
        # the test server's mod_mam archives nothing by default (ejabberd's default: never)
        await desktop.push_iq("<prefs xmlns='urn:xmpp:mam:2' default='always'/>")
        answer = desktop.make_message(mto=caller.boundjid.full, mtype="chat")
        answer.append(ET.fromstring(jmi("proceed", "call-o1")))
        answer.append(ET.fromstring("<store xmlns='urn:xmpp:hints'/>"))
        answer.send()
        await round_trip(desktop)
        stop = (await setup.apns.wait_for(2))[1]
        assert (stop.path, stop.headers["apns-push-type"]) == (f"/3/device/{APNS_TOKEN}",
                                                               "background")
        assert stop.json()["call-ended"] == "answered-elsewhere"
        publishes = await app.wait_for("xep", 2)
        assert publishes[1].summary["call-ended"] == "answered-elsewhere"
        # the barrier: the desktop logs out, a message reaches both offline devices
        await desktop.go_offline()
        send(caller, iphone.boundjid.bare, "talk later")
        requests = await setup.apns.wait_for(3)
        publishes = await app.wait_for("xep", 3)
        assert ["call-ended" in r.body.decode() for r in requests] == [False, True, False]
        assert [_ended(p) for p in publishes] == [None, "answered-elsewhere", None]

    setup.scenario.run(run)
