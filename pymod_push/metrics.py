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
    pymod_push_build_info{version}                   1, with the package's version
    pymod_push_python_restarts_total                 the shim's: Python processes restarted
    pymod_push_shim_held_events_total, _dropped_events_total   the shim's queue
    pymod_push_apns_certificate_expiry_seconds{app_name,pubsub_host}   certificate auth
    pymod_push_app_server_registrations_without_device   registrations at the built-in
                                                     app server whose node is no device

The shim's counters (restarts, held, dropped) count since the module started on the host,
not since this Python process did: the shim sends them (protocol.ShimCounters), so they
stay monotonic across restarts of Python.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC

from cryptography import x509

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
    version: str = ""  # pymod_push's (build_info)
    # the shim's counters, {"restarts", "held", "dropped"}; None until it sent them (the
    # series are left out rather than shown as 0, which would read as a counter reset)
    shim: dict[str, int] | None = None
    # APNs certificate auth: (app_name, pubsub_host) -> the certificate's notAfter (epoch s)
    certificates: dict[tuple[str, str], float] = field(default_factory=dict)
    # registrations at the built-in app server's pubsub hosts whose node is no device there
    without_device: int | None = None
    # UnifiedPush, None when the feature is off: POST answers by HTTP status, deliveries,
    # pushes dropped by reason (the gauges are totals' up_endpoints and up_kept)
    unified_push: UnifiedPushCounts | None = None


@dataclass
class UnifiedPushCounts:
    posts: dict[int, int]
    deliveries: int
    dropped: dict[str, int]


_not_after: dict[str, tuple[int, float | None]] = {}  # path -> (mtime_ns, notAfter)


def certificate_not_after(path: str) -> float | None:
    """The notAfter (epoch seconds) of the first certificate in a PEM file, read again only
    when the file changes; None (and a warning, once per change) if it cannot be read."""
    try:
        mtime = os.stat(path).st_mtime_ns
    except OSError as exc:
        mtime = -1
        error: str | None = exc.strerror or type(exc).__name__
    else:
        error = None
    cached = _not_after.get(path)
    if cached is not None and cached[0] == mtime:
        return cached[1]
    value: float | None = None
    if error is None:
        try:
            with open(path, "rb") as handle:
                certificate = x509.load_pem_x509_certificate(handle.read())
            after = getattr(certificate, "not_valid_after_utc", None)
            if after is None:  # cryptography < 42: a naive datetime in UTC
                after = certificate.not_valid_after.replace(tzinfo=UTC)
            value = float(after.timestamp())
        except (OSError, ValueError) as exc:
            error = type(exc).__name__
    if error is not None:
        log.warning("metrics: cannot read the certificate's expiry in %s: %s", path, error)
    _not_after[path] = (mtime, value)
    return value


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
    lines += _about(snapshot, host)
    lines += _unified_push(snapshot, host)
    return "\n".join(lines) + "\n"


def _unified_push(snapshot: Snapshot, host: str) -> list[str]:
    counts = snapshot.unified_push
    if counts is None:
        return []
    lines = ["# HELP pymod_push_unifiedpush_endpoints UnifiedPush endpoints.",
             "# TYPE pymod_push_unifiedpush_endpoints gauge",
             f"pymod_push_unifiedpush_endpoints{{{host}}} "
             f"{snapshot.totals.get('up_endpoints', 0)}",
             "# HELP pymod_push_unifiedpush_kept UnifiedPush pushes held (kept, in flight).",
             "# TYPE pymod_push_unifiedpush_kept gauge",
             f"pymod_push_unifiedpush_kept{{{host}}} {snapshot.totals.get('up_kept', 0)}",
             "# HELP pymod_push_unifiedpush_posts_total UnifiedPush POSTs, by answer code.",
             "# TYPE pymod_push_unifiedpush_posts_total counter"]
    lines += [f'pymod_push_unifiedpush_posts_total{{{host},code="{code}"}} {n}'
              for code, n in sorted(counts.posts.items())]
    lines += ["# HELP pymod_push_unifiedpush_deliveries_total UnifiedPush pushes the client "
              "took.", "# TYPE pymod_push_unifiedpush_deliveries_total counter",
              f"pymod_push_unifiedpush_deliveries_total{{{host}}} {counts.deliveries}",
              "# HELP pymod_push_unifiedpush_dropped_total UnifiedPush pushes dropped, by "
              "reason.", "# TYPE pymod_push_unifiedpush_dropped_total counter"]
    lines += [f'pymod_push_unifiedpush_dropped_total{{{host},reason="{_label(reason)}"}} {n}'
              for reason, n in sorted(counts.dropped.items())]
    return lines


def _about(snapshot: Snapshot, host: str) -> list[str]:
    """The process, the shim's queue, the APNs certificates, the app server's orphans."""
    lines = ["# HELP pymod_push_build_info The running pymod_push's version (always 1).",
             "# TYPE pymod_push_build_info gauge",
             f'pymod_push_build_info{{{host},version="{_label(snapshot.version)}"}} 1']
    if snapshot.shim is not None:
        for key, name, help_text in (
                ("restarts", "python_restarts_total", "Python processes restarted by the shim"),
                ("held", "shim_held_events_total", "Events the shim held while Python was "
                 "down or behind"),
                ("dropped", "shim_dropped_events_total", "Events the shim dropped, its queue "
                 "full")):
            lines += [f"# HELP pymod_push_{name} {help_text}, since the module started.",
                      f"# TYPE pymod_push_{name} counter",
                      f"pymod_push_{name}{{{host}}} {snapshot.shim.get(key, 0)}"]
    if snapshot.certificates:
        now = time.time()
        lines += ["# HELP pymod_push_apns_certificate_expiry_seconds Seconds until the APNs "
                  "client certificate expires (negative: expired).",
                  "# TYPE pymod_push_apns_certificate_expiry_seconds gauge"]
        lines += [f'pymod_push_apns_certificate_expiry_seconds{{{host},app_name="{_label(app)}",'
                  f'pubsub_host="{_label(pubsub)}"}} {round(not_after - now, 3)}'
                  for (app, pubsub), not_after in sorted(snapshot.certificates.items())]
    if snapshot.without_device is not None:
        lines += ["# HELP pymod_push_app_server_registrations_without_device XEP-0357 "
                  "registrations at the built-in app server whose node is no device.",
                  "# TYPE pymod_push_app_server_registrations_without_device gauge",
                  f"pymod_push_app_server_registrations_without_device{{{host}}} "
                  f"{snapshot.without_device}"]
    return lines


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
