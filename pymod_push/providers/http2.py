"""A lean HTTP/2 client on h2 for provider pushes: one TLS connection per backend, many
concurrent streams.

Why not httpx here: pushing to a fake APNs, httpx (httpcore, anyio) cost about 0.9 ms
of CPU per push, about 1,100 pushes/s per process (bench/provider_dispatch.py); the
work a push needs is framing a few headers and a small body, which h2 does directly.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from urllib.parse import urlsplit

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings

from . import hpack_cache

SWEEP_S = 1.0  # how often requests are checked for their timeout


class HttpError(Exception):
    """The request did not get an answer (connection failed, reset, timeout)."""


@dataclass(slots=True)
class Response:
    status_code: int
    headers: dict[str, str]
    content: bytes


@dataclass(slots=True)
class _Stream:
    done: asyncio.Future[Response]
    deadline: float  # loop time by which it is answered, or failed (no answer in time)
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    body: bytearray = field(default_factory=bytearray)
    pending: bytes = b""  # request body not yet sent (flow control)


class _Connection(asyncio.Protocol):
    """One HTTP/2 connection. What h2 has to send is written once per loop iteration
    (:meth:`_flush_soon`): a burst of requests, and the window updates for their answers,
    cost one TLS write, not one each."""

    def __init__(self, authority: str, timeout: float = 15.0) -> None:
        self.authority = authority
        self.timeout = timeout
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=True, header_encoding="utf-8", validate_outbound_headers=False,
            normalize_outbound_headers=False))
        self.h2.encoder = hpack_cache.Encoder()  # type: ignore[assignment]
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, _Stream] = {}
        self.closed = False
        self._waiting: deque[asyncio.Future[None]] = deque()  # requests waiting for a stream
        self._flush_pending = False
        self._sweep: asyncio.TimerHandle | None = None

    # -- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.h2.initiate_connection()
        self._flush_soon()

    def data_received(self, data: bytes) -> None:
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            self._fail_all(f"HTTP/2 protocol error: {exc}")
            if self.transport is not None:
                self.transport.close()
            return
        for event in events:
            self._event(event)
        self._flush_soon()

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail_all("connection lost")
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None

    # -- requests
    async def request(self, method: str, path: str, headers: Iterable[tuple[str, str]],
                      body: bytes) -> Response:
        while not self.closed and \
                len(self.streams) >= self.h2.remote_settings.max_concurrent_streams:
            waiter = asyncio.get_running_loop().create_future()
            self._waiting.append(waiter)
            await waiter
        if self.closed:
            raise HttpError("connection closed")
        return await self.open(method, path, headers, body)

    def can_open(self) -> bool:
        return not self.closed and \
            len(self.streams) < self.h2.remote_settings.max_concurrent_streams

    def open(self, method: str, path: str, headers: Iterable[tuple[str, str]],
             body: bytes) -> asyncio.Future[Response]:
        """A request on a new stream (can_open() must be true): its answer, to await."""
        stream_id = self.h2.get_next_available_stream_id()
        loop = asyncio.get_running_loop()
        stream = _Stream(loop.create_future(), loop.time() + self.timeout)
        self.streams[stream_id] = stream
        if self._sweep is None:
            self._sweep = loop.call_later(SWEEP_S, self._expire)
        request_headers = [(":method", method), (":scheme", "https"),
                           (":authority", self.authority), (":path", path), *headers]
        if body:
            request_headers.append(("content-length", str(len(body))))
        self.h2.send_headers(stream_id, request_headers, end_stream=not body)
        stream.pending = body
        self._send_pending(stream_id)
        self._flush_soon()
        return stream.done

    def _expire(self) -> None:
        """Every SWEEP_S while requests are open: those unanswered in time fail (and are
        reset), as asyncio.wait_for would make them, without a task and a timer each."""
        self._sweep = None
        now = asyncio.get_running_loop().time()
        expired = [i for i, stream in self.streams.items() if stream.deadline <= now]
        for stream_id in expired:
            self._finish(stream_id, "no answer in time")
            try:
                self.h2.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)
            except h2.exceptions.H2Error:
                pass  # already closed on the wire
        if expired:
            self._flush_soon()
        if self.streams and not self.closed:
            self._sweep = asyncio.get_running_loop().call_later(SWEEP_S, self._expire)

    def _send_pending(self, stream_id: int) -> None:
        stream = self.streams.get(stream_id)
        if stream is None or not stream.pending:
            return
        window = min(self.h2.local_flow_control_window(stream_id),
                     self.h2.max_outbound_frame_size)
        if window <= 0:
            return  # a WindowUpdated event sends the rest
        chunk, stream.pending = stream.pending[:window], stream.pending[window:]
        self.h2.send_data(stream_id, chunk, end_stream=not stream.pending)

    def _event(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.ResponseReceived):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                headers = {str(k): str(v) for k, v in event.headers}
                stream.status = int(headers.pop(":status", "0"))
                stream.headers = headers
        elif isinstance(event, h2.events.DataReceived):
            self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream.body += event.data
        elif isinstance(event, h2.events.StreamEnded):
            self._finish(event.stream_id, None)
        elif isinstance(event, h2.events.StreamReset):
            self._finish(event.stream_id, f"stream reset ({event.error_code})")
        elif isinstance(event, h2.events.WindowUpdated):
            for stream_id in list(self.streams) if event.stream_id == 0 else [event.stream_id]:
                self._send_pending(stream_id)
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.closed = True  # GOAWAY: streams above last_stream_id were not processed
            for stream_id in [s for s in self.streams if s > (event.last_stream_id or 0)]:
                self._finish(stream_id, "GOAWAY")
        elif isinstance(event, h2.events.RemoteSettingsChanged):
            self._wake()

    def _finish(self, stream_id: int, error: str | None) -> None:
        stream = self.streams.pop(stream_id, None)
        if stream is not None and not stream.done.done():
            if error is None:
                stream.done.set_result(Response(stream.status, stream.headers,
                                                bytes(stream.body)))
            else:
                stream.done.set_exception(HttpError(error))
        self._wake()

    def _wake(self) -> None:
        free = self.h2.remote_settings.max_concurrent_streams - len(self.streams)
        while self._waiting and (free > 0 or self.closed):
            waiter = self._waiting.popleft()
            if not waiter.done():
                waiter.set_result(None)
                free -= 1

    def _fail_all(self, reason: str) -> None:
        self.closed = True
        for stream_id in list(self.streams):
            self._finish(stream_id, reason)
        self._wake()

    def _flush_soon(self) -> None:
        if not self._flush_pending:
            self._flush_pending = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_pending = False
        data = self.h2.data_to_send()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)


@lru_cache(maxsize=16384)  # a device's URL recurs with every push to it
def _target(url: str) -> tuple[str, int, str]:
    """(host, port, path) of an https URL."""
    parts = urlsplit(url)
    if parts.scheme != "https" or not parts.hostname:
        raise HttpError(f"not an https URL: {url}")
    return parts.hostname, parts.port or 443, \
        parts.path + (f"?{parts.query}" if parts.query else "") or "/"


class Http2Client:
    """One HTTP/2 connection per origin, opened when needed and again after it closed."""

    def __init__(self, context: ssl.SSLContext, timeout: float = 15.0) -> None:
        context.set_alpn_protocols(["h2"])
        self._context = context
        self._timeout = timeout
        self._connections: dict[tuple[str, int], _Connection] = {}
        self._connecting: dict[tuple[str, int], asyncio.Lock] = {}

    async def _connection(self, host: str, port: int) -> _Connection:
        key = (host, port)
        connection = self._connections.get(key)
        if connection is not None and not connection.closed:
            return connection
        lock = self._connecting.setdefault(key, asyncio.Lock())
        async with lock:
            connection = self._connections.get(key)
            if connection is None or connection.closed:
                authority = host if port == 443 else f"{host}:{port}"
                try:
                    _, opened = await asyncio.wait_for(
                        asyncio.get_running_loop().create_connection(
                            lambda: _Connection(authority, self._timeout), host, port,
                            ssl=self._context,
                            server_hostname=host), self._timeout)
                except (OSError, ssl.SSLError, TimeoutError) as exc:
                    raise HttpError(f"cannot connect to {host}:{port}: {exc}") from None
                self._connections[key] = connection = opened
            return connection

    async def request(self, method: str, url: str, headers: dict[str, str],
                      content: bytes) -> Response:
        host, port, path = _target(url)
        connection = self._connections.get((host, port))
        if connection is not None and connection.can_open():  # no coroutine in between
            return await connection.open(method, path, headers.items(), content)
        connection = await self._connection(host, port)
        return await connection.request(method, path, headers.items(), content)

    async def aclose(self) -> None:
        for connection in self._connections.values():
            connection.closed = True
            if connection.transport is not None:
                connection.transport.close()
