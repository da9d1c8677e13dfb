"""The built-in app server's path through the Python process alone: ``python -m pymod_push``
started as ejabberd starts it (pipes, {packet,4}), fed the events ejabberd would send, and
pushing into the fake APNs (bench/fake_apns.py, its own process). No ejabberd: what is
measured is Python's CPU per push on the app-server path, without the noise of the VM on
the same two cores (appserver_apns measures the whole).

N users register an APNs device with the ad-hoc command (app_server_iq events) and enable
push at the pubsub host with the node and secret answered (bodies on); then M "stanza to a
pending session" events go in frames of up to 64, round-robin, with at most W pushes
awaited at once (pushes, not frames: the fake APNs reports each request). Printed: APNs
requests (must be M), pushes/s and the process's CPU per push, per round, and the median.

    python -m bench.appserver_port [--users 2000] [--messages 40000] [--rounds 3]
                                   [--rate R [--frame N]] [--postgres] [--provider-down]

--rate offers R events a second, in frames of N (default 1: how ejabberd sends them when
its events come one at a time), instead of as many as the process takes. The same pushes
then cost more CPU each: measured on 2026-12-03, 0.22 ms per push at 4,000/s in frames of
one, 0.20 in frames of 16, 0.17 in frames of 64, against 0.11-0.15 at saturation (frames
of 64 back to back). The work is the same (cProfile: 507 and 461 calls per push); what
differs is how often the process and the others on the two cores take turns.

--postgres keeps the state in a PostgreSQL server of its own (tests/postgres.py) instead of
SQLite. --provider-down makes the fake APNs answer every push 503 (APNs cannot serve): each
push is then deferred, written to the provider queue and committed, which is what a
provider outage costs the process.
"""

from __future__ import annotations

import argparse
import functools
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from bench.appserver_apns import (
    KEY_ID,
    NS_COMMANDS,
    PUBSUB_HOST,
    TEAM_ID,
    TOPIC,
    apns_backend,
    fake_apns_files,
)
from bench.port_events import BATCH, PortProcess, session, stanza_event
from bench.versus_builtin import NS_DATA
from devtools.instance import ROOT, free_port
from pymod_push.appserver.server import PUBLISH_BURST
from pymod_push.etf import Atom as A

IN_FLIGHT = 512


class Requests:
    """The fake APNs's requests as it reports them (one line each), counted."""

    def __init__(self, process: subprocess.Popen[bytes]) -> None:
        self.process = process
        self.count = 0
        self.refused = 0
        self.changed = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            if line.startswith(b"end"):
                break
            with self.changed:
                self.count += 1
                self.refused += line.split()[2] != b"200"
                self.changed.notify_all()

    def wait(self, predicate: Callable[[], bool], timeout: float) -> bool:
        with self.changed:
            return self.changed.wait_for(predicate, timeout)


def set_up(port: PortProcess, users: int) -> None:
    """Every user registers a device and enables push with what the app server answered."""
    answered: dict[int, dict[str, str]] = {}
    for start in range(0, users, BATCH):
        chunk = range(start, min(users, start + BATCH))
        port.send_events([(A("app_server_iq"), True, (
            f"<iq type='set' id='c{i}' from='user{i}@localhost/phone' to='localhost'>"
            f"<command xmlns='{NS_COMMANDS}' node='register-push-apns' action='execute'>"
            f"<x xmlns='{NS_DATA}' type='submit'><field var='token'><value>{i:064x}</value>"
            "</field></x></command></iq>").encode()) for i in chunk])
        while len(answered) < chunk.stop:
            for action in port.read_actions():
                if action[0] == "route":
                    xml = action[1].decode()
                    number = re.search(r"id=.c(\d+)", xml)
                    assert number is not None, xml
                    answered[int(number.group(1))] = dict(re.findall(
                        r"<field var=.(\w+).[^>]*><value>([^<]*)</value>", xml))
    for start in range(0, users, BATCH):
        chunk = range(start, min(users, start + BATCH))
        port.send_events([(A("iq"), i, session(i), (session(i)[0], b"localhost", b""), A("set"),
                           b"en", (
            f"<enable xmlns='urn:xmpp:push:0' jid='{PUBSUB_HOST}' node='{answered[i]['node']}'>"
            f"<x xmlns='{NS_DATA}' type='submit'><field var='FORM_TYPE'><value>"
            "urn:xmpp:push:options</value></field><field var='include-message-bodies'><value>1"
            f"</value></field></x><x xmlns='{NS_DATA}' type='submit'><field var='FORM_TYPE'>"
            "<value>http://jabber.org/protocol/pubsub#publish-options</value></field><field "
            f"var='secret'><value>{answered[i]['secret']}</value></field></x></enable>"
        ).encode()) for i in chunk])
        results = 0
        while results < len(chunk):
            results += sum(1 for a in port.read_actions() if a[0] == "iq_result")


def one_round(folder: Path, users: int, messages: int, db_url: str | None = None,
              down: bool = False, rate: float | None = None,
              frame: int = 1) -> tuple[float, float, int, int]:
    """(pushes/s, Python CPU ms per push, APNs requests answered 200, answered otherwise)
    of one fresh process."""
    tls, key_file = fake_apns_files(folder)
    apns_port = free_port()
    fake = subprocess.Popen([sys.executable, "-m", "bench.fake_apns", str(apns_port), str(tls),
                             str(key_file), TEAM_ID, KEY_ID, TOPIC, *(["down"] if down else [])],
                            cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert fake.stdout is not None and fake.stdout.readline().strip() == b"listening"
    requests = Requests(fake)
    backend = {A(k): v.encode() for k, v in apns_backend(tls, key_file, apns_port).items()}
    port = PortProcess(str(folder), db_url, options={A("backends"): [backend]})
    try:
        set_up(port, users)
        # What the process says from now on (acknowledgements) is read and dropped; with
        # no timeout, as the process may stay quiet until the round ends.
        threading.Thread(target=lambda: [port.actions.get() for _ in iter(int, 1)],
                         daemon=True).start()

        def room(sent: int) -> bool:
            return sent - requests.count < IN_FLIGHT

        cpu0, wall0 = port.cpu_seconds(), time.perf_counter()
        sent = 0
        while sent < messages:
            if not requests.wait(functools.partial(room, sent), 60):
                raise TimeoutError(f"{sent - requests.count} pushes unanswered for 60 s")
            count = min(frame if rate else BATCH, messages - sent)
            port.send_events([stanza_event((sent + k) % users, sent + k) for k in range(count)])
            sent += count
            if rate:  # the next frame when it is due
                time.sleep(max(0.0, wall0 + sent / rate - time.perf_counter()))
        requests.wait(lambda: requests.count >= messages, 120)
        wall, cpu = time.perf_counter() - wall0, port.cpu_seconds() - cpu0
    finally:
        port.close()
        assert fake.stdin is not None
        fake.stdin.close()
        fake.wait(30)
    return (messages / wall, cpu * 1000 / messages, requests.count - requests.refused,
            requests.refused)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=2000)
    parser.add_argument("--messages", type=int, default=40_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rate", type=float, help="events offered a second (default: "
                        "as many as the process takes)")
    parser.add_argument("--frame", type=int, default=1, help="events per frame with --rate")
    parser.add_argument("--postgres", action="store_true", help="PostgreSQL, not SQLite")
    parser.add_argument("--provider-down", action="store_true",
                        help="the fake APNs answers every push 503")
    args = parser.parse_args()
    if args.messages > args.users * PUBLISH_BURST:
        parser.error(f"at most {PUBLISH_BURST} messages per user: the app server's rate limit "
                     "would defer the rest")
    print(f"app server path, Python alone ({'PostgreSQL' if args.postgres else 'SQLite'}"
          f"{', APNs down' if args.provider_down else ''}): {args.users} users with an APNs "
          f"device, {args.messages} pushes into the fake APNs, "
          + (f"offered at {args.rate:,.0f}/s in frames of {args.frame}" if args.rate else
             f"as fast as taken, at most {IN_FLIGHT} awaited at once"))
    from tests.postgres import PostgresServer
    server = PostgresServer() if args.postgres else None
    rates, costs = [], []
    try:
        for number in range(1, args.rounds + 1):
            folder = Path(tempfile.mkdtemp(prefix="pymod_push-bench-port-"))
            try:
                rate, cost, delivered, refused = one_round(
                    folder, args.users, args.messages,
                    server.new_database() if server else None, args.provider_down,
                    args.rate, args.frame)
            finally:
                shutil.rmtree(folder, ignore_errors=True)
            rates.append(rate)
            costs.append(cost)
            answered = (f"{refused} APNs requests answered 503 (each push deferred)"
                        if args.provider_down else
                        f"{delivered} APNs requests answered 200 "
                        f"({'exact' if delivered == args.messages else 'MISSING'})")
            print(f"  round {number}: {answered}, {rate:,.0f} pushes/s, "
                  f"Python {cost:.3f} ms CPU per push")
    finally:
        if server is not None:
            server.stop()
    print(f"  median: {statistics.median(rates):,.0f} pushes/s, Python "
          f"{statistics.median(costs):.3f} ms CPU per push (target on this path: 0.15 ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
