"""What pending sessions cost the Python process in memory: ``python -m pymod_push`` started
as ejabberd starts it (pipes, {packet,4}, no ejabberd), fed the events ejabberd would send,
every publish answered (as an app server would). Measured: the process's anonymous
resident memory (RssAnon in /proc/PID/status), which is what grows with what it keeps.

1. Per pending session: --measured-sessions enable push and go pending, then get 150
   messages each, then more up to 5,000 each, as fast as the process takes them; printed:
   RssAnon's growth per session after each (with 150 and with 5,000 messages remembered).
2. Over time: a fresh process, --sessions pending sessions, --rate pushes a second for
   --minutes, round-robin; printed: RssAnon every minute, its growth from the start, and
   the bound that the remembered messages have (sessions x max_ack_queue x 12.8 bytes).

    python -m bench.pending_memory [--sessions 1000] [--rate 1000] [--minutes 30]
                                   [--measured-sessions 200] [--max-ack-queue 5000]
"""

from __future__ import annotations

import argparse
import queue
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

from bench.port_events import BATCH, PortProcess, enable_all, session, stanza_event
from pymod_push.etf import Atom as A

MB = 1024 * 1024
IN_FLIGHT = 16 * BATCH  # events sent ahead of the publishes read back
STEPS = (150, 5000)  # messages per session at which phase 1 measures
MARK_BYTES = 12.8  # a remembered message beyond 256 in a session (service.PushedTo)


def rss_anon(port: PortProcess) -> int:
    """The port process's anonymous resident memory, in bytes."""
    with open(f"/proc/{port.proc.pid}/status") as status:
        for line in status:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/PID/status")


def start(db_dir: str, max_ack_queue: int) -> PortProcess:
    # resume_timeout 72 h (PortProcess): nothing is forgotten within a run
    return PortProcess(db_dir, options={A("max_ack_queue"): max_ack_queue})


def go_pending(port: PortProcess, sessions: int) -> None:
    """Push enabled, then the sessions pending (nothing queued), as ejabberd tells it; one
    more session has push for settle's messages."""
    enable_all(port, sessions + 1)
    for first in range(0, sessions, BATCH):
        port.send_events([(A("session_pending"), session(i), [])
                          for i in range(first, min(first + BATCH, sessions))])
    settle(port, sessions)


def answer(port: PortProcess, actions: list[Any]) -> int:
    """Each publish answered with a result; how many there were."""
    publishes = [a for a in actions if a[0] == "publish"]
    if publishes:
        port.send_events([(A("iq_reply"), a[1], A("result")) for a in publishes])
    return len(publishes)


def settle(port: PortProcess, sessions: int) -> None:
    """Until every event sent so far is handled: a message to the session after the
    measured ones (go_pending), whose publish comes after all others (a port handles its
    events in order); its answer is handled with the next event."""
    port.send_events([stanza_event(sessions, -port.seq)])  # a new message each time
    node = f"node-{sessions}".encode()
    while True:
        actions = port.read_actions()
        answer(port, actions)
        if any(a[0] == "publish" and a[3] == node for a in actions):
            return


def messages(sessions: int, first: int, last: int, start_n: int) -> Iterator[Any]:
    """Messages first..last-1 (per session), round-robin over the sessions."""
    n = start_n
    for _ in range(first, last):
        for i in range(sessions):
            yield stanza_event(i, n)
            n += 1


def push_all(port: PortProcess, sessions: int, events: Iterator[Any], count: int) -> None:
    """count message events as fast as the process takes them, every publish answered."""
    sent = received = 0
    while received < count:
        while sent < count and sent - received < IN_FLIGHT:
            batch = [next(events) for _ in range(min(BATCH, count - sent))]
            port.send_events(batch)
            sent += len(batch)
        received += answer(port, port.read_actions())
    settle(port, sessions)


def per_session(sessions: int, max_ack_queue: int) -> None:
    with tempfile.TemporaryDirectory() as db_dir:
        port = start(db_dir, max_ack_queue)
        try:
            go_pending(port, sessions)
            base = rss_anon(port)
            done, n = 0, 0
            print(f"{sessions} pending sessions (max_ack_queue {max_ack_queue}); RssAnon "
                  f"{base / MB:.1f} MB before any message")
            for step in STEPS:
                count = (step - done) * sessions
                push_all(port, sessions, messages(sessions, done, step, n), count)
                n += count
                done = step
                grown = rss_anon(port) - base
                print(f"  after {step:>5} messages each: RssAnon +{grown / MB:.1f} MB = "
                      f"{grown / sessions / 1024:.1f} KiB per pending session "
                      f"({grown / sessions / min(step, max_ack_queue):.0f} bytes per "
                      "remembered message)")
        finally:
            port.close()


def drain(port: PortProcess) -> int:
    """The actions read so far, their publishes answered; how many publishes."""
    publishes = 0
    while True:
        try:
            actions = port.actions.get_nowait()
        except queue.Empty:
            return publishes
        publishes += answer(port, actions)


def over_time(sessions: int, rate: float, minutes: float, max_ack_queue: int) -> None:
    with tempfile.TemporaryDirectory() as db_dir:
        port = start(db_dir, max_ack_queue)
        try:
            go_pending(port, sessions)
            base = rss_anon(port)
            print(f"{sessions} pending sessions, {rate:,.0f} pushes/s for {minutes:g} min "
                  f"(max_ack_queue {max_ack_queue}): RssAnon {base / MB:.1f} MB at the start")
            events = messages(sessions, 0, sys.maxsize, 10**9)
            tick = max(0.01, BATCH / rate)  # frames of up to BATCH events at this rate
            began = time.monotonic()
            end = began + minutes * 60
            sent = received = 0
            next_report = began + 60
            while (now := time.monotonic()) < end:
                due = int((now - began) * rate) - sent
                while due > 0:
                    batch = [next(events) for _ in range(min(BATCH, due))]
                    port.send_events(batch)
                    sent += len(batch)
                    due -= len(batch)
                received += drain(port)
                if now >= next_report:
                    report(port, base, sessions, sent, received, now - began, max_ack_queue)
                    next_report += 60
                time.sleep(max(0.0, min(tick, end - time.monotonic())))
            settle(port, sessions)
            report(port, base, sessions, sent, sent, time.monotonic() - began, max_ack_queue)
        finally:
            port.close()


def report(port: PortProcess, base: int, sessions: int, sent: int, received: int,
           elapsed: float, max_ack_queue: int) -> None:
    grown = rss_anon(port) - base
    remembered = sessions * min(sent // sessions, max_ack_queue)
    print(f"  {elapsed / 60:5.1f} min: {sent:,} pushed ({received:,} answered), RssAnon "
          f"+{grown / MB:.1f} MB = {grown / sessions / 1024:.1f} KiB per session; "
          f"remembered messages {remembered:,} (at most {sessions * max_ack_queue:,}, "
          f"{sessions * max_ack_queue * MARK_BYTES / MB:.0f} MB of marks)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=1000.0, help="pushes a second")
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--measured-sessions", type=int, default=200,
                        help="sessions of the per-session measure (phase 1)")
    parser.add_argument("--max-ack-queue", type=int, default=5000,
                        help="mod_stream_mgmt's, as the shim tells it")
    args = parser.parse_args()
    per_session(args.measured_sessions, args.max_ack_queue)
    over_time(args.sessions, args.rate, args.minutes, args.max_ack_queue)
    return 0


if __name__ == "__main__":
    sys.exit(main())
