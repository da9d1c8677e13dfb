"""UnifiedPush (ejabberd as the push server of Conversations' distributor): the pure
parts. What a register and a POST may carry, the tokens and endpoint URLs, the
per-endpoint rate, and which kept pushes a new one replaces or pushes out. No I/O: the
service (service/unifiedpush.py) holds the state and the store, time comes in.
"""

from __future__ import annotations

import base64
import binascii
import re
import time
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from xml.sax.saxutils import quoteattr

from pymod_push.core import safexml
from pymod_push.core.limits import ascii_number
from pymod_push.core.ratelimit import RateLimiter, Refusal
from pymod_push.core.xmpp import RequestError

NS_UP = "http://gultsch.de/xmpp/drafts/unified-push"
TOKEN_RANDOM_BYTES = 32  # 256 random bits in every token
KEY_BYTES = 32  # application and instance: SHA-256 hashes, base64
MAX_BODY_BYTES = 4096  # a POST's body, at most (the shim answers 413 beyond)
TTL_DIGITS = 10  # a TTL header of more digits is refused (400)
TOPIC_CHARS = 32  # RFC 8030 §5.4
URGENCIES = frozenset({"very-low", "low", "normal", "high"})
RATE_KEYS = 100_000  # endpoints whose rate is tracked at once, at most (the idle ones go)

_STANDARD_B64 = re.compile(r"[A-Za-z0-9+/]{43}=")  # 32 bytes, standard alphabet, padded
_TOPIC = re.compile(r"[A-Za-z0-9_-]{1,32}")  # base64url alphabet
_TOKEN_PART = re.compile(r"[A-Za-z0-9_-]+")


# ----------------------------------------------------------------------- register
@dataclass(frozen=True, slots=True)
class Register:
    application: str
    instance: str


def check_key(name: str, value: str | None) -> str:
    """An application or instance: standard base64 (padded) of exactly 32 bytes, else
    RequestError bad-request with a text naming it (as Prosody and up)."""
    if value is None:
        raise RequestError("bad-request", f"{name}: missing")
    if not _STANDARD_B64.fullmatch(value):  # the size first: nothing big is decoded
        raise RequestError("bad-request", f"{name}: not base64 of 32 bytes")
    try:
        decoded = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError("bad-request", f"{name}: not base64 of 32 bytes") from None
    if len(decoded) != KEY_BYTES:
        raise RequestError("bad-request", f"{name}: not base64 of 32 bytes")
    return value


def parse_register(xml: bytes) -> Register:
    """The <register/> element of a register IQ, or RequestError."""
    try:
        element = safexml.parse(xml)
    except ET.ParseError:
        raise RequestError("bad-request", "the request is not usable XML") from None
    if element.tag != f"{{{NS_UP}}}register":
        raise RequestError("bad-request", "expected <register/>")
    return Register(check_key("application", element.get("application")),
                    check_key("instance", element.get("instance")))


def registered_xml(endpoint: str, expires: float) -> str:
    return (f"<registered xmlns='{NS_UP}' endpoint={quoteattr(endpoint)} "
            f"expiration='{expiration(expires)}'/>")


def expiration(when: float) -> str:
    """XEP-0082 UTC, ending in Z (Conversations reads no other zone form)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when))


# ----------------------------------------------------------------------- tokens
def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def make_token(host: str, random_bytes: bytes) -> str:
    """base64url(host) "." base64url(32 random bytes), unpadded: the host part tells the
    shim which virtual host serves it (never the HTTP Host header)."""
    if len(random_bytes) < TOKEN_RANDOM_BYTES:
        raise ValueError("a token needs 32 random bytes")
    return f"{_b64url(host.encode())}.{_b64url(random_bytes)}"


def token_host(token: str) -> str | None:
    """The virtual host a token names, or None if it is no well-formed token."""
    host, dot, rest = token.partition(".")
    if not dot or not _TOKEN_PART.fullmatch(host) or not _TOKEN_PART.fullmatch(rest) \
            or len(token) > 1000:
        return None
    try:
        return base64.urlsafe_b64decode(host + "=" * (-len(host) % 4)).decode("utf-8")
    except (binascii.Error, ValueError):
        return None


def endpoint_url(base_url: str, token: str) -> str:
    return f"{base_url.rstrip('/')}/{token}"


# ----------------------------------------------------------------------- POST
class BadPost(ValueError):
    """A POST's header that is not valid: HTTP 400 with this short text."""


@dataclass(frozen=True, slots=True)
class PostMeta:
    ttl: int | None  # seconds asked for, None: no TTL header
    urgency: str | None
    topic: str | None


def _header(name: str, value: bytes | None) -> str | None:
    if value is None:
        return None
    try:
        return value.decode("ascii")
    except UnicodeDecodeError:
        raise BadPost(f"{name}: not ASCII") from None


def parse_meta(ttl: bytes | None, urgency: bytes | None, topic: bytes | None) -> PostMeta:
    """RFC 8030's headers of a POST (raw, None when absent), or BadPost."""
    ttl_text, urgency_text, topic_text = (_header("TTL", ttl), _header("Urgency", urgency),
                                          _header("Topic", topic))
    seconds = None
    if ttl_text is not None:
        seconds = ascii_number(ttl_text, TTL_DIGITS)
        if seconds is None:
            raise BadPost(f"TTL: not a number of seconds (1 to {TTL_DIGITS} ASCII digits)")
    if urgency_text is not None:
        urgency_text = urgency_text.strip()
        if urgency_text not in URGENCIES:
            raise BadPost("Urgency: not one of very-low, low, normal, high")
    if topic_text is not None:
        topic_text = topic_text.strip()
        if not _TOPIC.fullmatch(topic_text):
            raise BadPost(f"Topic: not 1 to {TOPIC_CHARS} characters of the base64url "
                          "alphabet")
    return PostMeta(seconds, urgency_text, topic_text)


def kept_ttl(asked: int | None, max_ttl_s: int) -> int:
    """How long a push is kept: what the sender asked (its default: the maximum), at most
    the maximum."""
    return max_ttl_s if asked is None else min(asked, max_ttl_s)


class EndpointRate:
    """POSTs per endpoint: ``rate`` a minute after a burst of ``burst``; bounded memory
    (RATE_KEYS endpoints at most, the idle ones forgotten: they start full again)."""

    def __init__(self, rate_per_minute: int, burst: int, max_keys: int = RATE_KEYS) -> None:
        self._limiter = RateLimiter(max(1, burst), max(1, rate_per_minute) / 60, max_keys)

    def __len__(self) -> int:
        return len(self._limiter)

    def take(self, token: str, now: float) -> Refusal | None:
        return self._limiter.take(token, now)


# ----------------------------------------------------------------------- keeping
@dataclass(frozen=True, slots=True)
class Held:
    """A push of the endpoint as stored: what the keep policy looks at."""

    id: int
    topic: str | None
    state: str  # kept | sent | queued


def keep_plan(held: Sequence[Held], topic: str | None,
              max_kept: int) -> tuple[list[int], list[int]]:
    """What a new push (of that topic) removes among the endpoint's pushes held (id
    order): (replaced: the kept ones of its topic, overflow: the oldest kept beyond
    max_kept with the new one). Pushes sent (in flight) or queued in a session are
    not replaced: they may have reached the device already."""
    replaced = [h.id for h in held if topic is not None and h.topic == topic
                and h.state == "kept"]
    rest = [h for h in held if h.id not in replaced]
    overflow: list[int] = []
    excess = len(rest) + 1 - max(1, max_kept)
    for h in rest:
        if excess <= 0:
            break
        if h.state == "kept":
            overflow.append(h.id)
            excess -= 1
    return replaced, overflow
