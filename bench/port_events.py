"""Port micro-benchmark: realistic event frames through the real ``python -m pymod_push``.

Starts the port program as ejabberd would (pipes, {packet,4}), enables push for
N sessions, then:

1. throughput: streams M "stanza to a pending session" events in frames of up
   to 64 (as the shim batches them), answers every publish the program routes
   with an ``iq_reply`` event, and reports events/s by wall clock and by the
   port process's own CPU time (from /proc), i.e. per core;
2. latency: one event per frame at a steady rate, time from writing the frame
   to reading the publish it causes (p50/p99).

    python -m bench.port_events [--sessions N] [--messages M] [--postgres]

With --postgres the state is in a PostgreSQL server of its own (as tests/postgres.py
starts it, fsync off) instead of SQLite, to see what the database's round trips cost.
"""

from __future__ import annotations

import argparse
import os
import queue
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

from pymod_push import etf
from pymod_push.etf import Atom as A
from pymod_push.protocol import PROTOCOL_VERSION

BATCH = 64
TICKS = os.sysconf("SC_CLK_TCK")


class PortProcess:
    def __init__(self, db_dir: str, db_url: str | None = None,
                 options: dict[Any, Any] | None = None,
                 command: list[str] | None = None) -> None:
        """command: the interpreter's arguments (default: -m pymod_push)."""
        self.proc = subprocess.Popen([sys.executable, *(command or ["-m", "pymod_push"])],
                                     stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, bufsize=0)
        self.buffer = b""
        self.actions: queue.Queue[list[Any]] = queue.Queue()
        self.seq = 0
        self.send(etf.encode((A("hello"), PROTOCOL_VERSION, b"localhost", {
            A("db_file"): f"{db_dir}/bench.sqlite3".encode(), A("resume_timeout"): 259200000,
            A("include_message_bodies"): True, A("include_senders"): True,
            # the port's throughput is measured: its one app server is no third party
            A("publish_rate"): 10**9,
            **({A("db_url"): db_url.encode()} if db_url else {}), **(options or {})})))
        while True:  # skip log frames until the hello reply
            term = self.read_term()
            if isinstance(term, tuple) and term[0] == "hello":
                break
        # Reading in a thread of its own, as ejabberd does, so that neither side
        # blocks on a full pipe.
        threading.Thread(target=self._reader, daemon=True).start()

    def _reader(self) -> None:
        try:
            while True:
                term = self.read_term()
                if isinstance(term, list):
                    self.actions.put(term)
        except EOFError:
            pass

    def send(self, payload: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(struct.pack(">I", len(payload)) + payload)

    def send_events(self, events: list[Any]) -> None:
        self.seq += 1
        self.send(etf.encode((A("events"), 1, self.seq, events)))

    def read_term(self) -> Any:
        assert self.proc.stdout is not None
        while True:
            if len(self.buffer) >= 4:
                (size,) = struct.unpack_from(">I", self.buffer)
                if len(self.buffer) >= 4 + size:
                    payload = self.buffer[4:4 + size]
                    self.buffer = self.buffer[4 + size:]
                    return etf.decode(payload)
            chunk = os.read(self.proc.stdout.fileno(), 1 << 20)
            if not chunk:
                raise EOFError("the port program exited")
            self.buffer += chunk

    def read_actions(self) -> list[Any]:
        """The next list of actions (log frames are skipped)."""
        return self.actions.get(timeout=60)

    def cpu_seconds(self) -> float:
        with open(f"/proc/{self.proc.pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICKS

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(10)


def session(i: int) -> tuple[bytes, bytes, bytes]:
    return (f"user{i}".encode(), b"localhost", b"phone")


def stanza_event(i: int, n: int) -> Any:
    body = f"Message number {n}, with a bit of text as people write it."
    xml = (f"<message xmlns='jabber:client' from='sender@localhost/pc' to='user{i}@localhost' "
           f"type='chat' id='msg-{n}'><body>{body}</body><active xmlns='http://jabber.org/"
           f"protocol/chatstates'/><stanza-id xmlns='urn:xmpp:sid:0' by='user{i}@localhost' "
           f"id='{n}'/></message>")
    return (A("stanza"), session(i), (A("message"), b"sender@localhost/pc", f"msg-{n}".encode(),
                                      A("chat"), body.encode(), xml.encode()))


def enable_all(port: PortProcess, sessions: int) -> None:
    for start in range(0, sessions, BATCH):
        events = []
        for i in range(start, min(start + BATCH, sessions)):
            xml = (f"<enable xmlns='urn:xmpp:push:0' jid='push.example.net' node='node-{i}'>"
                   "<x xmlns='jabber:x:data' type='submit'><field var='FORM_TYPE'><value>"
                   "http://jabber.org/protocol/pubsub#publish-options</value></field>"
                   f"<field var='secret'><value>secret-{i}</value></field></x></enable>")
            events.append((A("iq"), i, session(i), (session(i)[0], b"localhost", b""), A("set"),
                           b"en", xml.encode()))
        port.send_events(events)
        answered = 0
        while answered < len(events):
            answered += sum(1 for a in port.read_actions() if a[0] == "iq_result")


def throughput(port: PortProcess, sessions: int, messages: int) -> tuple[int, float, float]:
    cpu0, wall0 = port.cpu_seconds(), time.perf_counter()
    sent = received = 0
    events = 0
    in_flight_limit = 16 * BATCH
    while received < messages:
        while sent < messages and sent - received < in_flight_limit:
            batch = [stanza_event(n % sessions, n)
                     for n in range(sent, min(sent + BATCH, messages))]
            port.send_events(batch)
            sent += len(batch)
            events += len(batch)
        routes = [a for a in port.read_actions() if a[0] == "publish"]
        received += len(routes)
        if routes:
            port.send_events([(A("iq_reply"), a[1], A("result")) for a in routes])
            events += len(routes)
    # A last event whose publish proves every reply before it was handled too.
    port.send_events([stanza_event(0, messages)])
    while not any(a[0] == "publish" for a in port.read_actions()):
        pass
    return events + 1, time.perf_counter() - wall0, port.cpu_seconds() - cpu0


def latency(port: PortProcess, sessions: int, samples: int, rate: float) -> list[float]:
    timings = []
    interval = 1 / rate
    next_at = time.perf_counter()
    for n in range(samples):
        next_at += interval
        start = time.perf_counter()
        port.send_events([stanza_event(n % sessions, 10_000_000 + n)])
        actions = port.read_actions()
        timings.append(time.perf_counter() - start)
        port.send_events([(A("iq_reply"), a[1], A("result"))
                          for a in actions if a[0] == "publish"])
        time.sleep(max(0.0, next_at - time.perf_counter()))
    return timings


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=1000)
    parser.add_argument("--messages", type=int, default=50_000)
    parser.add_argument("--latency-samples", type=int, default=2000)
    parser.add_argument("--latency-rate", type=float, default=1000.0)
    parser.add_argument("--postgres", action="store_true",
                        help="keep the state in a PostgreSQL server started for the run")
    args = parser.parse_args()
    server = None
    if args.postgres:
        from tests.postgres import PostgresServer
        server = PostgresServer()
    with tempfile.TemporaryDirectory() as db_dir:
        port = PortProcess(db_dir, server.new_database() if server else None)
        try:
            enable_all(port, args.sessions)
            events, wall, cpu = throughput(port, args.sessions, args.messages)
            timings = latency(port, args.sessions, args.latency_samples, args.latency_rate)
        finally:
            port.close()
            if server is not None:
                server.stop()
    quantiles = statistics.quantiles(timings, n=100)
    print(f"port benchmark ({'PostgreSQL' if args.postgres else 'SQLite'}): {args.sessions} "
          f"push sessions, {args.messages} messages (+ one iq_reply event per publish)")
    print(f"  throughput: {events} events in {wall:.2f} s wall = {events / wall:,.0f} events/s; "
          f"port process CPU {cpu:.2f} s = {events / cpu:,.0f} events/s per core "
          f"({cpu / events * 1e6:.1f} us CPU per event)")
    print(f"  latency, one event per frame at {args.latency_rate:.0f}/s: "
          f"p50 {quantiles[49] * 1e6:.0f} us, p99 {quantiles[98] * 1e6:.0f} us "
          f"(frame written -> publish read)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
