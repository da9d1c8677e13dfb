"""The port loop's group commit: frames in, one commit, then actions and one acknowledgement."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from pymod_push.etf import Atom
from pymod_push.port import GROUP_COMMIT_S
from tests.test_hostile_input import PortUnderTest, batch, hello


def opened(user: bytes) -> tuple[object, ...]:
    return (Atom("session_opened"), (user, b"example.org", b"pc"))


def acks(port: PortUnderTest) -> list[int]:
    return [a[1] for a in port.actions() if a[0] == "ack"]


async def until(condition: Callable[[], bool], timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(GROUP_COMMIT_S / 4)


def test_frames_close_together_share_one_commit_and_one_acknowledgement() -> None:
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
