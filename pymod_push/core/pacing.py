"""Publishes to any one remote app-server domain, paced (option publish_rate): however
many registrations point at one domain, this node sends it at most that many a second after
a burst of as many. The server's own domains (its host, subdomains of it, the built-in app
server's pubsub hosts) are not third parties and are not paced. What is over the rate
waits, in order, and goes out as soon as the rate allows: a well-behaved app server below
the rate sees no difference, one above it gets everything later instead of nothing. No
clock: time comes in.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Sequence
from functools import lru_cache
from typing import TypeVar

from pymod_push.core.ratelimit import RateLimiter
from pymod_push.protocol import Publish

log = logging.getLogger("pymod_push")
A = TypeVar("A")
_ROUNDING = 1e-6  # a token due at t is there at t, whatever floating point says


@lru_cache(maxsize=4096)  # app servers are few: once per JID, not per publish
def domain_of(jid: str) -> str:
    return jid.split("/", 1)[0].rpartition("@")[2].lower()


class DomainPacer:
    def __init__(self, per_second: int, local: tuple[str, ...] = ()) -> None:
        self.per_second = per_second
        self._local = frozenset(d.lower() for d in local)
        self._local_suffixes = tuple(f".{d.lower()}" for d in local)
        self._limit = RateLimiter(per_second, float(per_second))
        self._waiting: dict[str, deque[Publish]] = {}
        self._due: dict[str, float] = {}  # when a waiting domain has its next token

    def __len__(self) -> int:
        return sum(len(queue) for queue in self._waiting.values())

    def pace(self, actions: Sequence[A], now: float) -> list[A]:
        """The actions that go now: a publish over its domain's rate is held back."""
        passed: list[A] = []
        for action in actions:
            if not isinstance(action, Publish):
                passed.append(action)
                continue
            domain = domain_of(action.to)
            if domain in self._local or domain.endswith(self._local_suffixes):
                passed.append(action)
                continue
            queue = self._waiting.get(domain)
            if queue is None:  # nothing waits for this domain: a token, or wait
                refusal = self._limit.take(domain, now)
                if refusal is None:
                    passed.append(action)
                    continue
                queue = self._waiting[domain] = deque()
                self._due[domain] = now + refusal.retry_after + _ROUNDING
                log.warning("publishes to %s over %d a second: held back and sent at that "
                            "rate (option publish_rate)", domain, self.per_second)
            queue.append(action)
        return passed

    def due(self, now: float) -> list[Publish]:
        """The held-back publishes that may go now, each domain's in order."""
        released: list[Publish] = []
        for domain, due in list(self._due.items()):
            if due > now:
                continue
            queue = self._waiting[domain]
            while queue:
                refusal = self._limit.take(domain, now)
                if refusal is not None:
                    self._due[domain] = now + refusal.retry_after + _ROUNDING
                    break
                released.append(queue.popleft())
            if not queue:
                del self._waiting[domain], self._due[domain]
        return released

    def next_deadline(self) -> float | None:
        return min(self._due.values(), default=None)
