"""A fake APNs for benchmarks, in a process of its own: HTTP/2 framed by hand on asyncio (no
ASGI server, no h2 state machine), TLS with the loopback test CA. What it costs per request
is printed, and is well below what the measured process spends, so that it is not the
limit of the benchmark (hypercorn cost about 0.3 ms a request on this machine, h2 alone
about as much).

It is a server for the module's client only, not a general one: it takes the preface,
SETTINGS, PING, WINDOW_UPDATE, HEADERS (+ CONTINUATION), DATA, RST_STREAM and GOAWAY frames,
decodes HPACK (tables, integers, literals; Huffman through the hpack package), gives the
client back the connection window its DATA used, and answers each request on its stream:
200 with an ``apns-id``, or APNs' error answer. It checks what APNs checks
(tests.fake_providers.apns_check: the ES256 provider token, the topic, the push type, the
payload size), memoized on the headers that check looks at, so the reused token is verified
once and not once per request.

Every request gives one line on stdout, ``<arrival> <message number or -> <status>``
(arrival: time.monotonic(), one clock for the machine's processes; the number: the
payload's ``last-message-body`` if it is a number), written once per read. When stdin
closes it prints ``end <requests> <cpu seconds>`` and, on stderr, its CPU per request.

    python -m bench.fake_apns PORT TLS_DIR KEY_FILE TEAM_ID KEY_ID TOPIC [down]

With ``down`` it answers every valid request as APNs does when it cannot serve: 503
ServiceUnavailable (the client defers the push and tries again later).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import resource
import ssl
import struct
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hpack.huffman_table import decode_huffman
from hpack.table import HeaderTable

from tests.fake_providers import Received

Verdict = tuple[int, dict[str, Any]] | None
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = (
    0, 1, 3, 4, 6, 7, 8, 9)
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY = 0x1, 0x1, 0x4, 0x8, 0x20
_MARKER = re.compile(rb'"last-message-body":"(\d+)"')
_CHECKED = (b"authorization", b"apns-push-type", b"apns-topic", b"apns-priority")
_STATIC: tuple[tuple[bytes, bytes], ...] = HeaderTable.STATIC_TABLE


def integer(value: int, prefix_bits: int, flags: int = 0) -> bytes:
    """RFC 7541 5.1."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((flags | value,))
    out = bytearray((flags | limit,))
    value -= limit
    while value >= 128:
        out.append((value & 127) | 128)
        value >>= 7
    out.append(value)
    return bytes(out)


def string(data: bytes) -> bytes:
    """RFC 7541 5.2, without Huffman coding."""
    return integer(len(data), 7) + data


_STATUS = {pair[1]: integer(index, 7, 0x80) for index, pair in enumerate(_STATIC, 1)
           if pair[0] == b":status"}


def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes((kind, flags)) + \
        struct.pack(">I", stream_id) + payload


class HpackDecoder:
    """RFC 7541, what a request header block may hold."""

    def __init__(self) -> None:
        self.table: list[tuple[bytes, bytes]] = []  # newest first
        self.size = 0
        self.limit = 4096

    def _entry(self, index: int) -> tuple[bytes, bytes]:
        if index <= len(_STATIC):
            return _STATIC[index - 1]
        return self.table[index - len(_STATIC) - 1]

    @staticmethod
    def _integer(block: bytes, pos: int, bits: int) -> tuple[int, int]:
        limit = (1 << bits) - 1
        value = block[pos] & limit
        pos += 1
        if value < limit:
            return value, pos
        shift = 0
        while True:
            octet = block[pos]
            pos += 1
            value += (octet & 127) << shift
            shift += 7
            if not octet & 128:
                return value, pos

    def _string(self, block: bytes, pos: int) -> tuple[bytes, int]:
        huffman = block[pos] & 0x80
        length, pos = self._integer(block, pos, 7)
        data = block[pos:pos + length]
        return (decode_huffman(data) if huffman else data), pos + length

    def _add(self, pair: tuple[bytes, bytes]) -> None:
        self.table.insert(0, pair)
        self.size += len(pair[0]) + len(pair[1]) + 32
        self._evict()

    def _evict(self) -> None:
        while self.size > self.limit and self.table:
            name, value = self.table.pop()
            self.size -= len(name) + len(value) + 32

    def decode(self, block: bytes) -> dict[bytes, bytes]:
        headers: dict[bytes, bytes] = {}
        pos = 0
        while pos < len(block):
            first = block[pos]
            if first & 0x80:  # indexed
                index, pos = self._integer(block, pos, 7)
                name, value = self._entry(index)
            elif first & 0xE0 == 0x20:  # table size update
                self.limit, pos = self._integer(block, pos, 5)
                self._evict()
                continue
            else:
                bits = 6 if first & 0x40 else 4
                index, pos = self._integer(block, pos, bits)
                if index:
                    name = self._entry(index)[0]
                else:
                    name, pos = self._string(block, pos)
                value, pos = self._string(block, pos)
                if first & 0x40:
                    self._add((name, value))
            headers.setdefault(name, value)
        return headers


class Counts:
    def __init__(self) -> None:
        self.requests = 0


class _Apns(asyncio.Protocol):
    """One client connection: frames in, answers out, one write per read."""

    def __init__(self, check: Callable[[Received], Verdict], counts: Counts,
                 verdicts: dict[tuple[bytes, ...], Verdict], down: bool = False) -> None:
        self._check = check
        self._down = down
        self._counts = counts
        self._verdicts = verdicts
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._preface = False
        self._hpack = HpackDecoder()
        self._headers: dict[int, bytearray] = {}  # header blocks until END_HEADERS
        self._requests: dict[int, tuple[dict[bytes, bytes], bytearray]] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        # MAX_CONCURRENT_STREAMS 1000, as APNs advertises
        transport.write(frame(SETTINGS, 0, 0, struct.pack(">HI", 3, 1000)))

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        if not self._preface:
            if len(buffer) < len(PREFACE):
                return
            if not buffer.startswith(PREFACE):
                assert self._transport is not None
                self._transport.close()
                return
            del buffer[:len(PREFACE)]
            self._preface = True
        out: list[bytes] = []
        lines: list[str] = []
        consumed = 0  # DATA bytes: the connection window given back once
        pos = 0
        while len(buffer) - pos >= 9:
            length = int.from_bytes(buffer[pos:pos + 3], "big")
            if len(buffer) - pos - 9 < length:
                break
            kind, flags = buffer[pos + 3], buffer[pos + 4]
            stream_id = int.from_bytes(buffer[pos + 5:pos + 9], "big") & 0x7FFFFFFF
            payload = bytes(buffer[pos + 9:pos + 9 + length])
            pos += 9 + length
            if kind == DATA:
                consumed += length
                if flags & PADDED:
                    payload = payload[1:len(payload) - payload[0]]
                request = self._requests.get(stream_id)
                if request is not None:
                    request[1].extend(payload)
                    if flags & END_STREAM:
                        out.append(self._answer(stream_id, lines))
            elif kind in (HEADERS, CONTINUATION):
                if kind == HEADERS:
                    if flags & PADDED:
                        payload = payload[1:len(payload) - payload[0]]
                    if flags & PRIORITY:
                        payload = payload[5:]
                    self._headers[stream_id] = bytearray()
                self._headers[stream_id].extend(payload)
                if flags & END_HEADERS:
                    block = bytes(self._headers.pop(stream_id))
                    self._requests[stream_id] = (self._hpack.decode(block), bytearray())
                    if kind == HEADERS and flags & END_STREAM:
                        out.append(self._answer(stream_id, lines))
            elif kind == SETTINGS:
                if not flags & ACK:
                    out.append(frame(SETTINGS, ACK, 0))
            elif kind == PING:
                if not flags & ACK:
                    out.append(frame(PING, ACK, 0, payload))
            elif kind == RST_STREAM:
                self._requests.pop(stream_id, None)
            elif kind == GOAWAY:
                assert self._transport is not None
                self._transport.close()
        del buffer[:pos]
        if consumed:
            out.append(frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", consumed)))
        if out and self._transport is not None:
            self._transport.write(b"".join(out))
        if lines:
            self._counts.requests += len(lines)
            sys.stdout.write("".join(lines))
            sys.stdout.flush()

    def _answer(self, stream_id: int, lines: list[str]) -> bytes:
        arrived = time.monotonic()
        headers, body = self._requests.pop(stream_id)
        memo = tuple(headers.get(name, b"") for name in _CHECKED)
        if memo not in self._verdicts:
            self._verdicts[memo] = self._check(Received(
                headers.get(b":method", b"").decode(), headers.get(b":path", b"").decode(),
                {k.decode(): v.decode() for k, v in headers.items()}, bytes(body), "2"))
        verdict = self._verdicts[memo]
        if verdict is None and not headers.get(b":path", b"").startswith(b"/3/device/"):
            verdict = (404, {"reason": "BadPath"})
        elif verdict is None and len(body) > (5120 if memo[1] == b"voip" else 4096):
            verdict = (413, {"reason": "PayloadTooLarge"})
        elif verdict is None and self._down:
            verdict = (503, {"reason": "ServiceUnavailable"})
        status = 200 if verdict is None else verdict[0]
        found = _MARKER.search(body)
        lines.append(f"{arrived:.6f} {found.group(1).decode() if found else '-'} {status}\n")
        # :status from the static table if there, apns-id a literal without indexing
        code = str(status).encode()
        head = _STATUS.get(code) or integer(8, 4) + string(code)
        block = head + integer(0, 4) + string(b"apns-id") + string(str(uuid.uuid4()).encode())
        if verdict is None:
            return frame(HEADERS, END_HEADERS | END_STREAM, stream_id, block)
        payload = json.dumps(verdict[1]).encode()
        block += integer(31, 4) + string(b"application/json")  # content-type
        return frame(HEADERS, END_HEADERS, stream_id, block) + \
            frame(DATA, END_STREAM, stream_id, payload)


async def serve(port: int, tls: Path, check: Callable[[Received], Verdict],
                down: bool = False) -> None:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tls / "server.pem", tls / "server.key")
    context.set_alpn_protocols(["h2"])
    counts = Counts()
    verdicts: dict[tuple[bytes, ...], Verdict] = {}
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Apns(check, counts, verdicts, down), "127.0.0.1",
                                      port, ssl=context)
    print("listening", flush=True)
    closed = loop.create_future()

    def stdin_readable() -> None:
        if not closed.done() and not os.read(sys.stdin.fileno(), 65536):
            closed.set_result(None)
    loop.add_reader(sys.stdin.fileno(), stdin_readable)
    await closed
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu = usage.ru_utime + usage.ru_stime
    print(f"end {counts.requests} {cpu:.3f}", flush=True)
    print(f"fake APNs (HTTP/2 by hand, own process): {counts.requests} requests, CPU "
          f"{cpu * 1000 / max(counts.requests, 1):.3f} ms per request (start-up included)",
          file=sys.stderr, flush=True)
    server.close()


def main() -> None:
    port, tls, key_file, team_id, key_id, topic = sys.argv[1:7]
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    from tests.fake_providers import apns_check
    key = load_pem_private_key(Path(key_file).read_bytes(), password=None)
    check = apns_check(key.public_key(), team_id, key_id, topic)
    asyncio.run(serve(int(port), Path(tls), check, sys.argv[7:8] == ["down"]))


if __name__ == "__main__":
    main()
