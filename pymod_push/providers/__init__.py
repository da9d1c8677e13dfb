"""Push providers: what each one is sent (sans-IO request builders and reply readers)
and the HTTP/2 clients that send it (dispatch.py)."""

from __future__ import annotations

import base64
import enum
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol
from urllib.parse import urlencode

from pymod_push.core import compact_json
from pymod_push.core.limits import ascii_number, fit

if TYPE_CHECKING:
    from pymod_push.records import RegisteredDevice


@dataclass(slots=True)  # per push: not frozen (see protocol.Stanza)
class HttpRequest:
    method: str
    url: str
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""


class DeliveryOutcome(enum.Enum):
    DELIVERED = "delivered"
    RETRY = "retry"  # the provider is busy or down: try again later
    UNREGISTERED = "unregistered"  # the token is gone: forget the device
    FAILED = "failed"  # this push is wrong (payload, credentials): do not retry


@dataclass(slots=True)  # per push: not frozen (see protocol.Stanza)
class Reply:
    outcome: DeliveryOutcome
    reason: str = ""
    retry_after: float | None = None


def notification_text(summary: dict[str, str]) -> tuple[str, str]:
    """(title, body) to show, from the summary the XMPP server chose to include."""
    sender = summary.get("last-message-sender", "").split("/", 1)[0]
    body = summary.get("last-message-body", "")
    count = summary.get("message-count", "")
    if body or sender:
        return sender or "New message", body or "New message"
    if count and count != "0":
        return "", f"{count} new message{'s' if count != '1' else ''}"
    return "", ""


def summary_payload(summary: dict[str, str]) -> dict[str, str]:
    """What an app receives as data: the summary fields the XMPP server chose to include
    (counts by default; sender and body only when the user's options allow them)."""
    return {key: value for key, value in summary.items() if key != "FORM_TYPE"}


def fitted(summary: dict[str, str], build: Callable[[dict[str, str]], bytes],
           limit: int) -> bytes:
    """``build(summary)``, the summary shortened until that is at most ``limit`` bytes:
    the body first, then optional fields (see core.limits.fit)."""
    payload = build(summary)
    if len(payload) <= limit:
        return payload
    return build(fit(summary, lambda s: len(build(s)), limit))


def to_json(data: object) -> bytes:
    return compact_json.dumps(data).encode()


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def b64url_encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class Provider(Protocol):
    """What dispatch.py needs of a provider; everything but HTTP itself."""

    client_certificate: str | None

    def auth_request(self, now: float) -> HttpRequest | None:
        """A token request to make before sending, or None while the token is good."""

    def auth_reply(self, status: int, body: bytes, now: float) -> None: ...

    def request(self, device: RegisteredDevice, summary: dict[str, str], now: float,
                urgent: bool = False) -> HttpRequest: ...

    def reply(self, status: int, headers: dict[str, str], body: bytes) -> Reply: ...


def common_reply(status: int, reason: str = "") -> Reply:
    """What most providers' statuses mean. Only 429 and 5xx are worth another attempt;
    any other 4xx (408 too) fails for good at once: an endpoint that answers so to every
    push must not cost retries."""
    if 200 <= status < 300:
        return Reply(DeliveryOutcome.DELIVERED)
    if status in (404, 410):
        return Reply(DeliveryOutcome.UNREGISTERED, reason or str(status))
    if status == 429 or status >= 500:
        return Reply(DeliveryOutcome.RETRY, reason or str(status))
    return Reply(DeliveryOutcome.FAILED, reason or str(status))


class OAuthToken:
    """A bearer token from an OAuth token endpoint (FCM, WNS): kept until a minute before it
    expires, or until the provider refuses it."""

    def __init__(self, default_lifetime: float) -> None:
        self.value: str | None = None
        self._expires = 0.0
        self._default_lifetime = default_lifetime
        self._refreshed_for_401 = False

    def needed(self, now: float) -> bool:
        return self.value is None or now >= self._expires - 60

    def form_request(self, url: str, form: dict[str, str]) -> HttpRequest:
        return HttpRequest("POST", url, {"content-type": "application/x-www-form-urlencoded"},
                           urlencode(form).encode())

    def store(self, status: int, body: bytes, now: float) -> None:
        if status != 200:
            raise ValueError(f"the OAuth token endpoint answered {status}")
        answer = json.loads(body)
        self.value = str(answer["access_token"])
        # A number of seconds as JSON has it (an int, or digits): float() would also take
        # "NaN" or "Infinity", a token then never refreshed until the provider refuses it.
        lifetime = answer.get("expires_in", self._default_lifetime)
        if isinstance(lifetime, str):
            lifetime = ascii_number(lifetime, 9)
        if isinstance(lifetime, bool) or not isinstance(lifetime, (int, float)) \
                or not 0 < lifetime <= 10 * self._default_lifetime:
            lifetime = self._default_lifetime
        self._expires = now + float(lifetime)

    def refused(self) -> Reply:
        """The provider said 401: fetch a new token and try again at once, but only once;
        a new token refused too means the credentials are wrong."""
        if self._refreshed_for_401:
            return Reply(DeliveryOutcome.FAILED, "401 with a new token: check the credentials")
        self._refreshed_for_401 = True
        self.value = None
        return Reply(DeliveryOutcome.RETRY, "401", 0)

    def worked(self) -> None:
        self._refreshed_for_401 = False
