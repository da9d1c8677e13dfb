"""PostgreSQL for clusters (option `db_url`): the Store's own SQL, run through asyncpg.

The push service is synchronous and commits once per batch of events, so this adapter
offers what Store uses of a sqlite3 connection (execute, executemany, commit, rollback,
close) and runs asyncpg on an event loop of its own in a background thread. One
connection holds one transaction from the first statement after a commit to the next
commit, as sqlite3 does. Each call blocks for a round trip on 127.0.0.1 or the LAN: the
price of a database shared by the nodes of a cluster.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
from collections.abc import Coroutine, Iterator, Sequence
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import asyncpg

log = logging.getLogger("pymod_push")
T = TypeVar("T")
TIMEOUT = 30.0
MIGRATION_LOCK = 7_357_000  # pg_advisory_xact_lock key: one node migrates at a time

_PLACEHOLDER = re.compile(r"\?")
_USER = re.compile(r"\buser\b")  # a reserved word in PostgreSQL, a column name here
_REAL = re.compile(r"\bREAL\b")  # SQLite's REAL is 8 bytes; PostgreSQL's only 4
# SQLite's INTEGER PRIMARY KEY is the 64-bit rowid; PostgreSQL's INTEGER only 32 bits.
_INTEGER_KEY = re.compile(r"\bINTEGER PRIMARY KEY\b")


def translate(sql: str) -> str:
    """SQLite's dialect as Store writes it, for PostgreSQL."""
    counter = iter(range(1, 1000))
    sql = _PLACEHOLDER.sub(lambda _: f"${next(counter)}", sql)
    sql = _INTEGER_KEY.sub("BIGINT PRIMARY KEY", sql)
    return _REAL.sub("DOUBLE PRECISION", _USER.sub('"user"', sql))


def masked(url: str) -> str:
    """The URL as it may appear in logs: without its password."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


class Result:
    """What Store reads of a sqlite3 cursor."""

    def __init__(self, rows: Sequence[Any], rowcount: int) -> None:
        self.rows = [tuple(row) for row in rows]
        self.rowcount = rowcount

    def fetchone(self) -> tuple[Any, ...] | None:
        return self.rows[0] if self.rows else None

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        return iter(self.rows)

    def close(self) -> None:
        pass


class PgConnection:
    def __init__(self, url: str) -> None:
        self.url = url
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name="pymod_push-postgresql")
        self._thread.start()
        self._conn: asyncpg.Connection = self._run(asyncpg.connect(url, timeout=TIMEOUT))
        self._transaction: Any = None
        log.info("database: PostgreSQL at %s", masked(url))

    def _run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(TIMEOUT)

    def _begin(self) -> None:
        if self._transaction is None:
            self._transaction = self._conn.transaction()
            self._run(self._transaction.start())

    def execute(self, sql: str, args: Sequence[Any] = ()) -> Result:
        self._begin()
        query, values = translate(sql), [_value(a) for a in args]
        if sql.lstrip().upper().startswith("SELECT"):
            return Result(self._run(self._conn.fetch(query, *values)), -1)
        status = self._run(self._conn.execute(query, *values))
        count = status.rsplit(" ", 1)[-1]
        return Result([], int(count) if count.isdigit() else -1)

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        if rows:
            self._begin()
            self._run(self._conn.executemany(translate(sql),
                                             [[_value(a) for a in row] for row in rows]))

    def commit(self) -> None:
        if self._transaction is not None:
            transaction, self._transaction = self._transaction, None
            self._run(transaction.commit())

    def rollback(self) -> None:
        if self._transaction is not None:
            transaction, self._transaction = self._transaction, None
            self._run(transaction.rollback())

    def close(self) -> None:
        if not self._thread.is_alive():
            return  # closed already
        self.commit()
        self._run(self._conn.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    # ------------------------------------------------------------ migrations
    def migrate(self, migrations: Sequence[str]) -> None:
        """Apply what is missing, under a lock: cluster nodes may start at once."""
        async def run() -> None:
            async with self._conn.transaction():
                await self._conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
                await self._conn.execute("CREATE TABLE IF NOT EXISTS pymod_push_schema "
                                         "(version INTEGER NOT NULL)")
                version = await self._conn.fetchval("SELECT MAX(version) FROM "
                                                    "pymod_push_schema") or 0
                for number, script in enumerate(migrations[version:], start=version + 1):
                    await self._conn.execute(translate(script))
                    await self._conn.execute("INSERT INTO pymod_push_schema VALUES ($1)",
                                             number)
        self._run(run())

    def schema_version(self) -> int:
        return int(self._run(self._conn.fetchval(
            "SELECT MAX(version) FROM pymod_push_schema")) or 0)


def _value(value: Any) -> Any:
    return int(value) if isinstance(value, bool) else value
