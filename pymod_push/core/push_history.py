"""What the push check-up (ejabberdctl push_diagnose, the ad-hoc command push-diagnose) tells
that the store does not keep: each registration's and device's last push (when, what was
sent, the answer, the latency), the registrations disabled lately and why, and the newest
log lines about each user.

Kept in this process's memory only, bounded (docs/diagnostics.md says why): a restart of the
Python process forgets it, and the check-up then says "no push since this process started".
What is durable (registrations, since when, error counts) comes from the store.

Nothing secret is kept here: what was sent is described by its field names and counts,
never a body, a sender's text, a token or a node's secret; nodes are named by a short hash.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TypeVar

from pymod_push.core.ios_extensions import ELEMENT_KEY

RegistrationKey = tuple[str, str, str, str]  # user, server, app server JID, node

MAX_KEPT = 20_000  # registrations and devices whose last push is kept, each (oldest go)
MAX_USERS = 5_000  # users whose log lines and disabled registrations are kept
LOG_LINES = 8  # the newest log lines kept per user
DISABLED_KEPT = 4  # registrations disabled lately, kept per user
LINE_CHARS = 300  # a log line is cut there


def short_hash(secret: str) -> str:
    """How a node (or any value that must not be shown) is named: 8 hex digits."""
    return "#" + hashlib.sha256(secret.encode()).hexdigest()[:8]


def describe(summary: Iterable[tuple[str, str]]) -> str:
    """What a push carried, in words, without its text: counts and priority by value, the
    sender and the body by presence only, Tigase's elements by name."""
    said: list[str] = []
    for key, value in summary:
        if key.startswith(ELEMENT_KEY):
            tag = value.lstrip("<").split(" ", 1)[0].split(">", 1)[0].split("/", 1)[0]
            said.append(f"<{tag}/> element" if tag.isidentifier() else "an element")
        elif key.endswith("message-count") or key.endswith("subscription-count"):
            said.append(f"{key.rsplit('#', 1)[-1]} {value[:9]}")
        elif key.endswith("priority"):
            said.append(f"priority {value[:10]}")
        elif key.endswith("last-message-body"):
            said.append(f"a body ({len(value)} characters)")
        elif key.endswith("last-message-sender"):
            said.append("the sender")
        elif key != "FORM_TYPE":
            said.append(key.rsplit("#", 1)[-1][:40])
    return ", ".join(said) or "nothing but the wake-up"


@dataclass(slots=True)
class LastPush:
    sent_at: float  # wall clock
    what: str  # describe()
    test: bool = False
    answer: str = ""  # "" until answered
    answered_at: float | None = None

    @property
    def latency_ms(self) -> int | None:
        if self.answered_at is None:
            return None
        return max(0, round((self.answered_at - self.sent_at) * 1000))


@dataclass(slots=True, frozen=True)
class Disabled:
    at: float
    app_server: str
    node_hash: str
    why: str


class PushHistory:
    def __init__(self) -> None:
        self.started = time.time()
        self.registrations: OrderedDict[RegistrationKey, LastPush] = OrderedDict()
        self.devices: OrderedDict[str, LastPush] = OrderedDict()  # by device node
        self.logs: OrderedDict[str, deque[tuple[float, str, str]]] = OrderedDict()
        self.disabled: OrderedDict[str, deque[Disabled]] = OrderedDict()
        self._testing: set[RegistrationKey] = set()  # the next publish is a test push

    def clear(self) -> None:
        self.__init__()  # type: ignore[misc]

    # ------------------------------------------------------------------ registrations
    def testing(self, key: RegistrationKey) -> None:
        """The next publish to that registration is a check-up's test push."""
        self._testing.add(key)

    def sent(self, key: RegistrationKey, summary: Iterable[tuple[str, str]],
             now: float) -> None:
        test = key in self._testing
        self._testing.discard(key)
        _keep(self.registrations, key, LastPush(now, describe(summary), test))

    def answered(self, key: RegistrationKey, answer: str, now: float) -> None:
        last = self.registrations.get(key)
        if last is not None and not last.answer:
            last.answer, last.answered_at = answer, now

    def was_disabled(self, key: RegistrationKey, why: str, now: float) -> None:
        user = f"{key[0]}@{key[1]}"
        kept = self.disabled.get(user)
        if kept is None:
            kept = _keep(self.disabled, user, deque(maxlen=DISABLED_KEPT), MAX_USERS)
        kept.append(Disabled(now, key[2], short_hash(key[3]), why))

    # ------------------------------------------------------------------ devices
    def device_sent(self, node: str, summary: Iterable[tuple[str, str]], now: float) -> None:
        _keep(self.devices, node, LastPush(now, describe(summary)))

    def device_answered(self, node: str, answer: str, now: float) -> None:
        last = self.devices.get(node)
        if last is not None:
            last.answer, last.answered_at = answer, now

    # ------------------------------------------------------------------ log lines
    def note(self, user: str, level: str, text: str, now: float) -> None:
        lines = self.logs.get(user)
        if lines is None:
            lines = _keep(self.logs, user, deque(maxlen=LOG_LINES), MAX_USERS)
        else:
            self.logs.move_to_end(user)
        lines.append((now, level, printable(text)))


def printable(text: str) -> str:
    """A log line as the check-up shows it: one line, control characters escaped, cut."""
    cut = text[:LINE_CHARS]
    out = "".join(c if c.isprintable() else repr(c)[1:-1] for c in cut)
    return out + ("…" if len(text) > LINE_CHARS else "")


K = TypeVar("K")
V = TypeVar("V")


def _keep(kept: OrderedDict[K, V], key: K, value: V, limit: int = MAX_KEPT) -> V:
    kept[key] = value
    kept.move_to_end(key)
    while len(kept) > limit:
        kept.popitem(last=False)
    return value


HISTORY = PushHistory()  # this process's (one per process, as logging is)


class UserLogHandler(logging.Handler):
    """Keeps the module's log lines that name a user (extra={"push_user": "user@host"})
    in that user's ring of the newest lines."""

    def emit(self, record: logging.LogRecord) -> None:
        user = getattr(record, "push_user", None)
        if not isinstance(user, str) or not user:
            return
        try:
            HISTORY.note(user, record.levelname.lower(), record.getMessage(), record.created)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


def about(user: str, server: str = "") -> dict[str, str]:
    """The extra= of a log line about that user (a bare JID, or its user and server)."""
    return {"push_user": f"{user}@{server}" if server else user}
