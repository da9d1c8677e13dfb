"""The client side of an HTTP/2 connection (RFC 9113), framed by hand. Sans-IO: bytes in
(:meth:`H2Client.receive`), bytes out (:meth:`H2Client.data_to_send`), answers as events.

Why not h2: a push is one small request and one small answer, and h2's general state
machines (a stream object with its own validation, every open stream walked on each new
one) cost more CPU than the rest of a push together (bench/provider_dispatch.py: h2 was
about 60 % of the sending process). What a push client needs is short: HEADERS (and
CONTINUATION) out and in, DATA within flow control both ways, SETTINGS, PING, GOAWAY,
RST_STREAM and WINDOW_UPDATE. Server push is refused in our SETTINGS. HPACK is ours to
encode (hpack_cache) and hpack's to decode.

Bounds: an answer's header block and body are capped (MAX_HEADER_BLOCK, MAX_BODY); a
stream whose answer goes beyond is reset and fails, the connection goes on.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import hpack

from pymod_push.core.limits import ascii_number
from pymod_push.delivery.hpack_cache import Encoder, decode_plain

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, \
    CONTINUATION = range(10)
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY_FLAG = 0x1, 0x1, 0x4, 0x8, 0x20
NO_ERROR, PROTOCOL_ERROR, FLOW_CONTROL_ERROR, FRAME_SIZE_ERROR, REFUSED_STREAM, CANCEL, \
    COMPRESSION_ERROR = 0x0, 0x1, 0x3, 0x6, 0x7, 0x8, 0x9
SETTINGS_HEADER_TABLE_SIZE, SETTINGS_ENABLE_PUSH, SETTINGS_MAX_CONCURRENT_STREAMS, \
    SETTINGS_INITIAL_WINDOW_SIZE, SETTINGS_MAX_FRAME_SIZE = 1, 2, 3, 4, 5
MAX_TABLE_SIZE = 4096  # the HPACK table our encoder keeps at most
MAX_WINDOW = 2**31 - 1
MAX_STREAM_ID = 2**31 - 1
DEFAULT_WINDOW = 65535
DEFAULT_FRAME_SIZE = 16384
# What we allow the server: a large window, so that answers never wait for our updates
RECEIVE_WINDOW = 1 << 24
MAX_HEADER_BLOCK = 64 * 1024
MAX_BODY = 256 * 1024  # provider answers are a few hundred bytes; OAuth tokens a few KiB
# Until the server's SETTINGS say otherwise (RFC 9113 6.5.2 says unlimited; 100 is what
# providers allow and what an early burst should not exceed).
INITIAL_MAX_STREAMS = 100

_HEADER = struct.Struct(">IBI")  # length << 8 | type, flags, stream id (see _frame)


def _frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    return (len(payload) << 8 | kind).to_bytes(4, "big") + bytes((flags,)) \
        + stream_id.to_bytes(4, "big") + payload


class FramingError(Exception):
    """The server broke HTTP/2: the connection is over (a GOAWAY is queued)."""


@dataclass(slots=True)  # per push: not frozen (see protocol.Stanza)
class Answered:
    stream_id: int
    status: int
    headers: dict[str, str]
    body: bytes


@dataclass(frozen=True, slots=True)
class Failed:
    stream_id: int
    reason: str
    # The server says it did not process the request (REFUSED_STREAM, or above a
    # GOAWAY's last stream id, RFC 9113 8.7): it can be sent again as it is.
    unprocessed: bool = False


@dataclass(frozen=True, slots=True)
class GoneAway:
    """The server takes no new streams; those above last_stream_id failed (see Failed)."""
    last_stream_id: int
    error_code: int


Event = Answered | Failed | GoneAway


@dataclass(slots=True)
class _Stream:
    send_window: int
    pending: bytes = b""  # request body not yet sent (flow control)
    status: int = 0  # 0 until the final (non-1xx) response headers
    headers: dict[str, str] = field(default_factory=dict)
    body: bytearray = field(default_factory=bytearray)
    unacknowledged: int = 0  # DATA received since our last WINDOW_UPDATE for the stream


class H2Client:
    def __init__(self) -> None:
        self.encoder = Encoder()
        self.decoder = hpack.Decoder()
        self.decoder.max_header_list_size = MAX_HEADER_BLOCK
        self.max_concurrent_streams = INITIAL_MAX_STREAMS
        self.closed = False  # GOAWAY or a protocol error: no new streams
        self.streams: dict[int, _Stream] = {}
        # Streams whose body waits for window (in the order they ran out): what a
        # WINDOW_UPDATE resumes, without going through every open stream.
        self._blocked: dict[int, _Stream] = {}
        self._next_id = 1
        self._peer_window = DEFAULT_WINDOW  # the server's initial window for a stream
        self._peer_frame = DEFAULT_FRAME_SIZE
        self._send_window = DEFAULT_WINDOW  # connection level
        self._unacknowledged = 0  # connection-level DATA since our last WINDOW_UPDATE
        self._buffer = bytearray()
        self._block: bytearray | None = None  # a header block awaiting CONTINUATION
        self._block_stream = 0
        self._block_ends_stream = False
        self._out = [PREFACE, _frame(SETTINGS, 0, 0, struct.pack(
            ">HIHI", SETTINGS_ENABLE_PUSH, 0, SETTINGS_INITIAL_WINDOW_SIZE, RECEIVE_WINDOW)),
            _frame(WINDOW_UPDATE, 0, 0, (RECEIVE_WINDOW - DEFAULT_WINDOW).to_bytes(4, "big"))]

    # -- sending
    def can_open(self) -> bool:
        return not self.closed and len(self.streams) < self.max_concurrent_streams

    def request(self, headers: list[tuple[str, str]], body: bytes) -> int:
        """A request on a new stream (can_open() must be true): its stream id."""
        stream_id = self._next_id
        self._next_id += 2
        if self._next_id > MAX_STREAM_ID:
            self.closed = True  # stream ids used up: the next request needs a new connection
        self.streams[stream_id] = stream = _Stream(self._peer_window, body)
        block = self.encoder.encode(headers)
        flags = END_HEADERS if body else END_HEADERS | END_STREAM
        if len(block) <= self._peer_frame:
            self._out.append(_frame(HEADERS, flags, stream_id, block))
        else:
            size = self._peer_frame
            self._out.append(_frame(HEADERS, flags & END_STREAM, stream_id, block[:size]))
            for start in range(size, len(block), size):
                last = start + size >= len(block)
                self._out.append(_frame(CONTINUATION, END_HEADERS if last else 0, stream_id,
                                        block[start:start + size]))
        if body:
            self._send_body(stream_id, stream)
        return stream_id

    def reset(self, stream_id: int, error_code: int = CANCEL) -> None:
        """Give up a stream (its answer is no longer awaited)."""
        if self.streams.pop(stream_id, None) is not None:
            self._blocked.pop(stream_id, None)
            self._out.append(_frame(RST_STREAM, 0, stream_id, error_code.to_bytes(4, "big")))

    def data_to_send(self) -> bytes:
        if not self._out:
            return b""
        data = b"".join(self._out)
        self._out.clear()
        return data

    def _send_body(self, stream_id: int, stream: _Stream) -> None:
        while stream.pending:
            size = min(stream.send_window, self._send_window, self._peer_frame)
            if size <= 0:
                self._blocked[stream_id] = stream  # a WINDOW_UPDATE sends the rest
                return
            chunk, stream.pending = stream.pending[:size], stream.pending[size:]
            stream.send_window -= len(chunk)
            self._send_window -= len(chunk)
            self._out.append(_frame(DATA, 0 if stream.pending else END_STREAM, stream_id,
                                    chunk))
        if self._blocked:
            self._blocked.pop(stream_id, None)

    # -- receiving
    def receive(self, data: bytes) -> list[Event]:
        """What the server's bytes mean (new SETTINGS may also free streams: see
        can_open). Raises FramingError: the connection is over (see close)."""
        buffer = self._buffer
        buffer += data
        events: list[Event] = []
        position, size = 0, len(buffer)
        try:
            while size - position >= 9:
                word, flags, stream_id = _HEADER.unpack_from(buffer, position)
                length, kind = word >> 8, word & 0xFF
                if length > DEFAULT_FRAME_SIZE:  # we never allow more (SETTINGS)
                    raise self._error(FRAME_SIZE_ERROR, f"a frame of {length} bytes")
                end = position + 9 + length
                if end > size:
                    break
                payload = bytes(buffer[position + 9:end])
                position = end
                self._frame_received(kind, flags, stream_id & MAX_STREAM_ID, payload, events)
        finally:
            del buffer[:position]
        return events

    def close(self) -> None:
        """The connection is gone: no stream is open any more, none opens."""
        self.closed = True
        self.streams.clear()
        self._blocked.clear()

    def _error(self, code: int, why: str) -> FramingError:
        self.closed = True  # no stream of the server's was processed: push is disabled
        self._out.append(_frame(GOAWAY, 0, 0, struct.pack(">II", 0, code)))
        return FramingError(why)

    def _frame_received(self, kind: int, flags: int, stream_id: int, payload: bytes,
                        events: list[Event]) -> None:
        if self._block is not None and (kind != CONTINUATION or stream_id != self._block_stream):
            raise self._error(PROTOCOL_ERROR, "a header block was interrupted")
        if kind == HEADERS:
            if flags & PADDED:
                payload = self._unpadded(payload)
            if flags & PRIORITY_FLAG:
                payload = payload[5:]
            self._header_block(stream_id, payload, flags, events)
        elif kind == CONTINUATION:
            if self._block is None:
                raise self._error(PROTOCOL_ERROR, "CONTINUATION without HEADERS")
            self._block += payload
            if flags & END_HEADERS:
                block, self._block = self._block, None
                self._headers_complete(self._block_stream, bytes(block),
                                       self._block_ends_stream, events)
            elif len(self._block) > MAX_HEADER_BLOCK:
                raise self._error(PROTOCOL_ERROR, "a header block beyond the bound")
        elif kind == DATA:
            self._data(stream_id, flags, payload, events)
        elif kind == RST_STREAM:
            if len(payload) != 4:
                raise self._error(FRAME_SIZE_ERROR, "RST_STREAM of the wrong size")
            if self.streams.pop(stream_id, None) is not None:
                code = int.from_bytes(payload, "big")
                events.append(Failed(stream_id, f"stream reset ({code})",
                                     unprocessed=code == REFUSED_STREAM))
        elif kind == SETTINGS:
            if not flags & ACK:
                self._settings(payload)
        elif kind == PING:
            if len(payload) != 8:
                raise self._error(FRAME_SIZE_ERROR, "PING of the wrong size")
            if not flags & ACK:
                self._out.append(_frame(PING, ACK, 0, payload))
        elif kind == GOAWAY:
            if len(payload) < 8:
                raise self._error(FRAME_SIZE_ERROR, "GOAWAY too short")
            last, code = struct.unpack_from(">II", payload)
            last &= MAX_STREAM_ID
            self.closed = True
            for gone in [i for i in self.streams if i > last]:
                del self.streams[gone]
                events.append(Failed(gone, "GOAWAY", unprocessed=True))
            events.append(GoneAway(last, code))
        elif kind == WINDOW_UPDATE:
            self._window_update(stream_id, payload, events)
        elif kind == PUSH_PROMISE:
            raise self._error(PROTOCOL_ERROR, "PUSH_PROMISE, though push is disabled")
        # PRIORITY and unknown frame types are ignored (RFC 9113 4.1, 5.3.2)

    def _unpadded(self, payload: bytes) -> bytes:
        if not payload or payload[0] >= len(payload):
            raise self._error(PROTOCOL_ERROR, "padding beyond the frame")
        return payload[1:len(payload) - payload[0]]

    def _header_block(self, stream_id: int, fragment: bytes, flags: int,
                      events: list[Event]) -> None:
        if flags & END_HEADERS:
            self._headers_complete(stream_id, fragment, bool(flags & END_STREAM), events)
        else:
            self._block = bytearray(fragment)
            self._block_stream = stream_id
            self._block_ends_stream = bool(flags & END_STREAM)

    def _headers_complete(self, stream_id: int, block: bytes, ends_stream: bool,
                          events: list[Event]) -> None:
        try:  # decoded even for a stream given up: the HPACK table must follow the server's
            fields = decode_plain(block) or self.decoder.decode(block, raw=True)
        except (hpack.HPACKError, ValueError, IndexError) as exc:
            raise self._error(COMPRESSION_ERROR, f"HPACK: {exc}") from None
        stream = self.streams.get(stream_id)
        if stream is None:
            return
        if stream.status == 0:  # response headers (trailers, after them, are ignored)
            headers = {name.decode("utf-8", "replace"): value.decode("utf-8", "replace")
                       for name, value in fields}
            status = headers.pop(":status", "")
            # Three ASCII digits (RFC 9110, 15); isdigit() would pass '\u00b2'
            code = ascii_number(status, 3) if len(status) == 3 else None
            if code is None or code < 100:
                self._fail(stream_id, "an answer without a valid status", events)
                return
            if code >= 200:
                stream.status, stream.headers = code, headers
            elif ends_stream:
                self._fail(stream_id, "an informational answer ended the stream", events)
                return
        if ends_stream:
            self._end(stream_id, stream, events)

    def _data(self, stream_id: int, flags: int, payload: bytes, events: list[Event]) -> None:
        # Flow control counts the whole frame, padding included, on every stream
        self._unacknowledged += len(payload)
        if self._unacknowledged > RECEIVE_WINDOW // 2:
            self._out.append(_frame(WINDOW_UPDATE, 0, 0,
                                    self._unacknowledged.to_bytes(4, "big")))
            self._unacknowledged = 0
        stream = self.streams.get(stream_id)
        if stream is None:
            return
        if flags & PADDED:
            payload = self._unpadded(payload)
        if stream.status == 0:
            self._fail(stream_id, "DATA before the answer's headers", events)
            return
        stream.body += payload
        if len(stream.body) > MAX_BODY:
            self._fail(stream_id, f"an answer beyond {MAX_BODY} bytes", events)
            return
        if flags & END_STREAM:
            self._end(stream_id, stream, events)
        else:
            stream.unacknowledged += len(payload)
            if stream.unacknowledged > RECEIVE_WINDOW // 2:
                self._out.append(_frame(WINDOW_UPDATE, 0, stream_id,
                                        stream.unacknowledged.to_bytes(4, "big")))
                stream.unacknowledged = 0

    def _end(self, stream_id: int, stream: _Stream, events: list[Event]) -> None:
        del self.streams[stream_id]
        if stream.pending:  # answered before our body was all sent: stop sending it
            self._blocked.pop(stream_id, None)
            self._out.append(_frame(RST_STREAM, 0, stream_id, NO_ERROR.to_bytes(4, "big")))
        if stream.status == 0:
            events.append(Failed(stream_id, "the stream ended without an answer"))
        else:
            events.append(Answered(stream_id, stream.status, stream.headers,
                                   bytes(stream.body)))

    def _fail(self, stream_id: int, reason: str, events: list[Event]) -> None:
        self.reset(stream_id, PROTOCOL_ERROR)
        events.append(Failed(stream_id, reason))

    def _settings(self, payload: bytes) -> None:
        if len(payload) % 6:
            raise self._error(FRAME_SIZE_ERROR, "SETTINGS of the wrong size")
        for offset in range(0, len(payload), 6):
            setting, value = struct.unpack_from(">HI", payload, offset)
            if setting == SETTINGS_HEADER_TABLE_SIZE:
                # Our encoder may use at most what the server's decoder keeps
                self.encoder.header_table_size = min(value, MAX_TABLE_SIZE)
            elif setting == SETTINGS_MAX_CONCURRENT_STREAMS:
                self.max_concurrent_streams = value
            elif setting == SETTINGS_INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    raise self._error(FLOW_CONTROL_ERROR, "an initial window beyond 2^31-1")
                delta, self._peer_window = value - self._peer_window, value
                for stream in self.streams.values():
                    stream.send_window += delta
            elif setting == SETTINGS_MAX_FRAME_SIZE:
                if not DEFAULT_FRAME_SIZE <= value <= 2**24 - 1:
                    raise self._error(PROTOCOL_ERROR, "a max frame size out of range")
                self._peer_frame = value
        self._out.append(_frame(SETTINGS, ACK, 0))
        self._resume_bodies()

    def _window_update(self, stream_id: int, payload: bytes, events: list[Event]) -> None:
        if len(payload) != 4:
            raise self._error(FRAME_SIZE_ERROR, "WINDOW_UPDATE of the wrong size")
        increment = int.from_bytes(payload, "big") & MAX_WINDOW
        if stream_id == 0:
            if increment == 0:
                raise self._error(PROTOCOL_ERROR, "a WINDOW_UPDATE of 0")
            self._send_window += increment
            if self._send_window > MAX_WINDOW:
                raise self._error(FLOW_CONTROL_ERROR, "the connection window beyond 2^31-1")
            self._resume_bodies()
            return
        stream = self.streams.get(stream_id)
        if stream is None:
            return
        stream.send_window += increment
        if increment == 0 or stream.send_window > MAX_WINDOW:
            self.reset(stream_id, FLOW_CONTROL_ERROR if increment else PROTOCOL_ERROR)
            events.append(Failed(stream_id, "a stream window out of bounds"))
            return
        self._send_body(stream_id, stream)

    def _resume_bodies(self) -> None:
        for stream_id, stream in list(self._blocked.items()):
            if self.streams.get(stream_id) is stream:
                self._send_body(stream_id, stream)
            else:  # ended or reset meanwhile
                del self._blocked[stream_id]
