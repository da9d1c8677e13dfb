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
from urllib.parse import urlsplit

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings


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
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    body: bytearray = field(default_factory=bytearray)
    pending: bytes = b""  # request body not yet sent (flow control)


class _Connection(asyncio.Protocol):
    def __init__(self, authority: str) -> None:
        self.authority = authority
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=True, header_encoding="utf-8", validate_outbound_headers=False,
            normalize_outbound_headers=False))
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, _Stream] = {}
        self.closed = False
        self._waiting: deque[asyncio.Future[None]] = deque()  # requests waiting for a stream

    # -- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.h2.initiate_connection()
        self._flush()

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
        self._flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail_all("connection lost")

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
        stream_id = self.h2.get_next_available_stream_id()
        stream = _Stream(asyncio.get_running_loop().create_future())
        self.streams[stream_id] = stream
        request_headers = [(":method", method), (":scheme", "https"),
                           (":authority", self.authority), (":path", path), *headers]
        if body:
            request_headers.append(("content-length", str(len(body))))
        self.h2.send_headers(stream_id, request_headers, end_stream=not body)
        stream.pending = body
        self._send_pending(stream_id)
        self._flush()
        return await stream.done

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

    def _flush(self) -> None:
        data = self.h2.data_to_send()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)


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
        lock = self._connecting.setdefault(key, asyncio.Lock())
        async with lock:
            connection = self._connections.get(key)
            if connection is None or connection.closed:
                authority = host if port == 443 else f"{host}:{port}"
                try:
                    _, opened = await asyncio.wait_for(
                        asyncio.get_running_loop().create_connection(
                            lambda: _Connection(authority), host, port, ssl=self._context,
                            server_hostname=host), self._timeout)
                except (OSError, ssl.SSLError, TimeoutError) as exc:
                    raise HttpError(f"cannot connect to {host}:{port}: {exc}") from None
                self._connections[key] = connection = opened
            return connection

    async def request(self, method: str, url: str, headers: dict[str, str],
                      content: bytes) -> Response:
        parts = urlsplit(url)
        if parts.scheme != "https" or not parts.hostname:
            raise HttpError(f"not an https URL: {url}")
        connection = await self._connection(parts.hostname, parts.port or 443)
        path = parts.path + (f"?{parts.query}" if parts.query else "") or "/"
        try:
            return await asyncio.wait_for(
                connection.request(method, path, headers.items(), content), self._timeout)
        except TimeoutError:
            raise HttpError("no answer in time") from None

    async def aclose(self) -> None:
        for connection in self._connections.values():
            connection.closed = True
            if connection.transport is not None:
                connection.transport.close()
