"""Persistent push state in SQLite (WAL, versioned schema).

The service changes state through these methods and the port loop commits once
per batch of events, before any action of that batch reaches ejabberd: what a
client was told (an enable's result) is on disk first.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass, field
from typing import Any, TypeVar

from .checkpoints import Checkpointer
from .core import compact_json
from .core.ios_extensions import Extensions
from .core.options import PushOptions
from .core.xep0357 import FormFields
from .metrics import COMMIT_BUCKETS, Histogram
from .protocol import SessionKey, UserKey

K = TypeVar("K")
V = TypeVar("V")


def _rebuilt(table: str, columns: str) -> str:
    """A migration's statements giving table, rows kept, an INTEGER PRIMARY KEY id."""
    names = ", ".join(["id", *(c.split()[0] for c in columns.split(", "))])
    return (f"CREATE TABLE {table}_new (id INTEGER PRIMARY KEY, {columns}); "
            f"INSERT INTO {table}_new ({names}) SELECT {names} FROM {table}; "
            f"DROP TABLE {table}; ALTER TABLE {table}_new RENAME TO {table};")


MIGRATIONS: tuple[str, ...] = (
    # version 1
    """
    CREATE TABLE registrations (
        user TEXT NOT NULL,
        server TEXT NOT NULL,
        resource TEXT NOT NULL,
        push_jid TEXT NOT NULL,
        node TEXT NOT NULL,
        publish_options TEXT,
        enabled_at REAL NOT NULL,
        errors INTEGER NOT NULL DEFAULT 0,
        message_count INTEGER NOT NULL DEFAULT 0,
        subscription_count INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (user, server, push_jid, node)
    );
    CREATE INDEX registrations_by_session ON registrations (user, server, resource);
    """,
    # version 2: the built-in app server's device registrations
    """
    CREATE TABLE devices (
        node TEXT PRIMARY KEY,
        secret TEXT NOT NULL,
        user TEXT NOT NULL,
        device_id TEXT NOT NULL,
        device_name TEXT NOT NULL DEFAULT '',
        provider TEXT NOT NULL,
        app_name TEXT NOT NULL,
        pubsub_host TEXT NOT NULL,
        token TEXT NOT NULL,
        application_id TEXT NOT NULL DEFAULT '',
        p256dh TEXT NOT NULL DEFAULT '',
        auth TEXT NOT NULL DEFAULT '',
        created_at REAL NOT NULL
    );
    CREATE INDEX devices_by_user ON devices (user, device_id);
    """,
    # version 3: per-user push options (urn:xmpp:push:options)
    """
    CREATE TABLE user_options (
        user TEXT NOT NULL,
        server TEXT NOT NULL,
        senders INTEGER NOT NULL,
        message_count INTEGER NOT NULL,
        subscription_count INTEGER NOT NULL,
        message_bodies INTEGER NOT NULL,
        PRIMARY KEY (user, server)
    );
    """,
    # version 4: APNs VoIP (PushKit) tokens, for urgent pushes such as incoming calls
    """
    ALTER TABLE devices ADD COLUMN voip_token TEXT NOT NULL DEFAULT '';
    """,
    # version 5: restart recovery. Which ejabberd node a registration's session lives on
    # (in a cluster each node wakes its own users), when a pending session is to be woken
    # before its resume timeout runs out, notifications not yet answered by their app
    # server (they survive a crash of this process), and the last event batch handled.
    """
    ALTER TABLE registrations ADD COLUMN ejabberd_node TEXT NOT NULL DEFAULT '';
    ALTER TABLE registrations ADD COLUMN wake_due DOUBLE PRECISION;
    CREATE TABLE outbox (
        id BIGINT PRIMARY KEY,
        user TEXT NOT NULL,
        server TEXT NOT NULL,
        push_jid TEXT NOT NULL,
        node TEXT NOT NULL,
        summary TEXT NOT NULL,
        attempt INTEGER NOT NULL DEFAULT 0,
        due DOUBLE PRECISION NOT NULL,
        ejabberd_node TEXT NOT NULL DEFAULT ''
    );
    CREATE TABLE port_state (
        ejabberd_node TEXT NOT NULL,
        host TEXT NOT NULL,
        epoch BIGINT NOT NULL,
        seq BIGINT NOT NULL,
        PRIMARY KEY (ejabberd_node, host)
    );
    """,
    # version 6: the built-in app server's pushes that a provider deferred (busy, down):
    # retried until delivered or too old, also by the next process after a crash
    """
    CREATE TABLE provider_queue (
        id BIGINT PRIMARY KEY,
        device_node TEXT NOT NULL,
        summary TEXT NOT NULL,
        attempt INTEGER NOT NULL,
        due DOUBLE PRECISION NOT NULL,
        created DOUBLE PRECISION NOT NULL,
        ejabberd_node TEXT NOT NULL DEFAULT ''
    );
    """,
    # version 7: whether a registration's session is pending (ejabberdctl push_wake_all)
    """
    ALTER TABLE registrations ADD COLUMN pending INTEGER NOT NULL DEFAULT 0;
    """,
    # version 8: exactly one push per message per registration, durably. A message pushed
    # to a pending session comes back when the session ends (offline storage, the archive),
    # also after a crash or a restart: what was pushed to each pending session since it
    # went pending (pending_since) is an append-only log, ids in time order (cheap to write
    # and to purge), read back by the next process. Errors of a registration are counted at
    # most once per window (last_error_at): a burst counts once.
    """
    CREATE TABLE pushed (
        id INTEGER PRIMARY KEY,
        user TEXT NOT NULL,
        server TEXT NOT NULL,
        resource TEXT NOT NULL,
        mark BIGINT NOT NULL
    );
    ALTER TABLE registrations ADD COLUMN pending_since BIGINT NOT NULL DEFAULT 0;
    ALTER TABLE registrations ADD COLUMN last_error_at DOUBLE PRECISION;
    """,
    # version 9: notifications waiting for the admin's async push logic (option logic):
    # the event is acknowledged with its row, and the next process finishes it.
    """
    CREATE TABLE hook_queue (
        id INTEGER PRIMARY KEY,
        user TEXT NOT NULL,
        server TEXT NOT NULL,
        resource TEXT NOT NULL,
        stanza TEXT NOT NULL,
        ejabberd_node TEXT NOT NULL
    );
    """,
    # version 10: what a device registered at a provider written in Python (its declared
    # fields, JSON), see python_provider.py
    """
    ALTER TABLE devices ADD COLUMN extra TEXT NOT NULL DEFAULT '';
    """,
    # version 11: the Tigase push extensions a client sent with its enable (encryption key,
    # priority, filters: core/ios_extensions.to_json), "" for none
    """
    ALTER TABLE registrations ADD COLUMN extensions TEXT NOT NULL DEFAULT '';
    """,
    # version 12: a notification's id is its row's id. In SQLite only INTEGER PRIMARY KEY
    # is (BIGINT PRIMARY KEY made a second index, written with every notification and its
    # answer: a quarter of what those cost); PostgreSQL gets BIGINT PRIMARY KEY as before.
    f"""
    {_rebuilt("outbox", "user TEXT NOT NULL, server TEXT NOT NULL, push_jid TEXT NOT NULL, "
              "node TEXT NOT NULL, summary TEXT NOT NULL, attempt INTEGER NOT NULL DEFAULT 0, "
              "due DOUBLE PRECISION NOT NULL, ejabberd_node TEXT NOT NULL DEFAULT ''")}
    {_rebuilt("provider_queue", "device_node TEXT NOT NULL, summary TEXT NOT NULL, "
              "attempt INTEGER NOT NULL, due DOUBLE PRECISION NOT NULL, "
              "created DOUBLE PRECISION NOT NULL, ejabberd_node TEXT NOT NULL DEFAULT ''")}
    """,
    # version 13: a device's pushes waiting at its provider are bounded (the newest kept,
    # see keep_newest_queued: found by device), and a device that only ever fails is given
    # up (failing_since: when its pushes began to fail, the same for all of them; NULL in
    # rows of before: created stands for it)
    """
    ALTER TABLE provider_queue ADD COLUMN failing_since DOUBLE PRECISION;
    CREATE INDEX provider_queue_by_device ON provider_queue (device_node, ejabberd_node, id);
    """,
)


@dataclass(slots=True)
class Registration:
    user: str
    server: str
    resource: str
    push_jid: str
    node: str
    publish_options: str | None
    errors: int = 0
    message_count: int = 0
    subscription_count: int = 0
    last_error_at: float | None = None  # when an error was last counted (see count_error)
    # Tigase's push extensions (ios_extensions.to_json; holds the client's key: no repr)
    extensions: str = field(default="", repr=False)
    # Derived, kept with the registration by the service so that each is parsed once, not
    # per push (a count-bounded cache thrashes with many users): publish_options parsed
    # (xep0357.publish_options_form) and extensions parsed. Not stored, not compared, no
    # repr (the secret, the key).
    publish_form: FormFields | None = field(default=None, repr=False, compare=False)
    parsed_extensions: Extensions | None = field(default=None, repr=False, compare=False)

    @property
    def key(self) -> tuple[str, str, str, str]:
        return (self.user, self.server, self.push_jid, self.node)

    @property
    def session(self) -> SessionKey:
        return (self.user, self.server, self.resource)

    @property
    def user_key(self) -> UserKey:
        return (self.user, self.server)


@dataclass(slots=True)
class OutboxEntry:
    """A notification sent to an app server and not yet answered for good."""

    id: int
    registration: tuple[str, str, str, str]
    summary: list[tuple[str, str]]
    attempt: int
    due: float


@dataclass(slots=True)
class QueuedPush:
    """A push for a device of the built-in app server, deferred by its provider."""

    id: int
    device_node: str
    summary: dict[str, str]
    attempt: int
    due: float
    created: float
    # Since when its device's pushes fail, without a delivery (the device is given up after
    # a while: see providers/dispatch.py); the same for all of a device's queued pushes.
    failing_since: float


@dataclass(slots=True, frozen=True)  # frozen: the store keeps and shares them
class Device:
    """A device registered at the built-in app server."""

    node: str
    secret: str
    user: str  # bare JID
    device_id: str
    device_name: str
    provider: str  # apns | fcm | webpush | ubuntu | wns
    app_name: str
    pubsub_host: str
    token: str
    application_id: str = ""
    p256dh: str = ""
    auth: str = ""
    voip_token: str = ""  # APNs PushKit token, used for urgent pushes where configured
    extra: str = ""  # a Python provider's registration fields, JSON (python_provider.py)


_DEVICE_COLUMNS = ("node, secret, user, device_id, device_name, provider, app_name, "
                   "pubsub_host, token, application_id, p256dh, auth, voip_token, extra")
_COLUMNS = ("user, server, resource, push_jid, node, publish_options, errors, "
            "message_count, subscription_count, last_error_at, extensions")
_COLUMN_COUNT = _COLUMNS.count(",") + 1
_JOINED_COLUMNS = ", ".join(f"r.{column.strip()}" for column in _COLUMNS.split(","))


class DatabaseUnavailable(Exception):
    """PostgreSQL cannot be reached (store_pg): nothing of the open transaction is lost, it
    is sent again when the database is back; the port holds events meanwhile."""


UserEntry = tuple[list["Registration"], PushOptions | None]  # all of a user's, and options
DEVICE_MEMORY = 50_000  # app server devices kept in memory (SQLite), at most: ~26 MB
USER_MEMORY = 50_000  # users whose registrations are kept in memory, at most: ~28 MB


class Store:
    """The SQL here runs on SQLite and, through store_pg.PgConnection (which turns `?` into
    `$n` and quotes the column `user`), on PostgreSQL.

    What every stanza to a pending user reads, the user's registrations and options, is
    kept in memory per user once read: a method that changes them calls _changed, which
    drops the user's entry (and, with PostgreSQL, tells the other nodes: NOTIFY). The
    service updates the counts of the very objects kept (then save_counts). With SQLite
    this process is the database's only writer, so for_user, user_options and the app
    server's devices come from memory too; with PostgreSQL, only for_session_with_options
    does, as other nodes write the counts and devices."""

    def __init__(self, path: str, connection: Any = None, *,
                 background_checkpoints: bool = False) -> None:
        """background_checkpoints: SQLite's WAL checkpoints run in a thread of their own
        (checkpoints.py) rather than in the commits; for the process that serves."""
        self._pg = connection
        self._checkpoints: Checkpointer | None = None
        self.commits = Histogram(COMMIT_BUCKETS)  # start to answer (metrics)
        self._users: dict[UserKey, UserEntry] = {}
        self._devices: dict[str, Device | None] = {}  # SQLite: node -> device (None: none)
        if connection is not None:  # PostgreSQL (see open_store)
            self.db = connection
            self.db.migrate(MIGRATIONS)
            return
        if path not in ("", ":memory:"):
            _make_private(path)
        self.db = sqlite3.connect(path, isolation_level="DEFERRED", check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("PRAGMA busy_timeout=5000")
        (version,) = self.db.execute("PRAGMA user_version").fetchone()
        for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
            with self.db:
                self.db.executescript(f"BEGIN; {script}; PRAGMA user_version={number}; COMMIT;")
        if background_checkpoints and path not in ("", ":memory:"):
            self.db.execute("PRAGMA wal_autocheckpoint=0")
            self._checkpoints = Checkpointer(path)

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

    def _user_entry(self, user: UserKey) -> UserEntry:
        """The user's registrations (ordered as _select orders them) and options, from
        memory once read."""
        if self._pg is not None:
            for changed in self._pg.changed_users():  # by other nodes
                if changed is None:
                    self._users.clear()
                else:
                    self._users.pop(changed, None)
        entry = self._users.get(user)
        return entry if entry is not None else \
            _kept(self._users, user, self._read_user(user), USER_MEMORY)

    def _read_user(self, user: UserKey) -> UserEntry:
        """The user's registrations and options in one query (one round trip with
        PostgreSQL), options alone for a user without registrations."""
        rows = list(self.db.execute(
            f"SELECT {_JOINED_COLUMNS}, o.senders, o.message_count, o.subscription_count, "
            "o.message_bodies, r.enabled_at FROM registrations r LEFT JOIN user_options o "
            "ON o.user=r.user AND o.server=r.server WHERE r.user=? AND r.server=?", user))
        if not rows:
            return [], self._user_options(user)
        # As _select orders them (enabled_at, node), sorted here: ORDER BY would cost a
        # temporary b-tree every time.
        rows.sort(key=lambda row: (row[-1], row[4]))
        stored = rows[0][_COLUMN_COUNT:-1]
        options = None if stored[0] is None else PushOptions(*(bool(v) for v in stored))
        return [Registration(*row[:_COLUMN_COUNT]) for row in rows], options

    def rollback(self) -> None:
        self.db.rollback()
        self._users.clear()  # what the undone writes changed is read again
        self._devices.clear()

    def close(self) -> None:
        if self._checkpoints is not None:
            self._checkpoints.close()  # first: closing the last connection checkpoints
        self.db.commit()
        self.db.close()

    def _select(self, where: str, args: tuple[str | float, ...],
                limit: int | None = None) -> Iterator[Registration]:
        query = f"SELECT {_COLUMNS} FROM registrations WHERE {where} ORDER BY enabled_at, node"
        if limit is not None:
            query += f" LIMIT {int(limit)}"
        with closing(self.db.execute(query, args)) as cursor:
            for row in cursor:
                yield Registration(*row)

    def for_session(self, session: SessionKey) -> list[Registration]:
        return list(self._select("user=? AND server=? AND resource=?", session))

    def for_session_with_options(self, session: SessionKey
                                 ) -> tuple[list[Registration], PushOptions | None]:
        """A session's registrations and its user's own push options (None: never set):
        this runs for every stanza to a pending session."""
        registrations, options = self._user_entry(session[:2])
        return [r for r in registrations if r.resource == session[2]], options

    def for_user(self, user: UserKey) -> list[Registration]:
        if self._pg is None:
            return list(self._user_entry(user)[0])
        return list(self._select("user=? AND server=?", user))

    def get(self, key: tuple[str, str, str, str]) -> Registration | None:
        found = list(self._select("user=? AND server=? AND push_jid=? AND node=?", key))
        return found[0] if found else None

    def enable(self, registration: Registration, ejabberd_node: str = "") -> None:
        """Add or replace (same user, app server and node) with fresh counters, for a
        session live on ejabberd_node (not pending, no wake due)."""
        self.db.execute(
            "INSERT INTO registrations (user, server, resource, push_jid, node, "
            "publish_options, enabled_at, ejabberd_node, extensions) VALUES "
            "(?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (user, server, push_jid, node) DO UPDATE SET "
            "resource=excluded.resource, publish_options=excluded.publish_options, "
            "extensions=excluded.extensions, "
            "enabled_at=excluded.enabled_at, errors=0, last_error_at=NULL, message_count=0, "
            "subscription_count=0, ejabberd_node=excluded.ejabberd_node, wake_due=NULL, "
            "pending=0",
            (registration.user, registration.server, registration.resource,
             registration.push_jid, registration.node, registration.publish_options,
             time.time(), ejabberd_node, registration.extensions))
        self._changed(registration.user_key)

    def registration_count(self, user: UserKey) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM registrations WHERE user=? AND "
                                   "server=?", user).fetchone()[0])

    def accounts_near(self, registrations: int, devices: int,
                      limit: int = 20) -> list[tuple[str, int, int]]:
        """Accounts holding at least that many registrations or devices, most first:
        (bare JID, registrations, devices)."""
        found: dict[str, list[int]] = {}
        for user, server, count in self.db.execute(
                "SELECT user, server, COUNT(*) FROM registrations GROUP BY user, server "
                "HAVING COUNT(*) >= ? ORDER BY COUNT(*) DESC LIMIT ?", (registrations, limit)):
            found.setdefault(f"{user}@{server}", [0, 0])[0] = int(count)
        for user, count in self.db.execute(
                "SELECT user, COUNT(*) FROM devices GROUP BY user HAVING COUNT(*) >= ? "
                "ORDER BY COUNT(*) DESC LIMIT ?", (devices, limit)):
            found.setdefault(str(user), [0, 0])[1] = int(count)
        for account, counts in found.items():  # the other count, for those found by one
            if counts[0] == 0 and "@" in account:
                name, server = account.split("@", 1)
                counts[0] = self.registration_count((name, server))
            if counts[1] == 0:
                counts[1] = self.device_count(account)
        return sorted(((a, r, d) for a, (r, d) in found.items()),
                      key=lambda row: (-max(row[1], row[2]), row[0]))[:limit]

    def device_count(self, user: str) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM devices WHERE user=?",
                                   (user,)).fetchone()[0])

    def disable(self, user: UserKey, push_jid: str, node: str | None) -> list[Registration]:
        """Remove the user's registrations at that app server (one node or all)."""
        if node is None:
            removed = list(self._select("user=? AND server=? AND push_jid=?", (*user, push_jid)))
        else:
            removed = list(self._select("user=? AND server=? AND push_jid=? AND node=?",
                                        (*user, push_jid, node)))
        for registration in removed:
            self.delete(registration.key)
        return removed

    def delete(self, key: tuple[str, str, str, str]) -> None:
        self.db.execute("DELETE FROM registrations WHERE user=? AND server=? AND push_jid=? "
                        "AND node=?", key)
        self._changed(key[:2])

    def delete_user(self, user: UserKey) -> int:
        self._changed(user)
        return int(self.db.execute("DELETE FROM registrations WHERE user=? AND server=?",
                                   user).rowcount)

    def add_pushed(self, entry_id: int, session: SessionKey, mark: int) -> None:
        """Log that a message (mark: see pushed_mark) was pushed to the pending session."""
        self.db.execute("INSERT INTO pushed (id, user, server, resource, mark) VALUES "
                        "(?, ?, ?, ?, ?)", (entry_id, *session, mark))

    def pushed_to_pending(self, ejabberd_node: str) -> Iterator[tuple[SessionKey, int]]:
        """What was pushed to each session of that node since it went pending, if it has
        not come back since (for the next process), oldest first."""
        with closing(self.db.execute(
                "SELECT p.user, p.server, p.resource, p.mark FROM pushed p WHERE EXISTS "
                "(SELECT 1 FROM registrations r WHERE r.user=p.user AND r.server=p.server "
                "AND r.resource=p.resource AND r.pending=1 AND r.ejabberd_node=? "
                "AND p.id>=r.pending_since) ORDER BY p.id", (ejabberd_node,))) as cursor:
            for user, server, resource, mark in cursor:
                yield (user, server, resource), int(mark)

    def last_pushed_id(self) -> int:
        row = self.db.execute("SELECT MAX(id) FROM pushed").fetchone()
        return int(row[0]) if row and row[0] is not None else 0

    def purge_pushed(self, before_id: int) -> int:
        return int(self.db.execute("DELETE FROM pushed WHERE id<?", (before_id,)).rowcount)

    def save_counts(self, registration: Registration) -> None:
        self.db.execute(
            "UPDATE registrations SET message_count=?, subscription_count=? WHERE user=? "
            "AND server=? AND push_jid=? AND node=?",
            (registration.message_count, registration.subscription_count, *registration.key))
        entry = self._users.get(registration.user_key)
        for kept in entry[0] if entry is not None else ():
            if kept is registration:
                return  # the very object kept: what is kept is what was written
        self._changed(registration.user_key)

    def reset_counts(self, session: SessionKey) -> None:
        self.db.execute(
            "UPDATE registrations SET message_count=0, subscription_count=0 WHERE user=? "
            "AND server=? AND resource=? AND (message_count>0 OR subscription_count>0)", session)
        self._changed(session[:2])

    # ------------------------------------------------------------- devices
    def add_device(self, device: Device) -> list[str]:
        """Store a device; an earlier registration of the same device and provider is
        replaced. Returns the nodes it replaced."""
        replaced = [row[0] for row in self.db.execute(
            "SELECT node FROM devices WHERE user=? AND device_id=? AND provider=? AND app_name=?",
            (device.user, device.device_id, device.provider, device.app_name))]
        self.db.executemany("DELETE FROM devices WHERE node=?", [(n,) for n in replaced])
        self._devices_changed([*replaced, device.node])
        self.db.execute(f"INSERT INTO devices ({_DEVICE_COLUMNS}, created_at) VALUES "
                        "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (device.node, device.secret, device.user, device.device_id,
                         device.device_name, device.provider, device.app_name,
                         device.pubsub_host, device.token, device.application_id,
                         device.p256dh, device.auth, device.voip_token, device.extra,
                         time.time()))
        return replaced

    def device(self, node: str) -> Device | None:
        """The device with that node; with SQLite from memory once read."""
        if self._pg is None and node in self._devices:
            return self._devices[node]
        row = self.db.execute(f"SELECT {_DEVICE_COLUMNS} FROM devices WHERE node=?",
                              (node,)).fetchone()
        device = Device(*row) if row else None
        return _kept(self._devices, node, device, DEVICE_MEMORY) if self._pg is None else device

    def _devices_changed(self, nodes: list[str]) -> None:
        for node in nodes:
            self._devices.pop(node, None)

    def devices_of(self, user: str) -> list[Device]:
        return [Device(*row) for row in self.db.execute(
            f"SELECT {_DEVICE_COLUMNS} FROM devices WHERE user=? ORDER BY created_at, node",
            (user,))]

    def remove_devices(self, user: str, nodes: list[str] | None = None,
                       device_id: str | None = None) -> list[str]:
        """Remove a user's devices by node list, else by device id; the removed nodes."""
        removed = [d.node for d in self.devices_of(user)
                   if (d.node in nodes if nodes is not None else d.device_id == device_id)]
        self.db.executemany("DELETE FROM devices WHERE node=?", [(n,) for n in removed])
        self._devices_changed(removed)
        return removed

    def remove_device(self, node: str) -> None:
        self.db.execute("DELETE FROM devices WHERE node=?", (node,))
        self._devices_changed([node])

    # -------------------------------------------------------- user options
    def user_options(self, user: UserKey) -> PushOptions | None:
        return self._user_entry(user)[1] if self._pg is None else self._user_options(user)

    def _user_options(self, user: UserKey) -> PushOptions | None:
        row = self.db.execute("SELECT senders, message_count, subscription_count, "
                              "message_bodies FROM user_options WHERE user=? AND server=?",
                              user).fetchone()
        return PushOptions(*(bool(v) for v in row)) if row else None

    def all_user_options(self) -> list[tuple[UserKey, PushOptions]]:
        rows = self.db.execute("SELECT user, server, senders, message_count, "
                               "subscription_count, message_bodies FROM user_options")
        return [((u, s), PushOptions(*(bool(v) for v in rest))) for u, s, *rest in rows]

    def set_user_options(self, user: UserKey, options: PushOptions | None) -> None:
        self._changed(user)
        if options is None:
            self.db.execute("DELETE FROM user_options WHERE user=? AND server=?", user)
            return
        self.db.execute("INSERT INTO user_options (user, server, senders, message_count, "
                        "subscription_count, message_bodies) VALUES (?, ?, ?, ?, ?, ?) "
                        "ON CONFLICT (user, server) DO UPDATE SET senders=excluded.senders, "
                        "message_count=excluded.message_count, "
                        "subscription_count=excluded.subscription_count, "
                        "message_bodies=excluded.message_bodies",
                        (*user, int(options.senders), int(options.message_count),
                         int(options.subscription_count), int(options.message_bodies)))

    def set_errors(self, key: tuple[str, str, str, str], errors: int,
                   counted_at: float | None) -> None:
        self.db.execute("UPDATE registrations SET errors=?, last_error_at=? WHERE user=? AND "
                        "server=? AND push_jid=? AND node=?", (errors, counted_at, *key))
        self._changed(key[:2])

    # ------------------------------------------------------- restart recovery
    def bind_node(self, session: SessionKey, ejabberd_node: str, wake_due: float | None,
                  pending_since: int | None = None) -> None:
        """The session lives on that ejabberd node, pending since that id (see add_pushed)
        or not pending (None); wake it at wake_due (None: never)."""
        self.db.execute("UPDATE registrations SET ejabberd_node=?, wake_due=?, pending=?, "
                        "pending_since=? WHERE user=? AND server=? AND resource=?",
                        (ejabberd_node, wake_due, int(pending_since is not None),
                         pending_since or 0, *session))

    def sessions_gone(self, ejabberd_node: str, wake_at: float | None) -> int:
        """That node restarted: none of its sessions is pending any more; all are to be
        woken at wake_at (None: not at all). How many registrations that concerns."""
        return int(self.db.execute("UPDATE registrations SET pending=0, wake_due=? WHERE "
                                   "ejabberd_node IN (?, '')", (wake_at, ejabberd_node)).rowcount)

    def pending_on(self, ejabberd_node: str) -> list[Registration]:
        return list(self._select("ejabberd_node=? AND pending=1", (ejabberd_node,)))

    def delete_node(self, user: UserKey, node: str) -> list[Registration]:
        """Remove the user's registrations with that node (at any app server)."""
        removed = list(self._select("user=? AND server=? AND node=?", (*user, node)))
        for registration in removed:
            self.delete(registration.key)
        return removed

    def delete_older_than(self, cutoff: float) -> list[Registration]:
        """Remove registrations enabled before cutoff (a Unix time)."""
        removed = list(self._select("enabled_at<?", (cutoff,)))
        for registration in removed:
            self.delete(registration.key)
        return removed

    def enabled_at(self, key: tuple[str, str, str, str]) -> float | None:
        row = self.db.execute("SELECT enabled_at FROM registrations WHERE user=? AND server=? "
                              "AND push_jid=? AND node=?", key).fetchone()
        return float(row[0]) if row else None

    def totals(self) -> dict[str, int]:
        """Row counts for ejabberdctl push_status."""
        tables = ("registrations", "devices", "user_options", "outbox", "provider_queue",
                  "pushed")
        totals = {table: int(self.db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])
                  for table in tables}
        if self._pg is not None:
            totals["database_round_trips"] = int(self._pg.round_trips)
        return totals

    def clear_wake(self, key: tuple[str, str, str, str]) -> None:
        self.db.execute("UPDATE registrations SET wake_due=NULL WHERE user=? AND server=? "
                        "AND push_jid=? AND node=?", key)

    def due_wakes(self, ejabberd_node: str, now: float, limit: int) -> list[Registration]:
        return list(self._select("ejabberd_node IN (?, '') AND wake_due<=?",
                                 (ejabberd_node, now), limit))

    def next_wake(self, ejabberd_node: str) -> float | None:
        row = self.db.execute("SELECT MIN(wake_due) FROM registrations WHERE "
                              "ejabberd_node IN (?, '')", (ejabberd_node,)).fetchone()
        return None if row is None or row[0] is None else float(row[0])

    def add_hook_work(self, work_id: int, target: SessionKey, stanza: str,
                      ejabberd_node: str) -> None:
        """A notification waiting for the admin's async functions (resource "": every
        registration of the user); stanza: the event's stanza as JSON."""
        self.db.execute("INSERT INTO hook_queue (id, user, server, resource, stanza, "
                        "ejabberd_node) VALUES (?, ?, ?, ?, ?, ?)",
                        (work_id, *target, stanza, ejabberd_node))

    def remove_hook_work(self, work_id: int) -> None:
        self.db.execute("DELETE FROM hook_queue WHERE id=?", (work_id,))

    def hook_work(self, ejabberd_node: str) -> list[tuple[int, SessionKey, str]]:
        rows = self.db.execute("SELECT id, user, server, resource, stanza FROM hook_queue "
                               "WHERE ejabberd_node=? ORDER BY id", (ejabberd_node,))
        return [(int(i), (u, s, r), stanza) for i, u, s, r, stanza in rows]

    def add_outbox(self, entry: OutboxEntry, ejabberd_node: str) -> None:
        self.db.execute("INSERT INTO outbox (id, user, server, push_jid, node, summary, attempt, "
                        "due, ejabberd_node) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (entry.id, *entry.registration, compact_json.dumps(entry.summary),
                         entry.attempt, entry.due, ejabberd_node))

    def update_outbox(self, entry: OutboxEntry) -> None:
        self.db.execute("UPDATE outbox SET attempt=?, due=? WHERE id=?",
                        (entry.attempt, entry.due, entry.id))

    def clear_errors(self, key: tuple[str, str, str, str]) -> None:
        """A publish went through: the registration's error count starts again."""
        self.db.execute("UPDATE registrations SET errors=0, last_error_at=NULL WHERE user=? "
                        "AND server=? AND push_jid=? AND node=? AND errors>0", key)
        self._changed(key[:2])

    def remove_outbox(self, entry_id: int) -> None:
        self.db.execute("DELETE FROM outbox WHERE id=?", (entry_id,))

    def outbox(self, ejabberd_node: str) -> list[OutboxEntry]:
        rows = self.db.execute("SELECT id, user, server, push_jid, node, summary, attempt, due "
                               "FROM outbox WHERE ejabberd_node=? ORDER BY id", (ejabberd_node,))
        return [OutboxEntry(int(i), (u, s, j, n), [tuple(f) for f in json.loads(summary)],
                            int(attempt), float(due))
                for i, u, s, j, n, summary, attempt, due in rows]

    def last_batch(self, ejabberd_node: str, host: str) -> tuple[int, int] | None:
        row = self.db.execute("SELECT epoch, seq FROM port_state WHERE ejabberd_node=? AND "
                              "host=?", (ejabberd_node, host)).fetchone()
        return (int(row[0]), int(row[1])) if row else None

    def set_last_batch(self, ejabberd_node: str, host: str, epoch: int, seq: int) -> None:
        self.db.execute("INSERT INTO port_state (ejabberd_node, host, epoch, seq) VALUES "
                        "(?, ?, ?, ?) ON CONFLICT (ejabberd_node, host) DO UPDATE SET "
                        "epoch=excluded.epoch, seq=excluded.seq",
                        (ejabberd_node, host, epoch, seq))

    # ------------------------------------------------------ provider queue
    def queue_push(self, push: QueuedPush, ejabberd_node: str) -> None:
        self.db.execute("INSERT INTO provider_queue (id, device_node, summary, attempt, due, "
                        "created, ejabberd_node, failing_since) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        (push.id, push.device_node, json.dumps(push.summary), push.attempt,
                         push.due, push.created, ejabberd_node, push.failing_since))

    def keep_newest_queued(self, device_node: str, ejabberd_node: str, keep: int) -> None:
        """The device's queued pushes (of that ejabberd node) but the ``keep`` newest (by
        id) are removed: the bound on what waits per device; 0 removes them all. A write
        with no answer to wait for (no round trip of its own with PostgreSQL)."""
        self.db.execute("DELETE FROM provider_queue WHERE device_node=? AND ejabberd_node=? "
                        "AND id<=(SELECT id FROM provider_queue WHERE device_node=? AND "
                        "ejabberd_node=? ORDER BY id DESC LIMIT 1 OFFSET ?)",
                        (device_node, ejabberd_node, device_node, ejabberd_node, keep))

    def restart_failing(self, device_node: str, ejabberd_node: str, since: float) -> None:
        """A push to the device was delivered: those still queued fail since ``since``."""
        self.db.execute("UPDATE provider_queue SET failing_since=? WHERE device_node=? AND "
                        "ejabberd_node=?", (since, device_node, ejabberd_node))

    def update_queued_push(self, push: QueuedPush) -> None:
        self.db.execute("UPDATE provider_queue SET attempt=?, due=? WHERE id=?",
                        (push.attempt, push.due, push.id))

    def remove_queued_push(self, push_id: int) -> None:
        self.db.execute("DELETE FROM provider_queue WHERE id=?", (push_id,))

    def queued_pushes(self, ejabberd_node: str) -> list[QueuedPush]:
        rows = self.db.execute("SELECT id, device_node, summary, attempt, due, created, "
                               "COALESCE(failing_since, created) FROM provider_queue WHERE "
                               "ejabberd_node=? ORDER BY id", (ejabberd_node,))
        return [QueuedPush(int(i), node, dict(json.loads(summary)), int(attempt), float(due),
                           float(created), float(failing))
                for i, node, summary, attempt, due, created, failing in rows]


def _kept(memory: dict[K, V], key: K, value: V, limit: int) -> V:
    """value, kept in memory under key; at most limit entries, the longest kept going."""
    if len(memory) >= limit:
        del memory[next(iter(memory))]
    memory[key] = value
    return value


# The database holds secrets (pubsub secrets, Web Push auth secrets, Tigase AES keys): its
# files are its owner's alone. SQLite creates the -wal and -shm files with the database
# file's mode.
PRIVATE_MODE = 0o600


def _make_private(path: str) -> None:
    """The SQLite database at path created readable and writable by its owner only, if it
    is new; its files' modes narrowed to that if an earlier version left them wider."""
    os.close(os.open(path, os.O_RDWR | os.O_CREAT, PRIVATE_MODE))
    for name in (path, f"{path}-wal", f"{path}-shm"):
        try:
            if os.stat(name).st_mode & 0o077:
                os.chmod(name, PRIVATE_MODE)
        except FileNotFoundError:
            pass


def open_store(db_file: str, db_url: str | None = None) -> Store:
    """SQLite at db_file, or PostgreSQL (a cluster's shared database) when db_url is set."""
    if db_url:
        from .store_pg import PgConnection  # asyncpg is only needed for clusters
        return Store("", PgConnection(db_url))
    return Store(db_file, background_checkpoints=True)
