"""An HPACK encoder (RFC 7541) for what a provider client sends: the same few header blocks
again and again. Sans-IO.

hpack's own encoder searches its tables header by header and Huffman-codes every literal:
about a third of the Python process's CPU per push. Here a block costs a few dictionary
lookups: a header that is the same for every request of a backend (its authority, token,
topic, push type, content type) goes into the dynamic table once and is one or two bytes
afterwards; the others (the path with the device token, the expiration, the collapse id, the
length) are literals without indexing, their encoding kept for when they recur. Strings are
not Huffman-coded (allowed; a few dozen bytes more per request, no CPU).

The table is never evicted from: when an entry does not fit, the next block empties it
first (a size update to 0, then back), so indexes are known without modelling evictions.
"""

from __future__ import annotations

from collections.abc import Iterable

# RFC 7541 Appendix A: the static table, index -> (name, value)
_STATIC = (
    (b":authority", b""), (b":method", b"GET"), (b":method", b"POST"), (b":path", b"/"),
    (b":path", b"/index.html"), (b":scheme", b"http"), (b":scheme", b"https"),
    (b":status", b"200"), (b":status", b"204"), (b":status", b"206"), (b":status", b"304"),
    (b":status", b"400"), (b":status", b"404"), (b":status", b"500"), (b"accept-charset", b""),
    (b"accept-encoding", b"gzip, deflate"), (b"accept-language", b""), (b"accept-ranges", b""),
    (b"accept", b""), (b"access-control-allow-origin", b""), (b"age", b""), (b"allow", b""),
    (b"authorization", b""), (b"cache-control", b""), (b"content-disposition", b""),
    (b"content-encoding", b""), (b"content-language", b""), (b"content-length", b""),
    (b"content-location", b""), (b"content-range", b""), (b"content-type", b""),
    (b"cookie", b""), (b"date", b""), (b"etag", b""), (b"expect", b""), (b"expires", b""),
    (b"from", b""), (b"host", b""), (b"if-match", b""), (b"if-modified-since", b""),
    (b"if-none-match", b""), (b"if-range", b""), (b"if-unmodified-since", b""),
    (b"last-modified", b""), (b"link", b""), (b"location", b""), (b"max-forwards", b""),
    (b"proxy-authenticate", b""), (b"proxy-authorization", b""), (b"range", b""),
    (b"referer", b""), (b"refresh", b""), (b"retry-after", b""), (b"server", b""),
    (b"set-cookie", b""), (b"strict-transport-security", b""), (b"transfer-encoding", b""),
    (b"user-agent", b""), (b"vary", b""), (b"via", b""), (b"www-authenticate", b""),
)
_STATIC_PAIR = {pair: index for index, pair in enumerate(_STATIC, 1) if pair[1]}
_STATIC_NAME: dict[bytes, int] = {}
for _index, (_name, _) in enumerate(_STATIC, 1):
    _STATIC_NAME.setdefault(_name, _index)

DEFAULT_TABLE_SIZE = 4096  # SETTINGS_HEADER_TABLE_SIZE's default
# Headers whose value is the same for every request of a backend (for a while, as a
# bearer token): worth a dynamic table entry.
INDEXED = frozenset({b":authority", b"authorization", b"apns-topic", b"apns-push-type",
                     b"apns-priority", b"content-type", b"content-encoding", b"urgency"})
MAX_CACHED = 8192  # literal encodings kept for when they recur (device paths, ...)


def integer(value: int, prefix_bits: int, flags: int = 0) -> bytes:
    """RFC 7541 5.1: ``value`` with an N-bit prefix, the first octet's high bits ``flags``."""
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


class Encoder:
    """What h2wire encodes its requests' headers with (``encode``, and
    ``header_table_size`` from the peer's SETTINGS). Blocks are kept by the headers as
    given (text), so a header seen before costs one dictionary lookup."""

    def __init__(self) -> None:
        self._limit = DEFAULT_TABLE_SIZE  # what the peer allows (its SETTINGS)
        self._entries: dict[tuple[str, str], int] = {}  # -> insertion number
        self._used = 0
        self._indexed: dict[tuple[str, str], bytes] = {}  # valid until the next insertion
        self._literals: dict[tuple[str, str], bytes] = {}
        self._size_updates: list[int] = []
        self._empty_next = False  # an entry did not fit: the next block starts afresh

    @property
    def header_table_size(self) -> int:
        return self._limit

    @header_table_size.setter
    def header_table_size(self, value: int) -> None:
        self._limit = value
        self._empty()

    def _empty(self) -> None:
        self._entries.clear()
        self._indexed.clear()
        self._used = 0
        self._size_updates = [0, self._limit]

    def encode(self, headers: Iterable[tuple[str, str]]) -> bytes:
        if self._empty_next:
            self._empty_next = False
            self._empty()
        indexed, literals = self._indexed, self._literals
        block = [indexed.get(pair) or literals.get(pair) or self._encode(pair)
                 for pair in headers]
        if self._size_updates:  # at the start of the block (RFC 7541 4.2)
            block[:0] = [integer(size, 5, 0x20) for size in self._size_updates]
            self._size_updates = []
        return b"".join(block)

    def _encode(self, pair: tuple[str, str]) -> bytes:
        name, value = pair[0].encode(), pair[1].encode()
        static = _STATIC_PAIR.get((name, value))
        if static is not None:
            encoded = integer(static, 7, 0x80)
            self._literals[pair] = encoded
            return encoded
        if pair in self._entries:  # in the table; its index moved since it was cached
            position = len(self._entries) - 1 - self._entries[pair]
            encoded = self._indexed[pair] = integer(len(_STATIC) + 1 + position, 7, 0x80)
            return encoded
        name_index = _STATIC_NAME.get(name, 0)
        if name in INDEXED:
            size = len(name) + len(value) + 32
            if self._used + size <= self._limit:
                self._entries[pair] = len(self._entries)
                self._used += size
                self._indexed.clear()  # every index moved by one
                head = integer(name_index, 6, 0x40)
                return head + (b"" if name_index else string(name)) + string(value)
            if size <= self._limit:  # not while this block may refer to the table
                self._empty_next = True
            return integer(name_index, 4) + (b"" if name_index else string(name)) + string(value)
        encoded = integer(name_index, 4) + (b"" if name_index else string(name)) + string(value)
        if len(self._literals) >= MAX_CACHED:
            self._literals.clear()
        self._literals[pair] = encoded
        return encoded


def decode_plain(block: bytes) -> list[tuple[bytes, bytes]] | None:
    """A header block as providers answer a push (``:status`` from the static table, a
    few literals not indexed), decoded without touching the dynamic table; None for any
    other block (an index into the dynamic table, an indexed literal, a size update,
    Huffman, long strings), which hpack's decoder then decodes, its table as it was."""
    fields: list[tuple[bytes, bytes]] = []
    position, end = 0, len(block)
    while position < end:
        first = block[position]
        if first & 0x80:  # indexed: static entries only (one byte: index < 127)
            index = first & 0x7F
            if not 0 < index <= len(_STATIC):
                return None
            fields.append(_STATIC[index - 1])
            position += 1
            continue
        if first & 0xE0:  # indexed literal (01), size update (001)
            return None
        index = first & 0x0F  # literal without (0000) or never (0001) indexing
        position += 1
        if index == 0:
            found = _plain_string(block, position)
            if found is None:
                return None
            name, position = found
        elif index < 0x0F:
            name = _STATIC[index - 1][0]
        else:  # a multi-byte index
            return None
        found = _plain_string(block, position)
        if found is None:
            return None
        value, position = found
        fields.append((name, value))
    return fields


def _plain_string(block: bytes, position: int) -> tuple[bytes, int] | None:
    if position >= len(block) or block[position] & 0x80:  # Huffman-coded
        return None
    length = block[position] & 0x7F
    end = position + 1 + length
    if length == 0x7F or end > len(block):  # long (multi-byte length) or cut short
        return None
    return block[position + 1:end], end
