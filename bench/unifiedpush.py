"""UnifiedPush through a whole ejabberd: POSTs per second accepted (201) and delivered to an
online client, beside a plain XEP-0357 push's cost on the same machine, in the same run.

One ejabberd with mod_push_py (`unified_push_url` on an `ejabberd_http` listener of its own,
no mod_mam, the per-endpoint rate out of the way). Two phases, alternating in rounds
(--rounds, figures are medians):

- UnifiedPush: --endpoints online distributors (light XMPP clients, one endpoint each, as
  Conversations registers it) answer every <push/> with a result; --connections HTTP/1.1
  keep-alive connections POST --posts bodies of --size bytes round-robin over the
  endpoints, each connection one request at a time (the 201 comes after Python's commit).
  Each body is numbered: every POST must be answered 201 and delivered exactly once.
- XEP-0357: --sessions pending push sessions (push enabled at an app-server client that
  answers every publish) and a sender sending --messages messages round-robin, at most
  --connections of them unpublished at a time (a closed loop like the POSTs'). Every
  message must make exactly one publish.

Per phase: pushes per second (UnifiedPush: accepted, i.e. the last 201, and delivered, the
last <push/> at a distributor; XEP-0357: the last publish at the app server), latency
(POST -> 201, POST -> <push/>; message sent -> publish) p50/p99, and CPU ms per push of the
ejabberd VM and of the Python process (/proc, utime + stime) over the phase.

    python -m bench.unifiedpush [--posts 10000] [--endpoints 50] [--connections 16]
        [--size 256] [--sessions 200] [--messages 10000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import os
import re
import shutil
import statistics
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from bench.groupchat import register_all
from devtools.instance import Instance
from devtools.xmpp_light import Xmpp

TICKS = os.sysconf("SC_CLK_TCK")
HOST = "localhost"
APP = f"app@{HOST}/srv"
NS_UP = "http://gultsch.de/xmpp/drafts/unified-push"
NS_PUSH = "urn:xmpp:push:0"
NS_DATA = "jabber:x:data"
BODIES = ("<x xmlns='jabber:x:data' type='submit'><field var='FORM_TYPE'><value>"
          "urn:xmpp:push:options</value></field><field var='include-message-bodies'>"
          "<value>1</value></field></x>")
TIMEOUT = 120.0


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def percentile(values: list[float], share: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(len(ordered) * share) - 1))]


def up_hash(text: str) -> str:
    return base64.b64encode(hashlib.sha256(text.encode()).digest()).decode()


@dataclass
class Result:
    pushes: int
    per_s: float  # accepted (UnifiedPush) or published (XEP-0357) per second
    delivered_per_s: float  # UnifiedPush: delivered to the distributors
    p50_ms: float
    p99_ms: float
    delivery_p50_ms: float
    beam_ms: float  # CPU per push
    python_ms: float
    statuses: Counter[int] = field(default_factory=Counter)


class Http:
    """One keep-alive HTTP/1.1 connection, one request at a time."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: bytes) -> int:
        for _ in range(2):  # once more on a connection the server had closed
            if self.writer is None:
                self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
            assert self.reader is not None
            self.writer.write(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n"
                              f"TTL: 3600\r\nContent-Type: application/octet-stream\r\n"
                              f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            status_line = await self.reader.readline()
            if not status_line:
                self.close()
                continue
            status = int(status_line.split()[1])
            length, close = 0, False
            while (line := await self.reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.decode("latin-1").partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)
                elif name.strip().lower() == "connection" and "close" in value.lower():
                    close = True
            await self.reader.readexactly(length)
            if close:
                self.close()
            return status
        raise ConnectionError("the server closed the connection twice")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


class Distributor:
    """A light client registering one endpoint, answering every <push/> with a result."""

    def __init__(self, port: int, user: str, arrivals: dict[int, list[float]]) -> None:
        self.client = Xmpp(port, user, "secret", "phone")
        self.user = user
        self.arrivals = arrivals
        self.path = ""

    async def start(self) -> None:
        await self.client.connect()
        answer = await self.client.request(
            f"<iq type='set' id='r' to='{HOST}'><register xmlns='{NS_UP}' "
            f"application='{up_hash(self.user + ':app')}' "
            f"instance='{up_hash(self.user + ':instance')}'/></iq>", "r")
        registered = answer.find(f"{{{NS_UP}}}registered")
        if answer.get("type") != "result" or registered is None:
            raise RuntimeError(f"register refused: {ET.tostring(answer).decode()}")
        self.path = urlsplit(registered.get("endpoint", "")).path
        self.client.on_stanza = self.on_stanza
        self.reader = asyncio.create_task(self.client.run())

    def on_stanza(self, element: ET.Element) -> None:
        if not element.tag.endswith("iq") or element.get("type") != "set":
            return
        push = element.find(f"{{{NS_UP}}}push")
        if push is None:
            return
        payload = base64.b64decode(push.text or "")
        self.arrivals.setdefault(int(payload[:10]), []).append(time.perf_counter())
        self.client.send(f"<iq type='result' id='{element.get('id')}' "
                         f"to='{element.get('from')}'/>")


async def up_phase(instance: Instance, distributors: list[Distributor], posts: int,
                   connections: int, size: int, first: int,
                   arrivals: dict[int, list[float]]) -> Result:
    beam, python = instance.vm_pid(), instance.python_pid()
    assert beam is not None and python is not None
    numbers = iter(range(first, first + posts))
    sent_at: dict[int, float] = {}
    answered_at: dict[int, float] = {}
    statuses: Counter[int] = Counter()
    filler = bytes(range(256)) * (size // 256 + 1)

    async def worker() -> None:
        http = Http(instance.http_port)
        try:
            for n in numbers:
                body = b"%010d" % n + filler[:max(0, size - 10)]
                sent_at[n] = time.perf_counter()
                status = await http.post(distributors[n % len(distributors)].path, body)
                answered_at[n] = time.perf_counter()
                statuses[status] += 1
        finally:
            http.close()

    cpu0 = cpu_seconds(beam), cpu_seconds(python)
    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(connections)))
    accepted_s = max(answered_at.values()) - started
    mine = range(first, first + posts)
    deadline = time.monotonic() + TIMEOUT
    while sum(1 for n in mine if n in arrivals) < statuses[201]:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{sum(1 for n in mine if n in arrivals)} of {statuses[201]} "
                               "accepted POSTs delivered")
        await asyncio.sleep(0.01)
    delivered_s = max(arrivals[n][0] for n in mine if n in arrivals) - started
    cpu1 = cpu_seconds(beam), cpu_seconds(python)
    latencies = [(answered_at[n] - sent_at[n]) * 1000 for n in mine]
    delivery = [(arrivals[n][0] - sent_at[n]) * 1000 for n in mine if n in arrivals]
    return Result(pushes=posts, per_s=statuses[201] / accepted_s,
                  delivered_per_s=statuses[201] / delivered_s,
                  p50_ms=percentile(latencies, 0.5), p99_ms=percentile(latencies, 0.99),
                  delivery_p50_ms=percentile(delivery, 0.5),
                  beam_ms=(cpu1[0] - cpu0[0]) * 1000 / posts,
                  python_ms=(cpu1[1] - cpu0[1]) * 1000 / posts, statuses=statuses)


async def push_session(port: int, i: int) -> None:
    """A pending XEP-0357 session: stream management, push enabled (node n<i>), gone."""
    client = Xmpp(port, f"push{i}", "secret", "phone")
    await client.connect()
    client.send("<enable xmlns='urn:xmpp:sm:3' resume='true'/>")
    await client._until(lambda e: e.tag.endswith("enabled"))
    answer = await client.request(f"<iq type='set' id='e'><enable xmlns='{NS_PUSH}' "
                                  f"jid='{APP}' node='n{i}'>{BODIES}</enable></iq>", "e")
    if answer.get("type") != "result":
        raise RuntimeError(f"push enable refused: {ET.tostring(answer).decode()}")
    client.abort()


async def xep0357_phase(instance: Instance, sender: Xmpp, sessions: int, messages: int,
                        window: int, first: int, published: dict[int, list[float]],
                        arrived: asyncio.Event) -> Result:
    beam, python = instance.vm_pid(), instance.python_pid()
    assert beam is not None and python is not None
    sent_at: dict[int, float] = {}
    mine = range(first, first + messages)

    def done() -> int:
        return sum(1 for n in sent_at if n in published)

    cpu0 = cpu_seconds(beam), cpu_seconds(python)
    started = time.perf_counter()
    deadline = time.monotonic() + TIMEOUT
    for n in mine:
        while len(sent_at) - done() >= window:
            arrived.clear()
            if time.monotonic() > deadline:
                raise TimeoutError(f"{done()} of {len(sent_at)} messages published")
            try:
                await asyncio.wait_for(arrived.wait(), 1)
            except TimeoutError:
                pass
        sent_at[n] = time.perf_counter()
        sender.send(f"<message to='push{n % sessions}@{HOST}/phone' type='chat'>"
                    f"<body>{n}</body></message>")
    while done() < messages:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{done()} of {messages} messages published")
        await asyncio.sleep(0.01)
    elapsed = max(published[n][0] for n in mine) - started
    cpu1 = cpu_seconds(beam), cpu_seconds(python)
    latencies = [(published[n][0] - sent_at[n]) * 1000 for n in mine]
    return Result(pushes=messages, per_s=messages / elapsed, delivered_per_s=messages / elapsed,
                  p50_ms=percentile(latencies, 0.5), p99_ms=percentile(latencies, 0.99),
                  delivery_p50_ms=percentile(latencies, 0.5),
                  beam_ms=(cpu1[0] - cpu0[0]) * 1000 / messages,
                  python_ms=(cpu1[1] - cpu0[1]) * 1000 / messages)


async def run(instance: Instance, args: argparse.Namespace) -> dict[str, list[Result]]:
    port = instance.c2s_port
    up_users = [f"up{i}" for i in range(args.endpoints)]
    await asyncio.to_thread(register_all, instance, [
        "app", "sender", *up_users, *(f"push{i}" for i in range(args.sessions))])
    # The app server of the XEP-0357 side: answers and timestamps every publish.
    app = Xmpp(port, "app", "secret", "srv")
    await app.connect()
    published: dict[int, list[float]] = {}
    arrived = asyncio.Event()

    def on_publish(element: ET.Element) -> None:
        if not element.tag.endswith("iq") or element.get("type") != "set":
            return
        body = next((f.findtext(f"{{{NS_DATA}}}value") for f in element.iter(f"{{{NS_DATA}}}field")
                     if f.get("var") == "last-message-body"), None)
        if body is not None and body.isdigit():
            published.setdefault(int(body), []).append(time.perf_counter())
            arrived.set()
        app.send(f"<iq type='result' id='{element.get('id')}' to='{element.get('from')}'/>")

    app.on_stanza = on_publish
    app_reader = asyncio.create_task(app.run())
    mark = instance.log_mark()
    for start in range(0, args.sessions, 50):
        await asyncio.gather(*(push_session(port, i)
                               for i in range(start, min(start + 50, args.sessions))))
    await asyncio.to_thread(wait_pending, instance, args.sessions, mark)
    sender = Xmpp(port, "sender", "secret", "s")
    await sender.connect()
    arrivals: dict[int, list[float]] = {}
    distributors = [Distributor(port, user, arrivals) for user in up_users]
    for start in range(0, len(distributors), 50):
        await asyncio.gather(*(d.start() for d in distributors[start:start + 50]))

    results: dict[str, list[Result]] = {"UnifiedPush": [], "XEP-0357": []}
    up_first = push_first = 0
    for round_number in range(1, args.rounds + 1):
        up = await up_phase(instance, distributors, args.posts, args.connections, args.size,
                            up_first, arrivals)
        up_first += args.posts
        push = await xep0357_phase(instance, sender, args.sessions, args.messages,
                                   args.connections, push_first, published, arrived)
        push_first += args.messages
        results["UnifiedPush"].append(up)
        results["XEP-0357"].append(push)
        print(f"  round {round_number}: UnifiedPush {up.per_s:,.0f} accepted/s, "
              f"{up.delivered_per_s:,.0f} delivered/s, CPU/push ejabberd {up.beam_ms:.3f} ms "
              f"+ Python {up.python_ms:.3f} ms, answers {dict(up.statuses)}; XEP-0357 "
              f"{push.per_s:,.0f} pushes/s, CPU/push ejabberd {push.beam_ms:.3f} ms + Python "
              f"{push.python_ms:.3f} ms", flush=True)
    await asyncio.sleep(1)  # a duplicate would have arrived by now
    check(arrivals, up_first, "POST", "deliveries")
    check(published, push_first, "message", "publishes")
    app_reader.cancel()
    for distributor in distributors:
        distributor.reader.cancel()
    return results


def check(arrivals: dict[int, list[float]], count: int, what: str, got: str) -> None:
    """Each of the numbered POSTs / messages arrived exactly once."""
    per = Counter(len(arrivals.get(n, [])) for n in range(count))
    if per != Counter({1: count}):
        raise AssertionError(f"{got} per {what}: {dict(per)} (expected exactly 1 each)")


def wait_pending(instance: Instance, count: int, mark: int) -> None:
    """Until ejabberd has logged that many sessions waiting for resumption."""
    pattern = re.compile(r"waiting .* for stream resumption")
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        text = instance.log_file.read_bytes()[mark:].decode(errors="replace")
        if len(pattern.findall(text)) >= count:
            return
        time.sleep(0.2)
    raise TimeoutError(f"fewer than {count} sessions became pending")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--posts", type=int, default=10000, help="POSTs per round")
    parser.add_argument("--endpoints", type=int, default=50, help="online distributors")
    parser.add_argument("--connections", type=int, default=16,
                        help="HTTP connections; also the XEP-0357 side's window")
    parser.add_argument("--size", type=int, default=256, help="bytes per POST body (>= 10)")
    parser.add_argument("--sessions", type=int, default=200, help="pending XEP-0357 sessions")
    parser.add_argument("--messages", type=int, default=10000, help="messages per round")
    parser.add_argument("--rounds", type=int, default=3, help="figures are medians of rounds")
    args = parser.parse_args()
    if not 10 <= args.size <= 4096:
        parser.error("--size must be 10 to 4096 bytes")
    print(f"UnifiedPush: {args.posts} POSTs of {args.size} bytes per round over "
          f"{args.connections} keep-alive connections to {args.endpoints} online "
          f"distributors; XEP-0357: {args.messages} messages per round to {args.sessions} "
          f"pending push sessions (at most {args.connections} unpublished); {args.rounds} "
          "round(s) alternating in one ejabberd; medians")
    folder = Path(tempfile.mkdtemp(prefix="pymod_push-bench-"))
    folder.chmod(0o755)
    # The per-endpoint rate out of the way: the server's throughput is measured, not it.
    instance = Instance(folder, unified_push=True, modules={"mod_mam": None}, options={
        "unified_push_rate": 10_000_000, "unified_push_burst": 10_000_000,
        "resume_timeout": 259200})
    instance.write_config()
    try:
        instance.start()
        results = asyncio.run(run(instance, args))
    finally:
        instance.discard()
        shutil.rmtree(folder, ignore_errors=True)

    def median(name: str, key: str) -> float:
        return float(statistics.median(getattr(r, key) for r in results[name]))

    print(f"{'':24} {'pushes/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'ejabberd ms':>12} "
          f"{'Python ms':>10} {'total ms':>9}   (CPU per push)")
    rows = [("UnifiedPush POST -> 201", "UnifiedPush", "per_s", "p50_ms", "p99_ms"),
            ("UnifiedPush delivered", "UnifiedPush", "delivered_per_s", "delivery_p50_ms", ""),
            ("XEP-0357 push", "XEP-0357", "per_s", "p50_ms", "p99_ms")]
    for label, name, rate, p50, p99 in rows:
        p99_text = f"{median(name, p99):8.1f}" if p99 else f"{'':8}"
        print(f"{label:24} {median(name, rate):9,.0f} {median(name, p50):8.1f} {p99_text} "
              f"{median(name, 'beam_ms'):12.3f} {median(name, 'python_ms'):10.3f} "
              f"{median(name, 'beam_ms') + median(name, 'python_ms'):9.3f}")
    ratio = ((median("UnifiedPush", "beam_ms") + median("UnifiedPush", "python_ms"))
             / max(median("XEP-0357", "beam_ms") + median("XEP-0357", "python_ms"), 1e-9))
    print(f"a UnifiedPush POST (accepted and delivered) costs {ratio:.2f} x a XEP-0357 push "
          "in CPU")


if __name__ == "__main__":
    main()
