"""UnifiedPush: the endpoints (one per account, application and instance, found by token)
and the pushes kept for them until delivered or expired."""

from __future__ import annotations

import base64
from collections.abc import Sequence
from dataclasses import dataclass

from pymod_push.core.unifiedpush import Held
from pymod_push.protocol import SessionKey, UserKey
from pymod_push.store.base import StoreBase

KEPT, SENT, QUEUED = "kept", "sent", "queued"  # up_kept.state

_ENDPOINT = ("token, user, server, resource, application, instance, expires, created, "
             "last_delivery")


@dataclass(slots=True)
class UpEndpoint:
    token: str
    user: str
    server: str
    resource: str
    application: str
    instance: str
    expires: float
    created: float
    last_delivery: float | None = None

    @property
    def session(self) -> SessionKey:
        return self.user, self.server, self.resource

    @property
    def user_key(self) -> UserKey:
        return self.user, self.server


@dataclass(slots=True)
class KeptPush:
    id: int
    token: str
    topic: str | None
    payload: bytes
    expires: float
    state: str


def _endpoint(row: Sequence[object]) -> UpEndpoint:
    token, user, server, resource, application, instance, expires, created, last = row
    return UpEndpoint(str(token), str(user), str(server), str(resource), str(application),
                      str(instance), float(expires),  # type: ignore[arg-type]
                      float(created),  # type: ignore[arg-type]
                      None if last is None else float(last))  # type: ignore[arg-type]


def _kept(row: Sequence[object]) -> KeptPush:
    push_id, token, topic, payload, expires, state = row
    return KeptPush(int(push_id), str(token),  # type: ignore[call-overload]
                    None if topic is None else str(topic),
                    base64.b64decode(str(payload)), float(expires),  # type: ignore[arg-type]
                    str(state))


class UnifiedPushTables(StoreBase):
    """up_endpoints and up_kept (schema version 14)."""

    # ------------------------------------------------------------ endpoints
    def up_endpoint(self, token: str) -> UpEndpoint | None:
        row = self.db.execute(f"SELECT {_ENDPOINT} FROM up_endpoints WHERE token=?",
                              (token,)).fetchone()
        return None if row is None else _endpoint(row)

    def up_endpoint_for(self, user: UserKey, application: str,
                        instance: str) -> UpEndpoint | None:
        row = self.db.execute(f"SELECT {_ENDPOINT} FROM up_endpoints WHERE user=? AND "
                              "server=? AND application=? AND instance=?",
                              (*user, application, instance)).fetchone()
        return None if row is None else _endpoint(row)

    def up_endpoints_of(self, user: UserKey) -> list[UpEndpoint]:
        return [_endpoint(r) for r in self.db.execute(
            f"SELECT {_ENDPOINT} FROM up_endpoints WHERE user=? AND server=? ORDER BY created, "
            "token", user)]

    def up_endpoints_at(self, session: SessionKey) -> list[UpEndpoint]:
        return [_endpoint(r) for r in self.db.execute(
            f"SELECT {_ENDPOINT} FROM up_endpoints WHERE user=? AND server=? AND resource=? "
            "ORDER BY created, token", session)]

    def up_endpoint_count(self, user: UserKey) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM up_endpoints WHERE user=? AND "
                                   "server=?", user).fetchone()[0])

    def add_up_endpoint(self, endpoint: UpEndpoint) -> None:
        self.db.execute(f"INSERT INTO up_endpoints ({_ENDPOINT}) VALUES "
                        "(?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (endpoint.token, endpoint.user, endpoint.server, endpoint.resource,
                         endpoint.application, endpoint.instance, endpoint.expires,
                         endpoint.created, endpoint.last_delivery))

    def renew_up_endpoint(self, token: str, resource: str, expires: float) -> None:
        self.db.execute("UPDATE up_endpoints SET resource=?, expires=? WHERE token=?",
                        (resource, expires, token))

    def up_delivered(self, token: str, when: float) -> None:
        self.db.execute("UPDATE up_endpoints SET last_delivery=? WHERE token=?", (when, token))

    def delete_up_endpoint(self, token: str) -> None:
        """The endpoint and its pushes."""
        self.db.execute("DELETE FROM up_kept WHERE token=?", (token,))
        self.db.execute("DELETE FROM up_endpoints WHERE token=?", (token,))

    def up_users(self) -> list[UserKey]:
        return [(str(u), str(s)) for u, s in self.db.execute(
            "SELECT DISTINCT user, server FROM up_endpoints ORDER BY user, server")]

    def up_endpoints_expired(self, cutoff: float) -> list[UpEndpoint]:
        return [_endpoint(r) for r in self.db.execute(
            f"SELECT {_ENDPOINT} FROM up_endpoints WHERE expires<? ORDER BY expires", (cutoff,))]

    # ------------------------------------------------------------ kept pushes
    def add_up_kept(self, push: KeptPush) -> None:
        self.db.execute("INSERT INTO up_kept (id, token, topic, payload, expires, state) "
                        "VALUES (?, ?, ?, ?, ?, ?)",
                        (push.id, push.token, push.topic,
                         base64.b64encode(push.payload).decode("ascii"), push.expires,
                         push.state))

    def up_held(self, token: str) -> list[Held]:
        """The endpoint's pushes held, in id order (what the keep policy looks at)."""
        return [Held(int(i), None if t is None else str(t), str(s)) for i, t, s in
                self.db.execute("SELECT id, topic, state FROM up_kept WHERE token=? "
                                "ORDER BY id", (token,))]

    def up_kept_of(self, token: str, state: str = KEPT) -> list[KeptPush]:
        return [_kept(r) for r in self.db.execute(
            "SELECT id, token, topic, payload, expires, state FROM up_kept WHERE token=? "
            "AND state=? ORDER BY id", (token, state))]

    def up_kept_get(self, push_id: int) -> KeptPush | None:
        row = self.db.execute("SELECT id, token, topic, payload, expires, state FROM up_kept "
                              "WHERE id=?", (push_id,)).fetchone()
        return None if row is None else _kept(row)

    def up_count_kept(self, token: str) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM up_kept WHERE token=?",
                                   (token,)).fetchone()[0])

    def set_up_state(self, push_id: int, state: str) -> None:
        self.db.execute("UPDATE up_kept SET state=? WHERE id=?", (state, push_id))

    def delete_up_kept(self, push_id: int) -> None:
        self.db.execute("DELETE FROM up_kept WHERE id=?", (push_id,))

    def up_states(self, before: str, after: str, server: str) -> int:
        """Every push of the host's endpoints in state before now in state after; how
        many (a database may be shared by the hosts of a cluster)."""
        mine = "token IN (SELECT token FROM up_endpoints WHERE server=?)"
        count = self.db.execute(f"SELECT COUNT(*) FROM up_kept WHERE state=? AND {mine}",
                                (before, server)).fetchone()[0]
        if count:
            self.db.execute(f"UPDATE up_kept SET state=? WHERE state=? AND {mine}",
                            (after, before, server))
        return int(count)

    def up_kept_expired(self, now: float, in_flight_before: float,
                        limit: int = 10_000) -> list[KeptPush]:
        """Kept pushes whose time is over, and those sent or queued whose time was over
        before in_flight_before (an answer that never came), oldest first."""
        return [_kept(r) for r in self.db.execute(
            "SELECT id, token, topic, payload, expires, state FROM up_kept WHERE "
            "(state=? AND expires<=?) OR (state<>? AND expires<=?) ORDER BY id LIMIT ?",
            (KEPT, now, KEPT, in_flight_before, limit))]

    def last_up_kept_id(self) -> int:
        row = self.db.execute("SELECT MAX(id) FROM up_kept").fetchone()
        return int(row[0]) if row and row[0] is not None else 0

    def up_totals(self) -> tuple[int, int]:
        """(endpoints, pushes held)."""
        endpoints = self.db.execute("SELECT COUNT(*) FROM up_endpoints").fetchone()[0]
        kept = self.db.execute("SELECT COUNT(*) FROM up_kept").fetchone()[0]
        return int(endpoints), int(kept)
