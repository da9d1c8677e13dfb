"""Pushes of the built-in app server deferred by their provider."""

from __future__ import annotations

import json

from pymod_push.records import QueuedPush
from pymod_push.store.base import StoreBase


class ProviderQueueTable(StoreBase):
    """Pushes of the built-in app server deferred by their provider."""

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
