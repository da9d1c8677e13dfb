"""What one hostile or careless account can do, without ejabberd (issue 13): huge bodies
and forms, too many registrations and devices, floods of push IQs and commands, invalid
app-server JIDs. Figures are printed (pytest -s shows them)."""

from __future__ import annotations

import base64
import json
import sqlite3
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import http_ece  # type: ignore[import-untyped]
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from pymod_push.appserver.server import AppServer, Delivery
from pymod_push.core import limits, safexml
from pymod_push.core.config import Backend, Config
from pymod_push.core.limits import CUT_MARK, MAX_PUBLISH_IQ_BYTES, cut_utf8, fit
from pymod_push.core.xep0357 import MAX_PUBLISH_OPTIONS_XML_BYTES
from pymod_push.core.xmpp import jid_problem
from pymod_push.protocol import IqError, IqResult, Publish, PushIq, Route, StanzaToPending
from pymod_push.providers import HttpRequest
from pymod_push.providers.apns import MAX_PAYLOAD, MAX_VOIP_PAYLOAD, Apns
from pymod_push.providers.fcm import MAX_DATA, Fcm
from pymod_push.providers.ubuntu import MAX_BODY, UbuntuPush
from pymod_push.providers.webpush import WebPush
from pymod_push.providers.wns import MAX_PAYLOAD as WNS_MAX
from pymod_push.providers.wns import Wns
from pymod_push.records import RegisteredDevice
from pymod_push.service.decisions import PushService
from pymod_push.store import Store
from tests.builders import (
    ACCOUNT,
    BACKENDS,
    GOOD_JIDS,
    HOSTILE_JIDS,
    NS_DATA,
    NS_PUSH,
    OPEN,
    PHONE,
    PUBSUB_HOST,
    REGISTER_HOST,
    Clock,
    enable_xml,
    make_service,
    message,
    publish_iq_xml,
    push_iq,
    xml_attr,
    xml_escape,
)

# Bodies that are large in every way a serializer can make them larger.
MEGABYTE = 1024 * 1024
HUGE_BODIES = {
    "ascii": "a" * MEGABYTE,
    "emoji": "\U0001F600" * (MEGABYTE // 4),
    "markup": "<&>'\"" * (MEGABYTE // 5),
    "json-escapes": "\\\"\n\u0001" * (MEGABYTE // 4),
    "combining": "e\u0301" * (MEGABYTE // 3),
}


def answer(actions: Any) -> IqResult | IqError:
    (found,) = [a for a in actions if isinstance(a, (IqResult, IqError))]
    return found


# ------------------------------------------------------------------ cutting a body

@settings(max_examples=300, deadline=None)
@given(text=st.text(), max_bytes=st.integers(0, 64))
def test_a_cut_body_fits_ends_with_the_mark_and_keeps_whole_characters(text: str,
                                                                       max_bytes: int) -> None:
    cut = cut_utf8(text, max_bytes)
    assert len(cut.encode()) <= max_bytes or cut == ""
    if len(text.encode()) <= max_bytes:
        assert cut == text
    elif cut:
        assert cut.endswith(CUT_MARK) and text.startswith(cut[:-1])


@settings(max_examples=200, deadline=None)
@given(body=st.text(min_size=1), sender=st.text(), extra=st.text(), limit=st.integers(60, 400))
def test_fit_shortens_the_body_first_then_drops_optional_fields(body: str, sender: str,
                                                                extra: str, limit: int) -> None:
    summary = {"message-count": "3", "last-message-sender": sender, "x-admin": extra,
               "last-message-body": body}

    def size(fields: dict[str, str]) -> int:
        return len(json.dumps(fields).encode())

    kept = fit(summary, size, limit)
    assert size(kept) <= limit
    assert kept.get("message-count") == "3"  # 60 bytes hold the counts whatever else
    if "last-message-body" in kept and kept["last-message-body"] != body:
        cut = kept["last-message-body"]
        assert cut.endswith(CUT_MARK) and body.startswith(cut[:-1])
        # shortened as little as needed: one more character would not fit
        longer = {**kept, "last-message-body": limits.cut_chars(body, len(cut) + 1)}
        assert len(cut) + 1 > len(body) or size(longer) > limit
    if kept.keys() < summary.keys() - {"last-message-body"}:
        assert "last-message-body" not in kept or len(kept["last-message-body"]) <= 1


# ------------------------------------------------------------ the publish IQ bound

@pytest.mark.parametrize("kind", HUGE_BODIES)
def test_a_1_mb_body_gives_a_bounded_publish(kind: str) -> None:
    service = make_service(**OPEN)
    assert isinstance(answer(service.handle(push_iq(enable_xml("n1")), 0.0)), IqResult)
    body = HUGE_BODIES[kind]
    (publish,) = service.handle(StanzaToPending(PHONE, message(body, escaped=True)), 0.0)
    assert isinstance(publish, Publish)
    summary = {var: values[0] for var, values in publish.fields}
    cut = summary["last-message-body"]
    assert len(cut.encode()) <= service.config.max_body_length
    assert cut.endswith(CUT_MARK) and body.startswith(cut[:-1])
    size = len(publish_iq_xml(publish))
    print(f"\n1 MB {kind} body: publish IQ of {size} bytes, body cut to {len(cut.encode())} "
          "bytes")
    assert size <= 8 * 1024


def test_the_largest_publish_an_account_can_cause_is_within_the_bound() -> None:
    """Everything at its limit: app-server JID and node of 1023-byte parts full of
    characters fxml escapes six-fold, the largest publish-options, a sender and a body
    to match."""
    service = make_service(**OPEN)
    local, domain = "a" * 1023, ".".join(["d" * 63] * 16)[:1023]
    resource = "'" * 1023
    jid = f"{local}@{domain}/{resource}"
    assert jid_problem(jid) is None
    node = "'" * 1023
    value = "'" * 600
    form = (f"<x xmlns='{NS_DATA}' type='submit'>" + "".join(
        f"<field var='f{i}'><value>{xml_escape(value)}</value></field>" for i in range(64))
        + "</x>")
    refused = answer(service.handle(push_iq(enable_xml(node, jid, form)), 0.0))
    assert isinstance(refused, IqError) and refused.condition == "not-acceptable"
    assert "publish-options" in refused.text
    fitting = (f"<x xmlns='{NS_DATA}' type='submit'>" + "".join(
        f"<field var='f{i}'><value>{xml_escape(value[:100])}</value></field>" for i in range(6))
        + "</x>")
    assert isinstance(answer(service.handle(push_iq(enable_xml(node, jid, fitting)), 0.0)),
                      IqResult)
    sender = f"{'b' * 1023}@{domain}/{'<' * 1023}"
    (publish,) = service.handle(
        StanzaToPending(PHONE, message("&" * MEGABYTE, sender=sender, escaped=True)), 0.0)
    assert isinstance(publish, Publish)
    size = len(publish_iq_xml(publish, host="e" * 1023))
    print(f"\nlargest publish IQ: {size} bytes (bound {MAX_PUBLISH_IQ_BYTES})")
    assert size <= MAX_PUBLISH_IQ_BYTES


def test_an_admins_summary_cannot_blow_the_bound() -> None:
    class Huge:
        @staticmethod
        def summary(message: Any, recipient: Any, fields: Any) -> dict[str, str]:
            return {**dict(fields), **{f"x-{i}": "v" * 100_000 for i in range(10)}}

    from pymod_push.logic import Logic
    service = PushService(Config("example.org", include_message_bodies=True), Store(":memory:"),
                          logic=Logic(Huge()))
    service.handle(push_iq(enable_xml("n1")), 0.0)
    (publish,) = service.handle(StanzaToPending(PHONE, message("hello", escaped=True)), 0.0)
    assert isinstance(publish, Publish)
    summary = {var: values[0] for var, values in publish.fields}
    assert summary["message-count"] == "1"
    assert len(publish_iq_xml(publish)) <= limits.MAX_SUMMARY_XML_BYTES + 1024


# ------------------------------------------------------------------ provider payloads

def _pem(key: Any) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _backend(kind: str, **options: str) -> Backend:
    return Backend(0, kind, "app", "push.example.org", "pubsub.example.org", options)


def _providers(folder: Path) -> dict[str, Any]:
    key = ec.generate_private_key(ec.SECP256R1())
    (folder / "key.p8").write_bytes(_pem(key))
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    (folder / "sa.json").write_text(json.dumps({
        "project_id": "proj", "client_email": "svc@proj.iam",
        "private_key": _pem(rsa_key).decode(), "token_uri": "https://oauth.example/token"}))
    return {"apns": Apns(_backend("apns", key_file=str(folder / "key.p8"), key_id="K1",
                                  team_id="T1", topic="org.example.app",
                                  voip_topic="org.example.app.voip")),
            "fcm": Fcm(_backend("fcm", service_account_file=str(folder / "sa.json"))),
            "webpush": WebPush(_backend("webpush")),
            "wns": Wns(_backend("wns", package_sid="sid", auth_key="k",  # DEVICE's URL:
                                channel_domains="push.example.net")),  # a WNS channel here
            "ubuntu": UbuntuPush(_backend("ubuntu"))}


RECEIVER = ec.generate_private_key(ec.SECP256R1())
AUTH = b"sixteen byte key"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


DEVICE = RegisteredDevice("node-1", "secret", "alice@example.org", "phone", "", "x", "app",
                "pubsub.example.org", "https://push.example.net/wpush/abc", "app.id_app",
                _b64(RECEIVER.public_key().public_bytes(
                    serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)),
                _b64(AUTH), voip_token="cd" * 32)


def _payload(kind: str, request: HttpRequest) -> tuple[int, int, dict[str, str]]:
    """(size as the provider counts it, its limit, the summary fields delivered)."""
    if kind == "apns":
        limit = MAX_VOIP_PAYLOAD if request.headers["apns-push-type"] == "voip" else MAX_PAYLOAD
        data = json.loads(request.body)
        data.pop("aps")
        return len(request.body), limit, data
    if kind == "fcm":
        data = json.loads(request.body)["message"]["data"]
        return len(json.dumps(data, separators=(",", ":")).encode()), MAX_DATA, data
    if kind == "webpush":
        plain = http_ece.decrypt(request.body, private_key=RECEIVER, auth_secret=AUTH,
                                 version="aes128gcm")
        return len(request.body), 4096, json.loads(plain)
    if kind == "wns":
        return len(request.body), WNS_MAX, json.loads(request.body)
    return len(request.body), MAX_BODY, json.loads(request.body)["data"]


@pytest.mark.parametrize("urgent", [False, True], ids=["message", "call"])
@pytest.mark.parametrize("body_kind", HUGE_BODIES)
def test_every_provider_payload_stays_within_its_limit(tmp_path: Path, body_kind: str,
                                                       urgent: bool) -> None:
    """A 1 MB body as another server may publish it (the app server cuts values at 4 KiB,
    the providers fit the rest): the body is shortened, the counts stay."""
    body = limits.cut_utf8(HUGE_BODIES[body_kind], 4096)
    summary = {"FORM_TYPE": "urn:xmpp:push:summary", "message-count": "7",
               "last-message-sender": "bob@example.org/" + "r" * 1000,
               "last-message-body": body}
    if urgent:
        summary["last-message-priority"] = "high"
    largest = 0
    for kind, provider in _providers(tmp_path).items():
        if hasattr(provider, "token"):  # FCM, WNS: as if the OAuth token were there
            provider.token.value = "t"
        request = provider.request(DEVICE, summary, 1000.0, urgent=urgent)
        size, limit, data = _payload(kind, request)
        largest = max(largest, size)
        assert size <= limit, (kind, size, limit)
        assert data["message-count"] == "7", kind
        if urgent:
            assert data["last-message-priority"] == "high", kind
        shown = data.get("last-message-body", "")
        assert shown == "" or (shown.endswith(CUT_MARK) and body.startswith(shown[:-1])), kind
        assert len(shown) > 100 or "last-message-sender" not in data, kind  # body cut first
    print(f"\nlargest provider payload ({body_kind}, {'call' if urgent else 'message'}): "
          f"{largest} bytes")


# ------------------------------------------------------------------ registrations

def test_registrations_per_account_are_limited_and_nothing_is_lost() -> None:
    service = make_service(**OPEN, max_registrations=5)
    for number in range(5):
        assert isinstance(answer(service.handle(push_iq(enable_xml(f"n{number}")), 0.0)),
                          IqResult)
    refused = answer(service.handle(push_iq(enable_xml("n5")), 0.0))
    assert isinstance(refused, IqError)
    assert (refused.error_type, refused.condition) == ("cancel", "resource-constraint")
    assert "max_registrations" in refused.text and "5" in refused.text
    # re-enabling one it holds is no new one; from another resource neither
    assert isinstance(answer(service.handle(push_iq(enable_xml("n3")), 0.0)), IqResult)
    tablet = ("alice", "example.org", "tablet")
    assert isinstance(answer(service.handle(push_iq(enable_xml("n4"), sender=tablet), 0.0)),
                      IqResult)
    held = service.store.for_user(ACCOUNT[:2])
    assert sorted(r.node for r in held) == [f"n{i}" for i in range(5)]
    # a disable makes room
    service.handle(push_iq(f"<disable xmlns='{NS_PUSH}' jid='push.example.net' node='n0'/>"),
                   0.0)
    assert isinstance(answer(service.handle(push_iq(enable_xml("n5")), 0.0)), IqResult)
    publishes = service.handle(StanzaToPending(PHONE, message("hi", escaped=True)), 0.0)
    print(f"\nregistrations held: {len(service.store.for_user(ACCOUNT[:2]))} (limit 5); "
          f"publishes for one message: {len(publishes)}")
    assert len(publishes) == 4  # n1, n2, n3, n5: n4 moved to the tablet


def _changes(store: Store) -> int:
    db = store.db
    assert isinstance(db, sqlite3.Connection)
    return db.total_changes


def test_an_enable_writes_one_row_however_many_the_account_holds() -> None:
    service = make_service(**OPEN, max_registrations=10_000)
    written = []
    for number in range(2000):
        before = _changes(service.store)
        service.handle(push_iq(enable_xml(f"n{number}")), 0.0)
        written.append(_changes(service.store) - before)
    print(f"\nrows written per enable: first {written[0]}, 2000th {written[-1]}")
    assert set(written) == {1}


# ------------------------------------------------------------------ push JIDs

def test_the_hostile_jid_corpus_is_large_enough() -> None:
    assert len(set(HOSTILE_JIDS)) >= 50


@pytest.mark.parametrize("jid", HOSTILE_JIDS, ids=range(len(HOSTILE_JIDS)))
def test_hostile_push_jids_are_refused_with_jid_malformed(jid: str) -> None:
    assert jid_problem(jid) is not None
    service = make_service(**OPEN)
    refused = answer(service.handle(push_iq(enable_xml("n1", jid)), 0.0))
    assert isinstance(refused, IqError)
    assert refused.condition in ("jid-malformed", "bad-request"), refused
    assert service.store.for_user(ACCOUNT[:2]) == []


@pytest.mark.parametrize("jid", GOOD_JIDS)
def test_ordinary_push_jids_are_accepted(jid: str) -> None:
    service = make_service(**OPEN)
    assert isinstance(answer(service.handle(push_iq(enable_xml("n1", jid)), 0.0)), IqResult)


# ------------------------------------------------------------------ the app server

def _iq(iq_type: str, to: str, payload: str, iq_id: str = "i1",
        sender: str = "alice@example.org/phone") -> bytes:
    return (f"<iq xmlns='jabber:client' type='{iq_type}' id='{iq_id}' from={xml_attr(sender)} "
            f"to='{to}'>{payload}</iq>").encode()


def _register(server: AppServer, device_id: str, sender: str = "alice@example.org/phone"
              ) -> ET.Element:
    command = (f"<command xmlns='http://jabber.org/protocol/commands' node='register-push-apns' "
               f"action='execute'><x xmlns='{NS_DATA}' type='submit'><field var='token'><value>"
               f"{'ab' * 32}</value></field><field var='device-id'><value>{device_id}</value>"
               "</field></x></command>")
    (route,) = server.handle(True, _iq("set", REGISTER_HOST, command, sender=sender))
    assert isinstance(route, Route)
    return ET.fromstring(route.xml)


def _error(element: ET.Element) -> tuple[str, str, str]:
    error = element.find("error")
    assert element.get("type") == "error" and error is not None
    condition = next(c.tag.rpartition("}")[2] for c in error if not c.tag.endswith("text"))
    text = next((c.text or "" for c in error if c.tag.endswith("text")), "")
    return error.get("type", ""), condition, text


def test_devices_per_account_are_limited() -> None:
    config = Config("example.org", backends=BACKENDS[:1], max_devices=3)
    server = AppServer(config, Store(":memory:"), Clock())
    for number in range(3):
        assert _register(server, f"d{number}").get("type") == "result"
    error_type, condition, text = _error(_register(server, "d3"))
    assert (error_type, condition) == ("cancel", "resource-constraint") and "max_devices" in text
    assert _register(server, "d1").get("type") == "result"  # registering again: no new one
    assert _register(server, "x", sender="bob@example.org/pc").get("type") == "result"
    assert len(server.store.devices_of("alice@example.org")) == 3


def test_an_oversized_or_broken_publish_is_answered_at_once() -> None:
    server = AppServer(Config("example.org", backends=BACKENDS[:1]), Store(":memory:"), Clock())
    huge = _iq("set", PUBSUB_HOST, "<pubsub xmlns='http://jabber.org/protocol/pubsub'><publish "
               "node='n'><item>" + "x" * (safexml.MAX_XML_BYTES + 1) + "</item></publish>"
               "</pubsub>", iq_id="big", sender="example.net")
    (route,) = server.handle(True, huge)
    assert isinstance(route, Route)
    answer_xml = ET.fromstring(route.xml)
    assert answer_xml.get("id") == "big" and answer_xml.get("to") == "example.net"
    assert _error(answer_xml)[:2] == ("modify", "not-acceptable")
    broken = _iq("set", PUBSUB_HOST, "<pubsub xmlns='x'>\0</pubsub>", iq_id="bad")
    (route,) = server.handle(True, broken)
    assert isinstance(route, Route)
    assert _error(ET.fromstring(route.xml))[:2] == ("modify", "bad-request")


def test_a_publish_with_a_huge_body_is_pushed_not_refused() -> None:
    server = AppServer(Config("example.org", backends=BACKENDS[:1]), Store(":memory:"), Clock())
    values = {f.get("var"): f.findtext(f"{{{NS_DATA}}}value")
              for f in _register(server, "d1").iter(f"{{{NS_DATA}}}field")}
    body = "\U0001F600" * 200_000
    publish = ("<pubsub xmlns='http://jabber.org/protocol/pubsub'>"
               f"<publish node='{values['node']}'><item><notification xmlns='{NS_PUSH}'>"
               f"<x xmlns='{NS_DATA}' type='submit'>"
               "<field var='message-count'><value>2</value></field>"
               f"<field var='last-message-body'><value>{body}</value></field></x></notification>"
               f"</item></publish><publish-options><x xmlns='{NS_DATA}' type='submit'>"
               f"<field var='secret'><value>{values['secret']}</value></field></x>"
               "</publish-options></pubsub>")
    (delivery,) = server.handle(True, _iq("set", PUBSUB_HOST, publish, sender="example.net"))
    assert isinstance(delivery, Delivery)
    cut = delivery.summary["last-message-body"]
    assert len(cut.encode()) <= 4096 and cut.endswith(CUT_MARK)
    assert delivery.summary["message-count"] == "2"
    assert MAX_PUBLISH_OPTIONS_XML_BYTES == 4096


# ------------------------------------------------------------------ who is near a limit

def test_push_list_and_push_status_show_who_is_near_a_limit() -> None:
    from pymod_push.port import admin_commands as admin
    from pymod_push.protocol import AdminCommand, CommandResult

    service = make_service(**OPEN, max_registrations=10)
    for number in range(8):
        service.handle(push_iq(enable_xml(f"n{number}")), 0.0)
    bob = ("bob", "example.org", "pc")
    service.handle(PushIq("b", bob, ("bob", "example.org", ""), "set", "en",
                          enable_xml("b1").encode()), 0.0)

    def run(name: str, *args: str) -> str:
        (result,) = admin.run(AdminCommand("r", name, args), service, admin.ProcessInfo(), 0.0)
        assert isinstance(result, CommandResult)
        return result.text

    listed = run("list", "alice", "example.org")
    assert "limits: 8 of 10 push registrations (max_registrations), 0 of 20" in listed
    assert listed.endswith("near a limit")
    assert not run("list", "bob", "example.org").endswith("near a limit")
    status = run("status")
    assert "accounts near a limit" in status and "alice@example.org 8 registration(s)" in status
    assert "bob@" not in status
    print(f"\n{listed.splitlines()[-1]}\n{status.splitlines()[-1]}")


# ------------------------------------------------------------------ reflection

def _publish(number: int, to: str) -> Publish:
    return Publish(number, to, f"n{number}", (), None, 30_000)


def test_publishes_over_a_domains_rate_wait_in_order_and_none_is_dropped() -> None:
    from pymod_push.core.pacing import DomainPacer

    pacer = DomainPacer(10)
    flood = [_publish(n, f"user{n}@victim.example/r") for n in range(1000)]
    other = _publish(5000, "push.example.net")
    passed = pacer.pace([*flood, other], 100.0)
    assert [p.ref for p in passed] == [*range(10), 5000]  # the burst, and the other domain
    assert len(pacer) == 990 and pacer.next_deadline() == pytest.approx(100.1)
    sent = [p.ref for p in passed if isinstance(p, Publish) and p.ref < 5000]
    now, seconds = 100.0, 0
    while len(pacer):
        deadline = pacer.next_deadline()
        assert deadline is not None and deadline > now
        now = deadline
        released = pacer.due(now)
        assert released
        sent += [p.ref for p in released]
        seconds = int(now - 100.0)
    assert sent == list(range(1000))  # in order, all of them
    assert 98 <= seconds <= 99  # at 10 a second
    # below the rate nothing waits
    assert pacer.pace([_publish(1, "victim.example")], now + 10) != []


def test_the_service_paces_publishes_to_one_domain() -> None:
    service = make_service(**OPEN, publish_rate=5)
    accounts = [(f"user{n}", "example.org", "phone") for n in range(12)]
    for number, session in enumerate(accounts):
        iq = PushIq(number, session, (*session[:2], ""), "set", "en",
                    enable_xml(f"n{number}", jid="push.victim.example").encode())
        assert isinstance(answer(service.handle(iq, 0.0)), IqResult)
    now_sent = [a for session in accounts
                for a in service.handle(StanzaToPending(session, message("hi", escaped=True)), 1.0)]
    assert len(now_sent) == 5
    deadline = service.next_deadline()
    assert deadline is not None and deadline == pytest.approx(1.2)
    later = service.tick(2.0)
    assert len(later) == 5 and all(isinstance(p, Publish) for p in later)
    assert len(service.tick(3.0)) == 2
    print("\n12 publishes to one domain at publish_rate 5: 5 at once, 5 after 1 s, 2 after 2 s")


def test_the_servers_own_domains_are_not_paced() -> None:
    from pymod_push.core.pacing import DomainPacer

    pacer = DomainPacer(1, ("example.org", "pubsub.push.example.net"))
    own = [_publish(n, to) for n, to in enumerate(
        ["app@example.org/srv", "pubsub.example.org", "PubSub.Push.Example.NET"] * 10)]
    assert pacer.pace(own, 0.0) == own
    remote = [_publish(n, "evil-example.org") for n in range(3)]
    assert pacer.pace(remote, 0.0) == remote[:1]
