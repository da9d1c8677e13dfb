"""The store's one connection and what every area of it shares: commits (SQLite's local,
PostgreSQL's pipelined), the in-memory copies and their invalidation."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from typing import Any, TypeVar

from pymod_push.core.user_options import PushOptions
from pymod_push.metrics import COMMIT_BUCKETS, Histogram
from pymod_push.protocol import UserKey
from pymod_push.records import RegisteredDevice, Registration
from pymod_push.store.checkpoints import Checkpointer
from pymod_push.store.schema import MIGRATIONS
from pymod_push.store.sqlite import connect

K = TypeVar("K")
V = TypeVar("V")

UserEntry = tuple[list[Registration], PushOptions | None]  # all of a user's, and options
DEVICE_MEMORY = 50_000  # app server devices kept in memory (SQLite), at most: ~26 MB
USER_MEMORY = 50_000  # users whose registrations are kept in memory, at most: ~28 MB


class StoreBase:
    """The connection: SQLite's, or store.postgres.PgConnection, which runs the same SQL
    on PostgreSQL (it turns `?` into `$n` and quotes the column `user`)."""

    def __init__(self, path: str, connection: Any = None, *,
                 background_checkpoints: bool = False) -> None:
        """background_checkpoints: SQLite's WAL checkpoints run in a thread of their own
        (checkpoints.py) rather than in the commits; for the process that serves."""
        self._pg = connection
        self._checkpoints: Checkpointer | None = None
        self.commits = Histogram(COMMIT_BUCKETS)  # start to answer (metrics)
        self._users: dict[UserKey, UserEntry] = {}
        # SQLite: node -> device (None: none)
        self._devices: dict[str, RegisteredDevice | None] = {}
        if connection is not None:  # PostgreSQL (see open_store)
            self.db = connection
            self.db.migrate(MIGRATIONS)
            return
        self.db, self._checkpoints = connect(path, MIGRATIONS, background_checkpoints)

    def schema_version(self) -> int:
        if not isinstance(self.db, sqlite3.Connection):
            return int(self.db.schema_version())
        return int(self.db.execute("PRAGMA user_version").fetchone()[0])

    def commit(self) -> None:
        started = time.perf_counter()
        self.db.commit()
        self.commits.observe(time.perf_counter() - started)
        if self._checkpoints is not None:
            self._checkpoints.committed(self.db)

    def start_commit(self, when_done: Callable[[], None]) -> bool | None:
        """PostgreSQL: start the commit and return at once (see PgConnection.start_commit;
        True: when_done follows, then land()). None: commit() is the way (SQLite, whose
        commit is a local write)."""
        return self._pg.start_commit(when_done) if self._pg is not None else None

    def land(self) -> None:
        """How the commit start_commit started went (DatabaseUnavailable if it failed)."""
        if self._pg is not None:
            self._pg.land()
            self.commits.observe(self._pg.flight_s)

    def write_mark(self) -> int:
        """Where this transaction's writes stand (PostgreSQL; see undo_to)."""
        return self._pg.mark() if self._pg is not None else 0

    def undo_to(self, mark: int) -> None:
        """Forget the writes since write_mark (an event to be handled again, PostgreSQL)."""
        if self._pg is not None:
            self._pg.rollback_to(mark)
            self._users.clear()  # what the undone writes changed is read again

    def round_trips(self) -> int | None:
        """Database round trips so far (PostgreSQL), for metrics and the benchmark."""
        return int(self._pg.round_trips) if self._pg is not None else None

    def _changed(self, user: UserKey) -> None:
        """The user's registrations or options change (see the class)."""
        self._users.pop(user, None)
        if self._pg is not None:
            self._pg.notify(user)

    def rollback(self) -> None:
        self.db.rollback()
        self._users.clear()  # what the undone writes changed is read again
        self._devices.clear()

    def close(self) -> None:
        if self._checkpoints is not None:
            self._checkpoints.close()  # first: closing the last connection checkpoints
        self.db.commit()
        self.db.close()


def _kept(memory: dict[K, V], key: K, value: V, limit: int) -> V:
    """value, kept in memory under key; at most limit entries, the longest kept going."""
    if len(memory) >= limit:
        del memory[next(iter(memory))]
    memory[key] = value
    return value
