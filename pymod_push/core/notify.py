"""What a stanza means for push, what a notification says, what a reply means."""

from __future__ import annotations

import enum
import hashlib
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from encodings.idna import nameprep
from functools import lru_cache

from pymod_push.core import ios_extensions, safexml
from pymod_push.core.config import Config
from pymod_push.core.user_options import PushOptions
from pymod_push.protocol import Stanza, UserKey


class Trigger(enum.Enum):
    MESSAGE = "message"
    CALL = "call"  # a Jingle Message Initiation proposal: push at once, urgently
    # A proposal older than the ring window (call_ring_window, core/calls.is_stale): a
    # missed call, pushed as an ordinary message, never urgent or VoIP
    MISSED_CALL = "missed_call"
    SUBSCRIPTION = "subscription"


NS_JMI = b"urn:xmpp:jingle-message:0"
NS_CARBONS = b"urn:xmpp:carbons:2"
NS_FORWARD = "urn:xmpp:forward:0"
NS_MUC_USER = b"http://jabber.org/protocol/muc#user"
_JMI_PROPOSE = f"{{{NS_JMI.decode()}}}propose"
CALL_BODY = "Incoming call"
MISSED_CALL_BODY = "Missed call"
MISSED_FIELD = "call-missed"  # summary field of a stale proposal's push: the call's id


def trigger_of(stanza: Stanza, config: Config) -> Trigger | None:
    """Why this stanza warrants a push, or None (chat states, receipts, markers, empty
    bodies, group chat without a mention); carbons are unwrapped before (unwrap_carbon).
    A call proposal that is no one-to-one call (is_call) is judged as any other message:
    in a room, by the group chat rules."""
    if stanza.kind == "presence":
        return Trigger.SUBSCRIPTION if stanza.type == "subscribe" else None
    if stanza.kind != "message" or stanza.type == "error":
        return None
    xml = stanza.xml
    if NS_JMI in xml and b"<propose" in xml and is_call(stanza):
        return Trigger.CALL
    if stanza.type == "groupchat":
        if not groupchat_candidate(stanza, config):
            return None
        if config.notify_groupchat == "mentions" and not mentions(stanza):
            return None
        return Trigger.MESSAGE
    if stanza.body.strip() or config.notify_on == "all":
        return Trigger.MESSAGE
    return None


def groupchat_candidate(stanza: Stanza, config: Config) -> bool:
    """A group chat message that may push, before any mention rule (the server's
    notify_groupchat or a client's groupchat filter): the admin allows group chat pushes,
    it has a body, and it is not the room's echo of what the user said elsewhere."""
    if config.notify_groupchat == "never" or not stanza.body.strip():
        return False
    return not (stanza.nick and stanza.sender.partition("/")[2] == stanza.nick)


def extension_event(stanza: Stanza, call: bool) -> ios_extensions.Event:
    """The stanza as the Tigase extensions' decisions see it."""
    return ios_extensions.Event(stanza.kind, stanza.type, stanza.sender, stanza.body,
                                stanza.xml, call, is_encrypted(stanza), stanza.nick,
                                stanza.known)


def is_call(stanza: Stanza) -> bool:
    """Is this message a one-to-one call proposal (Jingle Message Initiation)? Only a chat
    or normal message whose own child is the <propose/>, and not a room occupant's
    private message (XEP-0045 marks those with <x xmlns='...muc#user'/>): a proposal in a
    room, or passed on inside another element, would ring every device it reaches."""
    if stanza.type not in ("chat", "normal") or NS_MUC_USER in stanza.xml:
        return False
    try:
        root = safexml.parse(stanza.xml)
    except ET.ParseError:
        return False
    return root.find(_JMI_PROPOSE) is not None


def unwrap_carbon(stanza: Stanza, user: UserKey) -> Stanza | None:
    """What a Message Carbons copy stands for, for ``user`` (user, server, stringprep'ed):
    None for the copy of a message the user sent from another device (never a push), the
    forwarded message for a received copy. Only the server writes carbons, from the
    user's own bare JID (XEP-0280, 11): a wrapper from anyone else, or one that cannot be
    read (malformed, nested more than safexml.MAX_DEPTH deep), is not honoured, the
    stanza is a plain message from its real sender."""
    if NS_CARBONS not in stanza.xml or not is_own_bare_jid(stanza.sender, user):
        return stanza
    try:
        root = safexml.parse(stanza.xml)
    except ET.ParseError:
        return stanza
    if root.find(f"{{{NS_CARBONS.decode()}}}sent") is not None:
        return None
    inner = root.find(f"{{{NS_CARBONS.decode()}}}received/{{{NS_FORWARD}}}forwarded/"
                      f"{{jabber:client}}message")
    if inner is None:
        return stanza
    return Stanza("message", inner.get("from", stanza.sender), inner.get("id", ""),
                  inner.get("type", "normal"), inner.findtext("{jabber:client}body") or "",
                  ET.tostring(inner))


def is_own_bare_jid(jid: str, user: UserKey) -> bool:
    """Is ``jid`` the bare JID of ``user`` (stringprep'ed)? The shim tells a JID as the
    sender wrote it, the case of a login's name kept: compared after the mapping that
    nodeprep and nameprep share (RFC 3454 B.1 and B.2, NFKC)."""
    name, server = user
    if jid == f"{name}@{server}":
        return True
    local, at, domain = jid.partition("@")
    if not at or "/" in domain:
        return False
    try:
        return nameprep(local) == name and nameprep(domain) == server
    except UnicodeError:  # a character that neither may hold
        return False


def mentions(stanza: Stanza) -> bool:
    """Does a group chat message name the user (their nickname in that room)?"""
    nick = stanza.nick
    if not nick:
        return False
    return re.search(rf"(?<!\w){re.escape(nick)}(?!\w)", stanza.body, re.IGNORECASE) is not None


# End-to-end encryption: OMEMO (both namespaces), legacy OpenPGP (XEP-0027), OpenPGP for
# XMPP (XEP-0373). Their <body/> is a plaintext fallback ("This message is encrypted...")
# that must never be shown as if it were the message.
ENCRYPTION_NAMESPACES = (b"eu.siacs.conversations.axolotl", b"urn:xmpp:omemo:2",
                         b"jabber:x:encrypted", b"urn:xmpp:openpgp:0")
ENCRYPTED_BODY = "Encrypted message"


_OMEMO, _OMEMO2, _PGP, _OX = ENCRYPTION_NAMESPACES


def is_encrypted(stanza: Stanza) -> bool:
    xml = stanza.xml  # once per push: four searches without a generator's frames
    return _OMEMO in xml or _OMEMO2 in xml or _PGP in xml or _OX in xml


def fingerprint(stanza: Stanza) -> bytes:
    """Identifies one message across its re-routings (pending queue -> offline -> archive).

    ejabberd adds a <delay/> when it re-routes, so the XML differs; sender, id
    and body do not.
    """
    # Each part followed by a NUL: the marks stored by earlier versions stay valid.
    text = f"{stanza.kind}\0{stanza.sender}\0{stanza.id}\0{stanza.body}\0"
    return hashlib.blake2b(text.encode(), digest_size=12).digest()


@dataclass(slots=True)
class Counts:
    messages: int = 0
    subscriptions: int = 0


def wake_fields(options: PushOptions, counts: Counts) -> list[tuple[str, str]]:
    """A push that only wakes the device (after a restart, before a resume timeout ends):
    the counts as they are, nothing about any message."""
    fields: list[tuple[str, str]] = []
    if options.message_count:
        fields.append(("message-count", str(counts.messages)))
    if options.subscription_count:
        fields.append(("pending-subscription-count", str(counts.subscriptions)))
    return fields


def summary_fields(options: PushOptions, counts: Counts, trigger: Trigger,
                   stanza: Stanza) -> list[tuple[str, str]]:
    """The urn:xmpp:push:summary fields, as the user's options allow."""
    fields = wake_fields(options, counts)
    if trigger is Trigger.CALL:
        if options.senders:
            fields.append(("last-message-sender", stanza.sender))
        if options.message_bodies:
            fields.append(("last-message-body", CALL_BODY))
        fields.append(("last-message-priority", "high"))
    elif trigger is Trigger.MISSED_CALL:
        if options.senders:
            fields.append(("last-message-sender", stanza.sender))
        if options.message_bodies:
            fields.append(("last-message-body", MISSED_CALL_BODY))
        fields.append((MISSED_FIELD, ios_extensions.call_media(stanza.xml)[0]))
    elif trigger is Trigger.MESSAGE:
        if options.senders:
            fields.append(("last-message-sender", stanza.sender))
        if options.message_bodies and stanza.body:
            body = ENCRYPTED_BODY if is_encrypted(stanza) else stanza.body
            fields.append(("last-message-body", body))
    elif options.senders:
        fields.append(("last-subscription-sender", stanza.sender))
    return fields


def pushed_mark(registration_key: tuple[str, str, str, str], message: bytes) -> int:
    """What is remembered of a message pushed to a registration (message: its fingerprint),
    64 bits: the same message to another registration of the session has another mark."""
    # Push JID and node; the session is kept beside it.
    digest = hashlib.blake2b(message + _registration_bytes(*registration_key[2:]),
                             digest_size=8)
    return int.from_bytes(digest.digest(), "big", signed=True)


@lru_cache(maxsize=65536)
def _registration_bytes(push_jid: str, node: str) -> bytes:
    return b"\0" + push_jid.encode() + b"\0" + node.encode()


class PublishOutcome(enum.Enum):
    DELIVERED = "delivered"
    TRANSIENT = "transient"  # no answer or a 'wait' error: try again later
    REJECTED = "rejected"  # another error: tried again too, and counted (count_error)
    # The target says it is no app server (NOT_AN_APP_SERVER): a user's client, a component
    # or a server that a push was pointed at. Counted every time (count_error).
    NOT_AN_APP_SERVER = "not_an_app_server"
    GONE = "gone"  # item-not-found: the app server has no such node (any more)


# 'cancel' errors by which a publish's target says that it serves no push: what an XMPP
# client, or a component or server that is no app server, answers a publish (slixmpp's
# default for an IQ it has no handler for is feature-not-implemented, ejabberd's for a JID
# it does not serve service-unavailable). item-not-found, an app server's word for a node
# it does not have, disables at once (GONE).
NOT_AN_APP_SERVER = frozenset({"service-unavailable", "feature-not-implemented", "forbidden",
                               "not-allowed", "recipient-unavailable"})


def classify_reply(outcome: str, error_type: str = "", condition: str = "") -> PublishOutcome:
    """An app server's answer to a publish."""
    if outcome == "result":
        return PublishOutcome.DELIVERED
    if condition == "item-not-found":
        return PublishOutcome.GONE
    if outcome == "timeout" or error_type == "wait":
        return PublishOutcome.TRANSIENT
    if error_type == "cancel" and condition in NOT_AN_APP_SERVER:
        return PublishOutcome.NOT_AN_APP_SERVER
    return PublishOutcome.REJECTED


def count_error(outcome: PublishOutcome, errors: int, last_counted: float | None, now: float,
                window_s: float) -> tuple[int, float | None]:
    """A failed publish (an error answer or none) toward max_publish_errors: (errors,
    last counted). Most count only when the last one counted is at least window_s old. An
    app server that is away or overloaded for a while fails every publish of that while,
    and the re-sends after a restart come in a burst: each such spell counts once, so only
    failures spread over (max_publish_errors - 1) windows disable a registration. A target
    that says it is no app server (NOT_AN_APP_SERVER) counts every time, so that
    max_publish_errors of them in a row disable the registration: pushes pointed at
    someone's client or service are not reflected to it for window after window."""
    if outcome is not PublishOutcome.NOT_AN_APP_SERVER and last_counted is not None \
            and 0 <= now - last_counted < window_s:
        return errors, last_counted
    return errors + 1, now
