"""Calls: a stale proposal is a missed call, and a call's end stops exactly the devices that
rang (core/calls.py, service/calls.py, PushService)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from pymod_push.core import calls
from pymod_push.core.calls import CallEnd, call_end, is_stale, parse_stamp, sent_at
from pymod_push.protocol import Offline, Publish, Stanza, StanzaToPending
from pymod_push.providers.apns import Apns
from pymod_push.providers.fcm import Fcm
from pymod_push.service.calls import RingingCalls
from pymod_push.service.decisions import PushService
from tests.builders import (
    ALICE,
    APP,
    NOW,
    PHONE,
    SENDER,
    device,
    enable_xml,
    fields,
    make_service,
    message,
    push_iq,
)
from tests.unit.test_providers import backend, pem

pytestmark = pytest.mark.usefixtures("database")

TABLET = (*ALICE, "tablet")
LAPTOP = (*ALICE, "laptop")
OWN = "alice@example.org"
PROPOSE = ("<propose xmlns='urn:xmpp:jingle-message:0' id='{sid}'>"
           "<description xmlns='urn:xmpp:jingle:apps:rtp:1' media='audio'/></propose>")


def jmi(action: str, sid: str = "call1") -> str:
    return f"<{action} xmlns='urn:xmpp:jingle-message:0' id='{sid}'/>"


def delay(stamp: str) -> str:
    return f"<delay xmlns='urn:xmpp:delay' from='example.org' stamp='{stamp}'>Resent</delay>"


def sent_carbon(inner: str, to: str = SENDER, stanza_id: str = "c1") -> Stanza:
    """The sent carbon of what the user's laptop sent (to the caller)."""
    xml = (f"<message xmlns='jabber:client' from='{OWN}' to='{OWN}/phone' type='chat' "
           f"id='{stanza_id}'><sent xmlns='urn:xmpp:carbons:2'>"
           f"<forwarded xmlns='urn:xmpp:forward:0'><message xmlns='jabber:client' "
           f"from='{OWN}/laptop' to='{to}' type='chat' id='x'>{inner}</message></forwarded>"
           f"</sent></message>")
    return Stanza("message", OWN, stanza_id, "chat", "", xml.encode())


# --------------------------------------------------------------------- pure decisions

def test_a_stamp_is_ascii_digits_only() -> None:
    assert parse_stamp("2026-01-01T00:00:00Z") == 1767225600.0
    assert parse_stamp("2026-01-01T00:00:0\u00b2Z") is None  # a superscript two
    assert parse_stamp("\u0662026-01-01T00:00:00Z") is None  # an Arabic-Indic two


def test_age_is_from_the_oldest_delay_stamp_else_arrival() -> None:
    at = 1_700_000_000.0  # 2023-11-14T22:13:20Z
    assert sent_at(message(extra=PROPOSE).xml, at) == at
    old = message(extra=PROPOSE + delay("2023-11-14T22:10:00Z")).xml
    assert sent_at(old, at) == at - 200
    assert is_stale(old, at, 60) and not is_stale(old, at, 300)
    # offline storage's stamp and the resend's: the oldest counts
    both = message(extra=delay("2023-11-14T22:13:00.5Z") + delay("2023-11-14T22:12:00Z")).xml
    assert sent_at(both, at) == at - 80
    # a stamp in the future, without a zone, or no date: arrival
    for stamp in ("2030-01-01T00:00:00Z", "2023-11-14T22:10:00", "yesterday"):
        assert sent_at(message(extra=PROPOSE + delay(stamp)).xml, at) == at, stamp
    # a delay inside another element (forwarded) is not the message's own
    nested = message(extra=f"<x xmlns='urn:example'>{delay('2023-11-14T22:10:00Z')}</x>").xml
    assert sent_at(nested, at) == at


@pytest.mark.parametrize(("stanza", "expected"), [
    (message(body="", extra=jmi("retract")), CallEnd("call1", "bob@example.org", "retracted")),
    (message(body="", extra=jmi("reject")), CallEnd("call1", "bob@example.org", "rejected")),
    (message(body="", extra=jmi("finish")), CallEnd("call1", "bob@example.org", "finished")),
    (message(body="", extra=jmi("proceed")), None),  # the caller does not proceed
    (message(body="", extra=jmi("retract"), stanza_type="groupchat"), None),
    (message(body="", extra=jmi("retract") + "<x xmlns='http://jabber.org/protocol/muc#user'/>"),
     None),
    (message(body="", extra=jmi("retract", sid="")), None),
    (sent_carbon(jmi("proceed")), CallEnd("call1", "", "answered-elsewhere")),
    (sent_carbon(jmi("accept")), CallEnd("call1", "", "answered-elsewhere")),
    (sent_carbon(jmi("reject")), CallEnd("call1", "", "declined-elsewhere")),
    (sent_carbon(jmi("retract")), None),  # the user hung up their own call
    (sent_carbon("<body>hi</body>"), None),
    # Conversations' <accept/> to its own bare JID, straight from the answering device
    (message(body="", sender=f"{OWN}/laptop", extra=jmi("accept")),
     CallEnd("call1", "", "answered-elsewhere")),
    # someone else's "carbon" is not the user's: a plain message from its sender
    (Stanza("message", "mallory@example.net", "c1", "chat", "",
            sent_carbon(jmi("proceed")).xml.replace(b"from='alice@example.org'",
                                                     b"from='mallory@example.net'")), None),
])
def test_what_ends_a_call(stanza: Stanza, expected: CallEnd | None) -> None:
    assert call_end(stanza, ALICE) == expected


def test_the_received_carbon_of_a_retract_is_the_callers() -> None:
    inner = (f"<message xmlns='jabber:client' from='{SENDER}' to='{OWN}/laptop' type='chat' "
             f"id='r'>{jmi('retract')}</message>")
    xml = (f"<message xmlns='jabber:client' from='{OWN}' to='{OWN}/phone' type='chat' id='c'>"
           f"<received xmlns='urn:xmpp:carbons:2'><forwarded xmlns='urn:xmpp:forward:0'>"
           f"{inner}</forwarded></received></message>")
    stanza = Stanza("message", OWN, "c", "chat", "", xml.encode())
    assert call_end(stanza, ALICE) == CallEnd("call1", "bob@example.org", "retracted")


def test_ringing_calls_are_bounded_and_expire() -> None:
    ringing = RingingCalls(limit=2)
    device = ("alice", "example.org", APP, "n1")
    for sid in ("a", "b", "c"):
        ringing.rang(ALICE, sid, "bob@example.org", device, NOW + 60, NOW)
    assert len(ringing) == 2  # the oldest forgotten
    assert ringing.ended(ALICE, CallEnd("a", "bob@example.org", "retracted"), NOW) == set()
    assert ringing.ended(ALICE, CallEnd("b", "eve@example.org", "retracted"), NOW) == set()
    assert ringing.ended(ALICE, CallEnd("b", "", "answered-elsewhere"), NOW) == {device}
    assert ringing.ended(ALICE, CallEnd("b", "", "answered-elsewhere"), NOW) == set()  # once
    assert ringing.ended(ALICE, CallEnd("c", "bob@example.org", "retracted"), NOW + 60) == set()
    assert len(ringing) == 0
    ringing.rang(ALICE, "d", "bob@example.org", device, NOW, NOW)  # its window is over
    assert len(ringing) == 0


# ------------------------------------------------------------------ the push service

def _two_ringing_devices(**options: object) -> PushService:
    """Alice's phone and tablet pending with push, a call from Bob rang on both; her laptop
    enables push afterwards (it did not ring)."""
    service = make_service(**options)
    service.handle(push_iq(enable_xml("phone-node")), NOW)
    service.handle(push_iq(enable_xml("tablet-node"), sender=TABLET), NOW)
    propose = message(body="", extra=PROPOSE.format(sid="call1"), stanza_id="p1")
    urgent = [*service.handle(StanzaToPending(PHONE, propose), NOW),
              *service.handle(StanzaToPending(TABLET, propose), NOW)]
    assert [fields(p)["last-message-priority"] for p in urgent] == ["high", "high"]
    service.handle(push_iq(enable_xml("laptop-node"), sender=LAPTOP), NOW + 1)
    return service


def nodes(actions: object) -> list[str]:
    assert isinstance(actions, list) and all(isinstance(a, Publish) for a in actions)
    return sorted(a.node for a in actions)


def test_a_retract_stops_each_device_that_rang_once() -> None:
    service = _two_ringing_devices()
    retract = message(body="", extra=jmi("retract"), stanza_id="r1")
    stops = service.handle(StanzaToPending(PHONE, retract), NOW + 10)
    assert nodes(stops) == ["phone-node", "tablet-node"]  # not the laptop's
    for stop in stops:
        assert fields(stop) == {"FORM_TYPE": "urn:xmpp:push:summary",
                                "call-ended": "retracted", "call-sid": "call1"}
    # the same retract to the tablet's and the laptop's sessions, and offline: nothing more
    assert service.handle(StanzaToPending(TABLET, retract), NOW + 10) == []
    assert service.handle(StanzaToPending(LAPTOP, retract), NOW + 10) == []
    assert service.handle(Offline(ALICE, retract, "offline"), NOW + 11) == []


def test_answered_on_another_device_stops_the_others() -> None:
    service = _two_ringing_devices(notify_on="all")
    stops = service.handle(StanzaToPending(PHONE, sent_carbon(jmi("proceed"))), NOW + 5)
    assert nodes(stops) == ["phone-node", "tablet-node"]
    assert {fields(s)["call-ended"] for s in stops} == {"answered-elsewhere"}
    # CV's <accept/> to its own bare JID afterwards: the call is no longer ringing
    accept = message(body="", sender=f"{OWN}/laptop", extra=jmi("accept"), stanza_id="a1")
    assert service.handle(StanzaToPending(TABLET, accept), NOW + 5) == []


def test_no_stop_push_from_someone_else_or_after_the_window() -> None:
    service = _two_ringing_devices()
    other = message(body="", sender="eve@example.org/x", extra=jmi("retract"), stanza_id="e")
    assert service.handle(StanzaToPending(PHONE, other), NOW + 5) == []
    late = message(body="", extra=jmi("retract"), stanza_id="r1")
    assert service.handle(StanzaToPending(PHONE, late), NOW + 61) == []


def test_a_stale_proposal_is_a_missed_call_never_urgent() -> None:
    service = make_service(include_message_bodies=True, include_senders=True)
    service.handle(push_iq(enable_xml("phone-node")), NOW)
    stamp = "1970-01-12T13:45:00Z"  # NOW - 100 s
    assert calls.parse_stamp(stamp) == NOW - 100
    stale = message(body="", extra=PROPOSE.format(sid="old1") + delay(stamp))
    (push,) = service.handle(Offline(ALICE, stale, "offline"), NOW)
    assert fields(push) == {"FORM_TYPE": "urn:xmpp:push:summary", "message-count": "1",
                            "pending-subscription-count": "0",
                            "last-message-sender": SENDER, "last-message-body": "Missed call",
                            "call-missed": "old1"}
    # it rang nowhere: its retract stops nothing
    retract = message(body="", extra=jmi("retract", "old1"), stanza_id="r1")
    assert service.handle(Offline(ALICE, retract, "offline"), NOW + 1) == []
    # within the window (59 s old, a shorter window option makes it stale)
    fresh = message(body="", extra=PROPOSE.format(sid="new1") + delay("1970-01-12T13:45:41Z"),
                    stanza_id="p2")
    (push,) = service.handle(Offline(ALICE, fresh, "offline"), NOW)
    assert fields(push)["last-message-priority"] == "high"
    short = make_service(call_ring_window_ms=30_000)
    short.handle(push_iq(enable_xml("phone-node")), NOW)
    (push,) = short.handle(Offline(ALICE, fresh, "offline"), NOW)
    assert "last-message-priority" not in fields(push) and fields(push)["call-missed"] == "new1"


# ------------------------------------------------------------ the built-in app server

ENDED = {"FORM_TYPE": "urn:xmpp:push:summary", "call-ended": "retracted", "call-sid": "call1"}


@pytest.mark.parametrize("alert_option", ["", "true"])
def test_apns_stops_ringing_with_a_background_push_never_voip(tmp_path: Path,
                                                              alert_option: str) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    (tmp_path / "key.p8").write_bytes(pem(key))
    options = {"call_end_alert": alert_option} if alert_option else {}
    provider = Apns(backend("apns", key_file=str(tmp_path / "key.p8"), key_id="K1",
                            team_id="T1", topic="org.example.app",
                            voip_topic="org.example.app.voip", **options))
    phone = device(voip_token="cd" * 32)
    for summary in (ENDED, {**ENDED, "last-message-priority": "high"}):  # never VoIP
        stop = provider.request(phone, summary, 1000.0, urgent="last-message-priority" in summary)
        assert stop.url.endswith(f"/3/device/{phone.token}")
        headers = (stop.headers["apns-topic"], stop.headers["apns-push-type"],
                   stop.headers["apns-priority"], stop.headers["apns-expiration"])
        body = json.loads(stop.body)
        assert body["call-ended"] == "retracted" and body["call-sid"] == "call1"
        if alert_option:
            assert headers == ("org.example.app", "alert", "10", "1060")
            assert body["aps"]["alert"] == {"body": "Missed call"}
        else:
            assert headers == ("org.example.app", "background", "5", "1060")
            assert body["aps"] == {"content-available": 1}
    # answered elsewhere is no missed call: background even with the alert option
    answered = provider.request(phone, {**ENDED, "call-ended": "answered-elsewhere"}, 1000.0)
    assert answered.headers["apns-push-type"] == "background"


def test_fcm_stops_ringing_with_a_normal_data_message(tmp_path: Path) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    (tmp_path / "sa.json").write_text(json.dumps({
        "project_id": "proj", "client_email": "svc@proj.iam", "private_key": pem(key).decode(),
        "token_uri": "https://oauth.example/token"}))
    provider = Fcm(backend("fcm", service_account_file=str(tmp_path / "sa.json")))
    message = json.loads(provider.request(device("fcm-token"), ENDED, 1000.0).body)["message"]
    assert message["android"] == {"priority": "normal", "ttl": "60s", "collapse_key": "node-1"}
    assert message["data"] == {"call-ended": "retracted", "call-sid": "call1"}
    assert "notification" not in message
