"""Push logic with async functions (option logic, logic_budget): each user's notifications
wait for them in order, other users' do not; what misses the budget gets the default; a
notification waiting for them survives the process."""

from __future__ import annotations

import asyncio
import itertools
import time
from pathlib import Path
from typing import Any

from pymod_push.etf import Atom
from tests.port_harness import PortUnderTest, acks, batch, hello, until

LOGIC = '''
import asyncio

async def should_push(message, recipient, default):
    if recipient.user == "slow":
        await asyncio.sleep(30)  # a service that does not answer
    if "silence" in message.body:
        return False
    return default

async def summary(message, recipient, fields):
    await asyncio.sleep(0.01)  # a quick service
    return {**fields, "checked-by": "logic"}
'''


def session(user: str) -> tuple[bytes, bytes, bytes]:
    return (user.encode(), b"example.org", b"phone")


def enable_event(ref: int, user: str) -> tuple[Any, ...]:
    xml = f"<enable xmlns='urn:xmpp:push:0' jid='push.example.net' node='{user}-node'/>"
    return (Atom("iq"), ref, session(user), (user.encode(), b"example.org", b""), Atom("set"),
            b"en", xml.encode())


def stanza_event(user: str, body: str) -> tuple[Any, ...]:
    xml = (f"<message xmlns='jabber:client' type='chat' from='romeo@example.net/a' "
           f"id='{body}'><body>{body}</body></message>")
    return (Atom("stanza"), session(user), (Atom("message"), b"romeo@example.net/a",
                                            body.encode(), Atom("chat"), body.encode(),
                                            xml.encode()))


def pushes(port: PortUnderTest) -> list[tuple[str, dict[str, str], float]]:
    """(node, summary, when it was written) of each publish, in order."""
    found = []
    for when, frame in port.timed:
        if isinstance(frame, list):
            for action in frame:
                if action[0] == "publish":
                    fields = {var.decode(): values[0].decode() for var, values in action[4]
                              if values}
                    found.append((action[3].decode(), fields, when))
    return found


class TimedPort(PortUnderTest):
    def __init__(self) -> None:
        super().__init__()
        self.timed: list[tuple[float, Any]] = []

    def _write(self, data: bytes) -> None:
        super()._write(data)
        self.timed.append((time.monotonic(), self.written[-1]))


def test_a_slow_hook_holds_only_its_users_notifications_in_order(tmp_path: Path) -> None:
    logic = tmp_path / "mine.py"
    logic.write_text(LOGIC)

    async def main() -> None:
        port = TimedPort()
        try:
            port.app.on_frames([hello(tmp_path / "db.sqlite3", logic=logic, logic_budget=300,
                                     include_message_bodies=True)])
            port.app.on_frames([batch(1, enable_event(1, "slow"), enable_event(2, "fast"))])
            await until(lambda: acks(port) == [1])
            began = time.monotonic()
            port.app.on_frames([batch(2, stanza_event("slow", "s1"), stanza_event("slow", "s2"),
                                      stanza_event("fast", "f1"), stanza_event("fast", "silence"),
                                      stanza_event("slow", "s3"))])
            await until(lambda: len(pushes(port)) == 4, timeout=10)
            found = pushes(port)
            fast = [p for p in found if p[0] == "fast-node"]
            slow = [p for p in found if p[0] == "slow-node"]
            # The fast user's: at once, with the logic's summary; "silence" never pushed.
            assert [p[1]["last-message-body"] for p in fast] == ["f1"]
            assert fast[0][1]["checked-by"] == "logic"
            assert fast[0][2] - began < 0.25
            # The slow user's: each after the budget, with our defaults, in order.
            assert [p[1]["last-message-body"] for p in slow] == ["s1", "s2", "s3"]
            assert [p[1]["message-count"] for p in slow] == ["1", "2", "3"]
            assert all("checked-by" not in p[1] for p in slow)
            assert all(p[2] - began >= 0.3 * n - 0.02 for n, p in enumerate(slow, 1))
            assert all(b[2] - a[2] >= 0.25 for a, b in itertools.pairwise(slow))
            assert 2 in acks(port)
        finally:
            await port.app.aclose()

    asyncio.run(main())


def test_a_notification_waiting_for_the_logic_survives_the_process(tmp_path: Path) -> None:
    logic = tmp_path / "mine.py"
    logic.write_text(LOGIC)

    async def first() -> None:
        port = TimedPort()
        try:
            port.app.on_frames([hello(tmp_path / "db.sqlite3", logic=logic, logic_budget=5000,
                                     include_message_bodies=True)])
            port.app.on_frames([batch(1, enable_event(1, "slow"))])
            port.app.on_frames([batch(2, stanza_event("slow", "kept"))])
            await until(lambda: acks(port)[-1:] == [2])  # acknowledged, still waiting
            assert pushes(port) == []
        finally:
            await port.app.aclose()  # as a crash: the worker is gone

    async def second() -> None:
        port = TimedPort()
        try:
            port.app.on_frames([hello(tmp_path / "db.sqlite3", logic=logic, logic_budget=200,
                                     include_message_bodies=True)])
            await until(lambda: len(pushes(port)) == 1, timeout=10)
            assert pushes(port)[0][1]["last-message-body"] == "kept"
        finally:
            await port.app.aclose()
        port = TimedPort()
        try:  # and once only: the next process's first push is a new message's
            port.app.on_frames([hello(tmp_path / "db.sqlite3", logic=logic, logic_budget=200,
                                     include_message_bodies=True)])
            port.app.on_frames([batch(3, stanza_event("slow", "after"))])
            await until(lambda: len(pushes(port)) == 1, timeout=10)
            assert pushes(port)[0][1]["last-message-body"] == "after"
        finally:
            await port.app.aclose()

    asyncio.run(first())
    asyncio.run(second())
