"""Nothing spoofed (issue 29, rows 6 to 8) in core/notify.py and through the service: a
carbon counts only from the user's own bare JID, a call only in a one-to-one message,
and no nesting depth makes a traceback."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import replace

import pytest

from pymod_push.core import safexml
from pymod_push.core.config import Config
from pymod_push.core.notify import Trigger, is_call, is_own_bare_jid, trigger_of, unwrap_carbon
from pymod_push.protocol import Publish, Stanza, StanzaToPending
from pymod_push.service.logic_work import LogicWork
from tests.builders import ALICE, PHONE, enable, fields, make_service, message

MALLORY = "mallory@evil.example/x"
BOSS = "boss@example.org/desk"
PROPOSE = ("<propose xmlns='urn:xmpp:jingle-message:0' id='c1'>"
           "<description xmlns='urn:xmpp:jingle:apps:rtp:1' media='audio'/></propose>")
MUC_USER = "<x xmlns='http://jabber.org/protocol/muc#user'/>"


def carbon(wrapper: str, inner_sender: str = BOSS, body: str = "Wire 10k now",
           inside: str = "") -> str:
    return (f"<{wrapper} xmlns='urn:xmpp:carbons:2'><forwarded xmlns='urn:xmpp:forward:0'>"
            f"<message xmlns='jabber:client' from='{inner_sender}' id='inner' type='chat'>"
            f"<body>{body}</body>{inside}</message></forwarded></{wrapper}>")


# ---------------------------------------------------------------- whose carbon

@pytest.mark.parametrize(("jid", "own"), [
    ("alice@example.org", True),
    ("Alice@Example.ORG", True),  # a login's case, kept by ejabberd in the JID it writes
    ("alice@example.org/laptop", False),  # carbons come from the bare JID only
    ("alice@example.org.evil", False),
    ("alice@evil.example", False),
    ("malice@example.org", False),
    ("example.org", False),
    ("", False),
    ("alice\u0000@example.org", False),  # a character that nodeprep prohibits
    ("alice\ue000@example.org", False),  # one that nameprep refuses (UnicodeError)
    ("al\u00adice@example.org", True),  # mapped to nothing (RFC 3454 B.1)
    ("alice@example.org@x", False),
])
def test_own_bare_jid(jid: str, own: bool) -> None:
    assert is_own_bare_jid(jid, ALICE) is own


def test_the_servers_carbons_are_honoured() -> None:
    received = message("", sender="alice@example.org", extra=carbon("received"))
    inner = unwrap_carbon(received, ALICE)
    assert inner is not None
    assert (inner.sender, inner.body, inner.id) == (BOSS, "Wire 10k now", "inner")
    assert unwrap_carbon(message("", sender="alice@example.org", extra=carbon("sent")),
                         ALICE) is None
    assert unwrap_carbon(message("", sender="Alice@example.org", extra=carbon("sent")),
                         ALICE) is None


@pytest.mark.parametrize("sender", [MALLORY, "alice@example.org/laptop",
                                    "alice@example.org.evil", "bob@example.org"])
@pytest.mark.parametrize("wrapper", ["received", "sent"])
def test_a_carbon_from_anyone_else_is_a_plain_message(sender: str, wrapper: str) -> None:
    """Was: a push from boss saying mallory's words, or (sent) none at all."""
    forged = message("hello", sender=sender, extra=carbon(wrapper))
    assert unwrap_carbon(forged, ALICE) is forged
    assert trigger_of(forged, Config("example.org")) is Trigger.MESSAGE


def test_a_carbon_that_cannot_be_read_is_a_plain_message() -> None:
    """Malformed, or nested deeper than safexml.MAX_DEPTH: judged as what it is outside
    (was: RecursionError in ET.tostring past some hundreds of levels)."""
    deep = "<a>" * 5000 + "</a>" * 5000
    for extra in (carbon("received", inside=deep), carbon("sent", inside=deep)):
        own = message("", sender="alice@example.org", extra=extra)
        assert unwrap_carbon(own, ALICE) is own
        assert trigger_of(own, Config("example.org")) is None  # no body: no push
    broken = replace(message("", sender="alice@example.org"),
                     xml=b"<message xmlns='jabber:client'><received xmlns='urn:xmpp:carbons:2'>")
    assert unwrap_carbon(broken, ALICE) is broken
    # Within the bound, the inner message is whole.
    levels = safexml.MAX_DEPTH - 5  # message, received, forwarded, message: 4, body aside
    nested = "<a>" * levels + "</a>" * levels
    inner = unwrap_carbon(message("", sender="alice@example.org",
                                  extra=carbon("received", inside=nested)), ALICE)
    assert inner is not None and inner.body == "Wire 10k now"
    assert ET.fromstring(inner.xml).find(".//{jabber:client}a") is not None


# ------------------------------------------------------------------ what is a call

@pytest.mark.parametrize(("stanza", "call"), [
    (message("", sender=BOSS, extra=PROPOSE), True),
    (message("", sender=BOSS, extra=PROPOSE, stanza_type="normal"), True),
    (message("", sender="room@muc.example.org/Bob", extra=PROPOSE, stanza_type="groupchat"),
     False),
    (message("", sender="room@muc.example.org/Bob", extra=PROPOSE + MUC_USER), False),  # MUC PM
    (message("", sender=BOSS, extra=PROPOSE, stanza_type="headline"), False),
    # Passed on inside something else (a forwarded message): not the sender's proposal
    (message("", sender=BOSS, extra="<forwarded xmlns='urn:xmpp:forward:0'>"
             "<message xmlns='jabber:client'>" + PROPOSE + "</message></forwarded>"), False),
    (message("<propose xmlns='urn:xmpp:jingle-message:0'/> as text", sender=BOSS), False),
])
def test_only_one_to_one_proposals_are_calls(stanza: Stanza, call: bool) -> None:
    assert is_call(stanza) is call
    assert (trigger_of(stanza, Config("example.org", notify_groupchat="always"))
            is Trigger.CALL) is call


@pytest.mark.parametrize(("policy", "body", "nick", "trigger"), [
    ("never", "ring", "", None),
    ("never", "Alice, ring", "Alice", None),
    ("mentions", "ring", "Alice", None),
    ("mentions", "", "Alice", None),
    ("mentions", "Alice, ring", "Alice", Trigger.MESSAGE),
    ("always", "ring", "Alice", Trigger.MESSAGE),
    ("always", "", "Alice", None),
])
def test_a_proposal_in_a_room_follows_the_group_chat_rules(
        policy: str, body: str, nick: str, trigger: Trigger | None) -> None:
    """Was: Trigger.CALL (urgent) for every pending occupant, whatever the policy."""
    stanza = message(body, sender="room@muc.example.org/Bob", extra=PROPOSE,
                     stanza_type="groupchat", nick=nick)
    assert trigger_of(stanza, Config("example.org", notify_groupchat=policy)) is trigger


def test_a_proposal_in_a_private_message_from_a_room_is_an_ordinary_message() -> None:
    config = Config("example.org", notify_groupchat="never")
    private = message("ring", sender="room@muc.example.org/Bob", extra=PROPOSE + MUC_USER)
    assert trigger_of(private, config) is Trigger.MESSAGE
    assert trigger_of(replace(private, body=""), config) is None


# -------------------------------------------------------------- through the service

@pytest.mark.usefixtures("database")
def test_a_forged_carbon_pushes_its_real_sender_and_body() -> None:
    service = make_service(include_senders=True, include_message_bodies=True)
    service.handle(enable(), 0)
    (push,) = service.handle(StanzaToPending(PHONE, message("hello", sender=MALLORY,
                                                            extra=carbon("received"))), 1)
    assert fields(push)["last-message-sender"] == MALLORY
    assert fields(push)["last-message-body"] == "hello"
    (push,) = service.handle(StanzaToPending(PHONE, message(
        "see this", sender=MALLORY, extra=carbon("sent"), stanza_id="m2")), 2)
    assert fields(push)["last-message-sender"] == MALLORY
    assert fields(push)["message-count"] == "2"
    # The server's own still mean what they say.
    (push,) = service.handle(StanzaToPending(PHONE, message(
        "", sender="alice@example.org", extra=carbon("received"))), 3)
    assert fields(push)["last-message-sender"] == BOSS
    assert service.handle(StanzaToPending(PHONE, message(
        "", sender="alice@example.org", extra=carbon("sent"))), 4) == []


@pytest.mark.usefixtures("database")
def test_the_async_logic_path_unwraps_for_the_same_user() -> None:
    """logic_call and finish_logic (async push logic) judge carbons as _notify does."""
    service = make_service(include_senders=True, include_message_bodies=True)
    service.handle(enable(), 0)
    for sender, expected in ((MALLORY, (MALLORY, "hello")),
                             ("alice@example.org", (BOSS, "Wire 10k now"))):
        work = LogicWork(1, PHONE, message("hello", sender=sender, extra=carbon("received"),
                                          stanza_id=sender))
        call = service.logic_call(work)
        assert call.message is not None
        assert (call.message.sender, call.message.body) == expected
        (push,) = service.finish_logic(call, [(True, None)], 1)
        assert isinstance(push, Publish)
        assert (fields(push)["last-message-sender"],
                fields(push)["last-message-body"]) == expected


@pytest.mark.usefixtures("database")
def test_a_proposal_in_a_room_is_no_urgent_push() -> None:
    service = make_service(notify_groupchat="never", include_message_bodies=True)
    service.handle(enable(), 0)
    room = message("ring", sender="room@muc.example.org/Bob", extra=PROPOSE,
                   stanza_type="groupchat", nick="alice")
    assert service.handle(StanzaToPending(PHONE, room), 1) == []
    (push,) = service.handle(StanzaToPending(PHONE, message(
        "pm ring", sender="room@muc.example.org/Bob", extra=PROPOSE + MUC_USER,
        stanza_id="pm")), 2)
    assert "last-message-priority" not in fields(push)
    assert fields(push)["last-message-body"] == "pm ring"
    (push,) = service.handle(StanzaToPending(PHONE, message("", sender=BOSS, extra=PROPOSE,
                                                            stanza_id="call")), 3)
    assert fields(push)["last-message-priority"] == "high"
