"""The port program without ejabberd: frames built as the shim writes them, a PortApp fed
them directly, and what it writes back, decoded."""

from __future__ import annotations

import asyncio
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pymod_push import etf
from pymod_push.etf import Atom
from pymod_push.port.app import PortApp
from pymod_push.port.commit import GROUP_COMMIT_S
from pymod_push.protocol import PROTOCOL_VERSION


def hello(db_file: str | Path = ":memory:", **options: object) -> bytes:
    """The shim's hello: its host, the database file, node e@h, and these module options
    (strings and paths as binaries)."""
    def term(value: object) -> object:
        return str(value).encode() if isinstance(value, str | Path) else value
    return etf.encode((Atom("hello"), PROTOCOL_VERSION, b"example.org", {
        Atom("db_file"): term(db_file), Atom("node"): Atom("e@h"),
        **{Atom(name): term(value) for name, value in options.items()}}))


def batch(seq: int, *events: Any) -> bytes:
    return etf.encode((Atom("events"), 1, seq, list(events)))


class PortUnderTest:
    """A PortApp fed frames directly; what it writes, decoded."""

    def __init__(self) -> None:
        self.written: list[Any] = []
        self.app = PortApp(self._write)

    def _write(self, data: bytes) -> None:
        (size,) = struct.unpack(">I", data[:4])
        assert size == len(data) - 4
        self.written.append(etf.decode(data[4:]))

    def actions(self) -> list[tuple[Any, ...]]:
        """Every action written (log lines and the hello reply left out)."""
        return [a for frame_ in self.written if isinstance(frame_, list) for a in frame_
                if a[0] != "log"]


def acks(port: PortUnderTest) -> list[int]:
    return [a[1] for a in port.actions() if a[0] == "ack"]


async def until(condition: Callable[[], bool], timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(GROUP_COMMIT_S / 4)


def counters(restarts: int = 0, held: int = 0, dropped: int = 0) -> bytes:
    """The shim's counters frame (protocol version 5), outside the batches."""
    return etf.encode((Atom("counters"), {Atom("restarts"): restarts, Atom("held"): held,
                                          Atom("dropped"): dropped}))
