"""What was pushed to each pending session: a message that comes back (offline,
archived, re-routed to another session) is not pushed again."""

from __future__ import annotations

import struct
from array import array
from bisect import bisect_left
from dataclasses import dataclass, field

# Up to this many marks a session's are scanned (fastest for few), beyond found by bisection.
SCANNED_MARKS = 256
_PACKED = struct.Struct("q")  # a mark as scanned: native, as array("q") holds it


@dataclass(slots=True)
class PushedTo:
    """The marks (pushed_mark) of what a session was pushed since it went pending, at most
    keep of them, the oldest forgotten first. Up to SCANNED_MARKS, packed (8 bytes a mark)
    and scanned; beyond, 12 bytes a mark, found by bisection (a scan took 15 us a push at
    5,000 marks; a set of ints costs about 100 bytes a mark)."""

    # when it went pending (else its first push): the session ends within its resume
    # timeout of that, and what it held is re-routed then
    since: float
    # the marks packed, oldest first, while scanned (None once beyond SCANNED_MARKS)
    scanned: bytearray | None = field(default_factory=bytearray)
    # then the marks in the order pushed; once full, a ring whose oldest is at oldest
    ring: array[int] = field(default_factory=lambda: array("q"))
    oldest: int = 0
    # and the positions in ring, ordered by the mark there
    by_mark: array[int] = field(default_factory=lambda: array("i"))

    def __len__(self) -> int:
        scanned = self.scanned
        return len(self.ring) if scanned is None else len(scanned) // _PACKED.size

    def __contains__(self, mark: int) -> bool:
        if self.scanned is not None:
            return _scan(self.scanned, _PACKED.pack(mark))
        ring, by_mark = self.ring, self.by_mark
        at = bisect_left(by_mark, mark, key=ring.__getitem__)
        return at < len(by_mark) and ring[by_mark[at]] == mark

    def remember(self, mark: int, keep: int) -> bool:
        """Remember mark (False if it is already), forgetting the oldest beyond keep
        (at least 1)."""
        scanned = self.scanned
        if scanned is not None:
            packed = _PACKED.pack(mark)
            if _scan(scanned, packed):
                return False
            scanned += packed
            if len(scanned) > keep * _PACKED.size:
                del scanned[:len(scanned) - keep * _PACKED.size]
            elif len(scanned) > SCANNED_MARKS * _PACKED.size:
                self._index()
            return True
        ring, by_mark = self.ring, self.by_mark
        at = bisect_left(by_mark, mark, key=ring.__getitem__)
        if at < len(by_mark) and ring[by_mark[at]] == mark:
            return False
        if len(ring) != keep and (self.oldest or len(ring) > keep):  # keep changed
            ring, by_mark = self._keep_newest(min(len(ring), keep))
            at = bisect_left(by_mark, mark, key=ring.__getitem__)
        if len(ring) < keep:
            by_mark.insert(at, len(ring))
            ring.append(mark)
            return True
        # full: mark takes the oldest's place (at counted the oldest's mark among those)
        oldest = self.oldest
        gone = bisect_left(by_mark, ring[oldest], key=ring.__getitem__)
        del by_mark[gone]
        by_mark.insert(at - 1 if gone < at else at, oldest)
        ring[oldest] = mark
        self.oldest = oldest + 1 if oldest + 1 < keep else 0
        return True

    def _index(self) -> None:
        """From scanned marks to the ring and its order by mark."""
        assert self.scanned is not None
        self.ring.frombytes(self.scanned)
        self.scanned = None
        self._keep_newest(len(self.ring))

    def _keep_newest(self, count: int) -> tuple[array[int], array[int]]:
        """Only the newest count marks, oldest first from position 0 (rare: when the
        bound changes with the session's registrations)."""
        marks = self.ring[self.oldest:] + self.ring[:self.oldest]
        self.ring = ring = marks[len(marks) - count:]
        self.oldest = 0
        self.by_mark = array("i", sorted(range(count), key=ring.__getitem__))
        return ring, self.by_mark


def _scan(marks: bytearray, mark: bytes) -> bool:
    at = marks.find(mark)
    while at > 0 and at % _PACKED.size:  # found astride two marks: not this one
        at = marks.find(mark, at + 1)
    return at >= 0


NOTHING = PushedTo(0.0)  # of a session pushed nothing yet (never changed)
