"""Tigase's extensions to XEP-0357, as Siskin IM and Snikket iOS use them.

A client sends them as children (and, for away, an attribute) of ``<enable/>``:
``<encrypt/>`` (the notification is AES-128-GCM encrypted with a key only the device
holds), ``<priority/>`` (high or low), ``<muted/>``, ``<groupchat/>`` and
``<ignore-unknown/>`` (filters), ``<jingle/>`` (calls). They are parsed and checked here,
kept with the registration as compact JSON (``to_json``/``from_json``), and decide per
notification whether it goes, how urgent it is and what it carries.

Pure functions, no I/O; the random IV comes in as an argument. The key is a secret: it is
left out of every repr, and nothing here logs.
"""

from __future__ import annotations

import base64
import binascii
import enum
import json
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any
from xml.sax.saxutils import escape, quoteattr

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from pymod_push.core import safexml
from pymod_push.core.limits import ascii_number, cut_chars
from pymod_push.core.xmpp import RequestError, jid_problem

NS_ENCRYPT = "tigase:push:encrypt:0"
NS_PRIORITY = "tigase:push:priority:0"
NS_MUTED = "tigase:push:filter:muted:0"
NS_GROUPCHAT = "tigase:push:filter:groupchat:0"
NS_IGNORE_UNKNOWN = "tigase:push:filter:ignore-unknown:0"
NS_JINGLE = "tigase:push:jingle:0"
NS_AWAY = "tigase:push:away:0"
NS_REFERENCE = "urn:xmpp:reference:0"
NS_JMI = "urn:xmpp:jingle-message:0"
NS_RTP = "urn:xmpp:jingle:apps:rtp:1"
ALG_AES_128_GCM = "aes-128-gcm"

# What we implement and advertise on the account's disco#info (away is not: pushing
# while every other resource is away needs presence tracking the shim does not do).
# The data fields an encrypted notification's blob and IV reach the device in, as they are
# (Siskin's notification service extension reads them; appserver.requests, providers.apns).
ENCRYPTED_FIELD = "encrypted"
IV_FIELD = "iv"
FEATURES = (NS_ENCRYPT, f"tigase:push:encrypt:{ALG_AES_128_GCM}", NS_PRIORITY, NS_MUTED,
            NS_GROUPCHAT, NS_IGNORE_UNKNOWN, NS_JINGLE)

KEY_BYTES = 16  # AES-128
IV_BYTES = 12  # GCM's standard nonce, fresh for each push
TAG_BYTES = 16
# max-size: Tigase's default (a quarter below APNs' and FCM's 4 KiB); what a client may
# ask for is bounded both ways, an encrypted element must fit the summary's bound.
DEFAULT_MAX_SIZE = 3000
MIN_MAX_SIZE = 256
MAX_MAX_SIZE = 8192
MAX_MUTED = 1000
MAX_ROOMS = 1000
MAX_NICK_BYTES = 1023
# Everything an enable's extensions may take stored (JSON): bounds a registration's row
# (a thousand muted JIDs of a usual length take some 30 KiB).
MAX_STORED_BYTES = 64 * 1024
# Stored extensions up to this size are parsed once and kept (most are a few hundred
# bytes); larger ones, rare, are parsed each time, so that the cache stays small.
CACHED_BYTES = 4096

ALLOW = ("always", "never", "mentioned")
OMEMO_BODY = "New secure message. Open to see the message."
# The keys of the elements a notification's pairs carry besides its summary fields (see
# element_pairs): "<element1>", ... (a form field's name never starts with "<").
ELEMENT_KEY = "<element"


@dataclass(frozen=True, slots=True)
class Encrypt:
    key: bytes = field(repr=False)
    max_size: int = DEFAULT_MAX_SIZE
    alg: str = ALG_AES_128_GCM


@dataclass(frozen=True, slots=True)
class RoomRule:
    room: str  # bare JID, folded (see fold)
    allow: str  # always | never | mentioned
    nick: str = ""


@dataclass(frozen=True, slots=True)
class Extensions:
    """What a client asked for with its enable (all off: no extension)."""

    encrypt: Encrypt | None = None
    priority: bool = False
    muted: frozenset[str] = frozenset()  # bare JIDs, folded
    groupchat: tuple[RoomRule, ...] | None = None  # None: no <groupchat/> sent
    ignore_unknown: bool = False
    jingle: bool = False
    away: bool = False  # stored, not acted on (not advertised)

    def __bool__(self) -> bool:
        return self != NONE

    def names(self) -> list[str]:
        """The extensions asked for, by name (push_list; no key, no JIDs)."""
        named = [("encrypt", self.encrypt is not None), ("priority", self.priority),
                 ("muted", bool(self.muted)), ("groupchat", self.groupchat is not None),
                 ("ignore-unknown", self.ignore_unknown), ("jingle", self.jingle),
                 ("away", self.away)]
        return [name for name, on in named if on]

    def to_json(self) -> str:
        if not self:
            return ""
        data: dict[str, Any] = {}
        if self.encrypt is not None:
            data["encrypt"] = [self.encrypt.alg, base64.b64encode(self.encrypt.key).decode(),
                               self.encrypt.max_size]
        if self.priority:
            data["priority"] = 1
        if self.muted:
            data["muted"] = sorted(self.muted)
        if self.groupchat is not None:
            data["groupchat"] = [[r.room, r.allow, r.nick] for r in self.groupchat]
        if self.ignore_unknown:
            data["ignore_unknown"] = 1
        if self.jingle:
            data["jingle"] = 1
        if self.away:
            data["away"] = 1
        return json.dumps(data, separators=(",", ":"), ensure_ascii=False)


NONE = Extensions()


def from_json(text: str) -> Extensions:
    """A registration's stored extensions (to_json); "" is none."""
    if not text:
        return NONE
    return _cached(text) if len(text) <= CACHED_BYTES else _from_json(text)


@lru_cache(maxsize=4096)
def _cached(text: str) -> Extensions:
    return _from_json(text)


def _from_json(text: str) -> Extensions:
    data = json.loads(text)
    encrypt = None
    if "encrypt" in data:
        alg, key, max_size = data["encrypt"]
        encrypt = Encrypt(base64.b64decode(key), int(max_size), str(alg))
    groupchat = None
    if "groupchat" in data:
        groupchat = tuple(RoomRule(str(room), str(allow), str(nick))
                          for room, allow, nick in data["groupchat"])
    return Extensions(encrypt, bool(data.get("priority")),
                      frozenset(str(j) for j in data.get("muted", ())), groupchat,
                      bool(data.get("ignore_unknown")), bool(data.get("jingle")),
                      bool(data.get("away")))


def fold(jid: str) -> str:
    """A JID's bare part, compared without case (nodeprep and nameprep fold case; the rest
    of their mapping does not matter for JIDs that clients copy from stanzas)."""
    return jid.partition("/")[0].casefold()


# ------------------------------------------------------------------------ parsing

def _bad(text: str) -> RequestError:
    return RequestError("bad-request", text)


def parse_enable(enable: ET.Element) -> Extensions:
    """The extensions of an ``<enable/>`` element, checked; RequestError (bad-request)
    for anything malformed, before anything is stored."""
    seen: set[str] = set()
    encrypt: Encrypt | None = None
    priority = ignore_unknown = jingle = False
    muted: frozenset[str] = frozenset()
    groupchat: tuple[RoomRule, ...] | None = None
    for child in enable:
        namespace, _, name = child.tag[1:].partition("}")
        if (namespace, name) not in _ELEMENTS:
            continue  # not ours (a data form), or an extension we do not offer
        if namespace in seen:
            raise _bad(f"<{name} xmlns='{namespace}'> is given more than once")
        seen.add(namespace)
        if namespace == NS_ENCRYPT and name == "encrypt":
            encrypt = _parse_encrypt(child)
        elif namespace == NS_PRIORITY and name == "priority":
            priority = True
        elif namespace == NS_MUTED and name == "muted":
            muted = _parse_muted(child)
        elif namespace == NS_GROUPCHAT and name == "groupchat":
            groupchat = _parse_groupchat(child)
        elif namespace == NS_IGNORE_UNKNOWN and name == "ignore-unknown":
            ignore_unknown = True
        elif namespace == NS_JINGLE and name == "jingle":
            jingle = True
    away_text = (enable.get("away") or "false").strip().lower()
    if away_text not in ("true", "1", "false", "0"):
        raise _bad("the 'away' attribute of enable must be true or false")
    extensions = Extensions(encrypt, priority, muted, groupchat, ignore_unknown, jingle,
                            away_text in ("true", "1"))
    if len(extensions.to_json().encode()) > MAX_STORED_BYTES:
        raise _bad(f"the push extensions take more than {MAX_STORED_BYTES} bytes")
    return extensions


_ELEMENTS = frozenset({(NS_ENCRYPT, "encrypt"), (NS_PRIORITY, "priority"), (NS_MUTED, "muted"),
                       (NS_GROUPCHAT, "groupchat"), (NS_IGNORE_UNKNOWN, "ignore-unknown"),
                       (NS_JINGLE, "jingle")})


def _parse_encrypt(element: ET.Element) -> Encrypt:
    alg = (element.get("alg") or "").strip().lower()
    if alg != ALG_AES_128_GCM:
        raise _bad(f"encrypt: unsupported algorithm {alg[:32]!r} (supported: "
                   f"{ALG_AES_128_GCM})")
    text = "".join((element.text or "").split())
    try:
        key = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise _bad("encrypt: the key is not base64") from None
    if len(key) != KEY_BYTES:
        raise _bad(f"encrypt: the key must be {KEY_BYTES} bytes (128 bits)")
    max_size = DEFAULT_MAX_SIZE
    raw = element.get("max-size")
    if raw is not None:
        asked = ascii_number(raw, max_digits=9)  # not isdigit(): '\u00b2' is a digit to it
        if asked is None:
            raise _bad("encrypt: max-size must be a number of bytes (ASCII digits)")
        if asked < MIN_MAX_SIZE:
            raise _bad(f"encrypt: max-size must be at least {MIN_MAX_SIZE} bytes")
        max_size = min(asked, MAX_MAX_SIZE)
    return Encrypt(key, max_size)


def _checked_jid(text: str | None, what: str) -> str:
    if not text:
        raise _bad(f"{what} needs a 'jid' attribute")
    problem = jid_problem(text)
    if problem is not None or "/" in text:
        raise _bad(f"{what}: {text[:64]!r} is not a bare JID")
    return fold(text)


def _parse_muted(element: ET.Element) -> frozenset[str]:
    items = element.findall(f"{{{NS_MUTED}}}item")
    if len(items) > MAX_MUTED:
        raise _bad(f"muted: at most {MAX_MUTED} items")
    return frozenset(_checked_jid(item.get("jid"), "muted item") for item in items)


def _parse_groupchat(element: ET.Element) -> tuple[RoomRule, ...]:
    rooms = element.findall(f"{{{NS_GROUPCHAT}}}room")
    if len(rooms) > MAX_ROOMS:
        raise _bad(f"groupchat: at most {MAX_ROOMS} rooms")
    rules: dict[str, RoomRule] = {}
    for room in rooms:
        jid = _checked_jid(room.get("jid"), "groupchat room")
        allow = (room.get("allow") or "").strip()
        if allow not in ALLOW:
            raise _bad(f"groupchat room {jid[:64]!r}: allow must be always, never or "
                       "mentioned")
        nick = room.get("nick") or ""
        if len(nick.encode()) > MAX_NICK_BYTES:
            raise _bad(f"groupchat room {jid[:64]!r}: the nick is too long")
        rules[jid] = RoomRule(jid, allow, nick)  # the last rule for a room holds
    return tuple(rules.values())


# ---------------------------------------------------------------------- deciding

@dataclass(frozen=True, slots=True)
class Event:
    """What a notification is about, as these decisions need it."""

    kind: str  # "message" | "presence"
    type: str  # the stanza's type
    sender: str  # full JID
    body: str
    xml: bytes
    call: bool  # a JMI propose
    encrypted: bool  # OMEMO / OpenPGP
    own_nick: str = ""  # the user's nick in that room, as the shim saw them join
    known: bool | None = None  # the sender is in the roster (None: not known)


def allowed(extensions: Extensions, event: Event, user_jid: str) -> bool:
    """Do the client's filters let this notification through? (muted, groupchat,
    ignore-unknown; the server's own policy has been applied before.)"""
    sender = fold(event.sender)
    if sender in extensions.muted:
        return False
    if event.type == "groupchat" and event.kind == "message":
        if extensions.groupchat is None:
            return True
        rule = next((r for r in extensions.groupchat if r.room == sender), None)
        if rule is None:  # not listed: the clients leave out the rooms set to "none"
            return False
        if rule.allow == "always":
            return True
        if rule.allow == "mentioned":
            return is_mentioned(event, rule.nick or event.own_nick, user_jid)
        return False
    if extensions.ignore_unknown and event.known is False:
        return False
    return True


def is_mentioned(event: Event, nick: str, user_jid: str) -> bool:
    """The nick as a word in the body (any case), or a XEP-0372 mention of the user or of
    their occupant JID."""
    if nick and re.search(rf"(?<!\w){re.escape(nick)}(?!\w)", event.body,
                          re.IGNORECASE):
        return True
    if NS_REFERENCE.encode() not in event.xml:
        return False
    uris = {f"xmpp:{fold(user_jid)}"}
    if nick:
        uris.add(f"xmpp:{fold(event.sender)}/{nick}")
    return any(uri in uris or uri.casefold() in uris for uri in _mention_uris(event.xml))


def _mention_uris(xml: bytes) -> Iterable[str]:
    try:
        root = safexml.parse(xml)
    except ET.ParseError:
        return []
    return [r.get("uri", "") for r in root.iter(f"{{{NS_REFERENCE}}}reference")
            if r.get("type") == "mention"]


class Kind(enum.Enum):
    CHAT = "chat"
    GROUPCHAT = "groupchat"
    SUBSCRIBE = "subscribe"
    CALL = "call"


def kind_of(event: Event) -> Kind | None:
    if event.call:
        return Kind.CALL
    if event.kind == "presence":
        return Kind.SUBSCRIBE if event.type == "subscribe" else None
    return Kind.GROUPCHAT if event.type == "groupchat" else Kind.CHAT


def is_important(event: Event) -> bool:
    """Our policy's "the user must be alerted": a call, a subscription request, a message
    with a body (a group chat message pushes only if it passed the mention rules)."""
    kind = kind_of(event)
    return kind in (Kind.CALL, Kind.SUBSCRIBE) or (kind is not None
                                                  and bool(event.body.strip()))


def priority_element(important: bool) -> str:
    return f"<priority xmlns='{NS_PRIORITY}'>{'high' if important else 'low'}</priority>"


def call_media(xml: bytes) -> tuple[str, list[str]]:
    """A JMI propose's id and the media of its RTP descriptions (each once, in order)."""
    try:
        root = safexml.parse(xml)
    except ET.ParseError:
        return "", []
    propose = next(root.iter(f"{{{NS_JMI}}}propose"), None)
    if propose is None:
        return "", []
    media: list[str] = []
    for description in propose.iter(f"{{{NS_RTP}}}description"):
        value = description.get("media", "")
        if value and value not in media:
            media.append(value)
    return propose.get("id", ""), media


def jingle_element(sid: str, media: list[str]) -> str:
    inner = "".join(f"<media>{escape(m)}</media>" for m in media)
    return f"<jingle xmlns='{NS_JINGLE}' action='propose' sid={quoteattr(sid)}>{inner}</jingle>"


def payload(event: Event, unread: int, senders: bool, bodies: bool) -> dict[str, Any]:
    """The JSON the clients decrypt: unread, sender, type, message, nickname; sid and
    media for a call. senders/bodies: what the admin allows."""
    kind = kind_of(event)
    data: dict[str, Any] = {"unread": unread}
    if senders:
        # a call's sender is the full JID (the device calls back that resource)
        data["sender"] = event.sender if kind is Kind.CALL else event.sender.partition("/")[0]
    if kind is not None:
        data["type"] = kind.value
    if kind is Kind.CALL:
        data["sid"], data["media"] = call_media(event.xml)
    elif kind in (Kind.CHAT, Kind.GROUPCHAT) and bodies and event.body:
        data["message"] = OMEMO_BODY if event.encrypted else event.body
    if kind is Kind.GROUPCHAT and senders:
        nickname = event.sender.partition("/")[2]
        if nickname:
            data["nickname"] = nickname
    return data


def _json_bytes(data: dict[str, Any]) -> bytes:
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode()


def encrypted_size(plaintext_bytes: int, voip: bool) -> int:
    """Bytes of the <encrypted/> element for a plaintext of that size."""
    content = 4 * ((plaintext_bytes + TAG_BYTES + 2) // 3)
    iv = 4 * ((IV_BYTES + 2) // 3)
    voip_attr = len(" type='voip'") if voip else 0
    return len(f"<encrypted xmlns='{NS_ENCRYPT}' iv=''></encrypted>") + iv + voip_attr + content


def fit_payload(data: dict[str, Any], max_size: int, voip: bool) -> bytes:
    """The payload as JSON, its message cut (never half a character, the cut marked) so
    that the <encrypted/> element fits max_size; if even no message does not, the
    nickname, then the sender go. The count and type always stay."""
    def size(d: dict[str, Any]) -> int:
        return encrypted_size(len(_json_bytes(d)), voip)

    if size(data) <= max_size:
        return _json_bytes(data)
    message = data.get("message")
    if isinstance(message, str) and message:
        low, high = 0, len(message)
        while low < high:  # the longest cut that fits (0: none does)
            middle = (low + high + 1) // 2
            if size({**data, "message": cut_chars(message, middle)}) <= max_size:
                low = middle
            else:
                high = middle - 1
        if low > 0:
            return _json_bytes({**data, "message": cut_chars(message, low)})
    data = {k: v for k, v in data.items() if k != "message"}
    for optional in ("nickname", "media", "sender"):
        if size(data) <= max_size:
            break
        data.pop(optional, None)
    return _json_bytes(data)


def encrypt(key: bytes, iv: bytes, plaintext: bytes, voip: bool) -> str:
    """The <encrypted/> element: AES-128-GCM of plaintext with a real 128-bit tag
    appended, no associated data; iv must be fresh for each push."""
    sealed = AESGCM(key).encrypt(iv, plaintext, None)
    voip_attr = " type='voip'" if voip else ""
    return (f"<encrypted xmlns='{NS_ENCRYPT}' iv='{base64.b64encode(iv).decode()}'"
            f"{voip_attr}>{base64.b64encode(sealed).decode()}</encrypted>")


def decrypt(key: bytes, element: ET.Element) -> dict[str, Any]:
    """The payload of an <encrypted/> element (tests, and what a device does)."""
    iv = base64.b64decode(element.get("iv", ""))
    sealed = base64.b64decode(element.text or "")
    value: dict[str, Any] = json.loads(AESGCM(key).decrypt(iv, sealed, None))
    return value


# --------------------------------------------------------- a notification's parts

def element_pairs(elements: Iterable[str]) -> list[tuple[str, str]]:
    """Extension elements as pairs of a notification's summary (stored in the outbox with
    it, sent as children of <notification/>: see split)."""
    return [(f"{ELEMENT_KEY}{i}>", xml) for i, xml in enumerate(elements, start=1)]


def split(pairs: Iterable[tuple[str, str]]) -> tuple[list[tuple[str, str]], list[str]]:
    """A notification's summary fields and its extension elements."""
    fields: list[tuple[str, str]] = []
    elements: list[str] = []
    for key, value in pairs:
        if key.startswith(ELEMENT_KEY):
            elements.append(value)
        else:
            fields.append((key, value))
    return fields, elements
