"""PostgreSQL for clusters (option `db_url`): the Store's own SQL, run through asyncpg.

The push service is synchronous and commits once per group of event batches (port.py), so
this adapter offers what Store uses of a sqlite3 connection (execute, executemany, commit,
rollback, close) and runs asyncpg on an event loop of its own in a background thread.

Round trips are what a shared database costs, so writes do not make any of their own: they
are kept, in order, as the open transaction's write log and go to the server at the commit
as one script (one round trip: `BEGIN; EXECUTE ...; ...; COMMIT`), each statement prepared
once per connection (`PREPARE`) and its values sent as quoted literals. A read first sends
the writes before it (it must see them), inside the transaction; a write whose row count is
asked for is sent then too. Store keeps the registrations it reads on the hot path in
memory (see Store.for_session_with_options); other nodes' changes reach it as
notifications (LISTEN/NOTIFY, channel `pymod_push`) that this connection collects.

When the database cannot be reached, calls raise store.DatabaseUnavailable at once or
within ROUND_TRIP_TIMEOUT (never the event loop stuck for long), and nothing of the open
transaction is lost: its write log is sent again, whole, on a new connection when the
database is back. A commit whose answer was lost is looked up (pymod_push_commits) rather
than applied twice.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import functools
import itertools
import json
import logging
import re
import threading
import time
import uuid
from collections.abc import Callable, Coroutine, Iterator, Sequence
from typing import Any, NamedTuple, TypeVar
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from pymod_push.core.limits import ascii_number
from pymod_push.records import DatabaseUnavailable

log = logging.getLogger("pymod_push")
T = TypeVar("T")
CONNECT_TIMEOUT = 2.0
ROUND_TRIP_TIMEOUT = 5.0  # an answer this late: the database is taken as unreachable
MIGRATION_TIMEOUT = 300.0
MIGRATION_LOCK = 7_357_000  # pg_advisory_xact_lock key: one node migrates at a time
CHANNEL = "pymod_push"  # NOTIFY payload: a user whose registrations or options changed

_PLACEHOLDER = re.compile(r"\?")
_USER = re.compile(r"\buser\b")  # a reserved word in PostgreSQL, a column name here
_REAL = re.compile(r"\bREAL\b")  # SQLite's REAL is 8 bytes; PostgreSQL's only 4
# SQLite's INTEGER PRIMARY KEY is the 64-bit rowid; PostgreSQL's INTEGER only 32 bits.
_INTEGER_KEY = re.compile(r"\bINTEGER PRIMARY KEY\b")

# What says the database is away (rather than that a statement is wrong).
_UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError, TimeoutError, asyncio.TimeoutError, concurrent.futures.TimeoutError,
    asyncpg.exceptions.ConnectionDoesNotExistError, asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,  # admin shutdown, cannot connect now
    asyncpg.exceptions.ConnectionFailureError,
    asyncpg.exceptions.InsufficientResourcesError,  # too many connections, disk full
    asyncpg.exceptions.ReadOnlySQLTransactionError)  # a standby: reconnect to the primary


def translate(sql: str) -> str:
    """SQLite's dialect as Store writes it, for PostgreSQL."""
    counter = iter(range(1, 1000))
    sql = _PLACEHOLDER.sub(lambda _: f"${next(counter)}", sql)
    sql = _INTEGER_KEY.sub("BIGINT PRIMARY KEY", sql)
    return _REAL.sub("DOUBLE PRECISION", _USER.sub('"user"', sql))


class Statement(NamedTuple):
    text: str  # PostgreSQL's dialect
    is_read: bool
    tables: frozenset[str]  # every table it names
    # Rows of a plain INSERT, or single-key DELETEs, of one table can go as one statement
    # (see _merged): the SQL before the rows' values, and how each row's values are
    # written in it (a format with {}); "" when the statement cannot be merged. The key
    # column: the INSERT's first, the DELETE's.
    merged_head: str = ""
    merged_row: str = ""
    key_column: str = ""


_TABLES = re.compile(r"\b(?:FROM|INTO|UPDATE|JOIN)\s+(\w+)", re.IGNORECASE)
_PLAIN_INSERT = re.compile(r"(INSERT INTO \w+ \((\w+)[^)]*\) VALUES )\(\$1(?:, \$\d+)*\)")
_DELETE_BY_KEY = re.compile(r"(DELETE FROM \w+ WHERE (\w+))=\$1")


@functools.lru_cache(maxsize=1024)
def statement(sql: str) -> Statement:
    """Translated once per SQL text (Store's statements are few and fixed)."""
    text = translate(sql)
    tables = frozenset(name.lower() for name in _TABLES.findall(text))
    if found := _PLAIN_INSERT.fullmatch(text):
        return Statement(text, False, tables, found.group(1), "({})", found.group(2))
    if found := _DELETE_BY_KEY.fullmatch(text):
        return Statement(text, False, tables, found.group(1) + " IN (", "{}", found.group(2))
    return Statement(text, sql.lstrip()[:6].upper() == "SELECT", tables)


def literal(value: Any) -> str:
    """A value for EXECUTE in a script: NULL or a quoted literal, which PostgreSQL reads
    with the parameter's own type (standard_conforming_strings is on: a quote is doubled,
    a backslash is just a backslash)."""
    if value is None:
        return "NULL"
    if isinstance(value, str):
        if "\x00" in value:  # would end the query text early
            raise ValueError("a NUL character cannot be stored in PostgreSQL")
        return "'" + value.replace("'", "''") + "'"
    if isinstance(value, bool):
        return "'1'" if value else "'0'"
    if isinstance(value, int | float):
        return f"'{value!r}'"
    raise TypeError(f"no PostgreSQL literal for {type(value).__name__}")


def masked(url: str) -> str:
    """The URL as it may appear in logs: without its password."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


class Result:
    """What Store reads of a sqlite3 cursor. A write's row count is only known once the
    write was sent: asking for it sends it (see PgConnection.row_count)."""

    __slots__ = ("rows", "_count", "_pending")

    def __init__(self, rows: Sequence[Any], count: int = -1,
                 pending: tuple[PgConnection, Write] | None = None) -> None:
        self.rows = [tuple(row) for row in rows]
        self._count = count
        self._pending = pending

    @property
    def rowcount(self) -> int:
        if self._pending is not None:
            connection, write = self._pending
            self._count, self._pending = connection.row_count(write), None
        return self._count

    def fetchone(self) -> tuple[Any, ...] | None:
        return self.rows[0] if self.rows else None

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        return iter(self.rows)

    def close(self) -> None:
        pass


class Write:
    """A statement of the write log, its values already rendered."""

    __slots__ = ("statement", "values", "notify", "key")

    def __init__(self, statement: Statement, values: str, notify: str | None = None,
                 key: str = "") -> None:
        self.statement = statement
        self.values = values
        self.notify = notify  # the payload, for a notification
        self.key = key  # its first value, rendered (see _merged)


_NOTIFY = statement(f"SELECT pg_notify('{CHANNEL}', ?)")


def _merged(writes: list[Write]) -> list[list[Write]]:
    """The writes in groups that each go as one statement: the rows of a plain INSERT, or
    of a DELETE by key, gathered while what comes between them cannot see or change them:
    statements on other tables, and the other of the two on the same table and key column
    for other keys (a push's outbox row is inserted while older ones are deleted). Any
    other statement goes alone, after the groups it could see. About half of what a push
    writes is such rows, and each statement costs the server far more than a row does."""
    out: list[list[Write]] = []
    gathering: dict[str, tuple[list[Write], set[str]]] = {}  # text -> rows, their keys
    for write in writes:
        query = write.statement
        for text, (rows, keys) in list(gathering.items()):
            other = rows[0].statement
            if text == query.text or not other.tables & query.tables:
                continue
            if (query.merged_head and query.key_column == other.key_column
                    and write.key not in keys):
                continue  # other rows of the same table: either order is the same
            out.append(rows)  # it could see them: they go first
            del gathering[text]
        if not query.merged_head:
            out.append([write])
            continue
        rows, keys = gathering.setdefault(query.text, ([], set()))
        rows.append(write)
        keys.add(write.key)
    out.extend(rows for rows, _ in gathering.values())
    return out


class PgConnection:
    def __init__(self, url: str) -> None:
        self.url = url
        self.round_trips = 0  # for metrics and the benchmark
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name="pymod_push-postgresql")
        self._thread.start()
        self._conn: asyncpg.Connection | None = None
        self._pid = 0
        self._prepared: dict[str, str] = {}  # statement text -> name, on this connection
        self._names = itertools.count(1)
        self._log: list[Write] = []  # the open transaction's writes, in order
        self._base = 0  # writes committed before the log's first (marks count from 0)
        self._sent = 0  # how many of them the server's open transaction holds
        self._notified: set[str] = set()
        self._process = uuid.uuid4().hex  # this process's row of pymod_push_commits
        self._commit_seq = 1
        self._in_doubt = False  # a commit was sent and its answer lost
        self._doubt_count = 0  # how many writes of the log that commit had
        # A commit under way (see start_commit): its answer to come, how many writes of
        # the log it carries, the statements it prepares.
        self._flight: tuple[concurrent.futures.Future[str], int, dict[str, str]] | None = None
        self.flight_s = 0.0  # how long the last commit start_commit sent took to answer
        self._flight_error: BaseException | None = None  # for land(), once
        # Users whose registrations or options other nodes changed (None: maybe any, after
        # a reconnection), filled by the background thread.
        self._changed: collections.deque[str | None] = collections.deque()
        self._connect_at_start()
        log.info("database: PostgreSQL at %s", masked(url))

    # ------------------------------------------------------------ connection
    def _connect_at_start(self) -> None:
        """The first connection: waited for (ejabberd holds the events meanwhile), said
        once, then once a minute."""
        began, warned = time.monotonic(), -1e9
        delay = 0.2
        while True:
            try:
                self._connect()
                break
            except DatabaseUnavailable as exc:
                if time.monotonic() - warned > 60:
                    warned = time.monotonic()
                    log.warning("database: PostgreSQL at %s is unreachable (%s); waiting "
                                "for it", masked(self.url), exc)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
        if warned > 0:
            log.warning("database: PostgreSQL reachable after %.0f s", time.monotonic() - began)

    def _connect(self) -> None:
        async def connect() -> asyncpg.Connection:
            conn = await asyncpg.connect(self.url, timeout=CONNECT_TIMEOUT)
            try:
                await conn.execute("SET standard_conforming_strings = on")  # see literal()
                await conn.add_listener(CHANNEL, self._on_notification)
            except BaseException:
                conn.terminate()
                raise
            return conn
        try:
            conn = self._wait(connect(), CONNECT_TIMEOUT * 2)
        except _UNAVAILABLE as exc:
            raise DatabaseUnavailable(_why(exc)) from exc
        self._conn, self._pid = conn, conn.get_server_pid()
        self._prepared.clear()
        self._changed.append(None)  # notifications may have been missed meanwhile

    def _on_notification(self, _conn: Any, pid: int, _channel: str, payload: str) -> None:
        if pid != self._pid:  # this process's own changes are known here already
            self._changed.append(payload)

    def changed_users(self) -> Iterator[tuple[str, str] | None]:
        """Users other nodes changed since the last call (None: any user may have)."""
        while self._changed:
            payload = self._changed.popleft()
            if payload is None:
                yield None
            else:
                user, server = json.loads(payload)
                yield (user, server)

    def _wait(self, coroutine: Coroutine[Any, Any, T], timeout: float) -> T:
        future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise

    def _call(self, make: Callable[[asyncpg.Connection], Coroutine[Any, Any, T]],
              timeout: float = ROUND_TRIP_TIMEOUT) -> T:
        """One round trip; a lost connection makes the transaction start again (whole,
        from the write log) on a new one."""
        self._finish_flight()
        if self._conn is None or self._conn.is_closed():
            self._lost()
            self._connect()
            assert self._conn is not None
        self.round_trips += 1
        try:
            return self._wait(make(self._conn), timeout)
        except _UNAVAILABLE as exc:
            self._lost()
            raise DatabaseUnavailable(_why(exc)) from exc
        except asyncpg.InternalClientError as exc:
            # The server's goodbye (an error, then the connection closed) is still being
            # read: asyncpg refuses the query before it knows the connection is gone.
            self._lost()
            raise DatabaseUnavailable(_why(exc)) from exc
        except asyncpg.InterfaceError as exc:
            if not self._conn.is_closed():
                raise
            self._lost()  # closed by the server meanwhile
            raise DatabaseUnavailable(_why(exc)) from exc

    def _lost(self) -> None:
        conn, self._conn = self._conn, None
        self._sent = 0  # the server rolled back what it had of the transaction
        if conn is not None:
            self._loop.call_soon_threadsafe(conn.terminate)

    # ------------------------------------------------------------ statements
    def execute(self, sql: str, args: Sequence[Any] = ()) -> Result:
        query = statement(sql)
        if query.is_read:
            self._send()  # the read sees this transaction's writes
            values = [int(a) if isinstance(a, bool) else a for a in args]
            return Result(self._call(lambda c: c.fetch(query.text, *values)))
        rendered = [literal(a) for a in args]
        write = Write(query, ", ".join(rendered), None, rendered[0] if rendered else "")
        self._log.append(write)
        return Result((), -1, (self, write))

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        for row in rows:
            self.execute(sql, row)

    def notify(self, user: tuple[str, str]) -> None:
        """Tell the other nodes, with this transaction, that the user's registrations or
        options changed (once per user and transaction)."""
        payload = json.dumps(user)
        if payload not in self._notified:
            self._notified.add(payload)
            self._log.append(Write(_NOTIFY, literal(payload), payload))

    def row_count(self, write: Write) -> int:
        """Send the writes up to this one, it last: its status has the count."""
        self._finish_flight()
        self._settle()
        if write not in self._log[self._sent:]:
            return -1  # sent already (asked late): unknown
        index = self._log.index(write, self._sent)
        self._send(index)
        status = self._run_script(self._log[index:index + 1])
        self._sent = index + 1
        count = ascii_number(status.rsplit(" ", 1)[-1])
        return -1 if count is None else count

    def _send(self, end: int | None = None) -> None:
        self._finish_flight()
        if end is None:
            self._settle()
            end = len(self._log)
        if self._sent < end:
            self._run_script(self._log[self._sent:end])
            self._sent = end

    def _run_script(self, writes: list[Write], commit: bool = False) -> str:
        """The writes as one simple-protocol query (one round trip); its last status."""
        self._finish_flight()
        if self._conn is None or self._conn.is_closed():  # the script depends on it
            self._lost()
            self._connect()
        new: dict[str, str] = {}
        script = self._script(writes, commit, new)
        status: str = self._call(lambda c: c.execute(script))
        self._prepared.update(new)  # only once they exist
        return status

    def _script(self, writes: list[Write], commit: bool, new: dict[str, str]) -> str:
        """BEGIN first if the server has no transaction open; statements new to the
        connection are prepared on the way (their names added to new)."""
        parts = [] if self._sent else ["BEGIN"]
        prepared = self._prepared
        for group in _merged(writes):
            if len(group) > 1:  # one statement for all their rows
                query = group[0].statement
                parts.append(query.merged_head + ", ".join(
                    query.merged_row.format(w.values) for w in group)
                    + (")" if query.merged_row == "{}" else ""))
                continue
            (write,) = group
            text = write.statement.text
            name = prepared.get(text) or new.get(text)
            if name is None:
                name = new[text] = f"pymod_push_{next(self._names)}"
                parts.append(f"PREPARE {name} AS {text}")
            parts.append(f"EXECUTE {name}({write.values})" if write.values else
                         f"EXECUTE {name}")
        if commit:
            parts.append("INSERT INTO pymod_push_commits (process, seq) VALUES "
                         f"('{self._process}', {self._commit_seq}) ON CONFLICT (process) "
                         "DO UPDATE SET seq=excluded.seq")
            parts.append("COMMIT")
        return ";\n".join(parts)

    # ----------------------------------------------------------- transactions
    def commit(self) -> None:
        self._finish_flight()
        if not self._log:
            if self._sent:  # cannot be: a write was sent, so it is in the log
                self._sent = 0
            return
        self._settle()
        if not self._log:
            return
        try:
            self._run_script(self._log[self._sent:], commit=True)
        except DatabaseUnavailable:
            # The COMMIT may have been applied: looked up before anything else is sent.
            self._in_doubt, self._doubt_count = True, len(self._log)
            raise
        except BaseException:
            self._lost()  # a statement failed: the transaction is aborted, start clean
            raise
        self._done()

    # The port commits without waiting: the events that come meanwhile are handled (their
    # writes join the log after the commit's) while the database works, which is most of
    # what a commit costs here. One commit at a time; anything else that needs the
    # connection waits for it first.
    def start_commit(self, when_done: Callable[[], None]) -> bool:
        """Send the open transaction's COMMIT and return at once: when_done is called (in
        another thread) once the answer is there, then land() says how it went. False if
        there was nothing to commit (when_done is not called)."""
        self._finish_flight()
        self._settle()
        if not self._log:
            return False
        if self._conn is None or self._conn.is_closed():
            self._lost()
            self._connect()
        assert self._conn is not None
        new: dict[str, str] = {}
        script = self._script(self._log[self._sent:], True, new)
        self.round_trips += 1
        started = time.perf_counter()
        future = asyncio.run_coroutine_threadsafe(self._conn.execute(script), self._loop)
        self._flight = (future, len(self._log), new)

        def answered(_: object) -> None:  # in asyncpg's thread, as soon as the answer is in
            self.flight_s = time.perf_counter() - started
            when_done()

        future.add_done_callback(answered)
        return True

    def land(self) -> None:
        """How the commit started last went: DatabaseUnavailable if its answer did not
        come (its writes stay in the log, in doubt, for the next commit)."""
        self._finish_flight()
        error, self._flight_error = self._flight_error, None
        if error is not None:
            raise error

    def _finish_flight(self) -> None:
        """Wait for the commit under way, if any; what went wrong is kept for land()
        (and raised here too when it means the connection is gone)."""
        if self._flight is None:
            return
        future, count, new = self._flight
        self._flight = None
        try:
            future.result(ROUND_TRIP_TIMEOUT)
        except (*_UNAVAILABLE, asyncpg.InternalClientError, asyncpg.InterfaceError) as exc:
            future.cancel()
            self._lost()
            self._in_doubt, self._doubt_count = True, count  # looked up before anything
            self._flight_error = DatabaseUnavailable(_why(exc))
            raise self._flight_error from exc
        except BaseException as exc:
            self._lost()  # a statement failed: the transaction is aborted
            self._flight_error = exc
            raise
        self._prepared.update(new)
        self._done(count)

    def _settle(self) -> None:
        """After a commit whose answer was lost: was it applied? (Its writes must then
        not be sent again; those written since are kept.)"""
        if not self._in_doubt:
            return
        seq = self._call(lambda c: c.fetchval(
            "SELECT seq FROM pymod_push_commits WHERE process=$1", self._process))
        self._in_doubt = False
        if seq == self._commit_seq:
            log.info("database: the commit whose answer was lost had been applied")
            self._done(self._doubt_count)

    def _done(self, count: int | None = None) -> None:
        """The first count writes (all by default) are committed."""
        count = len(self._log) if count is None else count
        del self._log[:count]
        self._base += count
        self._notified = {w.notify for w in self._log if w.notify is not None}
        self._sent = 0
        self._commit_seq += 1

    def mark(self) -> int:
        """Where the write log stands (see rollback_to)."""
        return self._base + len(self._log)

    def rollback_to(self, mark: int) -> None:
        """Forget the writes after mark (an event that could not be handled, to be handled
        again); the server's transaction, if it has any of them, is dropped as well."""
        try:
            self._finish_flight()
        except Exception:  # noqa: BLE001 - kept for land(); the writes after mark go anyway
            pass
        keep = max(mark - self._base, 0)  # those committed meanwhile stay committed
        if keep >= len(self._log):
            return
        if self._sent > keep:
            self._lost()
        del self._log[keep:]
        self._notified = {w.notify for w in self._log if w.notify is not None}

    def rollback(self) -> None:
        try:
            self._finish_flight()
        except Exception:  # noqa: BLE001 - whatever it was, it is rolled back now
            pass
        self._flight_error = None
        self._log.clear()
        self._notified.clear()
        if self._sent:
            self._lost()

    def close(self) -> None:
        if not self._thread.is_alive():
            return  # closed already
        try:
            self.land()
            self.commit()
            if self._conn is not None:
                self._call(lambda c: c.execute("DELETE FROM pymod_push_commits WHERE "
                                               "process=$1", self._process))
                self._wait(self._conn.close(), CONNECT_TIMEOUT)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)

    # ------------------------------------------------------------ migrations
    def migrate(self, migrations: Sequence[str]) -> None:
        """Apply what is missing, under a lock: cluster nodes may start at once."""
        async def run(conn: asyncpg.Connection) -> None:
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
                await conn.execute("CREATE TABLE IF NOT EXISTS pymod_push_schema "
                                   "(version INTEGER NOT NULL)")
                # The last commit of each process (see commit): not part of Store's schema.
                await conn.execute("CREATE TABLE IF NOT EXISTS pymod_push_commits "
                                   "(process TEXT PRIMARY KEY, seq BIGINT NOT NULL)")
                version = await conn.fetchval("SELECT MAX(version) FROM "
                                              "pymod_push_schema") or 0
                for number, script in enumerate(migrations[version:], start=version + 1):
                    await conn.execute(translate(script))
                    await conn.execute("INSERT INTO pymod_push_schema VALUES ($1)", number)
        self._call(run, MIGRATION_TIMEOUT)

    def schema_version(self) -> int:
        return int(self._call(lambda c: c.fetchval(
            "SELECT MAX(version) FROM pymod_push_schema")) or 0)


def _why(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__
