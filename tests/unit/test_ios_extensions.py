"""Tigase's push extensions (Siskin IM, Snikket iOS): parsing, the encrypted payload,
filters and priority as plain functions, then through the service on both databases."""

from __future__ import annotations

import base64
import json
import os
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any
from xml.sax.saxutils import quoteattr

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given, settings
from hypothesis import strategies as st

from pymod_push.core import ios_extensions as ext
from pymod_push.core.config import Config
from pymod_push.core.xep0357 import Enable, parse_push_request
from pymod_push.core.xmpp import RequestError
from pymod_push.logic import Logic
from pymod_push.protocol import (
    IqError,
    IqResult,
    Publish,
    SetPush,
    Stanza,
    StanzaToPending,
    action_term,
)
from pymod_push.service.decisions import PushService
from pymod_push.store import Store, open_store
from tests.builders import (
    APP,
    OWN_HOST_BACKENDS,
    PHONE,
    PUBSUB_HOST,
    enable_xml,
    make_service,
    push_iq,
    registered,
)

KEY = bytes(range(16))
KEY64 = base64.b64encode(KEY).decode()


def tigase_enable(children: str = "", node: str = "n1", attrs: str = "") -> str:
    """<enable/> with Tigase's extensions as its children (and no publish-options)."""
    return enable_xml(node, form=children, attrs=attrs)
def encrypt_el(key: str = KEY64, alg: str = "aes-128-gcm", extra: str = "") -> str:
    return f"<encrypt xmlns='tigase:push:encrypt:0' alg='{alg}'{extra}>{key}</encrypt>"


ALL = (encrypt_el(extra=" max-size='2000'")
       + "<priority xmlns='tigase:push:priority:0'/>"
       + "<muted xmlns='tigase:push:filter:muted:0'><item jid='Bot@Example.org'/></muted>"
       + "<groupchat xmlns='tigase:push:filter:groupchat:0'>"
       "<room jid='loud@muc.example.org' allow='always'/>"
       "<room jid='quiet@muc.example.org' allow='mentioned' nick='Alice'/>"
       "<room jid='off@muc.example.org' allow='never'/></groupchat>"
       + "<ignore-unknown xmlns='tigase:push:filter:ignore-unknown:0'/>"
       + "<jingle xmlns='tigase:push:jingle:0'/>")


def parsed(children: str, attrs: str = "") -> ext.Extensions | None:
    request = parse_push_request(tigase_enable(children, attrs=attrs).encode())
    assert isinstance(request, Enable)
    return request.extensions


# ------------------------------------------------------------------------ parsing

def test_every_extension_is_parsed() -> None:
    found = parsed(ALL, " away='true'")
    assert found is not None
    assert found.encrypt == ext.Encrypt(KEY, 2000)
    assert found.priority and found.ignore_unknown and found.jingle and found.away
    assert found.muted == frozenset({"bot@example.org"})
    assert found.groupchat == (ext.RoomRule("loud@muc.example.org", "always"),
                               ext.RoomRule("quiet@muc.example.org", "mentioned", "Alice"),
                               ext.RoomRule("off@muc.example.org", "never"))
    assert ext.from_json(found.to_json()) == found
    assert KEY64 not in repr(found)  # the key stays out of every repr


def test_an_enable_without_extensions_has_none() -> None:
    assert parsed("") is None
    assert parsed("<x xmlns='jabber:x:data' type='submit'/>") is None
    assert ext.from_json("") == ext.NONE and not ext.NONE and ext.NONE.to_json() == ""


def test_max_size_defaults_to_tigases_and_is_bounded() -> None:
    default = parsed(encrypt_el())
    assert default is not None and default.encrypt is not None
    assert default.encrypt.max_size == ext.DEFAULT_MAX_SIZE == 3000
    huge = parsed(encrypt_el(extra=" max-size='999999'"))
    assert huge is not None and huge.encrypt is not None
    assert huge.encrypt.max_size == ext.MAX_MAX_SIZE


@pytest.mark.parametrize(("children", "attrs", "words"), [
    (encrypt_el(key="not base64!"), "", "base64"),
    (encrypt_el(key=base64.b64encode(b"short").decode()), "", "16 bytes"),
    (encrypt_el(key=base64.b64encode(bytes(32)).decode()), "", "16 bytes"),
    (encrypt_el(key=""), "", "16 bytes"),
    (encrypt_el(alg="aes-256-gcm"), "", "algorithm"),
    (encrypt_el(alg=""), "", "algorithm"),
    (encrypt_el(extra=" max-size='12x'"), "", "max-size"),
    # isdigit() is true for each; int() raised on the first (a traceback, the IQ never
    # answered) and took the others (Arabic-Indic, fullwidth, mathematical 3000)
    (encrypt_el(extra=" max-size='\u00b2'"), "", "max-size must be a number"),
    (encrypt_el(extra=" max-size='\u0663\u0660\u0660\u0660'"), "", "ASCII digits"),
    (encrypt_el(extra=" max-size='\uff13\uff10\uff10\uff10'"), "", "ASCII digits"),
    (encrypt_el(extra=" max-size='\U0001d7d1\U0001d7ce\U0001d7ce\U0001d7ce'"), "",
     "ASCII digits"),
    (encrypt_el(extra=" max-size='3\u00b2'"), "", "ASCII digits"),
    (encrypt_el(extra=" max-size=''"), "", "max-size"),
    (encrypt_el(extra=" max-size='1234567890'"), "", "max-size"),
    (encrypt_el(extra=" max-size='10'"), "", "at least"),
    (encrypt_el() + encrypt_el(), "", "more than once"),
    ("<muted xmlns='tigase:push:filter:muted:0'><item/></muted>", "", "jid"),
    ("<muted xmlns='tigase:push:filter:muted:0'><item jid='a b'/></muted>", "", "bare JID"),
    ("<muted xmlns='tigase:push:filter:muted:0'><item jid='a@b/c'/></muted>", "", "bare JID"),
    ("<muted xmlns='tigase:push:filter:muted:0'>"
     + "<item jid='a@b'/>" * (ext.MAX_MUTED + 1) + "</muted>", "", "at most"),
    ("<groupchat xmlns='tigase:push:filter:groupchat:0'>"
     + "<room jid='r@muc' allow='always'/>" * (ext.MAX_ROOMS + 1) + "</groupchat>", "",
     "at most"),
    ("<groupchat xmlns='tigase:push:filter:groupchat:0'><room jid='r@muc' allow='sometimes'/>"
     "</groupchat>", "", "allow"),
    ("<groupchat xmlns='tigase:push:filter:groupchat:0'><room allow='always'/></groupchat>", "",
     "jid"),
    ("", " away='maybe'", "away"),
    ("<muted xmlns='tigase:push:filter:muted:0'>" + "".join(
        f"<item jid='{'u' * 90}{n}@example.org'/>" for n in range(900)) + "</muted>", "",
     "more than"),
])
def test_malformed_extensions_are_bad_requests(children: str, attrs: str, words: str) -> None:
    with pytest.raises(RequestError) as caught:
        parsed(children, attrs)
    assert caught.value.condition == "bad-request" and words in caught.value.text


jids = st.from_regex(r"[a-z][a-z0-9]{0,8}@[a-z]{1,8}\.[a-z]{2,3}", fullmatch=True)
nicks = st.text(st.characters(min_codepoint=32, max_codepoint=0xD7FF), max_size=12)


@settings(max_examples=60, deadline=None)
@given(key=st.binary(min_size=16, max_size=16), max_size=st.integers(256, 20000),
       muted=st.frozensets(jids, max_size=5),
       rooms=st.lists(st.tuples(jids, st.sampled_from(ext.ALLOW), nicks),
                      max_size=5, unique_by=lambda r: r[0]),
       flags=st.tuples(st.booleans(), st.booleans(), st.booleans(), st.booleans()))
def test_parse_and_storage_round_trip(key: bytes, max_size: int, muted: frozenset[str],
                                      rooms: list[tuple[str, str, str]],
                                      flags: tuple[bool, bool, bool, bool]) -> None:
    priority, ignore, jingle, away = flags
    children = encrypt_el(base64.b64encode(key).decode(), extra=f" max-size='{max_size}'")
    children += "<priority xmlns='tigase:push:priority:0'/>" if priority else ""
    children += ("<muted xmlns='tigase:push:filter:muted:0'>"
                 + "".join(f"<item jid='{j}'/>" for j in sorted(muted)) + "</muted>")
    children += ("<groupchat xmlns='tigase:push:filter:groupchat:0'>"
                 + "".join(f"<room jid='{r}' allow='{a}' nick={quoteattr(n)}/>"
                           for r, a, n in rooms) + "</groupchat>")
    children += "<ignore-unknown xmlns='tigase:push:filter:ignore-unknown:0'/>" if ignore else ""
    children += "<jingle xmlns='tigase:push:jingle:0'/>" if jingle else ""
    found = parsed(children, " away='true'" if away else "")
    assert found is not None and found.encrypt is not None
    assert found.encrypt.key == key
    assert found.encrypt.max_size == min(max_size, ext.MAX_MAX_SIZE)
    assert found.muted == muted
    assert [(r.room, r.allow, r.nick) for r in found.groupchat or ()] == rooms
    assert (found.priority, found.ignore_unknown, found.jingle, found.away) == flags
    ext._cached.cache_clear()
    assert ext.from_json(found.to_json()) == found


# ------------------------------------------------------------------- the payload

def event(body: str = "hello", sender: str = "bob@example.org/pc", stanza_type: str = "chat",
          kind: str = "message", xml: bytes = b"<message/>", call: bool = False,
          encrypted: bool = False, own_nick: str = "",
          known: bool | None = None) -> ext.Event:
    return ext.Event(kind, stanza_type, sender, body, xml, call, encrypted, own_nick, known)


def open_element(xml: str) -> ET.Element:
    element = ET.fromstring(xml)
    assert element.tag == f"{{{ext.NS_ENCRYPT}}}encrypted"
    return element


def test_encrypted_element_decrypts_with_a_real_tag() -> None:
    iv = os.urandom(12)
    plaintext = ext.fit_payload(ext.payload(event(), 3, True, True), 3000, False)
    element = open_element(ext.encrypt(KEY, iv, plaintext, False))
    assert base64.b64decode(element.get("iv", "")) == iv and element.get("type") is None
    assert ext.decrypt(KEY, element) == {"unread": 3, "sender": "bob@example.org",
                                         "type": "chat", "message": "hello"}
    sealed = bytearray(base64.b64decode(element.text or ""))
    assert bytes(sealed[-16:]) != bytes(16)  # not Prosody's zeros
    sealed[-1] ^= 1
    with pytest.raises(InvalidTag):
        AESGCM(KEY).decrypt(iv, bytes(sealed), None)


def test_payload_of_each_kind() -> None:
    room = event("Alice: lunch?", sender="room@muc.example.org/Bob", stanza_type="groupchat")
    assert ext.payload(room, 1, True, True) == {
        "unread": 1, "sender": "room@muc.example.org", "type": "groupchat",
        "message": "Alice: lunch?", "nickname": "Bob"}
    omemo = event("I sent you an OMEMO message", encrypted=True)
    assert ext.payload(omemo, 1, True, True)["message"] == ext.OMEMO_BODY
    subscribe = event("", kind="presence", stanza_type="subscribe", sender="carol@example.org")
    assert ext.payload(subscribe, 0, True, True) == {"unread": 0, "sender": "carol@example.org",
                                                     "type": "subscribe"}
    propose = (b"<message xmlns='jabber:client'><propose xmlns='urn:xmpp:jingle-message:0' "
               b"id='call1'><description xmlns='urn:xmpp:jingle:apps:rtp:1' media='audio'/>"
               b"<description xmlns='urn:xmpp:jingle:apps:rtp:1' media='video'/>"
               b"<description xmlns='urn:xmpp:jingle:apps:rtp:1' media='audio'/></propose>"
               b"</message>")
    call = event("", xml=propose, call=True)
    assert ext.payload(call, 1, True, True) == {
        "unread": 1, "sender": "bob@example.org/pc", "type": "call", "sid": "call1",
        "media": ["audio", "video"]}
    # the admin's limits withhold sender and body even encrypted
    assert ext.payload(room, 1, False, False) == {"unread": 1, "type": "groupchat"}


@settings(max_examples=80, deadline=None)
@given(body=st.text(max_size=3000), max_size=st.integers(ext.MIN_MAX_SIZE, 4000),
       sender=st.sampled_from(["bob@example.org/pc", "x" * 300 + "@example.org/r"]),
       voip=st.booleans())
def test_the_payload_is_trimmed_to_fit_max_size(body: str, max_size: int, sender: str,
                                                voip: bool) -> None:
    data = ext.payload(event(body, sender=sender), 7, True, True)
    plaintext = ext.fit_payload(data, max_size, voip)
    element = ext.encrypt(KEY, bytes(12), plaintext, voip)
    assert len(element.encode()) <= max_size
    assert len(element.encode()) == ext.encrypted_size(len(plaintext), voip)
    decoded = ext.decrypt(KEY, open_element(element))
    assert decoded["unread"] == 7 and decoded["type"] == "chat"
    whole = len(ext.encrypt(KEY, bytes(12), ext._json_bytes(data), voip).encode())
    if whole <= max_size:
        assert decoded == data  # nothing trimmed that fitted
        return
    message = decoded.get("message", "")
    # cut: a prefix with the mark, or left out; the sender goes only after the message
    assert message == "" or (message.endswith("\u2026") and body.startswith(message[:-1]))
    assert "sender" in decoded or "message" not in decoded


# ------------------------------------------------------------- filters, priority

def rules(children: str) -> ext.Extensions:
    found = parsed(children)
    assert found is not None
    return found


GROUPCHAT = rules(ALL)


@pytest.mark.parametrize(("what", "stanza", "allowed"), [
    ("muted 1:1", event(sender="bot@example.org/x"), False),
    ("muted, other case", event(sender="BOT@example.org"), False),
    ("known contact", event(known=True), True),
    ("unknown contact", event(known=False), False),
    ("roster not told", event(known=None), True),
    ("unknown subscription request", event("", kind="presence", stanza_type="subscribe",
                                           known=False), False),
    ("always room", event("x", sender="loud@muc.example.org/Bob", stanza_type="groupchat",
                          known=False), True),
    ("never room", event("Alice!", sender="off@muc.example.org/Bob",
                         stanza_type="groupchat"), False),
    ("unlisted room", event("Alice!", sender="new@muc.example.org/Bob",
                            stanza_type="groupchat"), False),
    ("mentioned by nick", event("hey alice, look", sender="quiet@muc.example.org/Bob",
                                stanza_type="groupchat"), True),
    ("nick inside a word", event("malice", sender="quiet@muc.example.org/Bob",
                                 stanza_type="groupchat"), False),
    ("not mentioned", event("lunch?", sender="quiet@muc.example.org/Bob",
                            stanza_type="groupchat"), False),
    ("XEP-0372 mention", event("hey you", sender="quiet@muc.example.org/Bob",
                               stanza_type="groupchat",
                               xml=b"<message xmlns='jabber:client'><body>hey you</body>"
                                   b"<reference xmlns='urn:xmpp:reference:0' type='mention' "
                                   b"uri='xmpp:alice@example.org' begin='4' end='7'/>"
                                   b"</message>"), True),
    ("XEP-0372 occupant mention", event("hey you", sender="quiet@muc.example.org/Bob",
                                        stanza_type="groupchat",
                                        xml=b"<message xmlns='jabber:client'><reference "
                                            b"xmlns='urn:xmpp:reference:0' type='mention' "
                                            b"uri='xmpp:quiet@muc.example.org/Alice'/>"
                                            b"</message>"), True),
    ("XEP-0372 someone else", event("hey you", sender="quiet@muc.example.org/Bob",
                                    stanza_type="groupchat",
                                    xml=b"<message xmlns='jabber:client'><reference "
                                        b"xmlns='urn:xmpp:reference:0' type='mention' "
                                        b"uri='xmpp:carol@example.org'/></message>"), False),
])
def test_filters(what: str, stanza: ext.Event, allowed: bool) -> None:
    assert ext.allowed(GROUPCHAT, stanza, "alice@example.org") is allowed, what


def test_without_a_groupchat_element_rooms_are_not_filtered_here() -> None:
    plain = rules("<priority xmlns='tigase:push:priority:0'/>")
    room = event("x", sender="any@muc.example.org/Bob", stanza_type="groupchat", known=False)
    assert ext.allowed(plain, room, "alice@example.org")
    assert ext.allowed(plain, event(known=False), "alice@example.org")  # not asked


def test_priority() -> None:
    assert ext.is_important(event("hi"))
    assert not ext.is_important(event(""))
    assert ext.is_important(event("", call=True))
    assert ext.is_important(event("", kind="presence", stanza_type="subscribe"))
    assert ext.priority_element(True) == \
        "<priority xmlns='tigase:push:priority:0'>high</priority>"


# -------------------------------------------------------- through the service



def stanza(body: str = "hi", stanza_id: str = "m1", sender: str = "bob@example.org/pc",
           stanza_type: str = "chat", extra: str = "", known: bool | None = True,
           nick: str = "") -> Stanza:
    xml = (f"<message xmlns='jabber:client' from='{sender}' id='{stanza_id}' "
           f"type='{stanza_type}'><body>{body}</body>{extra}</message>")
    return Stanza("message", sender, stanza_id, stanza_type, body, xml.encode(), nick, known)


def elements(action: object) -> list[ET.Element]:
    assert isinstance(action, Publish)
    return [ET.fromstring(e) for e in action.elements]


def decrypted(action: object) -> dict[str, Any]:
    (encrypted,) = [e for e in elements(action) if e.tag == f"{{{ext.NS_ENCRYPT}}}encrypted"]
    return ext.decrypt(KEY, encrypted)


def priority_of(action: object) -> str | None:
    found = [e.text for e in elements(action) if e.tag == f"{{{ext.NS_PRIORITY}}}priority"]
    assert len(found) <= 1
    return found[0] if found else None


@pytest.mark.usefixtures("database")
def test_enable_keeps_the_extensions_next_enable_replaces_disable_removes() -> None:
    service = make_service()
    assert service.handle(push_iq(tigase_enable(ALL)), 0) == [
        SetPush(PHONE, Config.resume_timeout_ms), IqResult("ref")]
    (registration,) = service.store.for_session(PHONE)
    assert ext.from_json(registration.extensions) == parsed(ALL)
    assert KEY64 not in repr(registration)
    service.handle(push_iq(tigase_enable("<priority xmlns='tigase:push:priority:0'/>")), 1)
    (registration,) = service.store.for_session(PHONE)
    assert ext.from_json(registration.extensions) == ext.Extensions(priority=True)
    service.handle(push_iq(tigase_enable("")), 2)  # an enable without any: none kept
    (registration,) = service.store.for_session(PHONE)
    assert registration.extensions == ""
    service.handle(push_iq(tigase_enable(ALL)), 3)
    service.handle(push_iq(f"<disable xmlns='urn:xmpp:push:0' jid='{APP}' node='n1'/>"), 4)
    assert service.store.for_user(PHONE[:2]) == []


@pytest.mark.usefixtures("database")
def test_a_malformed_extension_stores_nothing_and_keeps_what_was() -> None:
    service = make_service()
    service.handle(push_iq(tigase_enable(ALL)), 0)
    bad = tigase_enable(encrypt_el(key="AAAA") + "<priority xmlns='tigase:push:priority:0'/>")
    (answer,) = service.handle(push_iq(bad), 1)
    assert isinstance(answer, IqError) and answer.condition == "bad-request"
    assert "16 bytes" in answer.text
    (registration,) = service.store.for_session(PHONE)
    assert ext.from_json(registration.extensions) == parsed(ALL)  # untouched
    (answer,) = service.handle(push_iq(tigase_enable(encrypt_el(key="AAAA"), node="n2")), 2)
    assert isinstance(answer, IqError)
    assert len(service.store.for_user(PHONE[:2])) == 1


@pytest.mark.usefixtures("database")
def test_the_option_off_ignores_extensions() -> None:
    service = make_service(ios_extensions=False)
    service.handle(push_iq(tigase_enable(ALL)), 0)
    (registration,) = service.store.for_session(PHONE)
    assert registration.extensions == ""


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_extensions_and_unanswered_encrypted_pushes_survive_a_restart(
        kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    if kind == "sqlite":
        path = str(tmp_path / "push.sqlite3")

        def reopen() -> Store:
            return Store(path)
    else:
        url = request.getfixturevalue("postgres").new_database()

        def reopen() -> Store:
            return open_store("", url)
    service = PushService(Config("example.org"), reopen())
    service.handle(push_iq(tigase_enable(ALL)), 0)
    (push,) = service.handle(StanzaToPending(PHONE, stanza("kept for later")), 1)
    service.store.commit()
    service.store.close()
    again = PushService(Config("example.org"), reopen())
    try:
        (registration,) = again.store.for_session(PHONE)
        assert ext.from_json(registration.extensions) == parsed(ALL)
        # the publish left unanswered goes again, the same encrypted element
        (resent,) = again.tick(10**10)
        assert isinstance(resent, Publish)
        assert isinstance(push, Publish) and resent.elements == push.elements
        assert decrypted(resent)["message"] == "kept for later"
    finally:
        again.store.close()


@pytest.mark.usefixtures("database")
def test_encrypted_publish_has_no_form_and_decrypts() -> None:
    service = make_service()  # include_senders/bodies off: the encrypted payload has them
    service.handle(push_iq(tigase_enable(ALL)), 0)
    (push,) = service.handle(StanzaToPending(PHONE, stanza("secret text")), 1)
    assert isinstance(push, Publish) and push.fields == ()
    assert decrypted(push) == {"unread": 1, "sender": "bob@example.org", "type": "chat",
                               "message": "secret text"}
    assert priority_of(push) == "high"
    term = repr(action_term(push))
    assert "secret text" not in term and "bob@example.org" not in term
    # a fresh IV for each push
    (again,) = service.handle(StanzaToPending(PHONE, stanza("secret text", "m2")), 2)
    assert decrypted(again)["unread"] == 2
    ivs = {e.get("iv") for p in (push, again) for e in elements(p) if e.get("iv")}
    assert len(ivs) == 2


@pytest.mark.usefixtures("database")
def test_admin_limits_withhold_sender_and_body_even_encrypted() -> None:
    service = make_service(allow_senders=False, allow_message_bodies=False)
    service.handle(push_iq(tigase_enable(ALL)), 0)
    (push,) = service.handle(StanzaToPending(PHONE, stanza("secret text")), 1)
    assert decrypted(push) == {"unread": 1, "type": "chat"}


@pytest.mark.usefixtures("database")
def test_filters_and_priority_message_by_message() -> None:
    service = make_service()
    service.handle(push_iq(tigase_enable(ALL)), 0)
    cases = [  # (stanza, pushed, priority)
        (stanza("hi", "1"), True, "high"),
        (stanza("hi", "2", sender="bot@example.org/x"), False, None),  # muted
        (stanza("hi", "3", known=False), False, None),  # ignore-unknown
        (stanza("x", "4", sender="loud@muc.example.org/Bob", stanza_type="groupchat",
                known=None), True, "high"),  # always, though notify_groupchat=mentions
        (stanza("alice?", "5", sender="quiet@muc.example.org/Bob", stanza_type="groupchat",
                known=None), True, "high"),
        (stanza("lunch", "6", sender="quiet@muc.example.org/Bob", stanza_type="groupchat",
                known=None), False, None),
        (stanza("alice!", "7", sender="off@muc.example.org/Bob", stanza_type="groupchat",
                known=None), False, None),
        (stanza("alice!", "8", sender="other@muc.example.org/Bob", stanza_type="groupchat",
                known=None, nick="alice"), False, None),  # unlisted
    ]
    for message, pushed, priority in cases:
        actions = service.handle(StanzaToPending(PHONE, message), 1)
        assert len(actions) == int(pushed), message.id
        if pushed:
            assert priority_of(actions[0]) == priority
            assert decrypted(actions[0])["type"] == message.type


@pytest.mark.usefixtures("database")
def test_low_priority_and_plain_registrations() -> None:
    service = make_service(notify_on="all", include_senders=True)
    service.handle(push_iq(tigase_enable("<priority xmlns='tigase:push:priority:0'/>")), 0)
    receipt = Stanza("message", "bob@example.org/pc", "r", "chat", "", b"<message/>")
    (low,) = service.handle(StanzaToPending(PHONE, receipt), 1)
    assert priority_of(low) == "low"
    assert isinstance(low, Publish) and dict((k, v[0]) for k, v in low.fields)[
        "last-message-sender"] == "bob@example.org/pc"  # not encrypted: the form as ever
    (high,) = service.handle(StanzaToPending(PHONE, stanza("hi")), 1)
    assert priority_of(high) == "high"
    # a client that asked for nothing gets no element
    service.handle(push_iq(tigase_enable("")), 2)
    (plain,) = service.handle(StanzaToPending(PHONE, stanza("hi", "m3")), 3)
    assert isinstance(plain, Publish) and plain.elements == ()
    assert len(action_term(plain)) == 7  # the publish as before


@pytest.mark.usefixtures("database")
def test_calls_are_voip_high_and_carry_the_jingle_element() -> None:
    service = make_service()
    service.handle(push_iq(tigase_enable(ALL)), 0)
    propose = ("<propose xmlns='urn:xmpp:jingle-message:0' id='c1'>"
               "<description xmlns='urn:xmpp:jingle:apps:rtp:1' media='audio'/></propose>")
    call = Stanza("message", "bob@example.org/pc", "c", "chat", "",
                  f"<message xmlns='jabber:client'>{propose}</message>".encode(), "", True)
    (push,) = service.handle(StanzaToPending(PHONE, call), 1)
    found = {e.tag: e for e in elements(push)}
    assert found[f"{{{ext.NS_ENCRYPT}}}encrypted"].get("type") == "voip"
    assert decrypted(push) == {"unread": 1, "sender": "bob@example.org/pc", "type": "call",
                               "sid": "c1", "media": ["audio"]}
    assert priority_of(push) == "high"
    jingle = found[f"{{{ext.NS_JINGLE}}}jingle"]
    assert (jingle.get("action"), jingle.get("sid")) == ("propose", "c1")
    assert [m.text for m in jingle] == ["audio"]


@pytest.mark.usefixtures("database")
def test_a_unicode_digit_in_max_size_is_answered_with_bad_request() -> None:
    """Was: ValueError out of PushService.handle: no answer until the shim's timeout."""
    service = make_service()
    for max_size in ("\u00b2", "\u0663\u0660\u0660\u0660"):
        (answer,) = service.handle(push_iq(tigase_enable(encrypt_el(
            extra=f" max-size='{max_size}'"))), 0)
        assert isinstance(answer, IqError) and answer.condition == "bad-request"
        assert "max-size must be a number of bytes (ASCII digits)" in answer.text
    assert service.store.for_session(PHONE) == []
    (*_, answer) = service.handle(push_iq(tigase_enable(encrypt_el(extra=" max-size='3000'"))), 0)
    assert isinstance(answer, IqResult)


@pytest.mark.usefixtures("database")
def test_a_forged_carbon_is_filtered_as_its_real_sender() -> None:
    """muted and ignore-unknown judge the carbon's outer sender unless it is the user's
    own bare JID (was: the sender named inside, which anyone could write)."""
    service = make_service()
    muted = ("<muted xmlns='tigase:push:filter:muted:0'><item jid='mallory@evil.example'/>"
             "</muted><ignore-unknown xmlns='tigase:push:filter:ignore-unknown:0'/>")
    service.handle(push_iq(tigase_enable(encrypt_el() + muted)), 0)
    inner = ("<received xmlns='urn:xmpp:carbons:2'><forwarded xmlns='urn:xmpp:forward:0'>"
             "<message xmlns='jabber:client' from='bob@example.org/pc' type='chat' id='i'>"
             "<body>from bob</body></message></forwarded></received>")
    # muted mallory, and a stranger (as the shim tells: not in the roster)
    for sender, known in (("mallory@evil.example/x", None), ("eve@evil.example/x", False)):
        forged = stanza("psst", "f-" + sender, sender=sender, extra=inner, known=known)
        assert service.handle(StanzaToPending(PHONE, forged), 1) == [], sender
    own = stanza("", "own", sender="alice@example.org", extra=inner, known=None)
    (push,) = service.handle(StanzaToPending(PHONE, own), 1)
    assert decrypted(push) == {"unread": 1, "sender": "bob@example.org", "type": "chat",
                               "message": "from bob"}


@pytest.mark.usefixtures("database")
def test_a_proposal_in_a_room_is_a_group_chat_message_for_the_room_rules() -> None:
    """A room set to 'always' pushes a proposal sent to it as any group chat message:
    not a VoIP push, no <jingle/> (was: a call for every pending occupant)."""
    service = make_service()
    service.handle(push_iq(tigase_enable(ALL)), 0)
    propose = ("<propose xmlns='urn:xmpp:jingle-message:0' id='c1'>"
               "<description xmlns='urn:xmpp:jingle:apps:rtp:1' media='audio'/></propose>")
    ring = stanza("ring", "r1", sender="loud@muc.example.org/Bob", stanza_type="groupchat",
                  extra=propose, known=None)
    (push,) = service.handle(StanzaToPending(PHONE, ring), 1)
    found = {e.tag: e for e in elements(push)}
    assert f"{{{ext.NS_JINGLE}}}jingle" not in found
    assert found[f"{{{ext.NS_ENCRYPT}}}encrypted"].get("type") is None
    assert decrypted(push)["type"] == "groupchat"
    quiet = stanza("Alice, ring", "r2", sender="off@muc.example.org/Bob",
                   stanza_type="groupchat", extra=propose, known=None)
    assert service.handle(StanzaToPending(PHONE, quiet), 1) == []


@pytest.mark.usefixtures("database")
def test_the_admins_logic_sees_the_extensions() -> None:
    seen: list[ext.Extensions] = []

    class Module:
        @staticmethod
        def should_push(message: Any, recipient: Any, default: bool) -> bool:
            seen.append(recipient.extensions)
            return default

    service = make_service()
    service.use_logic(Logic(Module))  # type: ignore[arg-type]
    service.handle(push_iq(tigase_enable(ALL)), 0)
    pushes = service.handle(StanzaToPending(PHONE, stanza("hi")), 1)
    assert len(pushes) == 1 and seen == [parsed(ALL)]
    assert service.handle(StanzaToPending(PHONE, stanza("hi", "2", known=False)), 1) == []
    assert len(seen) == 2


def test_the_roster_context_from_the_shim() -> None:
    from pymod_push.etf import Atom
    from pymod_push.protocol import parse_event

    def with_roster(subscription: str, ask: str) -> bool | None:
        term = (Atom("stanza"), (b"alice", b"example.org", b"phone"),
                (Atom("message"), b"bob@example.org/pc", b"m", Atom("chat"), b"hi",
                 b"<message/>", {Atom("roster"): (Atom(subscription), Atom(ask))}))
        event = parse_event(term)
        assert isinstance(event, StanzaToPending)
        return event.stanza.known

    assert with_roster("both", "none") and with_roster("to", "none")
    assert with_roster("from", "none") and with_roster("none", "out")
    assert with_roster("none", "both") and with_roster("none", "subscribe")
    assert with_roster("none", "in") is False and with_roster("none", "none") is False


@pytest.mark.usefixtures("database")
def test_the_encrypted_payload_is_never_logged(caplog: pytest.LogCaptureFixture) -> None:
    import logging
    caplog.set_level(logging.DEBUG)
    service = make_service()
    service.handle(push_iq(tigase_enable(ALL)), 0)
    service.handle(StanzaToPending(PHONE, stanza("very secret body")), 1)
    text = caplog.text + json.dumps([r.getMessage() for r in caplog.records])
    assert KEY64 not in text and "very secret body" not in text


# ------------------------------------------------- the built-in app server (item 5)

def own_app_server() -> tuple[PushService, str, str]:
    """A service with its own APNs backend, a device registered at it (node, secret)."""
    service = PushService(Config("example.org", backends=OWN_HOST_BACKENDS), Store(":memory:"))
    node, secret = registered(service)
    return service, node, secret


def enable_own(service: PushService, node: str, secret: str, children: str) -> None:
    options = ("<x xmlns='jabber:x:data' type='submit'><field var='FORM_TYPE'><value>"
               "http://jabber.org/protocol/pubsub#publish-options</value></field><field "
               f"var='secret'><value>{secret}</value></field></x>")
    xml = (f"<enable xmlns='urn:xmpp:push:0' jid='{PUBSUB_HOST}' node='{node}'>{options}"
           f"{children}</enable>")
    (_, result) = service.handle(push_iq(xml), 0)
    assert isinstance(result, IqResult)


def apns_request(summary: dict[str, str], tmp_path: Path, urgent: bool = False,
                 voip: bool = False) -> tuple[dict[str, Any], dict[str, str]]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from pymod_push.core.config import Backend
    from pymod_push.providers.apns import Apns
    from pymod_push.records import RegisteredDevice

    key = ec.generate_private_key(ec.SECP256R1())
    (tmp_path / "key.p8").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    options = {"key_file": str(tmp_path / "key.p8"), "key_id": "K1", "team_id": "T1",
               "topic": "org.example.app", "voip_topic": "org.example.app.voip"}
    provider = Apns(Backend(0, "apns", "app", "push.example.org", "pubsub.example.org",
                            options))
    device = RegisteredDevice("n", "s", "alice@example.org", "phone", "", "apns", "app",
                    "pubsub.example.org", "ab" * 32, voip_token="cd" * 32 if voip else "")
    request = provider.request(device, summary, 1000.0, urgent)
    assert len(request.body) <= 4096
    return json.loads(request.body), request.headers


def test_the_own_app_server_puts_the_blob_into_the_apns_payload(tmp_path: Path) -> None:
    service, node, secret = own_app_server()
    enable_own(service, node, secret, encrypt_el() + "<priority xmlns='tigase:push:priority:0'/>")
    (delivery,) = service.handle(StanzaToPending(PHONE, stanza("for your eyes only")), 1)
    from pymod_push.appserver.server import Delivery

    assert isinstance(delivery, Delivery)
    assert set(delivery.summary) == {"encrypted", "iv"} and not delivery.urgent
    payload, headers = apns_request(delivery.summary, tmp_path)
    assert headers["apns-push-type"] == "alert"
    assert payload["aps"]["mutable-content"] == 1
    assert "for your eyes only" not in json.dumps(payload)
    element = ET.Element(f"{{{ext.NS_ENCRYPT}}}encrypted", iv=payload["iv"])
    element.text = payload["encrypted"]
    assert ext.decrypt(KEY, element) == {"unread": 1, "sender": "bob@example.org",
                                         "type": "chat", "message": "for your eyes only"}


def test_the_own_app_server_reads_the_same_through_ejabberd() -> None:
    """The IQ path: the publish IQ as the shim builds it with the elements in it."""
    from pymod_push.appserver import requests as app

    service, node, secret = own_app_server()
    service._own_pubsub = frozenset()  # routed, as another server's publish would be
    enable_own(service, node, secret, encrypt_el())
    (publish,) = service.handle(StanzaToPending(PHONE, stanza("hello")), 1)
    assert isinstance(publish, Publish) and publish.fields == ()
    iq = (f"<iq xmlns='jabber:server' type='set' id='p1' from='example.org' to='{publish.to}'>"
          "<pubsub xmlns='http://jabber.org/protocol/pubsub'>"
          f"<publish node='{publish.node}'><item><notification xmlns='urn:xmpp:push:0'>"
          + "".join(publish.elements) + "</notification></item></publish>"
          "<publish-options><x xmlns='jabber:x:data' type='submit'>"
          + "".join(f"<field var='{var}'><value>{values[0]}</value></field>"
                    for var, values in publish.publish_options or ())
          + "</x></publish-options></pubsub></iq>")
    routed = app.parse_publish(app.parse_iq(iq.encode()))
    direct = app.direct_publish(publish.node, publish.fields, publish.publish_options,
                                publish.elements)
    assert routed == direct and set(routed.summary) == {"encrypted", "iv"}


def test_an_encrypted_call_is_a_voip_push_of_the_blob(tmp_path: Path) -> None:
    service, node, secret = own_app_server()
    enable_own(service, node, secret, encrypt_el())
    propose = ("<propose xmlns='urn:xmpp:jingle-message:0' id='c9'>"
               "<description xmlns='urn:xmpp:jingle:apps:rtp:1' media='video'/></propose>")
    call = Stanza("message", "bob@example.org/pc", "c", "chat", "",
                  f"<message xmlns='jabber:client'>{propose}</message>".encode(), "", True)
    (delivery,) = service.handle(StanzaToPending(PHONE, call), 1)
    from pymod_push.appserver.server import Delivery

    assert isinstance(delivery, Delivery) and delivery.urgent
    payload, headers = apns_request(delivery.summary, tmp_path, urgent=True, voip=True)
    assert headers["apns-push-type"] == "voip"
    element = ET.Element(f"{{{ext.NS_ENCRYPT}}}encrypted", iv=payload["iv"])
    element.text = payload["encrypted"]
    assert ext.decrypt(KEY, element)["media"] == ["video"]


def test_a_blob_too_large_for_apns_is_left_out_not_cut(tmp_path: Path) -> None:
    summary = {"encrypted": "A" * 6000, "iv": "B" * 16}
    payload, _ = apns_request(summary, tmp_path)
    assert "encrypted" not in payload  # never a cut blob that would not decrypt


@pytest.mark.usefixtures("database")
def test_async_logic_gets_the_filtered_default_and_the_extensions() -> None:
    from pymod_push.service.logic_work import LogicWork

    class Module:
        @staticmethod
        async def should_push(message: Any, recipient: Any, default: bool) -> bool:
            return default

    service = make_service()
    service.use_logic(Logic(Module))  # type: ignore[arg-type]
    service.handle(push_iq(tigase_enable(ALL)), 0)
    for message, pushes in ((stanza("hi", "1", known=False), False), (stanza("hi", "2"), True)):
        (work,) = service.handle(StanzaToPending(PHONE, message), 1)
        assert isinstance(work, LogicWork)
        call = service.logic_call(work)
        (case,) = call.cases
        assert case.recipient.extensions == parsed(ALL) and case.default is pushes
        published = service.finish_logic(call, [(case.default, None)], 1)
        assert len(published) == int(pushes)
        if pushes:
            assert decrypted(published[0])["message"] == "hi"


tigase_children = st.lists(st.tuples(
    st.sampled_from(["encrypt", "priority", "muted", "groupchat", "ignore-unknown", "jingle",
                     "other"]),
    st.sampled_from([ext.NS_ENCRYPT, ext.NS_PRIORITY, ext.NS_MUTED, ext.NS_GROUPCHAT,
                     "tigase:push:other:0"]),
    st.dictionaries(st.sampled_from(["alg", "max-size", "jid", "allow", "nick"]),
                    st.sampled_from(["", "aes-128-gcm", "300", "-1", "a@b.c", "always",
                                     "x y", "mentioned", "\u00b2", "\u0663\u0660\u0660"]),
                    max_size=3),
    st.sampled_from(["", KEY64, "!!", "<item jid='a@b.c'/>", "<room jid='r@m.c'/>",
                     "<room jid='r@m.c' allow='never'/>", "<item/>"])), max_size=5)


@settings(max_examples=200, deadline=None)
@given(children=tigase_children)
def test_any_extension_input_is_taken_or_refused_as_bad_request(
        children: list[tuple[str, str, dict[str, str], str]]) -> None:
    xml = "".join(f"<{name} xmlns='{ns}'" + "".join(f" {k}={quoteattr(v)}"
                                                    for k, v in attrs.items())
                  + f">{inner}</{name}>" for name, ns, attrs, inner in children)
    try:
        found = parsed(xml)
    except RequestError as error:
        assert error.condition == "bad-request" and error.text
        return
    if found is not None:
        assert ext.from_json(found.to_json()) == found
