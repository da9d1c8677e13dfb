"""Token buckets per key (the app server's publishes per node). No clock: time comes in.

A key may take ``burst`` tokens at once; tokens come back at ``per_second``. Memory
stays bounded: a bucket idle long enough to be full again is the same as no bucket
and is dropped, and beyond ``max_keys`` the longest idle bucket goes (that key starts
full again: lenient, never wrong the other way).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass


@dataclass(slots=True)
class _Bucket:
    tokens: float
    updated: float  # when tokens was last brought up to date
    refused: bool = False  # refused since it last gave a token


@dataclass(frozen=True, slots=True)
class Refusal:
    retry_after: float  # seconds until the next token
    first: bool  # the first refusal since the key last got a token: worth one log line

    @property
    def retry_after_seconds(self) -> int:
        return max(1, math.ceil(self.retry_after))


class RateLimiter:
    def __init__(self, burst: int, per_second: float, max_keys: int = 100_000) -> None:
        if burst < 1 or per_second <= 0 or max_keys < 1:
            raise ValueError("a rate limit needs burst >= 1, per_second > 0, max_keys >= 1")
        self.burst = burst
        self.per_second = per_second
        self.max_keys = max_keys
        self._full_after = burst / per_second  # idle this long, a bucket is full again
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()  # least recently used first

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, key: str, now: float) -> Refusal | None:
        """Take one of ``key``'s tokens: None if there was one, else when there will be."""
        buckets = self._buckets
        self._evict_idle(now)
        bucket = buckets.get(key)
        if bucket is None:
            if len(buckets) >= self.max_keys:
                buckets.popitem(last=False)
            bucket = buckets[key] = _Bucket(float(self.burst), now)
        else:
            buckets.move_to_end(key)
            elapsed = now - bucket.updated
            if elapsed > 0:  # a clock that went back adds nothing
                tokens = bucket.tokens + elapsed * self.per_second
                bucket.tokens = tokens if tokens < self.burst else float(self.burst)
                bucket.updated = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            bucket.refused = False
            return None
        first = not bucket.refused
        bucket.refused = True
        return Refusal((1.0 - bucket.tokens) / self.per_second, first)

    def _evict_idle(self, now: float) -> None:
        # Buckets are in order of last use, so the idle ones are at the front.
        while self._buckets:
            oldest = next(iter(self._buckets.values()))
            if now - oldest.updated < self._full_after:
                break
            self._buckets.popitem(last=False)
