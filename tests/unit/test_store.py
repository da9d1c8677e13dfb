"""The store against both of its databases: SQLite (embedded default) and PostgreSQL (a
cluster's shared database, a real server started by the tests)."""

from __future__ import annotations

import shutil
import sqlite3
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pymod_push.core.user_options import PushOptions
from pymod_push.records import OutboxEntry, QueuedPush, RegisteredDevice, Registration
from pymod_push.store import Store, checkpoints, open_store
from pymod_push.store import base as store_module  # the in-memory bounds
from pymod_push.store.postgres import masked, translate
from pymod_push.store.schema import MIGRATIONS
from tests.builders import registration

Opener = Callable[[], Store]


@pytest.fixture(params=["sqlite", "postgresql"])
def opener(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Opener]:
    """Opens the same database again on every call (a restart, or another cluster node)."""
    if request.param == "sqlite":
        path = str(tmp_path / "push.sqlite3")
        stores: list[Store] = []

        def open_sqlite() -> Store:
            stores.append(open_store(path))
            return stores[-1]
        yield open_sqlite
    else:
        url = request.getfixturevalue("postgres").new_database()
        stores = []

        def open_postgres() -> Store:
            stores.append(open_store("", url))
            return stores[-1]
        yield open_postgres
    for store in stores:
        try:
            store.close()
        except Exception:  # noqa: BLE001 - already closed by the test
            pass


def test_migrations_apply_once_and_reopening_keeps_everything(opener: Opener) -> None:
    first = opener()
    assert first.schema_version() == len(MIGRATIONS)
    first.enable(registration())
    first.set_user_options(("alice", "example.org"), PushOptions(True, False, True, False))
    first.add_device(RegisteredDevice("node-1", "secret", "alice@example.org", "d1", "Phone",
                                      "apns",
                            "app", "pubsub.example.org", "ab" * 32, voip_token="cd" * 32))
    first.add_device(RegisteredDevice("node-2", "secret", "alice@example.org", "d1", "", "webhook",
                            "any", "pubsub.example.org", "", extra='{"channel": "c-1"}'))
    first.commit()
    first.close()
    again = opener()
    assert again.schema_version() == len(MIGRATIONS)
    assert [r.node for r in again.for_user(("alice", "example.org"))] == ["n1"]
    assert again.user_options(("alice", "example.org")) == PushOptions(True, False, True, False)
    device = again.device("node-1")
    assert device is not None and device.voip_token == "cd" * 32 and device.device_name == "Phone"
    python = again.device("node-2")  # a Python provider's registration fields
    assert python is not None and python.extra == '{"channel": "c-1"}' and device.extra == ""


def test_upgrade_keeps_notifications_and_gives_their_ids_no_second_index(
        tmp_path: Path) -> None:
    """Version 12 rebuilds the outbox and the provider queue of a version 11 database:
    every row is kept, and in SQLite the id is the row id (no autoindex to write)."""
    path = str(tmp_path / "push.sqlite3")
    with closing(sqlite3.connect(path)) as old:
        for number, script in enumerate(MIGRATIONS[:11], start=1):
            old.executescript(f"BEGIN; {script}; PRAGMA user_version={number}; COMMIT;")
        old.execute("INSERT INTO outbox (id, user, server, push_jid, node, summary, attempt, "
                    "due, ejabberd_node) VALUES (?, 'alice', 'example.org', 'push.example.net',"
                    " 'n1', '[[\"message-count\",\"2\"]]', 1, 99.5, 'ejabberd@a')", (2**40,))
        old.execute("INSERT INTO provider_queue (id, device_node, summary, attempt, due, "
                    "created, ejabberd_node) VALUES (7, 'node-1', '{\"message-count\":\"1\"}',"
                    " 2, 50.5, 40.0, 'ejabberd@a')")
        old.commit()
        indexes = ("SELECT COUNT(*) FROM sqlite_master WHERE type='index' AND tbl_name=? "
                   "AND name LIKE 'sqlite_autoindex%'")  # of the BIGINT PRIMARY KEY
        assert old.execute(indexes, ("outbox",)).fetchone() == (1,)  # the autoindex
    store = open_store(path)
    try:
        assert store.schema_version() == len(MIGRATIONS) >= 12
        assert store.outbox("ejabberd@a") == [OutboxEntry(
            2**40, ("alice", "example.org", "push.example.net", "n1"),
            [("message-count", "2")], 1, 99.5)]
        assert store.queued_pushes("ejabberd@a") == [
            QueuedPush(7, "node-1", {"message-count": "1"}, 2, 50.5, 40.0, 40.0)]
        for table in ("outbox", "provider_queue"):
            assert store.db.execute(indexes, (table,)).fetchone() == (0,)
            assert store.db.execute(f"SELECT MAX(rowid) = MAX(id) FROM {table}").fetchone() \
                == (1,)
    finally:
        store.close()


def test_registrations_enable_replace_disable_counts_and_errors(opener: Opener) -> None:
    store = opener()
    store.enable(registration("phone", "n1"))
    store.enable(registration("phone", "n2"))
    store.enable(registration("tablet", "n3"))
    first = store.get(("alice", "example.org", "push.example.net", "n1"))
    assert first is not None
    first.message_count, first.subscription_count = 4, 1
    store.save_counts(first)
    store.set_errors(first.key, 2, 1234.5)
    again = store.get(first.key)
    assert again is not None and (again.message_count, again.errors) == (4, 2)
    assert again.last_error_at == 1234.5
    store.clear_errors(first.key)
    cleared = store.get(first.key)
    assert cleared is not None and (cleared.message_count, cleared.errors) == (4, 0)
    assert cleared.last_error_at is None
    store.enable(registration("laptop", "n1"))  # the same node again: replaced, fresh
    replaced = store.get(first.key)
    assert replaced is not None and replaced.resource == "laptop"
    assert (replaced.message_count, replaced.errors) == (0, 0)
    store.reset_counts(("alice", "example.org", "laptop"))
    assert [r.node for r in store.for_session(("alice", "example.org", "phone"))] == ["n2"]
    removed = store.disable(("alice", "example.org"), "push.example.net", "n2")
    assert [r.node for r in removed] == ["n2"]
    assert store.delete_user(("alice", "example.org")) == 2
    assert store.for_user(("alice", "example.org")) == []


def test_the_pushed_log_is_read_back_for_pending_sessions_only(opener: Opener) -> None:
    store = opener()
    store.enable(registration("phone", "n1"))
    store.enable(registration("tablet", "n2"))
    phone, tablet = ("alice", "example.org", "phone"), ("alice", "example.org", "tablet")
    store.bind_node(phone, "node@a", None, pending_since=100)
    store.bind_node(tablet, "node@a", None, pending_since=100)
    store.add_pushed(90, phone, 7)  # an earlier pending period
    store.add_pushed(101, phone, -(2**63))
    store.add_pushed(102, tablet, 2**63 - 1)
    store.commit()
    assert sorted(store.pushed_to_pending("node@a")) == [(phone, -(2**63)), (tablet, 2**63 - 1)]
    assert list(store.pushed_to_pending("node@b")) == []
    store.bind_node(tablet, "node@a", None)  # back: not pending any more
    assert list(store.pushed_to_pending("node@a")) == [(phone, -(2**63))]
    assert store.last_pushed_id() == 102
    assert store.purge_pushed(102) == 2
    assert store.totals()["pushed"] == 1


def test_a_sessions_registrations_come_with_the_users_options(opener: Opener) -> None:
    store = opener()
    phone = ("alice", "example.org", "phone")
    assert store.for_session_with_options(phone) == ([], None)
    store.enable(registration("phone", "n1"))
    store.enable(registration("phone", "n2"))
    store.enable(registration("tablet", "n3"))
    registrations, options = store.for_session_with_options(phone)
    assert registrations == store.for_session(phone) and options is None
    store.set_user_options(phone[:2], PushOptions(False, True, False, True))
    store.set_user_options(("bob", "example.org"), PushOptions(True, True, True, True))
    registrations, options = store.for_session_with_options(phone)
    assert [r.node for r in registrations] == ["n1", "n2"]
    assert options == PushOptions(False, True, False, True) == store.user_options(phone[:2])


def test_devices_are_replaced_per_device_and_removed(opener: Opener) -> None:
    store = opener()

    def device(node: str, device_id: str) -> RegisteredDevice:
        return RegisteredDevice(node, "s", "alice@example.org", device_id, "", "fcm", "app",
                      "pubsub.example.org", f"token-{node}")

    assert store.add_device(device("a", "phone")) == []
    assert store.add_device(device("b", "phone")) == ["a"]  # same device registers again
    store.add_device(device("c", "tablet"))
    assert [d.node for d in store.devices_of("alice@example.org")] == ["b", "c"]
    assert store.remove_devices("alice@example.org", device_id="tablet") == ["c"]
    assert store.remove_devices("alice@example.org", nodes=["b", "zzz"]) == ["b"]
    assert store.device("b") is None


def test_recovery_state_outbox_queue_and_batches(opener: Opener) -> None:
    store = opener()
    store.enable(registration())
    store.bind_node(("alice", "example.org", "phone"), "ejabberd@a", 1234.5, pending_since=1)
    assert [r.node for r in store.due_wakes("ejabberd@a", 2000.0, 10)] == ["n1"]
    assert store.due_wakes("ejabberd@b", 2000.0, 10) == []
    assert store.next_wake("ejabberd@a") == 1234.5
    assert [r.node for r in store.pending_on("ejabberd@a")] == ["n1"]
    entry = OutboxEntry(2**40, ("alice", "example.org", "push.example.net", "n1"),
                        [("message-count", "1"),
                         ("last-message-body", 'Say "hi"\n\\ to ünïcode 🎉 and \x00\t')], 0, 99.25)
    store.add_outbox(entry, "ejabberd@a")
    entry.attempt, entry.due = 1, 130.5
    store.update_outbox(entry)
    assert store.outbox("ejabberd@a") == [entry] and store.outbox("ejabberd@b") == []
    queued = QueuedPush(7, "node-1", {"message-count": "1"}, 2, 50.5, 40.0, 30.0)
    store.queue_push(queued, "ejabberd@a")
    assert store.queued_pushes("ejabberd@a") == [queued]
    store.set_last_batch("ejabberd@a", "example.org", 1_764_000_000_000_000, 41)
    store.set_last_batch("ejabberd@a", "example.org", 1_764_000_000_000_000, 42)
    assert store.last_batch("ejabberd@a", "example.org") == (1_764_000_000_000_000, 42)
    store.remove_outbox(entry.id)
    store.remove_queued_push(7)
    assert store.outbox("ejabberd@a") == [] and store.queued_pushes("ejabberd@a") == []
    assert store.totals()["registrations"] == 1


def test_the_provider_queue_keeps_the_newest_pushes_of_each_device(opener: Opener) -> None:
    """The bound on what waits at a provider per device (keep_newest_queued): of a
    device's rows of one ejabberd node the newest (by id) stay, other devices' and other
    nodes' are untouched, 0 keeps none; when its pushes began to fail is the device's
    (restart_failing). What was written is what the next process reads."""
    store = opener()

    def push(push_id: int, node: str, failing_since: float = 1.5) -> QueuedPush:
        return QueuedPush(push_id, node, {"message-count": str(push_id)}, 0, 1.0, 1.0,
                          failing_since)

    for push_id in (3, 1, 8, 2, 7, 5, 4, 6):  # ids, not the order written, say which is new
        store.queue_push(push(push_id, "dev"), "ejabberd@a")
    store.queue_push(push(20, "other"), "ejabberd@a")
    store.queue_push(push(21, "dev"), "ejabberd@b")
    store.keep_newest_queued("dev", "ejabberd@a", 3)
    store.commit()
    again = opener()
    assert [(q.id, q.device_node) for q in again.queued_pushes("ejabberd@a")] == [
        (6, "dev"), (7, "dev"), (8, "dev"), (20, "other")]
    assert [q.summary for q in again.queued_pushes("ejabberd@a")][0] == {"message-count": "6"}
    assert [q.id for q in again.queued_pushes("ejabberd@b")] == [21]
    again.keep_newest_queued("dev", "ejabberd@a", 3)  # within the bound: nothing goes
    again.keep_newest_queued("nobody", "ejabberd@a", 0)
    again.restart_failing("dev", "ejabberd@a", 99.0)
    again.commit()
    third = opener()
    assert [(q.id, q.failing_since) for q in third.queued_pushes("ejabberd@a")] == [
        (6, 99.0), (7, 99.0), (8, 99.0), (20, 1.5)]
    assert third.queued_pushes("ejabberd@b")[0].failing_since == 1.5
    third.keep_newest_queued("dev", "ejabberd@a", 0)
    assert [q.id for q in third.queued_pushes("ejabberd@a")] == [20]
    assert third.totals()["provider_queue"] == 2


def test_uncommitted_changes_are_invisible_to_others_and_rolled_back(opener: Opener) -> None:
    node_a, node_b = opener(), opener()  # two processes on one database: a cluster
    node_a.enable(registration())
    node_a.rollback()
    assert node_b.for_user(("alice", "example.org")) == []
    node_a.enable(registration())
    node_a.commit()
    node_b.commit()  # end node B's read transaction, as each batch does
    # Another cluster node reads it (PostgreSQL); with SQLite, whose one process keeps
    # what it read in memory, the next process does.
    reader = opener() if isinstance(node_b.db, sqlite3.Connection) else node_b
    assert [r.node for r in reader.for_user(("alice", "example.org"))] == ["n1"]


def test_postgresql_dialect() -> None:
    assert translate("SELECT user FROM t WHERE user=? AND x=? AND user_options=?") == (
        'SELECT "user" FROM t WHERE "user"=$1 AND x=$2 AND user_options=$3')
    assert translate("CREATE TABLE t (a REAL)") == "CREATE TABLE t (a DOUBLE PRECISION)"
    assert masked("postgresql://push:s3cret@db:5432/push") == "postgresql://push:***@db:5432/push"
    assert masked("postgresql://push@db/push") == "postgresql://push@db/push"


def test_two_nodes_migrate_the_same_postgresql_at_once(postgres: Any) -> None:
    import threading

    url = postgres.new_database()
    stores: list[Store] = []
    threads = [threading.Thread(target=lambda: stores.append(open_store("", url)))
               for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert [s.schema_version() for s in stores] == [len(MIGRATIONS)] * 2
    for store in stores:
        store.close()


def test_counts_per_account_and_who_is_near_a_limit(opener: Opener) -> None:
    store = opener()
    for node in ("n1", "n2", "n3"):
        store.enable(registration(node=node), "node@a")
    store.enable(Registration("bob", "example.org", "pc", "app.example.net", "b1", None))
    store.add_device(RegisteredDevice("d1", "s", "carol@example.org", "phone", "", "fcm", "app",
                            "pubsub.example.org", "t"))
    store.add_device(RegisteredDevice("d2", "s", "carol@example.org", "tablet", "", "fcm", "app",
                            "pubsub.example.org", "t"))
    assert store.registration_count(("alice", "example.org")) == 3
    assert store.device_count("carol@example.org") == 2
    assert store.accounts_near(3, 2) == [("alice@example.org", 3, 0),
                                         ("carol@example.org", 0, 2)]
    assert store.accounts_near(4, 3) == []
    # an enable binds its registration to the node it was enabled on (and only that one)
    assert store.db.execute("SELECT COUNT(*) FROM registrations WHERE ejabberd_node=?",
                            ("node@a",)).fetchone()[0] == 3
def test_postgresql_writes_go_at_the_commit_in_one_round_trip(postgres: Any) -> None:
    store = open_store("", postgres.new_database())
    try:
        phone = ("alice", "example.org", "phone")
        store.enable(registration())
        store.commit()
        (first,), _ = store.for_session_with_options(phone)
        before = store.round_trips()
        for n in range(50):  # what the pushes of a group commit write
            first.message_count = n + 1
            store.save_counts(first)
            store.add_pushed(1000 + n, phone, n)
            store.add_outbox(OutboxEntry(n, first.key, [("message-count", str(n))], 0, 1.0),
                             "ejabberd@a")
            registrations, _ = store.for_session_with_options(phone)  # from memory
            assert registrations[0] is first
        store.set_last_batch("ejabberd@a", "example.org", 1, 2)
        store.commit()
        assert store.round_trips() == (before or 0) + 1
        again = open_store("", store.db.url)
        assert [r.message_count for r in again.for_user(phone[:2])] == [50]
        assert len(again.outbox("ejabberd@a")) == 50 and again.totals()["pushed"] == 50
        again.close()
    finally:
        store.close()


def test_postgresql_a_change_on_another_node_reaches_the_memory_of_this_one(
        postgres: Any) -> None:
    import time

    url = postgres.new_database()
    node_a, node_b = open_store("", url), open_store("", url)
    try:
        phone = ("alice", "example.org", "phone")
        node_b.enable(registration("phone", "n1"))
        node_b.commit()
        assert [r.node for r in node_a.for_session_with_options(phone)[0]] == ["n1"]
        node_b.enable(registration("phone", "n2"))
        node_b.set_user_options(phone[:2], PushOptions(False, True, False, True))
        node_b.commit()
        deadline = time.monotonic() + 10  # the notification travels: waited for, bounded
        while (len(node_a.for_session_with_options(phone)[0]) < 2
               and time.monotonic() < deadline):
            time.sleep(0.01)
        registrations, options = node_a.for_session_with_options(phone)
        assert [r.node for r in registrations] == ["n1", "n2"]
        assert options == PushOptions(False, True, False, True)
        node_b.delete_user(phone[:2])  # a count asked for: sent at once, in the transaction
        assert node_b.for_user(phone[:2]) == []
        node_b.rollback()
        assert len(node_b.for_user(phone[:2])) == 2
    finally:
        node_a.close()
        node_b.close()


def test_postgresql_outage_loses_no_write_and_applies_none_twice(postgres: Any) -> None:
    from pymod_push.records import DatabaseUnavailable

    url = postgres.new_database()
    store = open_store("", url)
    phone = ("alice", "example.org", "phone")
    try:
        store.enable(registration())
        store.commit()
        store.for_session_with_options(phone)
        store.add_pushed(1, phone, 11)
        store.set_last_batch("ejabberd@a", "example.org", 1, 1)
        assert store.for_user(phone[:2])  # the writes so far are in the server's transaction
        store.add_pushed(2, phone, 12)
        postgres.halt()
        try:
            with pytest.raises(DatabaseUnavailable):
                store.commit()
            with pytest.raises(DatabaseUnavailable):
                store.for_user(phone[:2])
            with pytest.raises(DatabaseUnavailable):
                store.commit()  # again: still away, nothing forgotten
            assert store.for_session_with_options(phone)[0]  # from memory meanwhile
        finally:
            postgres.start()
        store.commit()  # the whole transaction, on a new connection
        store.add_pushed(3, phone, 13)
        store.commit()
        again = open_store("", url)
        assert again.totals()["pushed"] == 3 and again.last_batch("ejabberd@a",
                                                                   "example.org") == (1, 1)
        again.close()
    finally:
        store.close()


def test_postgresql_a_commit_whose_answer_was_lost_is_not_applied_again(
        postgres: Any) -> None:
    store = open_store("", postgres.new_database())
    try:
        phone = ("alice", "example.org", "phone")
        connection = store.db
        store.add_pushed(1, phone, 11)
        log = list(connection._log)
        store.commit()
        # As if the COMMIT had gone through and its answer been lost with the connection:
        # the same writes are pending again, in doubt, and one more came since.
        connection._log, connection._commit_seq = log, connection._commit_seq - 1
        connection._in_doubt, connection._doubt_count = True, len(log)
        store.add_pushed(2, phone, 12)
        store.commit()  # a duplicate key if the first were sent again
        assert store.totals()["pushed"] == 2
    finally:
        store.close()


def test_postgresql_a_connection_cut_by_the_server_is_only_ever_unavailable(
        postgres: Any) -> None:
    """The server ends the connection (an admin, a restart, a failover) while the node is
    idle: the next statements either run on a new connection or say the database is
    unavailable, never anything else (asyncpg, still reading the server's goodbye, refused
    them with an InternalClientError that ended the process in CI)."""
    import asyncio

    import asyncpg

    from pymod_push.records import DatabaseUnavailable

    store = open_store("", postgres.new_database())
    outcomes: Counter[str] = Counter()

    async def cut(pid: int) -> None:
        admin = await asyncpg.connect(postgres.url())
        try:
            await admin.execute("SELECT pg_terminate_backend($1)", pid)
        finally:
            await admin.close()
    try:
        for _ in range(40):
            asyncio.run(cut(store.db._pid))
            for _ in range(3):
                try:
                    store.for_user(("alice", "example.org"))
                    outcomes["ran"] += 1
                except DatabaseUnavailable:
                    outcomes["unavailable"] += 1
        assert outcomes["ran"] + outcomes["unavailable"] == 120
        assert outcomes["ran"] >= 80  # each cut costs at most one statement
    finally:
        store.close()


def test_notifications_waiting_for_the_logic_are_kept_per_node(opener: Opener) -> None:
    store = opener()
    stanza = '["message", "romeo@example.net/a", "m1", "chat", "h\\u00e9llo \'q\'", "<x/>", ""]'
    store.add_logic_work(2, ("alice", "example.org", "phone"), stanza, "ejabberd@a")
    store.add_logic_work(1, ("alice", "example.org", ""), stanza, "ejabberd@a")
    store.add_logic_work(3, ("bob", "example.org", "pc"), stanza, "ejabberd@b")
    store.commit()
    again = opener()
    assert again.logic_work("ejabberd@a") == [(1, ("alice", "example.org", ""), stanza),
                                             (2, ("alice", "example.org", "phone"), stanza)]
    again.remove_logic_work(1)
    again.commit()
    assert [w[0] for w in opener().logic_work("ejabberd@a")] == [2]


def test_postgresql_rows_gathered_into_one_statement_change_what_one_by_one_would(
        postgres: Any) -> None:
    """The commit's script gathers INSERT rows and DELETEs by key per table (store_pg
    _merged): random interleavings of the push path's writes (ids inserted, deleted and
    inserted again within one commit) leave PostgreSQL as they leave SQLite."""
    import random

    pg, lite = open_store("", postgres.new_database()), Store(":memory:")
    chance = random.Random(7)
    phone = ("alice", "example.org", "phone")
    key = registration().key
    outbox: set[int] = set()
    queue: set[int] = set()
    try:
        for store in (pg, lite):
            store.enable(registration())
            store.commit()
        for _ in range(20):  # commits
            ops: list[Callable[[Store], None]] = []
            for _ in range(chance.randrange(1, 80)):
                n = chance.randrange(12)  # few ids: the same id comes back in one commit
                kind = chance.randrange(5)
                if kind == 0 and n not in outbox:
                    outbox.add(n)
                    ops.append(lambda s, n=n: s.add_outbox(OutboxEntry(
                        n, key, [("message-count", str(n))], 0, 1.0), "ejabberd@a"))
                elif kind == 1:
                    outbox.discard(n)
                    ops.append(lambda s, n=n: s.remove_outbox(n))
                elif kind == 2 and n not in queue:
                    queue.add(n)
                    ops.append(lambda s, n=n: s.queue_push(
                        QueuedPush(n, "dev", {"n": str(n)}, 0, 1.0, 1.0, 1.0), "ejabberd@a"))
                elif kind == 3 and n % 4 == 0:  # the bound per device: the newest stay
                    queue.intersection_update(sorted(queue)[len(queue) - n // 4:])
                    ops.append(lambda s, n=n: s.keep_newest_queued("dev", "ejabberd@a", n // 4))
                elif kind == 3:
                    queue.discard(n)
                    ops.append(lambda s, n=n: s.remove_queued_push(n))
                else:
                    mark = chance.randrange(10**9)
                    ops.append(lambda s, n=n, mark=mark: (s.add_pushed(mark, phone, n),
                                                          s.set_errors(key, n, None)))
            for store in (pg, lite):
                for op in ops:
                    op(store)
                store.commit()
        for query in ("SELECT id, summary FROM outbox", "SELECT id, summary FROM provider_queue",
                      "SELECT errors FROM registrations", "SELECT id, mark FROM pushed"):
            assert sorted(pg.db.execute(query).rows) == sorted(lite.db.execute(query)), query
        assert len(pg.db.execute("SELECT id FROM outbox").rows) == len(outbox) > 0
        assert sorted(q.id for q in lite.queued_pushes("ejabberd@a")) == sorted(queue)
    finally:
        pg.close()


def test_postgresql_a_group_commit_of_pushes_is_few_statements() -> None:
    """What 50 pushes write (their counts, the pushed log, the outbox) is 52 statements, not
    150; an answered push's outbox row goes in one DELETE with the others."""
    from pymod_push.store.postgres import Write, _merged, statement

    update = statement("UPDATE registrations SET message_count=? WHERE user=?")
    pushed = statement("INSERT INTO pushed (id, user, server, resource, mark) VALUES "
                       "(?, ?, ?, ?, ?)")
    outbox = statement("INSERT INTO outbox (id, user) VALUES (?, ?)")
    answered = statement("DELETE FROM outbox WHERE id=?")
    writes = []
    for n in range(50):
        writes += [Write(update, f"'{n}', 'a'", None, f"'{n}'"),
                   Write(pushed, f"'{n}', 'a', 's', 'r', '1'", None, f"'{n}'"),
                   Write(outbox, f"'{n}', 'a'", None, f"'{n}'")]
    groups = _merged(writes)
    assert len(groups) == 52 and sorted(map(len, groups))[-2:] == [50, 50]
    # Rows inserted while others are answered: one INSERT and one DELETE; a row deleted
    # in the commit it was inserted in is inserted first, and inserted again after.
    def insert(n: int) -> Write:
        return Write(outbox, f"'{n}', 'a'", None, f"'{n}'")

    def delete(n: int) -> Write:
        return Write(answered, f"'{n}'", None, f"'{n}'")

    groups = _merged([insert(1), delete(7), insert(2), delete(8), delete(1), insert(3),
                      insert(1)])
    assert [[w.key for w in g] for g in groups] == [
        ["'1'", "'2'"], ["'7'", "'8'", "'1'"], ["'3'", "'1'"]]


USERS = [("alice", "example.org"), ("bob", "example.org")]
RESOURCES = ["phone", "tablet"]
NODES = ["n1", "n2"]
DEVICE_NODES = [node + device_id for node in NODES for device_id in ("d1", "d2")]
_options = st.none() | st.builds(PushOptions, st.booleans(), st.booleans(), st.booleans(),
                                 st.booleans())
_key = st.tuples(st.sampled_from(USERS), st.sampled_from(["push.a", "push.b"]),
                 st.sampled_from(NODES)).map(lambda t: (*t[0], t[1], t[2]))
_operation = st.one_of(
    st.tuples(st.just("enable"), _key, st.sampled_from(RESOURCES)),
    st.tuples(st.just("delete"), _key),
    st.tuples(st.just("disable"), _key, st.booleans()),
    st.tuples(st.just("delete_user"), st.sampled_from(USERS)),
    st.tuples(st.just("options"), st.sampled_from(USERS), _options),
    st.tuples(st.just("count_kept"), st.sampled_from(USERS), st.sampled_from(RESOURCES)),
    st.tuples(st.just("count_read"), _key, st.integers(0, 9)),
    st.tuples(st.just("reset"), st.sampled_from(USERS), st.sampled_from(RESOURCES)),
    st.tuples(st.just("errors"), _key, st.integers(0, 3)),
    st.tuples(st.just("clear_errors"), _key),
    st.tuples(st.just("device"), st.sampled_from(NODES), st.sampled_from(["d1", "d2"]),
              st.text("abc", max_size=3)),
    st.tuples(st.just("remove_device"), st.sampled_from(DEVICE_NODES)),
    st.tuples(st.just("remove_devices"),
              st.lists(st.sampled_from(DEVICE_NODES), min_size=1, max_size=2)),
)


def _apply(store: Store, operation: tuple[Any, ...]) -> None:
    match operation:
        case ("enable", (user, server, push_jid, node), resource):
            store.enable(Registration(user, server, resource, push_jid, node, None))
        case ("delete", key):
            store.delete(key)
        case ("disable", (user, server, push_jid, node), every):
            store.disable((user, server), push_jid, None if every else node)
        case ("delete_user", user):
            store.delete_user(user)
        case ("options", user, options):
            store.set_user_options(user, options)
        case ("count_kept", user, resource):  # as the service does: the objects it was given
            for kept in store.for_session_with_options((*user, resource))[0]:
                kept.message_count += 1
                store.save_counts(kept)
        case ("count_read", key, count):  # an object read by itself, not the one kept
            read = store.get(key)
            if read is not None:
                read.message_count = count
                store.save_counts(read)
        case ("reset", user, resource):
            store.reset_counts((*user, resource))
        case ("errors", key, errors):
            store.set_errors(key, errors, 10.0 * errors)
        case ("clear_errors", key):
            store.clear_errors(key)
        case ("device", node, device_id, token):  # a node is a device's (see DEVICE_NODES)
            store.add_device(RegisteredDevice(node + device_id, "s", "alice@example.org", device_id,
                                    "", "fcm", "app", "push.a", token))
        case ("remove_device", node):
            store.remove_device(node)
        case ("remove_devices", nodes):
            store.remove_devices("alice@example.org", nodes)


def _seen(store: Store) -> list[Any]:
    """Everything the service and app server read, as one store reads it."""
    seen: list[Any] = []
    for user in USERS:
        seen += [store.for_user(user), store.user_options(user)]
        seen += [store.for_session_with_options((*user, r)) for r in RESOURCES]
    return seen + [store.device(node) for node in DEVICE_NODES]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_operation, min_size=1, max_size=25))
def test_what_sqlite_keeps_in_memory_is_what_it_stored(operations: list[Any]) -> None:
    """The one SQLite process reads registrations, options and devices from memory once
    read: after any sequence of changes it reads what a new process reads from disk."""
    _reads_as_a_new_process(operations)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_operation, min_size=1, max_size=25))
def test_what_is_kept_in_memory_is_bounded_and_still_right(operations: list[Any]) -> None:
    """With room for one user and two devices, what is read evicts what was kept."""
    with mock.patch.object(store_module, "USER_MEMORY", 1), \
            mock.patch.object(store_module, "DEVICE_MEMORY", 2):
        _reads_as_a_new_process(operations)


def _reads_as_a_new_process(operations: list[Any]) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = str(Path(folder) / "push.sqlite3")
        store = open_store(path)
        try:
            for operation in operations:
                _seen(store)  # everything read (and kept) before the change
                _apply(store, operation)
                store.commit()
                fresh = open_store(path)
                try:
                    assert _seen(store) == _seen(fresh), operation
                    assert len(store._users) <= store_module.USER_MEMORY
                    assert len(store._devices) <= store_module.DEVICE_MEMORY
                finally:
                    fresh.close()
        finally:
            store.close()


def _enable_many(store: Store, first: int, count: int) -> None:
    """count registrations, one commit each (as many group commits of the port)."""
    for i in range(first, first + count):
        store.enable(Registration(f"u{i}", "example.org", "phone", "push.example.net",
                                  f"n{i}", "<x/>"))
        store.commit()


def _wal_bytes(path: Path) -> int:
    wal = path.with_name(path.name + "-wal")
    return wal.stat().st_size if wal.exists() else 0


def _registrations_in_the_file_alone(path: Path) -> int:
    """What checkpoints copied: the database file read without its WAL."""
    with tempfile.TemporaryDirectory() as folder:
        copy = Path(folder) / "alone.sqlite3"
        shutil.copyfile(path, copy)
        with closing(sqlite3.connect(copy)) as db:
            if not db.execute("SELECT 1 FROM sqlite_master WHERE name='registrations'").fetchall():
                return 0  # not even the schema was copied
            return int(db.execute("SELECT count(*) FROM registrations").fetchone()[0])


@pytest.fixture
def checkpoints_on_request(monkeypatch: pytest.MonkeyPatch) -> None:
    """The checkpoint thread only runs when asked (Checkpointer.soon)."""
    monkeypatch.setattr(checkpoints, "COMMITS", 10**9)
    monkeypatch.setattr(checkpoints, "INTERVAL_S", 3600.0)


@pytest.mark.usefixtures("checkpoints_on_request")
def test_sqlite_commits_leave_the_wal_checkpoints_to_a_thread(tmp_path: Path) -> None:
    """A commit that copied the WAL into the database stalled the event loop for 15-30 ms:
    commits no longer do, the checkpoint thread does, and the writer's next commit copies
    what was written meanwhile."""
    path = tmp_path / "push.sqlite3"
    store = open_store(str(path))
    _enable_many(store, 0, 3000)
    # SQLite alone would have copied the WAL, and started it again, at 1,000 pages.
    assert _wal_bytes(path) > 2000 * 4096
    assert _registrations_in_the_file_alone(path) < 3000
    checkpointer = store._checkpoints
    assert checkpointer is not None
    checkpointer.soon()
    assert checkpointer.wait_for("background_turns", 1, timeout=60)
    assert _registrations_in_the_file_alone(path) == 3000
    assert checkpointer.tails == 0
    _enable_many(store, 3000, 3)  # the first commit copies the tail, itself included
    assert checkpointer.tails == 1
    assert _registrations_in_the_file_alone(path) == 3001
    thread = checkpointer._thread
    store.close()
    assert not thread.is_alive()
    assert not path.with_name(path.name + "-wal").exists()  # all copied at the close
    assert _registrations_in_the_file_alone(path) == 3003


@pytest.mark.usefixtures("checkpoints_on_request")
def test_sqlite_wal_stays_bounded_under_steady_writes(tmp_path: Path) -> None:
    """Background checkpoints race the writer, so they alone seldom let the WAL start
    again (it grew by 240 MB in 15 s): after the tail it does, and its file keeps the
    size of one turn's writes however many turns go by. Here a reader holds each
    background turn back from the last writes, as the writer going on would."""
    path = tmp_path / "push.sqlite3"
    store = open_store(str(path))
    checkpointer = store._checkpoints
    assert checkpointer is not None
    sizes = []
    with closing(sqlite3.connect(path, isolation_level=None)) as reader:
        for turn in range(1, 7):
            _enable_many(store, turn * 1000, 300)  # from the second turn on, the tail first
            reader.execute("BEGIN")
            reader.execute("SELECT count(*) FROM registrations").fetchone()
            _enable_many(store, turn * 1000 + 300, 5)  # after what the turn can copy
            sizes.append(_wal_bytes(path))
            checkpointer.soon()
            assert checkpointer.wait_for("background_turns", turn, timeout=60)
            reader.execute("ROLLBACK")
    assert max(sizes) < sizes[0] * 1.5, sizes  # one turn's worth, 6 turns written
    assert checkpointer.tails == 5
    store.close()
    again = open_store(str(path))
    assert len(list(again._select("1=1", ()))) == 6 * 305
    again.close()
