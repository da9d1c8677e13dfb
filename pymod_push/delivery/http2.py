"""A lean HTTP/2 client for provider pushes: one TLS connection per backend, many
concurrent streams, the framing done by h2wire (sans-IO).

A client for destinations users supply (Web Push, WNS: see UserDestinations) resolves
each host once per connection, has every address checked (core.destination) and connects
to a checked one, so that a second lookup cannot lead elsewhere (DNS rebinding); its
connections are closed when idle and capped in number (least recently used idle ones
closed first), and its lookups run on a few threads of their own.

Why not httpx here: pushing to a fake APNs, httpx (httpcore, anyio) cost about 0.9 ms
of CPU per push, about 1,100 pushes/s per process (bench/provider_dispatch.py); and h2
itself, about 0.2 ms (see h2wire).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
import threading
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from urllib.parse import urlsplit

from pymod_push.core import destination
from pymod_push.core.config import IpNetwork
from pymod_push.core.destination import IpAddress
from pymod_push.delivery import h2wire

SWEEP_S = 1.0  # how often requests are checked for their timeout
SEND_AGAIN = 3  # times a request the server did not process goes again
# A request is answered or failed within this many timeouts, whatever it waited for (a
# connection being opened, a stream, an answer, sending again): one to connect, one to
# be answered.
REQUEST_TIMEOUTS = 2
# Connections to destinations users supply: closed IDLE_S to 1.5 IDLE_S after their last
# request (checked every IDLE_S / 2), and at most MAX_USER_CONNECTIONS open or opening at
# once (the least recently used idle one is closed to make room; if none is idle, the new
# origin's request fails, to be tried again later).
IDLE_S = 60.0
MAX_USER_CONNECTIONS = 128
# Names users supply are looked up on threads of their own, at most MAX_LOOKUPS at once
# (more fail at once, to be tried again): a slow DNS server of theirs cannot hold the
# loop's default executor, where APNs' and FCM's connections look their hosts up.
MAX_LOOKUPS = 4


class HttpError(Exception):
    """The request did not get an answer (connection failed, reset, timeout)."""


class Denied(HttpError, destination.DestinationDenied):
    """The destination policy refuses the address a name resolved to, or the name."""


class NotProcessed(HttpError):
    """The server did not process the request (it refused the stream, or the connection
    closed before it was sent): it can go again, on another stream or connection."""


@dataclass(slots=True)
class Response:
    status_code: int
    headers: dict[str, str]
    content: bytes


class _Callback:
    """Where a request's answer goes when the caller gave a function instead of awaiting a
    future (Http2Client.request_now): called with the Response or the HttpError as soon
    as it is there, without a future and a loop callback per request. What the function
    raises is reported to the loop's exception handler, as a future's callback's would
    be: the connection goes on."""

    __slots__ = ("_function",)

    def __init__(self, function: Callable[[Response | HttpError], None]) -> None:
        self._function = function

    def done(self) -> bool:
        return False  # called once: the connection forgets it right before

    def set_result(self, result: Response | HttpError) -> None:
        try:
            self._function(result)
        except Exception as exc:  # noqa: BLE001 - as asyncio does for callbacks
            asyncio.get_running_loop().call_exception_handler({
                "message": "exception in an HTTP/2 answer's callback", "exception": exc})

    set_exception = set_result


# What a stream's answer goes to: a future to await, or a function (see _Callback).
_Answer = asyncio.Future[Response] | _Callback


class _Connection(asyncio.Protocol):
    """One HTTP/2 connection. What it has to send is written once per loop iteration
    (:meth:`_flush_soon`): a burst of requests, and the window updates for their answers,
    cost one TLS write, not one each."""

    def __init__(self, authority: str, timeout: float = 15.0, abort: bool = False) -> None:
        self.authority = authority
        self.timeout = timeout
        # Closed without TLS's close_notify exchange (which asyncio waits up to 30 s for):
        # a user's endpoint that never answers it cannot keep the socket open.
        self._abort = abort
        self.wire = h2wire.H2Client()
        self.transport: asyncio.Transport | None = None
        # stream id -> (its answer, the loop time by which it is answered or failed)
        self.streams: dict[int, tuple[_Answer, float]] = {}
        self._lost = False  # the connection is gone, or given up
        self._queued: deque[_Queued] = deque()  # requests waiting for a stream, in order
        self.last_used = 0.0  # loop time of the last request sent, or of the connection
        self._flush_pending = False
        self._sweep: asyncio.TimerHandle | None = None

    @property
    def closed(self) -> bool:
        """No new request goes on this connection (lost, GOAWAY, or stream ids used up)."""
        return self._lost or self.wire.closed

    @property
    def idle(self) -> bool:
        """No request is open or waits for a stream."""
        return not self.streams and not self._queued

    @property
    def ended(self) -> bool:
        """Closed, or lost: no request is open on it any more."""
        return self._lost

    def close(self) -> None:
        """No new request; those still open fail now, not once TLS has shut down (which
        may be after the loop has ended, their awaiters never told)."""
        self._fail_all("connection closed")
        if self.transport is not None:
            if self._abort:
                self.transport.abort()
            else:
                self.transport.close()

    # -- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.last_used = asyncio.get_running_loop().time()
        self._flush_soon()

    def data_received(self, data: bytes) -> None:
        try:
            events = self.wire.receive(data)
        except h2wire.FramingError as exc:
            self._fail_all(f"HTTP/2 protocol error: {exc}")
            self._flush()  # the GOAWAY
            self.close()
            return
        for event in events:
            if isinstance(event, h2wire.Answered):
                self._finish(event.stream_id, Response(event.status, event.headers,
                                                       event.body))
            elif isinstance(event, h2wire.Failed):
                failure = NotProcessed if event.unprocessed else HttpError
                self._finish(event.stream_id, failure(event.reason))
        self._wake()  # streams ended, or the server's SETTINGS allow more
        if self.wire.closed and not self.streams and not self._lost:
            self.close()  # a GOAWAY with nothing open: the socket is not left to the server
            return
        self._flush_soon()

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail_all("connection lost")
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None

    # -- requests
    def submit(self, method: str, path: str, headers: Iterable[tuple[str, str]],
               body: bytes, deadline: float | None = None) -> asyncio.Future[Response]:
        """The request's answer, to await (see send)."""
        done: asyncio.Future[Response] = asyncio.get_running_loop().create_future()
        self.send(method, path, headers, body, done, deadline)
        return done

    def send(self, method: str, path: str, headers: Iterable[tuple[str, str]], body: bytes,
             done: _Answer, deadline: float | None = None) -> None:
        """The request, its answer for done: sent on a new stream now if one is free, else
        when one is (in order). It fails with NotProcessed if the connection closes first,
        with HttpError if it is not answered within the timeout (or by deadline, a loop
        time, if that is sooner), stream or not (a server may grant none:
        SETTINGS_MAX_CONCURRENT_STREAMS 0)."""
        if self.closed:
            done.set_exception(NotProcessed("connection closed"))
        elif self._queued or not self.wire.can_open():
            loop = asyncio.get_running_loop()
            limit = loop.time() + self.timeout
            if deadline is not None and deadline < limit:
                limit = deadline
            self._queued.append((done, method, path, headers, body, limit))
            if self._sweep is None:
                self._sweep = loop.call_later(SWEEP_S, self._expire)
        else:
            self._open(done, method, path, headers, body, deadline)

    def _open(self, done: _Answer, method: str, path: str,
              headers: Iterable[tuple[str, str]], body: bytes,
              deadline: float | None = None) -> None:
        """On a new stream, answered within the timeout or by deadline if sooner (the
        request's own, or the one it had while it waited for the stream)."""
        loop = asyncio.get_running_loop()
        request_headers = [(":method", method), (":scheme", "https"),
                           (":authority", self.authority), (":path", path), *headers]
        if body:
            request_headers.append(("content-length", str(len(body))))
        stream_id = self.wire.request(request_headers, body)
        self.last_used = now = loop.time()
        limit = now + self.timeout
        if deadline is not None and deadline < limit:
            limit = deadline
        self.streams[stream_id] = (done, limit)
        if self._sweep is None:
            self._sweep = loop.call_later(SWEEP_S, self._expire)
        self._flush_soon()

    def _expire(self) -> None:
        """Every SWEEP_S while requests are open or wait for a stream: those unanswered in
        time fail (open ones are reset), as asyncio.wait_for would make them, without a
        task and a timer each."""
        self._sweep = None
        now = asyncio.get_running_loop().time()
        expired = [i for i, (_, deadline) in self.streams.items() if deadline <= now]
        for stream_id in expired:
            self.wire.reset(stream_id)
            self._finish(stream_id, HttpError("no answer in time"))
        if self._queued and any(entry[5] <= now for entry in self._queued):
            waiting = deque(entry for entry in self._queued if entry[5] > now)
            late = [entry[0] for entry in self._queued if entry[5] <= now]
            self._queued = waiting
            for done in late:
                if not done.done():
                    done.set_exception(HttpError("no stream granted in time"))
        if expired:
            self._wake()
            self._flush_soon()
        if (self.streams or self._queued) and not self._lost:
            self._sweep = asyncio.get_running_loop().call_later(SWEEP_S, self._expire)

    def _finish(self, stream_id: int, result: Response | HttpError) -> None:
        entry = self.streams.pop(stream_id, None)
        if entry is not None and not entry[0].done():
            if isinstance(result, Response):
                entry[0].set_result(result)
            else:
                entry[0].set_exception(result)
        if self.wire.closed and not self.streams and not self._lost:
            self.close()  # drained after a GOAWAY or its last stream id: the next is new

    def _wake(self) -> None:
        """Queued requests go out on the streams free now (or fail: closed meanwhile)."""
        while self._queued and (self.closed or self.wire.can_open()):
            done, method, path, headers, body, deadline = self._queued.popleft()
            if done.done():  # its awaiter was cancelled
                continue
            if self.closed:
                done.set_exception(NotProcessed("connection closed"))
            else:
                self._open(done, method, path, headers, body, deadline)

    def _fail_all(self, reason: str) -> None:
        self._lost = True
        self.wire.close()
        for stream_id in list(self.streams):
            self._finish(stream_id, HttpError(reason))
        self._wake()

    def _flush_soon(self) -> None:
        if not self._flush_pending:
            self._flush_pending = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_pending = False
        data = self.wire.data_to_send()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)


# A request waiting for a stream: its answer, method, path, headers, body, and the loop
# time by which it is answered or failed.
_Queued = tuple[_Answer, str, str, Iterable[tuple[str, str]], bytes, float]


def _target(url: str, refusal: type[HttpError] = HttpError) -> tuple[str, int, str]:
    """(host, port, path) of an https URL; refusal (raised) if it is none. Only the
    origin's parse is kept: each device has a URL of its own, its provider's few origins
    recur with every push."""
    scheme, separator, rest = url.partition("://")
    end = len(rest)  # the authority ends at the first of these
    for mark in "/?#":
        found = rest.find(mark, 0, end)
        if found >= 0:
            end = found
    authority, path = rest[:end], rest[end:]
    try:
        host, port = _origin(scheme, authority) if separator else ("", 0)
    except ValueError:  # a port out of range
        host = ""
    if not host:  # the URL is left out: a device's URL is a secret of sorts
        raise refusal("not an https URL without user information")
    if "#" in path or path.endswith("?"):
        path = path.partition("#")[0]
        path = path[:-1] if path.endswith("?") else path
    return host, port, path or "/"


@lru_cache(maxsize=256)
def _origin(scheme: str, authority: str) -> tuple[str, int]:
    """(host, port) of an https origin; host "" if it is none (or names a user)."""
    parts = urlsplit(f"{scheme}://{authority}")
    if parts.scheme != "https" or not parts.hostname or "@" in authority:
        return "", 0
    return parts.hostname, parts.port or 443


Resolver = Callable[[str, int], Awaitable[Sequence[IpAddress]]]


class _Lookups:
    """The threads names users supply are looked up on (MAX_LOOKUPS): a lookup beyond
    them fails at once instead of waiting, in the loop's default executor or here, for a
    DNS server that may never answer."""

    def __init__(self, threads: int) -> None:
        self.threads = threads
        # Taken in the loop, given back when the thread is done (not when the awaiter
        # gives up: the thread stays busy until the system resolver returns).
        self._free = threading.BoundedSemaphore(threads)
        self._executor: ThreadPoolExecutor | None = None  # made at the first lookup

    async def addresses(self, host: str, port: int) -> list[str]:
        """What the system resolver gives for host (getaddrinfo), as text."""
        if not self._free.acquire(blocking=False):
            raise HttpError(f"{self.threads} lookups are under way already; "
                            "the destination is tried again later")
        try:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(self.threads,
                                                    thread_name_prefix="pymod_push-lookup")
            lookup = self._executor.submit(_addresses, host, port)
        except BaseException:
            self._free.release()
            raise
        # Done or cancelled before it ran: either way exactly once.
        lookup.add_done_callback(lambda _: self._free.release())
        return await asyncio.wrap_future(lookup)


def _addresses(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    return [str(info[4][0]) for info in infos]


_lookups = _Lookups(MAX_LOOKUPS)


async def resolve(host: str, port: int) -> list[IpAddress]:
    """The addresses of host, in the system resolver's order, looked up on a thread of
    _lookups (HttpError at once if they are all busy); Denied if one is not an address
    (it could not be checked), or host is no name the resolver takes."""
    try:
        found = await _lookups.addresses(host, port)
    except UnicodeError:  # IDNA: an empty label, or one over 63 characters
        raise Denied("the host is not a valid host name") from None
    addresses: list[IpAddress] = []
    for text in found:
        try:
            address = ipaddress.ip_address(text)
        except ValueError:
            raise Denied(f"{host} resolves to something that is not an address") from None
        if address not in addresses:
            addresses.append(address)
    return addresses


@dataclass(frozen=True, slots=True)
class UserDestinations:
    """What a client for destinations users supply keeps to: where it may connect
    (core.destination; allowed: endpoint_allow_ips) and how many connections it keeps."""

    allowed: tuple[IpNetwork, ...] = ()
    resolve: Resolver = resolve  # injected by tests: no lookup, no traffic
    max_connections: int = MAX_USER_CONNECTIONS
    idle_s: float = IDLE_S


class _Opening:
    """Those waiting for one origin's connection to be opened; failure: why the attempt
    they waited for failed (they fail with it at once, not one connect after another)."""

    __slots__ = ("failure", "lock", "waiting")

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.waiting = 0
        self.failure: HttpError | None = None


class Http2Client:
    """One HTTP/2 connection per origin, opened when needed and again after it closed.
    With destinations (see UserDestinations): where it connects is checked, and its
    connections are bounded."""

    def __init__(self, context: ssl.SSLContext, timeout: float = 15.0,
                 destinations: UserDestinations | None = None) -> None:
        context.set_alpn_protocols(["h2"])
        self._context = context
        self._timeout = timeout
        self._destinations = destinations
        # What a URL that cannot be sent to raises: for a user's, no retry can help.
        self._refusal: type[HttpError] = HttpError if destinations is None else Denied
        self._connections: dict[tuple[str, int], _Connection] = {}
        self._connecting: dict[tuple[str, int], _Opening] = {}  # only while connecting
        self._opening = 0  # connections being opened (counted against the cap)
        # With destinations: connections no longer in _connections (GOAWAY, stream ids
        # used up) whose last requests are still open, counted against the cap until
        # they end (by their requests' deadline at the latest).
        self._draining: set[_Connection] = set()
        self._idle_sweep: asyncio.TimerHandle | None = None

    async def _connection(self, host: str, port: int, deadline: float) -> _Connection:
        """The origin's open connection, opened if needed by deadline (a loop time);
        those asking while it is being opened wait for it, and share its failure."""
        key = (host, port)
        opening = self._connecting.get(key)
        if opening is None:
            opening = self._connecting[key] = _Opening()
        opening.waiting += 1
        try:
            async with asyncio.timeout_at(deadline), opening.lock:
                if opening.failure is not None:  # a new exception: no shared traceback
                    raise type(opening.failure)(str(opening.failure))
                connection = self._connections.get(key)
                if connection is not None and not connection.closed:
                    return connection
                if connection is not None:
                    self._forget(key)
                try:
                    connection = await self._connect(host, port, deadline)
                except HttpError as exc:
                    opening.failure = exc
                    raise
                self._connections[key] = connection
                return connection
        except TimeoutError:
            raise HttpError(f"no connection to {_shown(host)}:{port} in time") from None
        finally:
            opening.waiting -= 1
            if not opening.waiting:
                del self._connecting[key]

    async def _connect(self, host: str, port: int, deadline: float) -> _Connection:
        loop = asyncio.get_running_loop()
        shown = _shown(host)
        authority = shown if port == 443 else f"{shown}:{port}"
        time_left = min(self._timeout, deadline - loop.time())
        if time_left <= 0:
            raise HttpError(f"cannot connect to {shown}:{port} in time")
        if self._destinations is None:
            def protocol() -> _Connection:
                return _Connection(authority, self._timeout)
            try:
                _, connection = await asyncio.wait_for(loop.create_connection(
                    protocol, host, port, ssl=self._context, server_hostname=host),
                    time_left)
            except (OSError, ssl.SSLError, TimeoutError) as exc:
                raise HttpError(f"cannot connect to {shown}:{port}: {exc}") from None
            return connection
        connection = await self._connect_checked(host, port, authority, time_left,
                                                 self._destinations)
        if self._idle_sweep is None:
            self._idle_sweep = loop.call_later(self._destinations.idle_s / 2,
                                               self._close_idle)
        return connection

    async def _connect_checked(self, host: str, port: int, authority: str,
                               time_left: float, destinations: UserDestinations
                               ) -> _Connection:
        """Connected within time_left to the first address of host that takes it, once
        host is found a valid name or address and every address it has is checked
        (Denied if not) and room is made among the connections (HttpError, a retry, if
        the cap is reached with busy ones only); TLS verifies the name."""
        try:  # the rules of registration: a row stored before them may break them
            target = destination.parse_url(f"https://{authority}/")
        except destination.UrlRefused as refused:
            raise Denied(str(refused)) from None
        limit = destinations.max_connections
        if self._opening >= limit:
            raise HttpError(f"{limit} connections are being opened already")
        self._opening += 1
        try:
            async with asyncio.timeout(time_left):
                addresses: Sequence[IpAddress] = [target.address] \
                    if target.address is not None else await destinations.resolve(host, port)
                try:
                    checked = destination.resolved_addresses(host, addresses,
                                                             destinations.allowed)
                except destination.UrlRefused as refused:
                    raise Denied(str(refused)) from None
                self._make_room(limit)

                def protocol() -> _Connection:
                    return _Connection(authority, self._timeout, abort=True)
                failure: OSError = OSError(f"{host} has no address")
                for address in checked:
                    try:
                        _, connection = await asyncio.get_running_loop().create_connection(
                            protocol, str(address), port, ssl=self._context,
                            server_hostname=host)
                        return connection
                    except OSError as exc:  # ssl.SSLError too
                        failure = exc
                raise failure
        except (OSError, TimeoutError) as exc:
            raise HttpError(f"cannot connect to {_shown(host)}:{port}: {exc}") from None
        finally:
            self._opening -= 1

    def _make_room(self, limit: int) -> None:
        """Before a connection is opened (counted in _opening): closed ones forgotten, and
        the least recently used idle ones closed while the open, draining and opening ones
        would be more than limit; HttpError if too few are idle (busy ones are kept: their
        requests go on)."""
        for key in [key for key, c in self._connections.items() if c.closed]:
            self._forget(key)
        if self._draining:
            self._draining = {c for c in self._draining if not c.ended}
        excess = len(self._connections) + len(self._draining) + self._opening - limit
        if excess <= 0:
            return
        idle = sorted((c.last_used, key) for key, c in self._connections.items() if c.idle)
        if len(idle) < excess:
            raise HttpError(f"{limit} connections are busy; the destination is tried "
                            "again later")
        for _, key in idle[:excess]:
            self._connections.pop(key).close()

    def _forget(self, key: tuple[str, int]) -> None:
        """A closed connection out of _connections: closed now if nothing is open on it
        (a GOAWAY's socket is not left open), else once its last request is done."""
        connection = self._connections.pop(key)
        if not connection.streams:
            connection.close()
        elif self._destinations is not None:
            self._draining.add(connection)  # counted against the cap until it ends

    def _close_idle(self) -> None:
        """Every IDLE_S / 2 while there are connections: those without a request for
        IDLE_S are closed, the closed ones forgotten."""
        self._idle_sweep = None
        assert self._destinations is not None
        now = asyncio.get_running_loop().time()
        for key, connection in list(self._connections.items()):
            if connection.closed:
                self._forget(key)
            elif connection.idle and now - connection.last_used >= self._destinations.idle_s:
                del self._connections[key]
                connection.close()
        if self._draining:
            self._draining = {c for c in self._draining if not c.ended}
        if self._connections or self._draining:
            self._idle_sweep = asyncio.get_running_loop().call_later(
                self._destinations.idle_s / 2, self._close_idle)

    def open_connections(self) -> int:
        """How many connections are open (for tests and status)."""
        return sum(1 for connection in self._connections.values() if not connection.closed)

    def connected(self) -> bool:
        """A connection is open (to the origin, if the client has only one): request_now
        is worth a try."""
        for connection in self._connections.values():  # per push: no generator
            if not connection.closed:
                return True
        return False

    def request_now(self, method: str, url: str, headers: dict[str, str], content: bytes,
                    answered: Callable[[Response | HttpError], None]) -> bool:
        """The request on the origin's open connection (see _Connection.send), without a
        task or a future: answered gets the Response or the HttpError. False if there is
        no such connection yet (answered is not called)."""
        host, port, path = _target(url, self._refusal)
        connection = self._connections.get((host, port))
        if connection is None or connection.closed:
            return False
        connection.send(method, path, headers.items(), content, _Callback(answered))
        return True

    async def request(self, method: str, url: str, headers: dict[str, str],
                      content: bytes) -> Response:
        """The answer, or HttpError within REQUEST_TIMEOUTS timeouts, whatever it waited
        for (a connection, a stream, the answer, sending again)."""
        host, port, path = _target(url, self._refusal)
        deadline = asyncio.get_running_loop().time() + REQUEST_TIMEOUTS * self._timeout
        for _ in range(SEND_AGAIN):
            connection = self._connections.get((host, port))
            if connection is None or connection.closed:
                connection = await self._connection(host, port, deadline)
            try:
                return await connection.submit(method, path, headers.items(), content,
                                               deadline)
            except NotProcessed:
                continue  # refused, or closed meanwhile (GOAWAY, stream ids used up)
        raise HttpError(f"{host}:{port} did not take the request {SEND_AGAIN} times")

    async def aclose(self) -> None:
        if self._idle_sweep is not None:
            self._idle_sweep.cancel()
            self._idle_sweep = None
        for connection in [*self._connections.values(), *self._draining]:
            connection.close()


def _shown(host: str) -> str:
    """host as in a URL: an IPv6 address in brackets."""
    return f"[{host}]" if ":" in host else host
