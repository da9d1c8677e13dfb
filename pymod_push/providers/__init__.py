"""Push providers: what each one is sent (sans-IO request builders and reply readers)
and the HTTP/2 clients that send it (dispatch.py)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class HttpRequest:
    method: str
    url: str
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""


class Outcome(enum.Enum):
    DELIVERED = "delivered"
    RETRY = "retry"  # the provider is busy or down: try again later
    UNREGISTERED = "unregistered"  # the token is gone: forget the device
    FAILED = "failed"  # this push is wrong (payload, credentials): do not retry


@dataclass(frozen=True, slots=True)
class Reply:
    outcome: Outcome
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
