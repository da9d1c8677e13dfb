"""A fake APNs for benchmarks: raw h2 on asyncio (no ASGI server), TLS with the loopback
test CA, in a process of its own, so that what it costs is not on the measured process and
is small enough not to be the limit.

It checks what APNs checks (tests.fake_providers.apns_check: the ES256 provider token, the
topic, the push type, the payload size), memoized on the headers that check looks at, so
the reused token is verified once and not once per request. It answers 200 with an
``apns-id``, or APNs' error answer. Every request gives one line on stdout,
``<arrival> <message number or -> <status>`` (arrival: time.monotonic(), one clock for the
machine's processes; the number: the payload's ``last-message-body`` if it is a number),
written once per batch of received data. When stdin closes it prints
``end <requests> <cpu seconds>`` and, on stderr, its CPU per request.

    python -m bench.fake_apns PORT TLS_DIR KEY_FILE TEAM_ID KEY_ID TOPIC
"""

from __future__ import annotations

import asyncio
import json
import re
import resource
import ssl
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.settings

from tests.fake_providers import Received

Verdict = tuple[int, dict[str, Any]] | None
_MARKER = re.compile(rb'"last-message-body":"(\d+)"')
_CHECKED = ("authorization", "apns-push-type", "apns-topic", "apns-priority")


class Counts:
    def __init__(self) -> None:
        self.requests = 0


class _Apns(asyncio.Protocol):
    """One client connection: h2 events in, answers out with one write per read."""

    def __init__(self, check: Callable[[Received], Verdict], counts: Counts,
                 verdicts: dict[tuple[str, ...], Verdict]) -> None:
        self._check = check
        self._counts = counts
        self._verdicts = verdicts
        self._h2 = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=False, header_encoding="utf-8", validate_outbound_headers=False,
            normalize_outbound_headers=False, validate_inbound_headers=False))
        self._transport: asyncio.Transport | None = None
        self._streams: dict[int, tuple[dict[str, str], bytearray]] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._h2.local_settings.max_concurrent_streams = 1000  # as APNs advertises
        self._h2.initiate_connection()
        transport.write(self._h2.data_to_send())

    def data_received(self, data: bytes) -> None:
        lines: list[str] = []
        for event in self._h2.receive_data(data):
            if isinstance(event, h2.events.RequestReceived):
                self._streams[event.stream_id] = (
                    {str(k): str(v) for k, v in event.headers}, bytearray())
            elif isinstance(event, h2.events.DataReceived):
                self._h2.acknowledge_received_data(event.flow_controlled_length,
                                                   event.stream_id)
                stream = self._streams.get(event.stream_id)
                if stream is not None:
                    stream[1].extend(event.data)
            elif isinstance(event, h2.events.StreamEnded):
                stream = self._streams.pop(event.stream_id, None)
                if stream is not None:
                    lines.append(self._answer(event.stream_id, *stream))
            elif isinstance(event, h2.events.ConnectionTerminated):
                if self._transport is not None:
                    self._transport.close()
        out = self._h2.data_to_send()
        if out and self._transport is not None:
            self._transport.write(out)
        if lines:
            self._counts.requests += len(lines)
            sys.stdout.write("".join(lines))
            sys.stdout.flush()

    def _answer(self, stream_id: int, headers: dict[str, str], body: bytearray) -> str:
        arrived = time.monotonic()
        memo = tuple(headers.get(name, "") for name in _CHECKED)
        if memo not in self._verdicts:
            self._verdicts[memo] = self._check(Received(
                headers.get(":method", ""), headers.get(":path", ""), headers, bytes(body), "2"))
        verdict = self._verdicts[memo]
        path = headers.get(":path", "")
        if verdict is None and not path.startswith("/3/device/"):
            verdict = (404, {"reason": "BadPath"})
        elif verdict is None and len(body) > (5120 if memo[1] == "voip" else 4096):
            verdict = (413, {"reason": "PayloadTooLarge"})
        status = 200 if verdict is None else verdict[0]
        answer = [(":status", str(status)), ("apns-id", str(uuid.uuid4()))]
        if verdict is None:
            self._h2.send_headers(stream_id, answer, end_stream=True)
        else:
            payload = json.dumps(verdict[1]).encode()
            self._h2.send_headers(stream_id, [*answer, ("content-type", "application/json")])
            self._h2.send_data(stream_id, payload, end_stream=True)
        found = _MARKER.search(body)
        marker = found.group(1).decode() if found else "-"
        return f"{arrived:.6f} {marker} {status}\n"


async def serve(port: int, tls: Path, check: Callable[[Received], Verdict]) -> None:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tls / "server.pem", tls / "server.key")
    context.set_alpn_protocols(["h2"])
    counts = Counts()
    verdicts: dict[tuple[str, ...], Verdict] = {}
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Apns(check, counts, verdicts), "127.0.0.1",
                                      port, ssl=context)
    print("listening", flush=True)
    closed = loop.create_future()
    loop.add_reader(sys.stdin.fileno(), lambda: closed.done() or (
        not sys.stdin.buffer.read1(65536) and closed.set_result(None)))
    await closed
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu = usage.ru_utime + usage.ru_stime
    print(f"end {counts.requests} {cpu:.3f}", flush=True)
    print(f"fake APNs (raw h2, own process): {counts.requests} requests, CPU "
          f"{cpu * 1000 / max(counts.requests, 1):.3f} ms per request (start-up included)",
          file=sys.stderr, flush=True)
    server.close()


def main() -> None:
    port, tls, key_file, team_id, key_id, topic = sys.argv[1:7]
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    from tests.fake_providers import apns_check
    key = load_pem_private_key(Path(key_file).read_bytes(), password=None)
    check = apns_check(key.public_key(), team_id, key_id, topic)
    uuid.uuid4()  # warm
    asyncio.run(serve(int(port), Path(tls), check))


if __name__ == "__main__":
    main()
