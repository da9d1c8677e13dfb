"""Prometheus metrics (option `metrics_listen`, off by default): a text exposition at
GET /metrics on the address given, served by the Python process of each host.

    pymod_push_events_total{type}                    events from ejabberd, by kind
    pymod_push_publishes_total{outcome}              publishes to app servers (XEP-0357)
    pymod_push_in_process_publishes_total            of those, to its own app server, in-process
    pymod_push_provider_pushes_total{provider,outcome}   built-in app server's pushes
    pymod_push_provider_latency_seconds{provider}    histogram of provider HTTP/2 requests
    pymod_push_registrations, _devices, _outbox, _provider_queue   gauges from the database
    pymod_push_database_round_trips_total            round trips to PostgreSQL (db_url)
    pymod_push_database_commit_seconds               histogram of commits, start to answer
"""

from __future__ import annotations

import asyncio
import bisect
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger("pymod_push")

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# A commit is a local WAL write (SQLite) or a round trip (PostgreSQL): finer at the low end.
COMMIT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


@dataclass
class Histogram:
    buckets: tuple[float, ...] = LATENCY_BUCKETS
    counts: list[int] = field(default_factory=list)  # per bucket, then above the last
    total: float = 0.0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.buckets) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value

    def lines(self, name: str, labels: str) -> list[str]:
        out, running = [], 0
        for bound, count in zip((*self.buckets, float("inf")), self.counts, strict=True):
            running += count
            le = "+Inf" if bound == float("inf") else repr(bound)
            out.append(f'{name}_bucket{{{labels},le="{le}"}} {running}')
        out.append(f"{name}_sum{{{labels}}} {self.total}")
        out.append(f"{name}_count{{{labels}}} {running}")
        return out


@dataclass
class Snapshot:
    """Everything the exposition shows, gathered by the port edge when asked."""

    host: str
    events: Counter[str]
    publishes: Counter[str]
    provider_pushes: Counter[tuple[str, str]]
    provider_latency: dict[str, Histogram]
    totals: dict[str, int]
    in_process: int = 0  # publishes to its own app server taken without the round trip
    commits: Histogram | None = None  # the database's commits, start to answer


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render(snapshot: Snapshot) -> str:
    host = f'host="{_label(snapshot.host)}"'
    lines = ["# HELP pymod_push_events_total Events from ejabberd, by kind.",
             "# TYPE pymod_push_events_total counter"]
    lines += [f'pymod_push_events_total{{{host},type="{_label(kind)}"}} {n}'
              for kind, n in sorted(snapshot.events.items())]
    lines += ["# HELP pymod_push_publishes_total Publishes to XEP-0357 app servers, by outcome.",
              "# TYPE pymod_push_publishes_total counter"]
    lines += [f'pymod_push_publishes_total{{{host},outcome="{_label(outcome)}"}} {n}'
              for outcome, n in sorted(snapshot.publishes.items())]
    lines += ["# HELP pymod_push_in_process_publishes_total Publishes to this module's own "
              "app server taken in-process (no round trip through ejabberd).",
              "# TYPE pymod_push_in_process_publishes_total counter",
              f"pymod_push_in_process_publishes_total{{{host}}} {snapshot.in_process}"]
    lines += ["# HELP pymod_push_provider_pushes_total Pushes of the built-in app server, by "
              "provider and outcome.", "# TYPE pymod_push_provider_pushes_total counter"]
    lines += [f'pymod_push_provider_pushes_total{{{host},provider="{_label(p)}",'
              f'outcome="{_label(o)}"}} {n}'
              for (p, o), n in sorted(snapshot.provider_pushes.items())]
    lines += ["# HELP pymod_push_provider_latency_seconds Provider request latency.",
              "# TYPE pymod_push_provider_latency_seconds histogram"]
    for provider, histogram in sorted(snapshot.provider_latency.items()):
        lines += histogram.lines("pymod_push_provider_latency_seconds",
                                 f'{host},provider="{_label(provider)}"')
    gauges = {"registrations": "XEP-0357 registrations", "devices": "app-server devices",
              "outbox": "notifications awaiting an app server's answer",
              "provider_queue": "pushes deferred by providers"}
    for name, help_text in gauges.items():
        lines += [f"# HELP pymod_push_{name} {help_text.capitalize()}.",
                  f"# TYPE pymod_push_{name} gauge",
                  f"pymod_push_{name}{{{host}}} {snapshot.totals.get(name, 0)}"]
    if "database_round_trips" in snapshot.totals:  # PostgreSQL
        lines += ["# HELP pymod_push_database_round_trips_total Round trips to PostgreSQL.",
                  "# TYPE pymod_push_database_round_trips_total counter",
                  f"pymod_push_database_round_trips_total{{{host}}} "
                  f"{snapshot.totals['database_round_trips']}"]
    if snapshot.commits is not None:
        lines += ["# HELP pymod_push_database_commit_seconds Database commits, from start to "
                  "answer.", "# TYPE pymod_push_database_commit_seconds histogram",
                  *snapshot.commits.lines("pymod_push_database_commit_seconds", host)]
    return "\n".join(lines) + "\n"


async def serve_metrics(address: str, snapshot: Callable[[], Snapshot]) -> asyncio.Server | None:
    """Serve GET /metrics at host:port; None (and an error logged) if that fails."""
    host, _, port = address.rpartition(":")
    try:
        server = await asyncio.start_server(
            lambda r, w: _answer(r, w, snapshot), host.strip("[]") or "127.0.0.1", int(port))
    except (OSError, ValueError) as exc:
        log.error("metrics: cannot listen on %s: %s", address, exc)
        return None
    log.info("metrics at http://%s/metrics", address)
    return server


async def _answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                  snapshot: Callable[[], Snapshot]) -> None:
    try:
        request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        method, path = (request.split(b" ", 2) + [b"", b""])[:2]
        if method == b"GET" and path.split(b"?")[0] == b"/metrics":
            body, status = render(snapshot()).encode(), b"200 OK"
            kind = b"text/plain; version=0.0.4; charset=utf-8"
        else:
            body, status, kind = b"not found\n", b"404 Not Found", b"text/plain"
        writer.write(b"HTTP/1.1 " + status + b"\r\nContent-Type: " + kind +
                     b"\r\nContent-Length: " + str(len(body)).encode() +
                     b"\r\nConnection: close\r\n\r\n" + body)
        await writer.drain()
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
        pass
    finally:
        writer.close()
