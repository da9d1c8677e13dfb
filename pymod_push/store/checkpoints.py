"""SQLite WAL checkpoints, done mostly in a thread of their own, off the event loop.

In WAL mode a commit only appends pages to the -wal file; a checkpoint copies them into
the database file. By default SQLite runs one inside the commit that takes the WAL past
1,000 pages, and that commit then takes 15-30 ms instead of 0.2 ms (measured here at
2,000 pushes/s, twice a second), with the whole event loop waiting for it.

So the Store's connection does not checkpoint on its own (wal_autocheckpoint=0). After
every COMMITS commits, or INTERVAL_S after a commit at most, this thread copies the WAL
with PASSIVE checkpoints on a connection of its own; they neither wait for nor block the
writer, and the sqlite3 module lets go of the GIL while SQLite works. Passes follow each
other while each still had much to copy (the writer went on meanwhile).

A checkpoint only lets the WAL start again from its beginning once it copied all of it,
which a thread racing the writer seldom does: under steady load the WAL would grow
without end (240 MB in 15 s in a test). So after the background passes the writer,
between two of its own transactions, copies the few pages written since (the tail: one
to three commits' worth, about 1-2 ms), and its next transaction restarts the WAL. Its
size stays about COMMITS commits' worth (6 MB at 2,000 pushes/s).

A checkpoint that fails (the disk, a lock) is tried again at the next turn; meanwhile the
WAL grows, which SQLite reads correctly at any size. A crash in the middle of one loses
nothing: SQLite replays the WAL at the next open.
"""

from __future__ import annotations

import logging
import sqlite3
import threading

log = logging.getLogger("pymod_push")

COMMITS = 200  # about the 1,000 pages SQLite waits for, at ~5-7 pages per commit
INTERVAL_S = 1.0
PASSES = 4  # background passes in a row, at most
FEW_PAGES = 64  # a pass that copied fewer: what the writer is left to copy is small


class Checkpointer:
    def __init__(self, path: str) -> None:
        self._path = path
        self._wake = threading.Event()
        self._stopping = False
        self._commits = 0  # since the last turn began (counted by the writer's thread)
        self._tail_due = False  # set by this thread, taken by the writer's
        self._failing = False
        # Turns done: the background passes, and the tails after them (for tests).
        self.background_turns = 0
        self.tails = 0
        self.progress = threading.Condition()
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name="pymod_push-checkpoints")
        self._thread.start()

    def committed(self, db: sqlite3.Connection) -> None:
        """After each of the writer's commits, on its connection (cheap but for the tail)."""
        if self._tail_due:
            self._tail_due = False
            if self._checkpoint(db, "the writer's") is not None:
                self._count("tails")
        self._commits += 1
        if self._commits == COMMITS:
            self._wake.set()

    def soon(self) -> None:
        """A turn now, whatever the count of commits (there must be one since the last)."""
        self._commits = max(self._commits, 1)
        self._wake.set()

    def wait_for(self, counter: str, count: int, timeout: float) -> bool:
        """Until the counter (background_turns, tails) reaches count (False if the timeout
        came first)."""
        with self.progress:
            return bool(self.progress.wait_for(lambda: getattr(self, counter) >= count,
                                               timeout))

    def _count(self, counter: str) -> None:
        with self.progress:
            setattr(self, counter, getattr(self, counter) + 1)
            self.progress.notify_all()

    def close(self) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join()

    def _run(self) -> None:
        db = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        try:
            while not self._stopping:
                self._wake.wait(INTERVAL_S)
                self._wake.clear()
                if self._commits == 0 or self._tail_due or self._stopping:
                    continue
                self._commits = 0  # the commits from now on count for the next turn
                self._background_passes(db)
        finally:
            db.close()

    def _background_passes(self, db: sqlite3.Connection) -> None:
        copied_before = 0
        for _ in range(PASSES):
            copied = self._checkpoint(db, "a background")
            if copied is None:
                return  # tried again at the next turn
            if copied - copied_before < FEW_PAGES:
                break
            copied_before = copied
        self._tail_due = True  # the writer's next commit copies the rest
        self._count("background_turns")

    def _checkpoint(self, db: sqlite3.Connection, whose: str) -> int | None:
        """One PASSIVE checkpoint: how many WAL pages are copied in all (None: failed)."""
        try:
            ((busy, _, copied),) = db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        except sqlite3.Error as exc:
            if not self._failing:  # said once, not every turn
                log.warning("database: %s WAL checkpoint of %s failed (%s); tried again "
                            "at least every %.0f s", whose, self._path, exc, INTERVAL_S)
                self._failing = True
            self._commits = max(self._commits, 1)
            return None
        if self._failing:
            log.warning("database: WAL checkpoints of %s work again", self._path)
            self._failing = False
        return int(copied) if not busy else 0
