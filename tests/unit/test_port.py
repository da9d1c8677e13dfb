"""The port loop's group commit: frames in, one commit, then actions and one acknowledgement."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

import pymod_push.port.commit
from pymod_push import etf
from pymod_push.etf import Atom
from pymod_push.protocol import PROTOCOL_VERSION
from pymod_push.store import open_store
from tests.port_harness import PortUnderTest, acks, batch, hello, until


def opened(user: bytes) -> tuple[object, ...]:
    return (Atom("session_opened"), (user, b"example.org", b"pc"))


def test_frames_close_together_share_one_commit_and_one_acknowledgement(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # A wider window than GROUP_COMMIT_S's few ms: a slow moment of the machine between
    # two frames cannot split them here.
    monkeypatch.setattr(pymod_push.port.commit, "GROUP_COMMIT_S", 0.5)

    async def main() -> None:
        port = PortUnderTest()
        try:
            port.app.on_frames([hello()])
            port.app.on_frames([batch(1, opened(b"a"))])
            assert acks(port) == [1]  # after a quiet moment: committed and answered at once
            commits = 0
            store = port.app._store
            assert store is not None
            commit = store.commit

            def counting_commit() -> None:
                nonlocal commits
                commits += 1
                commit()
            store.commit = counting_commit  # type: ignore[method-assign]
            port.app.on_frames([batch(2, opened(b"b"))])
            port.app.on_frames([batch(3, opened(b"c"))])
            assert acks(port) == [1]  # within GROUP_COMMIT_S of the last commit: waiting
            await until(lambda: acks(port) == [1, 3])
            assert commits == 1
            assert store.last_batch("e@h", "example.org") == (1, 3)
        finally:
            await port.app.aclose()

    asyncio.run(main())


def pg_hello(url: str) -> bytes:
    return etf.encode((Atom("hello"), PROTOCOL_VERSION, b"example.org",
                       {Atom("db_url"): url.encode(), Atom("node"): Atom("e@h")}))


def loglevel() -> tuple[object, ...]:
    """An event that reads nothing: its batch only writes (the last batch handled)."""
    return (Atom("loglevel"), Atom("info"))


def test_postgresql_the_next_events_are_handled_while_a_commit_is_under_way(
        postgres: Any) -> None:
    url = postgres.new_database()

    async def main() -> None:
        port = PortUnderTest()
        try:
            port.app.on_frames([pg_hello(url)])
            port.app.on_frames([batch(1, opened(b"a"))])
            assert port.app.commits.committing  # its commit is under way...
            port.app.on_frames([batch(2, loglevel())])  # ...and the next batch handled
            assert acks(port) == []  # nothing said before its commit is through
            await until(lambda: acks(port) == [1, 2])
        finally:
            await port.app.aclose()
        again = open_store("", url)
        try:
            assert again.last_batch("e@h", "example.org") == (1, 2)
        finally:
            again.close()

    asyncio.run(main())


def test_postgresql_a_commit_that_fails_under_way_loses_nothing(postgres: Any) -> None:
    """The database goes away with a commit under way: nothing is acknowledged, what
    comes meanwhile is held, and all of it is committed and said once it is back."""
    url = postgres.new_database()

    async def main() -> None:
        port = PortUnderTest()
        try:
            port.app.on_frames([pg_hello(url)])
            port.app.on_frames([batch(1, loglevel())])
            await until(lambda: acks(port) == [1])
            await asyncio.to_thread(postgres.halt)
            try:
                port.app.on_frames([batch(2, loglevel())])  # its commit fails
                await until(lambda: port.app.commits.held is not None)
                port.app.on_frames([batch(3, loglevel())])  # held
                assert acks(port) == [1]
            finally:
                await asyncio.to_thread(postgres.start)
            await until(lambda: acks(port)[-1:] == [3], timeout=30)
            assert acks(port) in ([1, 2, 3], [1, 3])  # in order, each batch once at most
        finally:
            await port.app.aclose()
        again = open_store("", url)
        try:
            assert again.last_batch("e@h", "example.org") == (1, 3)
        finally:
            again.close()

    asyncio.run(main())
