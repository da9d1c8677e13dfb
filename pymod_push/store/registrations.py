"""A user's registrations, counts, errors, options and wakes; kept in memory per user once read
(see Store)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import closing

from pymod_push.core.user_options import PushOptions
from pymod_push.protocol import SessionKey, UserKey
from pymod_push.records import Registration
from pymod_push.store import base
from pymod_push.store.base import StoreBase, UserEntry, _kept
from pymod_push.store.schema import _COLUMN_COUNT, _COLUMNS, _JOINED_COLUMNS


class RegistrationTable(StoreBase):
    """A user's registrations, counts, errors, options and wakes; kept in memory
    per user once read (see Store)."""

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
            _kept(self._users, user, self._read_user(user), base.USER_MEMORY)

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

    def push_users(self) -> list[UserKey]:
        """Every account with a registration (the shim's set for group chat pushes)."""
        with closing(self.db.execute("SELECT DISTINCT user, server FROM registrations")) as rows:
            return [(str(u), str(s)) for u, s in rows]

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

    def clear_errors(self, key: tuple[str, str, str, str]) -> None:
        """A publish went through: the registration's error count starts again."""
        self.db.execute("UPDATE registrations SET errors=0, last_error_at=NULL WHERE user=? "
                        "AND server=? AND push_jid=? AND node=? AND errors>0", key)
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
