"""Persistent push state in SQLite (WAL, versioned schema) or PostgreSQL (a cluster's).

The service changes state through these methods and the port loop commits once
per batch of events, before any action of that batch reaches ejabberd: what a
client was told (an enable's result) is on disk first. One connection, split by area:
registrations.py (a user's registrations and options), devices.py (the app server's
devices), ledger.py (outbox, pushed log, logic work, last batch), provider_queue.py;
base.py holds the connection and commits, schema.py the tables.
"""

from __future__ import annotations

from pymod_push.store.base import StoreBase
from pymod_push.store.devices import DeviceTable
from pymod_push.store.ledger import LedgerTables
from pymod_push.store.provider_queue import ProviderQueueTable
from pymod_push.store.registrations import RegistrationTable
from pymod_push.store.unifiedpush import UnifiedPushTables


class Store(RegistrationTable, DeviceTable, LedgerTables, ProviderQueueTable,
            UnifiedPushTables, StoreBase):
    """The SQL here runs on SQLite and, through store.postgres.PgConnection (which turns `?` into
    `$n` and quotes the column `user`), on PostgreSQL.

    What every stanza to a pending user reads, the user's registrations and options, is
    kept in memory per user once read: a method that changes them calls _changed, which
    drops the user's entry (and, with PostgreSQL, tells the other nodes: NOTIFY). The
    service updates the counts of the very objects kept (then save_counts). With SQLite
    this process is the database's only writer, so for_user, user_options and the app
    server's devices come from memory too; with PostgreSQL, only for_session_with_options
    does, as other nodes write the counts and devices."""

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

    def registrations_without_device(self, pubsub_hosts: list[str]) -> int:
        """XEP-0357 registrations at these pubsub hosts (the built-in app server's) whose
        node is no device there: their publishes find nobody (metrics)."""
        marks = ", ".join("?" * len(pubsub_hosts))
        return int(self.db.execute(
            f"SELECT COUNT(*) FROM registrations r WHERE r.push_jid IN ({marks}) AND NOT "
            "EXISTS (SELECT 1 FROM devices d WHERE d.node = r.node AND "
            "d.pubsub_host = r.push_jid)", tuple(pubsub_hosts)).fetchone()[0])

    def totals(self) -> dict[str, int]:
        """Row counts for ejabberdctl push_status."""
        tables = ("registrations", "devices", "user_options", "outbox", "provider_queue",
                  "pushed", "up_endpoints", "up_kept")
        totals = {table: int(self.db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])
                  for table in tables}
        if self._pg is not None:
            totals["database_round_trips"] = int(self._pg.round_trips)
        return totals


def open_store(db_file: str, db_url: str | None = None) -> Store:
    """SQLite at db_file, or PostgreSQL (a cluster's shared database) when db_url is set."""
    if db_url:
        from pymod_push.store.postgres import PgConnection  # asyncpg is only needed for clusters
        return Store("", PgConnection(db_url))
    return Store(db_file, background_checkpoints=True)
