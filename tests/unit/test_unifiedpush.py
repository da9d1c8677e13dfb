"""UnifiedPush (issue 33), Python's side driven directly: registers, POSTs and their
deliveries in, actions out, on SQLite and PostgreSQL; hostile input; restarts (the store
opened again)."""

from __future__ import annotations

import asyncio
import base64
import logging
import sqlite3
import time
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from pymod_push import etf
from pymod_push.core import unifiedpush as up
from pymod_push.core.config import Config
from pymod_push.core.push_history import short_hash
from pymod_push.core.xmpp import RequestError
from pymod_push.etf import Atom, Pid, Reference
from pymod_push.metrics import Snapshot, UnifiedPushCounts, render
from pymod_push.port import admin_commands as admin
from pymod_push.port.commit import RETRY_FIRST_S
from pymod_push.protocol import (
    PROTOCOL_VERSION,
    AdminCommand,
    CommandResult,
    EjabberdStarted,
    HttpReply,
    IqError,
    IqResult,
    ProtocolError,
    Publish,
    SessionOpened,
    SessionResumed,
    UpPost,
    UpPresence,
    UpPush,
    UpRegister,
    UpReply,
    UpUsers,
    UserRemoved,
    action_term,
    parse_event,
)
from pymod_push.service.decisions import PushService
from pymod_push.service.unifiedpush import ENDPOINT_GRACE_S
from pymod_push.store import Store, open_store
from pymod_push.store.schema import MIGRATIONS
from pymod_push.store.unifiedpush import KeptPush, UpEndpoint
from tests.builders import ALICE, HOST, NOW, PHONE, enable
from tests.port_harness import PortUnderTest, acks, batch, hello, until

URL = "https://example.org/up"
APPLICATION = base64.b64encode(b"A" * 32).decode()
INSTANCE = base64.b64encode(b"I" * 32).decode()
OTHER_INSTANCE = base64.b64encode(b"J" * 32).decode()
TABLET = (*ALICE, "tablet")
HTTP_REF = (Pid(Atom("ejabberd@localhost"), 81, 0, 3),
            Reference(Atom("ejabberd@localhost"), 3, (1, 2, 3)))

Opener = Callable[[], Store]


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(params=["sqlite", "postgresql"])
def opener(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Opener]:
    """Opens the same database again on every call (a restart of the Python process)."""
    stores: list[Store] = []
    url = request.getfixturevalue("postgres").new_database() \
        if request.param == "postgresql" else None

    def reopen() -> Store:
        for store in stores:
            try:
                store.close()
            except Exception:  # noqa: BLE001 - closed already
                pass
        stores.append(open_store(str(tmp_path / "push.sqlite3"), url))
        return stores[-1]
    yield reopen
    for store in stores:
        try:
            store.close()
        except Exception:  # noqa: BLE001 - closed already
            pass


def config(**options: object) -> Config:
    return replace(Config(HOST, unified_push_url=URL), **options)  # type: ignore[arg-type]


@pytest.fixture
def service(opener: Opener) -> PushService:
    return PushService(config(), opener())


def restarted(service: PushService, opener: Opener, **options: object) -> PushService:
    """The service's state committed, then a new process on the same database."""
    service.store.commit()
    return PushService(config(**options), opener())


def register_xml(application: str = APPLICATION, instance: str = INSTANCE) -> bytes:
    return (f"<register xmlns='{up.NS_UP}' application='{application}' "
            f"instance='{instance}'/>").encode()


def register(service: PushService, session: tuple[str, str, str] = PHONE,
             instance: str = INSTANCE, now: float = NOW) -> list[object]:
    return list(service.handle(UpRegister("r", session, "en", register_xml(
        instance=instance)), now))


def endpoint_of(actions: list[object]) -> str:
    result = next(a for a in actions if isinstance(a, IqResult))
    assert result.xml is not None
    element = ET.fromstring(result.xml)
    assert element.tag == f"{{{up.NS_UP}}}registered"
    return str(element.get("endpoint"))


def token_of(actions: list[object]) -> str:
    return endpoint_of(actions).rsplit("/", 1)[1]


def post(service: PushService, token: str, body: bytes = b"payload", now: float = NOW,
         ttl: bytes | None = b"60", topic: bytes | None = None,
         urgency: bytes | None = None, deadline_ms: int | None = None) -> list[object]:
    deadline = int((now + 10) * 1000) if deadline_ms is None else deadline_ms
    return list(service.handle(UpPost(HTTP_REF, token, ttl, urgency, topic, deadline, body),
                               now))


def reply_of(actions: list[object]) -> HttpReply:
    (reply,) = [a for a in actions if isinstance(a, HttpReply)]
    return reply


def pushes(actions: list[object]) -> list[UpPush]:
    return [a for a in actions if isinstance(a, UpPush)]


def answer(service: PushService, push: UpPush, outcome: str, condition: str = "",
           now: float = NOW) -> list[object]:
    error_type = "cancel" if outcome == "error" else ""
    return list(service.handle(UpReply(push.id, outcome, error_type, condition), now))


def registered(service: PushService, now: float = NOW) -> str:
    """ALICE's phone registered: the token."""
    return token_of(register(service, now=now))


# ----------------------------------------------------------------------------- core
@pytest.mark.parametrize("value", [
    None, "", "A" * 44, APPLICATION[:-1], APPLICATION + "=",
    base64.b64encode(b"x" * 31).decode(), base64.b64encode(b"x" * 33).decode(),
    base64.urlsafe_b64encode(b"\xfb" * 32).decode(),  # url-safe alphabet: not standard
    "A" * 10_000_000, "é" * 44, APPLICATION.replace("Q", " ", 1)])
def test_keys_other_than_base64_of_32_bytes_are_bad_requests(value: str | None) -> None:
    with pytest.raises(RequestError) as raised:
        up.check_key("instance", value)
    assert raised.value.condition == "bad-request"
    assert raised.value.text.startswith("instance: ")


def test_a_register_names_what_is_wrong() -> None:
    assert up.parse_register(register_xml()) == up.Register(APPLICATION, INSTANCE)
    for xml, text in ((register_xml(application="x"), "application: "),
                      (register_xml(instance="x"), "instance: "),
                      (b"<register/>", "expected"), (b"<register", "not usable XML")):
        with pytest.raises(RequestError) as raised:
            up.parse_register(xml)
        assert text in raised.value.text


def test_tokens_name_their_host_and_are_unguessable() -> None:
    token = up.make_token("example.org", bytes(range(32)))
    assert up.token_host(token) == "example.org"
    assert len(token.split(".")[1]) == 43  # 256 bits
    assert up.make_token("example.org", b"\x01" * 32) != token
    for bad in ("", "nodot", ".x", "x.", "a b.c", "ZXhhbXBsZS5vcmc.a/b", "%%.x"):
        assert up.token_host(bad) is None
    assert up.endpoint_url("https://h/up/", token) == f"https://h/up/{token}"


@pytest.mark.parametrize(("ttl", "urgency", "topic", "text"), [
    (b"\xd9\xa1\xd9\xa2", None, None, "TTL"),  # Arabic-Indic digits
    ("١٢".encode(), None, None, "TTL"),
    (b"-1", None, None, "TTL"), (b"1e3", None, None, "TTL"), (b"12345678901", None, None, "TTL"),
    (b"", None, None, "TTL"), (b"0x10", None, None, "TTL"),
    (None, b"urgent", None, "Urgency"), (None, b"", None, "Urgency"),
    (None, None, b"a" * 33, "Topic"), (None, None, b"a+b", "Topic"), (None, None, b"", "Topic"),
    (None, None, b"\xff", "Topic: not ASCII"), (None, "très".encode(), None, "Urgency"),
])
def test_bad_post_headers(ttl: bytes | None, urgency: bytes | None, topic: bytes | None,
                          text: str) -> None:
    with pytest.raises(up.BadPost, match=text):
        up.parse_meta(ttl, urgency, topic)


def test_post_headers_read() -> None:
    assert up.parse_meta(None, None, None) == up.PostMeta(None, None, None)
    assert up.parse_meta(b"0", b"very-low", b"a_B-9" * 6 + b"xy") == \
        up.PostMeta(0, "very-low", "a_B-9" * 6 + "xy")
    assert up.parse_meta(b"9999999999", b"high", None).ttl == 9_999_999_999
    assert up.kept_ttl(None, 86400) == 86400 and up.kept_ttl(10**9, 86400) == 86400
    assert up.kept_ttl(5, 86400) == 5


def test_expiration_is_utc_with_z() -> None:
    assert up.expiration(0) == "1970-01-01T00:00:00Z"
    assert up.expiration(1_800_000_000.9) == "2027-01-15T08:00:00Z"


def test_keep_policy() -> None:
    held = [up.Held(1, "t", "kept"), up.Held(2, None, "sent"), up.Held(3, "t", "sent"),
            up.Held(4, None, "kept"), up.Held(5, "u", "kept")]
    assert up.keep_plan(held, "t", 100) == ([1], [])  # the sent one of the topic stays
    assert up.keep_plan(held, None, 3) == ([], [1, 4, 5][:3])
    assert up.keep_plan(held, None, 5) == ([], [1])
    assert up.keep_plan(held, "u", 4) == ([5], [1])
    assert up.keep_plan([], None, 1) == ([], [])


def test_the_rate_is_per_endpoint_and_memory_bounded() -> None:
    rate = up.EndpointRate(60, 2, max_keys=100)
    assert rate.take("a", 0) is None and rate.take("a", 0) is None
    refused = rate.take("a", 0)
    assert refused is not None and refused.retry_after_seconds == 1
    assert rate.take("b", 0) is None
    assert rate.take("a", 1.0) is None  # one a second
    for n in range(10_000):
        rate.take(f"k{n}", 2.0)
    assert len(rate) <= 100


# ----------------------------------------------------------------------------- protocol
def test_protocol_7_events_and_actions() -> None:
    assert PROTOCOL_VERSION == 7
    session = (b"alice", b"example.org", b"phone")
    wire = etf.decode(etf.encode((Atom("up_register"), Atom("r1"), session, b"en",
                                  register_xml())))
    assert parse_event(wire) == UpRegister(Atom("r1"), PHONE, "en", register_xml())
    meta = {Atom("ttl"): b"60", Atom("urgency"): Atom("undefined"), Atom("topic"): b"t",
            Atom("deadline"): 1234}
    wire = etf.decode(etf.encode((Atom("up_post"), HTTP_REF, b"tok.en", meta, b"\x00body")))
    event = parse_event(wire)
    assert event == UpPost(HTTP_REF, "tok.en", b"60", None, b"t", 1234, b"\x00body")
    # the ref goes back as it came
    term = action_term(HttpReply(event.ref, 201, (("TTL", "60"),), b""))
    assert etf.decode(etf.encode(term)) == (Atom("http_reply"), HTTP_REF, 201,
                                            [(b"TTL", b"60")], b"")
    assert parse_event((Atom("up_presence"), session)) == UpPresence(PHONE)
    up_ref = (Atom("up"), 77)
    for outcome, expected in (
            (Atom("result"), UpReply(77, "result")), (Atom("offline"), UpReply(77, "offline")),
            (Atom("pending"), UpReply(77, "pending")), (Atom("timeout"), UpReply(77, "timeout")),
            ((Atom("timeout"), Atom("pending")), UpReply(77, "timeout_pending")),
            ((Atom("error"), Atom("cancel"), Atom("item-not-found")),
             UpReply(77, "error", "cancel", "item-not-found"))):
        assert parse_event((Atom("iq_reply"), up_ref, outcome)) == expected
    for bad in ((Atom("iq_reply"), (Atom("up"), "x"), Atom("result")),
                (Atom("iq_reply"), up_ref, Atom("whatever")),
                (Atom("iq_reply"), up_ref, (Atom("error"), Atom("cancel"))),
                (Atom("iq_reply"), up_ref, (Atom("timeout"), 1, 2, 3)),
                (Atom("up_post"), HTTP_REF, b"t", {}, b"x")):
        with pytest.raises(ProtocolError):  # logged and skipped, never fatal
            parse_event(bad)
    assert action_term(UpPush(5, PHONE, "a", "i", b"\x01", 30000)) == (
        Atom("up_push"), (Atom("up"), 5), (b"alice", b"example.org", b"phone"), b"a", b"i",
        b"\x01", 30000)
    assert action_term(UpUsers("reset", (ALICE,))) == (
        Atom("unified_push"), (Atom("users"), Atom("reset"), [(b"alice", b"example.org")]))


def test_options_from_the_hello() -> None:
    off = Config.from_options(HOST, {"unified_push_url": Atom("undefined")})
    assert off.unified_push_url is None
    on = Config.from_options(HOST, {"unified_push_url": b"https://h/up/",
                                    "unified_push_expiration": 3_600_000,
                                    "unified_push_max_ttl": 60_000,
                                    "unified_push_max_kept": 5, "unified_push_rate": 6,
                                    "unified_push_burst": 2,
                                    "unified_push_max_endpoints": 3})
    assert (on.unified_push_url, on.unified_push_expiration_ms, on.unified_push_max_ttl_ms,
            on.unified_push_max_kept, on.unified_push_rate, on.unified_push_burst,
            on.unified_push_max_endpoints) == ("https://h/up", 3_600_000, 60_000, 5, 6, 2, 3)
    defaults = Config.from_options(HOST, {})
    assert (defaults.unified_push_expiration_ms, defaults.unified_push_max_ttl_ms) == (
        7 * 86400_000, 86400_000)


# ----------------------------------------------------------------------------- register
def test_register_answers_a_stable_endpoint(service: PushService) -> None:
    first = register(service)
    assert first[0] == UpUsers("add", (ALICE,))
    endpoint = endpoint_of(first)
    token = endpoint.rsplit("/", 1)[1]
    assert endpoint == f"{URL}/{token}" and up.token_host(token) == HOST
    result = next(a for a in first if isinstance(a, IqResult))
    assert result.ref == "r" and ET.fromstring(str(result.xml)).get("expiration") == \
        up.expiration(NOW + 7 * 86400)
    # renewal: the same endpoint, a later expiration, no new user
    again = register(service, now=NOW + 3600)
    assert endpoint_of(again) == endpoint and not any(isinstance(a, UpUsers) for a in again)
    assert up.expiration(NOW + 3600 + 7 * 86400) in str(again[0])
    # another instance: another endpoint
    assert endpoint_of(register(service, instance=OTHER_INSTANCE)) != endpoint


def test_the_token_names_the_host_that_answers_it(service: PushService) -> None:
    """With unified_push_access allowing users of other hosts, their endpoints are still
    this host's (the shim finds the host that answers a POST from the token)."""
    remote = ("bob", "other.example", "pc")
    token = token_of(register(service, session=remote))
    assert up.token_host(token) == HOST
    assert reply_of(post(service, token)).status == 201


def test_register_refusals(service: PushService) -> None:
    (error,) = service.handle(UpRegister("r", PHONE, "en", register_xml(instance="bad")), NOW)
    assert isinstance(error, IqError) and (error.error_type, error.condition) == (
        "modify", "bad-request") and error.text.startswith("instance: ")
    (error,) = service.handle(UpRegister("r", (*ALICE, ""), "en", register_xml()), NOW)
    assert isinstance(error, IqError) and error.condition == "bad-request"
    huge = register_xml(instance="Q" * 5_000_000)
    (error,) = service.handle(UpRegister("r", PHONE, "en", huge), NOW)
    assert isinstance(error, IqError)
    assert service.store.up_endpoint_count(ALICE) == 0


def test_register_off_when_no_url(opener: Opener) -> None:
    service = PushService(config(), opener())
    token = registered(service)
    service = restarted(service, opener, unified_push_url=None)  # the option removed
    (error,) = service.handle(UpRegister("r", PHONE, "en", register_xml()), NOW)
    assert isinstance(error, IqError) and error.condition == "service-unavailable"
    assert service.unified_push.initial_actions() == [UpUsers("reset", ())]
    assert reply_of(post(service, token)).status == 404


def test_endpoints_per_account_are_bounded(opener: Opener) -> None:
    service = PushService(config(unified_push_max_endpoints=50), opener())
    answers = [service.handle(UpRegister(n, PHONE, "en", register_xml(
        instance=base64.b64encode(n.to_bytes(32, "big")).decode())), NOW)[-1]
        for n in range(1000)]
    assert sum(isinstance(a, IqResult) for a in answers) == 50
    refused = answers[-1]
    assert isinstance(refused, IqError) and (refused.error_type, refused.condition) == (
        "cancel", "not-allowed") and "unified_push_max_endpoints" in refused.text
    assert service.store.up_endpoint_count(ALICE) == 50
    # a renewal of one it holds is no new endpoint
    again = service.handle(UpRegister("x", PHONE, "en", register_xml(
        instance=base64.b64encode((3).to_bytes(32, "big")).decode())), NOW)
    assert isinstance(again[-1], IqResult)


# ----------------------------------------------------------------------------- POST
def test_post_is_kept_answered_201_and_sent(service: PushService) -> None:
    token = registered(service)
    actions = post(service, token, b"\x00\xffbytes", ttl=b"120")
    reply = reply_of(actions)
    (push,) = pushes(actions)
    assert reply.ref == HTTP_REF and reply.status == 201
    headers = dict(reply.headers)
    assert headers["TTL"] == "120" and headers["Location"] == f"{URL}/{token}/m/{push.id}"
    assert push == UpPush(push.id, PHONE, APPLICATION, INSTANCE, b"\x00\xffbytes", 30_000)
    assert actions.index(reply) < actions.index(push)
    assert service.store.up_kept_get(push.id) is not None  # durable before the 201 goes
    answer(service, push, "result")
    assert service.store.up_kept_get(push.id) is None
    assert service.unified_push.deliveries == 1
    endpoint = service.store.up_endpoint(token)
    assert endpoint is not None and endpoint.last_delivery == NOW


def test_a_post_behind_kept_pushes_overtakes_none(service: PushService) -> None:
    """While older pushes are kept (the session was away), a POST sends only the oldest,
    as a probe: asleep, one up_push per POST; once it is delivered the rest follow in
    order, the new one last (a POST between a bind and the client's presence)."""
    token = registered(service)
    first, = pushes(post(service, token, b"1"))
    assert not pushes(answer(service, first, "offline"))
    probes = []
    for body in (b"2", b"3"):
        actions = post(service, token, body)
        assert reply_of(actions).status == 201
        (probe,) = pushes(actions)
        probes.append(probe)
        assert probe.payload == b"1"
        assert not pushes(answer(service, probe, "offline"))
    probe, = pushes(post(service, token, b"4"))
    assert probe.payload == b"1"
    rest = pushes(answer(service, probe, "result"))
    assert [p.payload for p in rest] == [b"2", b"3", b"4"]
    for push in rest:
        assert not pushes(answer(service, push, "result"))
    assert service.unified_push.deliveries == 4
    assert service.store.up_totals()[1] == 0


def test_missing_or_long_ttl_is_the_maximum(service: PushService) -> None:
    token = registered(service)
    assert dict(reply_of(post(service, token, ttl=None)).headers)["TTL"] == "86400"
    assert dict(reply_of(post(service, token, ttl=b"99999999")).headers)["TTL"] == "86400"


@pytest.mark.parametrize("token", [
    "", "x", "no.such", up.make_token(HOST, b"\x00" * 32),
    up.make_token("other.example", b"\x00" * 32), "a" * 100_000])
def test_unknown_tokens_get_404(service: PushService, token: str) -> None:
    registered(service)
    actions = post(service, token)
    assert reply_of(actions).status == 404 and not pushes(actions)
    assert service.store.up_totals()[1] == 0


def test_a_token_of_this_host_for_another_endpoint_is_unknown(service: PushService) -> None:
    token = registered(service)
    forged = token[:-1] + ("A" if token[-1] != "A" else "B")
    assert reply_of(post(service, forged)).status == 404


def test_expired_endpoint_404_then_deleted(service: PushService) -> None:
    token = registered(service)
    later = NOW + 7 * 86400 + 1
    assert reply_of(post(service, token, now=later)).status == 404
    assert service.expire_unified_push(later) == []
    assert service.store.up_endpoint(token) is not None  # within the grace
    assert service.expire_unified_push(later + ENDPOINT_GRACE_S) == [
        UpUsers("remove", (ALICE,))]
    assert service.store.up_endpoint(token) is None


@pytest.mark.parametrize(("header", "value"), [
    ("ttl", "١".encode()), ("ttl", b"12345678901"), ("urgency", b"now"),
    ("topic", b"x" * 33), ("topic", b"bad topic")])
def test_bad_headers_get_400(service: PushService, header: str, value: bytes) -> None:
    token = registered(service)
    actions = post(service, token, **{header: value})  # type: ignore[arg-type]
    reply = reply_of(actions)
    assert reply.status == 400 and reply.body and len(reply.body) < 100
    assert not pushes(actions) and service.store.up_totals()[1] == 0


def test_rate_per_endpoint_429(opener: Opener) -> None:
    service = PushService(config(unified_push_rate=60, unified_push_burst=3), opener())
    token = registered(service)
    other = token_of(register(service, instance=OTHER_INSTANCE))
    statuses = [reply_of(post(service, token)).status for _ in range(5)]
    assert statuses == [201, 201, 201, 429, 429]
    refused = reply_of(post(service, token))
    assert dict(refused.headers)["Retry-After"] == "1"
    assert reply_of(post(service, other)).status == 201  # per endpoint
    assert reply_of(post(service, token, now=NOW + 1)).status == 201
    assert service.unified_push.posts[429] == 3


def test_bodies_the_shim_should_have_refused(service: PushService) -> None:
    token = registered(service)
    assert reply_of(post(service, token, b"")).status == 400
    assert reply_of(post(service, token, b"x" * 4097)).status == 413
    assert reply_of(post(service, token, b"x" * 4096)).status == 201


def test_a_post_past_its_deadline_is_not_taken(service: PushService) -> None:
    token = registered(service)
    assert post(service, token, deadline_ms=int(NOW * 1000) - 1) == []
    assert service.store.up_totals()[1] == 0 and not service.unified_push.posts


def test_topic_replaces_a_kept_push_and_the_oldest_go(opener: Opener) -> None:
    service = PushService(config(unified_push_max_kept=3), opener())
    token = registered(service)
    sent = [pushes(post(service, token, f"m{n}".encode(), topic=b"t" if n < 2 else None))[0]
            for n in range(2)]
    for push in sent:
        answer(service, push, "offline")
    third = pushes(post(service, token, b"m2", topic=b"t"))[0]  # replaces m0 and m1
    assert service.unified_push.dropped["topic"] == 2
    answer(service, third, "pending")
    for n in range(3):  # each sends the oldest kept as a probe, which finds no session
        for push in pushes(post(service, token, f"n{n}".encode())):
            answer(service, push, "offline")
    assert service.unified_push.dropped["overflow"] == 1  # m2, the oldest kept
    redelivered = pushes(list(service.handle(UpPresence(PHONE), NOW)))
    assert [p.payload for p in redelivered] == [b"n0", b"n1", b"n2"]


# ----------------------------------------------------------------------------- outcomes
def test_revoked_on_item_not_found_and_feature_not_implemented(service: PushService) -> None:
    token = registered(service)
    other = token_of(register(service, instance=OTHER_INSTANCE))
    push = pushes(post(service, token))[0]
    assert answer(service, push, "error", "item-not-found") == []  # alice has another
    assert reply_of(post(service, token)).status == 404
    push = pushes(post(service, other))[0]
    assert answer(service, push, "error", "feature-not-implemented") == [
        UpUsers("remove", (ALICE,))]
    assert reply_of(post(service, other)).status == 404
    # a later register of the same triple gets a new endpoint
    assert token_of(register(service)) != token


def test_other_errors_and_timeouts_keep_it(service: PushService) -> None:
    token = registered(service)
    for outcome, condition in (("error", "service-unavailable"), ("timeout", ""),
                               ("offline", ""), ("pending", "")):
        push = pushes(post(service, token, outcome.encode()))[0]
        answer(service, push, outcome, condition)
    assert service.store.up_endpoint(token) is not None
    redelivered = pushes(list(service.handle(SessionResumed(PHONE), NOW + 1)))
    assert [p.payload for p in redelivered] == [b"error", b"timeout", b"offline", b"pending"]
    # sent now: a second presence does not send them twice
    assert pushes(list(service.handle(UpPresence(PHONE), NOW + 2))) == []


def test_only_the_registering_resource_gets_them(service: PushService) -> None:
    token = registered(service)
    answer(service, pushes(post(service, token))[0], "offline")
    assert pushes(list(service.handle(UpPresence(TABLET), NOW))) == []
    # a register from the tablet moves the endpoint there, and what it kept goes
    moved = register(service, session=TABLET)
    (push,) = pushes(moved)
    assert push.session == TABLET and endpoint_of(moved).endswith(token)


def test_ttl_0_is_tried_once(service: PushService) -> None:
    token = registered(service)
    reply = reply_of(actions := post(service, token, ttl=b"0"))
    assert dict(reply.headers)["TTL"] == "0"
    answer(service, pushes(actions)[0], "offline")
    assert service.unified_push.dropped["expired"] == 1 and service.store.up_totals()[1] == 0
    delivered = pushes(post(service, token, ttl=b"0"))[0]
    answer(service, delivered, "result")
    assert service.unified_push.deliveries == 1


def test_timeout_in_a_pending_session_is_delivered_on_resume(service: PushService) -> None:
    token = registered(service)
    push = pushes(post(service, token))[0]
    answer(service, push, "timeout_pending")
    held = service.store.up_kept_get(push.id)
    assert held is not None and held.state == "queued"
    # ejabberd runs c2s_session_opened for a resumed session too, before it says resumed
    assert pushes(list(service.handle(SessionOpened(PHONE), NOW))) == []
    assert pushes(list(service.handle(SessionResumed(PHONE), NOW))) == []  # not twice
    assert service.store.up_kept_get(push.id) is None
    assert service.unified_push.deliveries == 1


def test_timeout_in_a_pending_session_is_kept_again_on_a_new_bind(
        service: PushService) -> None:
    token = registered(service)
    push = pushes(post(service, token))[0]
    answer(service, push, "timeout_pending")
    assert pushes(list(service.handle(SessionOpened(PHONE), NOW))) == []
    held = service.store.up_kept_get(push.id)
    assert held is not None and held.state == "queued"  # a resumption opens a session too
    (again,) = pushes(list(service.handle(UpPresence(PHONE), NOW)))  # a new bind's presence
    assert again.id == push.id


def test_kept_pushes_expire(service: PushService) -> None:
    token = registered(service)
    push = pushes(post(service, token, ttl=b"10"))[0]
    answer(service, push, "offline")
    service.expire_unified_push(NOW + 5)
    assert service.store.up_totals()[1] == 1
    service.expire_unified_push(NOW + 10)
    assert service.store.up_totals()[1] == 0 and service.unified_push.dropped["expired"] == 1
    # one in flight whose answer never comes goes a grace later
    stuck = pushes(post(service, token, ttl=b"10"))[0]
    service.expire_unified_push(NOW + 11)
    assert service.store.up_kept_get(stuck.id) is not None
    service.expire_unified_push(NOW + 10 + ENDPOINT_GRACE_S)
    assert service.store.up_kept_get(stuck.id) is None
    # one that expires before its session comes back is not sent
    push = pushes(post(service, token, ttl=b"10", now=NOW + 20))[0]
    answer(service, push, "offline", now=NOW + 20)
    assert pushes(list(service.handle(UpPresence(PHONE), NOW + 31))) == []


# ----------------------------------------------------------------------------- wakes
def test_a_kept_push_wakes_xep0357_devices_once(service: PushService) -> None:
    service.handle(enable(), NOW)
    token = registered(service)
    first = answer(service, pushes(post(service, token))[0], "pending")
    (wake,) = [a for a in first if isinstance(a, Publish)]
    assert dict(wake.fields)["message-count"] == ("1",)
    assert not any(str(token) in str(value) for _, values in wake.fields for value in values)
    second = answer(service, pushes(post(service, token))[0], "offline")
    assert [a for a in second if isinstance(a, Publish)] == []  # not one per push
    service.handle(UpPresence(PHONE), NOW)  # back: the next kept one wakes again
    third = answer(service, pushes(post(service, token))[0], "offline")
    assert len([a for a in third if isinstance(a, Publish)]) == 1
    assert service.unified_push.wakes == 2


def test_no_wake_without_xep0357(service: PushService) -> None:
    token = registered(service)
    assert answer(service, pushes(post(service, token))[0], "offline") == []


# ----------------------------------------------------------------------------- restarts
def test_a_restart_sends_nothing_twice_and_keeps_what_was_kept(
        service: PushService, opener: Opener) -> None:
    token = registered(service)
    kept = pushes(post(service, token, b"kept"))[0]
    answer(service, kept, "offline")
    (in_flight,) = pushes(post(service, token, b"later"))  # the oldest goes as a probe
    assert in_flight.payload == b"kept"
    service = restarted(service, opener)
    assert service.unified_push.initial_actions() == [UpUsers("reset", (ALICE,))]
    # the presence sends what was kept, not what is in flight (its answer is to come)
    (again,) = pushes(list(service.handle(UpPresence(PHONE), NOW)))
    assert again.payload == b"later"
    # the answer, replayed after the restart: nothing more to send
    assert not pushes(answer(service, in_flight, "result"))
    answer(service, again, "result")
    assert service.store.up_totals() == (1, 0)
    assert service.unified_push.deliveries == 2
    # ids stay increasing after a restart (the order of what is kept)
    newer = pushes(post(service, token, now=NOW - 100))[0]
    assert newer.id > in_flight.id


def test_ejabberd_started_keeps_what_was_in_flight(service: PushService,
                                                   opener: Opener) -> None:
    token = registered(service)
    first = pushes(post(service, token, b"one"))[0]
    second = pushes(post(service, token, b"two"))[0]
    answer(service, second, "timeout_pending")
    service = restarted(service, opener)
    service.handle(EjabberdStarted(), NOW)
    redelivered = pushes(list(service.handle(UpPresence(PHONE), NOW)))
    assert [(p.id, p.payload) for p in redelivered] == [(first.id, b"one"), (second.id, b"two")]


def test_the_account_removed_takes_its_endpoints(service: PushService) -> None:
    token = registered(service)
    answer(service, pushes(post(service, token))[0], "offline")
    actions = list(service.handle(UserRemoved(ALICE), NOW))
    assert UpUsers("remove", (ALICE,)) in actions
    assert service.store.up_totals() == (0, 0)


# ----------------------------------------------------------------------------- operator
def test_admin_list_and_revoke(service: PushService) -> None:
    token = registered(service)
    register(service, instance=OTHER_INSTANCE)
    answer(service, pushes(post(service, token))[0], "offline")
    info = admin.ProcessInfo()
    (listing,) = admin.run(AdminCommand("c", "up_list", ("alice", HOST)), service, info, NOW)
    assert isinstance(listing, CommandResult)
    lines = listing.text.splitlines()
    assert len(lines) == 2 and token not in listing.text and INSTANCE not in listing.text
    (line,) = [line for line in lines if line.startswith(short_hash(INSTANCE))]
    assert "resource phone" in line and f"application {short_hash(APPLICATION)}" in line
    assert "kept 1" in line and "last delivery never" in line
    assert up.expiration(NOW + 7 * 86400) in line
    (revoked,) = admin.run(AdminCommand("c", "up_revoke", ("alice", HOST,
                                                            short_hash(INSTANCE).removeprefix("#"))),
                           service, info, NOW)
    assert isinstance(revoked, CommandResult) and "revoked 1" in revoked.text
    assert reply_of(post(service, token)).status == 404
    (unknown,) = admin.run(AdminCommand("c", "up_revoke", ("alice", HOST, "ffffffff")),
                           service, info, NOW)
    assert isinstance(unknown, CommandResult) and unknown.text.startswith("error:")
    *actions, result = admin.run(AdminCommand("c", "up_revoke", ("alice", HOST, "all")),
                                 service, info, NOW)
    assert actions == [UpUsers("remove", (ALICE,))] and "revoked 1" in str(result)
    (status,) = admin.run(AdminCommand("c", "status", ()), service, info, NOW)
    assert "UnifiedPush endpoints: 0" in str(status)


def test_metrics(service: PushService) -> None:
    token = registered(service)
    answer(service, pushes(post(service, token))[0], "result")
    post(service, "no.such")
    totals = service.store.totals()
    counts = service.unified_push
    text = render(Snapshot(HOST, Counter(), Counter(), Counter(), {}, totals,
                           unified_push=UnifiedPushCounts(dict(counts.posts), counts.deliveries,
                                                          dict(counts.dropped))))
    assert 'pymod_push_unifiedpush_endpoints{host="example.org"} 1' in text
    assert 'pymod_push_unifiedpush_kept{host="example.org"} 0' in text
    assert 'pymod_push_unifiedpush_posts_total{host="example.org",code="201"} 1' in text
    assert 'pymod_push_unifiedpush_posts_total{host="example.org",code="404"} 1' in text
    assert 'pymod_push_unifiedpush_deliveries_total{host="example.org"} 1' in text
    assert 'pymod_push_unifiedpush_dropped_total{host="example.org",reason="overflow"} 0' in text


def test_logs_never_show_tokens_payloads_or_endpoints(
        service: PushService, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="pymod_push")
    service.handle(enable(), NOW)
    actions = register(service)
    token, endpoint = token_of(actions), endpoint_of(actions)
    secret = b"SECRET-PAYLOAD-42"
    for outcome in ("offline", "pending", "error"):
        answer(service, pushes(post(service, token, secret))[0], outcome, "item-not-found"
               if outcome == "error" else "")
    register(service, session=TABLET)
    token = token_of(register(service, session=TABLET, instance=OTHER_INSTANCE))
    for _ in range(20):
        post(service, token, secret)
    post(service, token, secret, deadline_ms=0)
    service.handle(UpPresence(TABLET), NOW)
    admin.run(AdminCommand("c", "up_revoke", ("alice", HOST, "all")), service,
              admin.ProcessInfo(), NOW)
    logged = caplog.text
    assert logged  # it does say things
    for secret_text in (token, token.split(".")[1], endpoint, secret.decode(), INSTANCE,
                        APPLICATION, base64.b64encode(secret).decode()):
        assert secret_text not in logged


# ----------------------------------------------------------------------------- the port
async def registered_through(port: PortUnderTest) -> str:
    """alice/phone registers through the port (batch 1): the endpoint's token."""
    session = (b"alice", b"example.org", b"phone")
    port.app.on_frames([batch(1, (Atom("up_register"), Atom("r"), session, b"en",
                                  register_xml()))])
    await until(lambda: 1 in acks(port))
    (result,) = [a for a in port.actions() if a[0] == "iq_result"]
    return ET.fromstring(result[2]).get("endpoint", "").rsplit("/", 1)[1]


def test_the_port_says_the_201_only_after_the_commit(tmp_path: Path) -> None:
    async def main() -> None:
        port = PortUnderTest()
        try:
            port.app.on_frames([hello(tmp_path / "db.sqlite3", unified_push_url=URL.encode())])
            # after the hello: the shim's UnifiedPush user set
            assert (Atom("unified_push"), (Atom("users"), Atom("reset"), [])) in port.actions()
            token = await registered_through(port)
            store = port.app._store
            assert store is not None
            commit = store.commit

            def marked_commit() -> None:
                commit()
                port.written.append("committed")
            store.commit = marked_commit  # type: ignore[method-assign]
            deadline = int((time.time() + 10) * 1000)
            meta = {Atom("ttl"): b"60", Atom("urgency"): Atom("undefined"),
                    Atom("topic"): Atom("undefined"), Atom("deadline"): deadline}
            port.app.on_frames([batch(2, (Atom("up_post"), HTTP_REF, token.encode(), meta,
                                          b"hello"))])
            await until(lambda: 2 in acks(port))
            replies = [i for i, f in enumerate(port.written) if isinstance(f, list)
                       and any(a[0] == "http_reply" for a in f)]
            (where,) = replies
            assert "committed" in port.written[:where]
            (reply,) = [a for a in port.written[where] if a[0] == "http_reply"]
            assert reply[1] == HTTP_REF and reply[2] == 201
            (push,) = [a for a in port.written[where] if a[0] == "up_push"]
            assert push[1][0] == "up" and push[5] == b"hello"
        finally:
            await port.app.aclose()

    asyncio.run(main())


# ----------------------------------------------------------------------------- the store
def test_store_endpoints_and_kept_pushes(opener: Opener) -> None:
    store = opener()
    endpoint = UpEndpoint("tok.one", *PHONE, APPLICATION, INSTANCE, NOW + 10, NOW)
    store.add_up_endpoint(endpoint)
    store.add_up_endpoint(UpEndpoint("tok.two", *TABLET, APPLICATION, OTHER_INSTANCE,
                                     NOW + 10, NOW + 1))
    for push_id, state in ((30, "kept"), (10, "sent"), (20, "kept"), (40, "queued")):
        store.add_up_kept(KeptPush(push_id, "tok.one", "t" if push_id == 20 else None,
                                   bytes([0, push_id, 255]), NOW + push_id, state))
    store.commit()
    store = opener()  # what was committed survives
    assert store.up_endpoint("tok.one") == endpoint
    assert store.up_endpoint_for(ALICE, APPLICATION, INSTANCE) == endpoint
    assert [e.token for e in store.up_endpoints_of(ALICE)] == ["tok.one", "tok.two"]
    assert [e.token for e in store.up_endpoints_at(TABLET)] == ["tok.two"]
    assert store.up_endpoint_count(ALICE) == 2 and store.up_users() == [ALICE]
    assert [h.id for h in store.up_held("tok.one")] == [10, 20, 30, 40]  # in id order
    assert [(p.id, p.payload) for p in store.up_kept_of("tok.one")] == [
        (20, b"\x00\x14\xff"), (30, b"\x00\x1e\xff")]
    assert store.up_kept_expired(NOW + 25, 0) == [store.up_kept_get(20)]
    assert [p.id for p in store.up_kept_expired(NOW + 25, NOW + 10)] == [10, 20]
    assert store.up_states("sent", "kept", "other.example") == 0
    assert store.up_states("sent", "kept", HOST) == 1
    assert store.up_states("sent", "kept", HOST) == 0
    assert [p.id for p in store.up_kept_of("tok.one")] == [10, 20, 30]
    store.renew_up_endpoint("tok.one", "tablet", NOW + 99)
    store.up_delivered("tok.one", NOW + 5)
    moved = store.up_endpoint("tok.one")
    assert moved is not None and (moved.resource, moved.expires, moved.last_delivery) == (
        "tablet", NOW + 99, NOW + 5)
    assert store.last_up_kept_id() == 40 and store.up_totals() == (2, 4)
    assert [e.token for e in store.up_endpoints_expired(NOW + 50)] == ["tok.two"]
    store.delete_up_endpoint("tok.one")
    assert store.up_totals() == (1, 0) and store.up_kept_get(10) is None
    totals = store.totals()
    assert (totals["up_endpoints"], totals["up_kept"]) == (1, 0)


def test_one_endpoint_per_account_application_and_instance(tmp_path: Path) -> None:
    store = open_store(str(tmp_path / "push.sqlite3"))
    try:
        store.add_up_endpoint(UpEndpoint("a.1", *PHONE, APPLICATION, INSTANCE, NOW, NOW))
        with pytest.raises(sqlite3.IntegrityError):
            store.add_up_endpoint(UpEndpoint("a.2", *TABLET, APPLICATION, INSTANCE, NOW, NOW))
        with pytest.raises(sqlite3.IntegrityError):  # the token is the key
            store.add_up_endpoint(UpEndpoint("a.1", *PHONE, APPLICATION, OTHER_INSTANCE,
                                             NOW, NOW))
    finally:
        store.close()


def test_an_older_database_gets_the_tables_and_stays_private(tmp_path: Path) -> None:
    path = tmp_path / "push.sqlite3"
    with closing(sqlite3.connect(path)) as old:
        for number, script in enumerate(MIGRATIONS[:13], start=1):
            old.executescript(f"BEGIN; {script}; PRAGMA user_version={number}; COMMIT;")
    path.chmod(0o600)
    store = open_store(str(path))
    try:
        assert store.schema_version() == len(MIGRATIONS) >= 14
        assert store.up_totals() == (0, 0)
        assert path.stat().st_mode & 0o777 == 0o600
        plan = " ".join(str(row) for row in store.db.execute(
            "EXPLAIN QUERY PLAN SELECT token FROM up_endpoints WHERE token=?", ("x",)))
        assert "INDEX" in plan and "(token=?)" in plan  # a POST looks up by index
    finally:
        store.close()


def test_postgresql_away_in_a_read_is_tried_again_and_loses_nothing(postgres: Any) -> None:
    """A POST's handling reads (its endpoint): the database away then, no commit has
    failed, yet the port tries again with its backoff and handles what it held once the
    database is back (every POST answered 201 once, in order)."""
    url = postgres.new_database()
    token = ""

    def post_frame(seq: int, body: bytes) -> bytes:
        meta = {Atom("ttl"): b"60", Atom("urgency"): Atom("undefined"),
                Atom("topic"): Atom("undefined"),
                Atom("deadline"): int((time.time() + 30) * 1000)}
        return batch(seq, (Atom("up_post"), HTTP_REF, token.encode(), meta, body))

    async def main() -> None:
        nonlocal token
        port = PortUnderTest()
        try:
            port.app.on_frames([etf.encode((Atom("hello"), PROTOCOL_VERSION, b"example.org", {
                Atom("db_url"): url.encode(), Atom("node"): Atom("e@h"),
                Atom("unified_push_url"): URL.encode()}))])
            token = await registered_through(port)
            await asyncio.to_thread(postgres.halt)
            try:
                port.app.on_frames([post_frame(2, b"during")])  # its read fails
                await until(lambda: port.app.commits.held is not None)
                port.app.on_frames([post_frame(3, b"held")])
                # commits tried again and failed (the backoff doubled twice): nothing said
                await until(lambda: port.app.commits._retry_s >= 4 * RETRY_FIRST_S)
                assert acks(port) == [1]
            finally:
                await asyncio.to_thread(postgres.start)
            await until(lambda: 3 in acks(port), timeout=30)
            replies = [a for a in port.actions() if a[0] == "http_reply"]
            assert [r[2] for r in replies] == [201, 201]
            assert [a[5] for a in port.actions() if a[0] == "up_push"] == [b"during", b"held"]
        finally:
            await port.app.aclose()

    asyncio.run(main())
