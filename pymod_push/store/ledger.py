"""What makes "nothing lost, nothing twice" survive a restart: the outbox of publishes not
answered for good, the log of pushed messages, the admin's logic work waiting, and the last
event batch committed."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import closing

from pymod_push.core import compact_json
from pymod_push.protocol import SessionKey
from pymod_push.records import OutboxEntry
from pymod_push.store.base import StoreBase


class LedgerTables(StoreBase):
    """What makes "nothing lost, nothing twice" survive a restart: the outbox of
    publishes not answered for good, the log of pushed messages, the admin's logic work
    waiting, and the last event batch committed."""

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

    def add_logic_work(self, work_id: int, target: SessionKey, stanza: str,
                      ejabberd_node: str) -> None:
        """A notification waiting for the admin's async functions (resource "": every
        registration of the user); stanza: the event's stanza as JSON."""
        self.db.execute("INSERT INTO hook_queue (id, user, server, resource, stanza, "
                        "ejabberd_node) VALUES (?, ?, ?, ?, ?, ?)",
                        (work_id, *target, stanza, ejabberd_node))

    def remove_logic_work(self, work_id: int) -> None:
        self.db.execute("DELETE FROM hook_queue WHERE id=?", (work_id,))

    def logic_work(self, ejabberd_node: str) -> list[tuple[int, SessionKey, str]]:
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
