"""Erlang External Term Format (ETF), both ways: every term OTP 25 can produce.

Mapping (decode -> Python -> encode):

=========================  ===========================  ==========================
Erlang                     Python                       encoded as
=========================  ===========================  ==========================
atom                       :class:`Atom` (a ``str``)    SMALL_ATOM_UTF8 / ATOM_UTF8
``true`` / ``false``       ``True`` / ``False``         atom
integer                    ``int``                      SMALL_INTEGER/INTEGER/BIG
float                      ``float``                    NEW_FLOAT
binary                     ``bytes``                    BINARY
bitstring                  :class:`BitBinary`           BIT_BINARY
tuple                      ``tuple``                    SMALL/LARGE_TUPLE
proper list                ``list``                     NIL / STRING / LIST
improper list              :class:`ImproperList`        LIST with a tail
map                        ``dict``                     MAP
pid / port / reference     :class:`Pid` etc.            NEW_PID / V4_PORT / NEWER_REFERENCE
fun / external fun         :class:`Fun` / :class:`Export`  as received
(any, encode only)         :class:`Encoded`             its bytes, as they are
=========================  ===========================  ==========================

Python ``str`` that is not an :class:`Atom` encodes as a UTF-8 binary (what
ejabberd uses for text). A list used as a map key decodes as :class:`HashableList`
(a tuple subclass that encodes back as a list); a map whose keys Python would
merge (``1``, ``1.0`` and ``true`` are equal in Python) decodes as
:class:`HashableMap`, its ``(key, value)`` pairs. Compressed terms are inflated.
``ATOM_CACHE_REF`` and ``DIST_HEADER`` only occur on distribution links, never
in ``term_to_binary`` output, and are rejected.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from typing import Any

__all__ = [
    "Atom", "BitBinary", "DecodeError", "Encoded", "Export", "Fun", "HashableList",
    "HashableMap", "ImproperList", "Pid", "Port", "Reference", "decode", "encode", "encoded",
]

VERSION = 131
NEW_FLOAT_EXT = 70
BIT_BINARY_EXT = 77
COMPRESSED = 80
NEW_PID_EXT = 88
NEW_PORT_EXT = 89
NEWER_REFERENCE_EXT = 90
SMALL_INTEGER_EXT = 97
INTEGER_EXT = 98
FLOAT_EXT = 99
ATOM_EXT = 100
REFERENCE_EXT = 101
PORT_EXT = 102
PID_EXT = 103
SMALL_TUPLE_EXT = 104
LARGE_TUPLE_EXT = 105
NIL_EXT = 106
STRING_EXT = 107
LIST_EXT = 108
BINARY_EXT = 109
SMALL_BIG_EXT = 110
LARGE_BIG_EXT = 111
NEW_FUN_EXT = 112
EXPORT_EXT = 113
NEW_REFERENCE_EXT = 114
SMALL_ATOM_EXT = 115
MAP_EXT = 116
FUN_EXT = 117
ATOM_UTF8_EXT = 118
SMALL_ATOM_UTF8_EXT = 119
V4_PORT_EXT = 120


class DecodeError(ValueError):
    """The bytes are not a well-formed external term."""


class Atom(str):
    """An Erlang atom. Compares equal to the plain string of its name."""

    __slots__ = ()

    def __repr__(self) -> str:
        return f"Atom({str.__repr__(self)})"


@dataclass(frozen=True, slots=True)
class BitBinary:
    """A bitstring whose last byte holds only ``bits`` (1..8) significant bits."""

    data: bytes
    bits: int

    def __post_init__(self) -> None:
        # Erlang keeps the unused low bits of the last byte at zero; so do we.
        if self.data and 1 <= self.bits < 8:
            mask = (0xFF << (8 - self.bits)) & 0xFF
            object.__setattr__(self, "data", self.data[:-1] + bytes((self.data[-1] & mask,)))


@dataclass(frozen=True, slots=True)
class ImproperList:
    """``[E1, ..., En | Tail]`` where ``Tail`` is not a list."""

    elements: tuple[Any, ...]
    tail: Any


class HashableList(tuple):  # type: ignore[type-arg]
    """A proper list used where Python needs something hashable (a map key)."""

    __slots__ = ()


class HashableMap(tuple):  # type: ignore[type-arg]
    """A map used as a map key: its ``(key, value)`` pairs, encoded back as a map."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class Encoded:
    """A term encoded already (without the version byte), written as it is: a part that
    recurs in many terms is encoded once (:func:`encoded`)."""

    data: bytes


def encoded(term: Any) -> Encoded:
    return Encoded(encode(term)[1:])


@dataclass(frozen=True, slots=True)
class Pid:
    node: Atom
    id: int
    serial: int
    creation: int


@dataclass(frozen=True, slots=True)
class Port:
    node: Atom
    id: int
    creation: int


@dataclass(frozen=True, slots=True)
class Reference:
    node: Atom
    creation: int
    ids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Fun:
    """A local fun, kept field by field so that it encodes back unchanged."""

    arity: int
    uniq: bytes
    index: int
    module: Atom
    old_index: int
    old_uniq: int
    pid: Pid
    free_vars: tuple[Any, ...]


@dataclass(frozen=True, slots=True)
class Export:
    """An external fun ``fun Module:Function/Arity``."""

    module: Atom
    function: Atom
    arity: int


_ATOM_CACHE: dict[bytes, Any] = {b"true": True, b"false": False}
_unpack_u16 = struct.Struct(">H").unpack_from
_unpack_u32 = struct.Struct(">I").unpack_from
_unpack_i32 = struct.Struct(">i").unpack_from
_unpack_f64 = struct.Struct(">d").unpack_from


def decode(data: bytes) -> Any:
    """Decode one complete ``term_to_binary`` result."""
    if not data or data[0] != VERSION:
        raise DecodeError("missing version byte 131")
    try:
        if len(data) > 1 and data[1] == COMPRESSED:
            (size,) = _unpack_u32(data, 2)
            inflater = zlib.decompressobj()
            raw = inflater.decompress(data[6:], size + 1)
            if len(raw) != size or not inflater.eof or inflater.unused_data:
                raise DecodeError("compressed term has the wrong size")
            term, pos = _decode(raw, 0)
            end, length = pos, len(raw)
        else:
            term, pos = _decode(data, 1)
            end, length = pos, len(data)
    except DecodeError:
        raise
    except (IndexError, struct.error, zlib.error, ValueError, TypeError, RecursionError) as exc:
        raise DecodeError(f"truncated or malformed term: {exc}") from None
    if end != length:
        raise DecodeError(f"{length - end} trailing bytes after the term")
    return term


def _atom(name: bytes, utf8: bool) -> Any:
    try:
        return _ATOM_CACHE[name]
    except KeyError:
        atom = Atom(name.decode("utf-8" if utf8 else "latin-1"))
        if len(_ATOM_CACHE) < 10_000:
            _ATOM_CACHE[name] = atom
        return atom


def _take(data: bytes, pos: int, size: int) -> bytes:
    end = pos + size
    if end > len(data):
        raise IndexError("term runs past the end of the frame")
    return data[pos:end]


def _decode_items(data: bytes, pos: int, count: int) -> tuple[list[Any], int]:
    """The elements of a tuple or list; binaries, small atoms, integers and tuples and
    empty lists without a call to _decode each (the codec's hot loop)."""
    items: list[Any] = []
    for _ in range(count):
        tag = data[pos]
        if tag == BINARY_EXT:
            (size,) = _unpack_u32(data, pos + 1)
            end = pos + 5 + size
            if end > len(data):
                raise IndexError("term runs past the end of the frame")
            items.append(data[pos + 5:end])
            pos = end
        elif tag == SMALL_ATOM_UTF8_EXT:
            size = data[pos + 1]
            name = data[pos + 2:pos + 2 + size]
            atom = _ATOM_CACHE.get(name)
            if atom is None or len(name) != size:
                atom, pos = _decode(data, pos)
            else:
                pos += 2 + size
            items.append(atom)
        elif tag == SMALL_TUPLE_EXT:
            elements, pos = _decode_items(data, pos + 2, data[pos + 1])
            items.append(tuple(elements))
        elif tag == SMALL_INTEGER_EXT:
            items.append(data[pos + 1])
            pos += 2
        elif tag == NIL_EXT:
            items.append([])
            pos += 1
        else:
            item, pos = _decode(data, pos)
            items.append(item)
    return items, pos


def _decode(data: bytes, pos: int) -> tuple[Any, int]:  # noqa: C901 - one branch per tag
    tag = data[pos]
    pos += 1
    if tag == SMALL_INTEGER_EXT:
        return data[pos], pos + 1
    if tag == BINARY_EXT:
        (size,) = _unpack_u32(data, pos)
        return _take(data, pos + 4, size), pos + 4 + size
    if tag == SMALL_ATOM_UTF8_EXT or tag == SMALL_ATOM_EXT:
        size = data[pos]
        return _atom(_take(data, pos + 1, size), tag == SMALL_ATOM_UTF8_EXT), pos + 1 + size
    if tag == SMALL_TUPLE_EXT or tag == LARGE_TUPLE_EXT:
        if tag == SMALL_TUPLE_EXT:
            arity = data[pos]
            pos += 1
        else:
            (arity,) = _unpack_u32(data, pos)
            pos += 4
        items, pos = _decode_items(data, pos, arity)
        return tuple(items), pos
    if tag == NIL_EXT:
        return [], pos
    if tag == LIST_EXT:
        (length,) = _unpack_u32(data, pos)
        pos += 4
        if length > len(data):
            raise IndexError("list longer than the frame")
        elements, pos = _decode_items(data, pos, length)
        tail, pos = _decode(data, pos)
        if tail == [] and isinstance(tail, list):
            return elements, pos
        if isinstance(tail, list):  # only from hand-made terms; Erlang would flatten it
            return elements + tail, pos
        if isinstance(tail, ImproperList):
            return ImproperList(tuple(elements) + tail.elements, tail.tail), pos
        return ImproperList(tuple(elements), tail), pos
    if tag == STRING_EXT:
        (size,) = _unpack_u16(data, pos)
        return list(_take(data, pos + 2, size)), pos + 2 + size
    if tag == INTEGER_EXT:
        return _unpack_i32(data, pos)[0], pos + 4
    if tag == MAP_EXT:
        (arity,) = _unpack_u32(data, pos)
        pos += 4
        if arity > len(data):
            raise IndexError("map larger than the frame")
        flat, pos = _decode_items(data, pos, 2 * arity)  # key, value, key, value...
        pairs = [(_hashable(flat[i]), flat[i + 1]) for i in range(0, len(flat), 2)]
        result = dict(pairs)
        if len(result) != arity:
            # Keys distinct in Erlang but equal in Python (1, 1.0 and true): keep them all.
            return HashableMap(pairs), pos
        return result, pos
    if tag == ATOM_UTF8_EXT or tag == ATOM_EXT:
        (size,) = _unpack_u16(data, pos)
        return _atom(_take(data, pos + 2, size), tag == ATOM_UTF8_EXT), pos + 2 + size
    if tag == NEW_FLOAT_EXT:
        return _unpack_f64(data, pos)[0], pos + 8
    if tag == FLOAT_EXT:
        text = _take(data, pos, 31).split(b"\0", 1)[0]
        return float(text), pos + 31
    if tag == SMALL_BIG_EXT or tag == LARGE_BIG_EXT:
        if tag == SMALL_BIG_EXT:
            size = data[pos]
            pos += 1
        else:
            (size,) = _unpack_u32(data, pos)
            pos += 4
        sign = data[pos]
        magnitude = int.from_bytes(_take(data, pos + 1, size), "little")
        return (-magnitude if sign else magnitude), pos + 1 + size
    if tag == BIT_BINARY_EXT:
        (size,) = _unpack_u32(data, pos)
        bits = data[pos + 4]
        if not 1 <= bits <= 8 or size == 0:
            raise DecodeError("bad bit count in a bitstring")
        raw = _take(data, pos + 5, size)
        return (raw if bits == 8 else BitBinary(raw, bits)), pos + 5 + size
    if tag in (NEW_PID_EXT, PID_EXT):
        node, pos = _decode_node(data, pos)
        (pid_id,) = _unpack_u32(data, pos)
        (serial,) = _unpack_u32(data, pos + 4)
        if tag == NEW_PID_EXT:
            return Pid(node, pid_id, serial, _unpack_u32(data, pos + 8)[0]), pos + 12
        return Pid(node, pid_id, serial, data[pos + 8]), pos + 9
    if tag in (V4_PORT_EXT, NEW_PORT_EXT, PORT_EXT):
        node, pos = _decode_node(data, pos)
        if tag == V4_PORT_EXT:
            port_id = int.from_bytes(_take(data, pos, 8), "big")
            return Port(node, port_id, _unpack_u32(data, pos + 8)[0]), pos + 12
        (port_id,) = _unpack_u32(data, pos)
        if tag == NEW_PORT_EXT:
            return Port(node, port_id, _unpack_u32(data, pos + 4)[0]), pos + 8
        return Port(node, port_id, data[pos + 4]), pos + 5
    if tag in (NEWER_REFERENCE_EXT, NEW_REFERENCE_EXT):
        (count,) = _unpack_u16(data, pos)
        node, pos = _decode_node(data, pos + 2)
        if tag == NEWER_REFERENCE_EXT:
            (creation,) = _unpack_u32(data, pos)
            pos += 4
        else:
            creation = data[pos]
            pos += 1
        ids = struct.unpack_from(f">{count}I", data, pos)
        return Reference(node, creation, ids), pos + 4 * count
    if tag == REFERENCE_EXT:
        node, pos = _decode_node(data, pos)
        return Reference(node, data[pos + 4], (_unpack_u32(data, pos)[0],)), pos + 5
    if tag == EXPORT_EXT:
        module, pos = _decode_atom(data, pos)
        function, pos = _decode_atom(data, pos)
        arity, pos = _decode(data, pos)
        if type(arity) is not int:
            raise DecodeError("malformed external fun")
        return Export(module, function, arity), pos
    if tag == NEW_FUN_EXT:
        (size,) = _unpack_u32(data, pos)
        end = pos + size
        arity = data[pos + 4]
        uniq = _take(data, pos + 5, 16)
        (index,) = _unpack_u32(data, pos + 21)
        (num_free,) = _unpack_u32(data, pos + 25)
        pos += 29
        module, pos = _decode_atom(data, pos)
        old_index, pos = _decode(data, pos)
        old_uniq, pos = _decode(data, pos)
        pid, pos = _decode(data, pos)
        free = []
        for _ in range(num_free):
            item, pos = _decode(data, pos)
            free.append(item)
        if pos != end or not isinstance(pid, Pid):
            raise DecodeError("malformed fun")
        return Fun(arity, uniq, index, module, old_index, old_uniq, pid, tuple(free)), pos
    raise DecodeError(f"unknown or unsupported tag {tag}")


def _decode_atom(data: bytes, pos: int) -> tuple[Atom, int]:
    """An atom where only an atom may stand (modules, functions, nodes): even true/false."""
    term, pos = _decode(data, pos)
    if isinstance(term, bool):
        return Atom("true" if term else "false"), pos
    if not isinstance(term, Atom):
        raise DecodeError("expected an atom")
    return term, pos


_decode_node = _decode_atom


def _hashable(term: Any) -> Any:
    if isinstance(term, list):
        return HashableList(_hashable(item) for item in term)
    if isinstance(term, tuple) and not isinstance(term, HashableList):
        return tuple(_hashable(item) for item in term)
    if isinstance(term, dict):
        return HashableMap((k, _hashable(v)) for k, v in term.items())
    if isinstance(term, ImproperList):
        return ImproperList(tuple(_hashable(e) for e in term.elements), _hashable(term.tail))
    if isinstance(term, Fun):
        return Fun(term.arity, term.uniq, term.index, term.module, term.old_index,
                   term.old_uniq, term.pid, tuple(_hashable(v) for v in term.free_vars))
    return term


# --------------------------------------------------------------------------- encoding

_pack_u16 = struct.Struct(">H").pack
_pack_u32 = struct.Struct(">I").pack
_pack_i32 = struct.Struct(">i").pack
_pack_f64 = struct.Struct(">d").pack
_ENCODED_ATOMS: dict[str, bytes] = {}


def encode(term: Any) -> bytes:
    """Encode a term as ``term_to_binary`` would (uncompressed)."""
    out: list[bytes] = [b"\x83"]
    _encode(term, out)
    return b"".join(out)


def _encode_atom(name: str, out: list[bytes]) -> None:
    cached = _ENCODED_ATOMS.get(name)
    if cached is None:
        raw = name.encode("utf-8")
        if len(name) > 255:
            raise ValueError("atom longer than 255 characters")
        if len(raw) < 256:
            cached = bytes((SMALL_ATOM_UTF8_EXT, len(raw))) + raw
        else:
            cached = bytes((ATOM_UTF8_EXT,)) + _pack_u16(len(raw)) + raw
        if len(_ENCODED_ATOMS) < 10_000:
            _ENCODED_ATOMS[name] = cached
    out.append(cached)


def _encode(term: Any, out: list[bytes]) -> None:  # noqa: C901 - one branch per type
    kind = type(term)
    if kind is bytes:
        out.append(b"m" + _pack_u32(len(term)))
        out.append(term)
    elif kind is Atom:
        _encode_atom(term, out)
    elif kind is tuple:
        arity = len(term)
        out.append(bytes((SMALL_TUPLE_EXT, arity)) if arity < 256 else b"i" + _pack_u32(arity))
        _encode_items(term, out)
    elif kind is bool:
        _encode_atom("true" if term else "false", out)
    elif kind is int:
        if 0 <= term < 256:
            out.append(bytes((SMALL_INTEGER_EXT, term)))
        elif -(2**31) <= term < 2**31:
            out.append(b"b" + _pack_i32(term))
        else:
            magnitude = -term if term < 0 else term
            raw = magnitude.to_bytes((magnitude.bit_length() + 7) // 8, "little")
            sign = b"\x01" if term < 0 else b"\x00"
            if len(raw) < 256:
                out.append(bytes((SMALL_BIG_EXT, len(raw))) + sign + raw)
            else:
                out.append(b"o" + _pack_u32(len(raw)) + sign + raw)
    elif kind is str:
        raw = term.encode("utf-8")
        out.append(b"m" + _pack_u32(len(raw)))
        out.append(raw)
    elif kind is list or kind is HashableList:
        _encode_list(term, out)
    elif kind is dict:
        out.append(b"t" + _pack_u32(len(term)))
        for key, value in term.items():
            _encode(key, out)
            _encode(value, out)
    elif kind is float:
        out.append(b"F" + _pack_f64(term))
    elif kind is type(None):
        _encode_atom("undefined", out)
    else:
        _encode_other(term, out)


def _encode_list(items: Any, out: list[bytes]) -> None:
    if not items:
        out.append(b"j")
        return
    if len(items) < 65536 and all(type(i) is int and 0 <= i < 256 for i in items):
        out.append(b"k" + _pack_u16(len(items)) + bytes(items))
        return
    out.append(b"l" + _pack_u32(len(items)))
    _encode_items(items, out)
    out.append(b"j")


def _encode_items(items: Any, out: list[bytes]) -> None:
    """The elements of a tuple or list; binaries and atoms, most of what ejabberd and
    Python exchange, without a call each (the codec's hot loop)."""
    for item in items:
        kind = type(item)
        if kind is bytes:
            out.append(b"m" + _pack_u32(len(item)))
            out.append(item)
        elif kind is Atom:
            cached = _ENCODED_ATOMS.get(item)
            if cached is None:
                _encode_atom(item, out)
            else:
                out.append(cached)
        else:
            _encode(item, out)


def _encode_other(term: Any, out: list[bytes]) -> None:
    if type(term) is Encoded:
        out.append(term.data)
    elif isinstance(term, Atom):
        _encode_atom(term, out)
    elif isinstance(term, bool):
        _encode_atom("true" if term else "false", out)
    elif isinstance(term, (bytes, bytearray, memoryview)):
        raw = bytes(term)
        out.append(b"m" + _pack_u32(len(raw)))
        out.append(raw)
    elif isinstance(term, HashableList):
        _encode_list(term, out)
    elif isinstance(term, HashableMap):
        out.append(b"t" + _pack_u32(len(term)))
        for key, value in term:
            _encode(key, out)
            _encode(value, out)
    elif isinstance(term, tuple):
        _encode(tuple(term), out)
    elif isinstance(term, int):
        _encode(int(term), out)
    elif isinstance(term, str):
        _encode(str(term), out)
    elif isinstance(term, ImproperList):
        if not term.elements:
            raise ValueError("an improper list needs at least one element")
        out.append(b"l" + _pack_u32(len(term.elements)))
        for item in term.elements:
            _encode(item, out)
        _encode(term.tail, out)
    elif isinstance(term, BitBinary):
        if not term.data or not 1 <= term.bits <= 8:
            raise ValueError("a bitstring needs data and 1..8 bits in its last byte")
        out.append(b"M" + _pack_u32(len(term.data)) + bytes((term.bits,)) + term.data)
    elif isinstance(term, Pid):
        out.append(bytes((NEW_PID_EXT,)))
        _encode_atom(term.node, out)
        out.append(_pack_u32(term.id) + _pack_u32(term.serial) + _pack_u32(term.creation))
    elif isinstance(term, Port):
        out.append(bytes((V4_PORT_EXT,)))
        _encode_atom(term.node, out)
        out.append(term.id.to_bytes(8, "big") + _pack_u32(term.creation))
    elif isinstance(term, Reference):
        out.append(bytes((NEWER_REFERENCE_EXT,)) + _pack_u16(len(term.ids)))
        _encode_atom(term.node, out)
        out.append(_pack_u32(term.creation) + b"".join(_pack_u32(i) for i in term.ids))
    elif isinstance(term, Export):
        out.append(bytes((EXPORT_EXT,)))
        _encode_atom(term.module, out)
        _encode_atom(term.function, out)
        _encode(term.arity, out)
    elif isinstance(term, Fun):
        body: list[bytes] = [
            bytes((term.arity,)), term.uniq, _pack_u32(term.index), _pack_u32(len(term.free_vars)),
        ]
        _encode_atom(term.module, body)
        for item in (term.old_index, term.old_uniq, term.pid, *term.free_vars):
            _encode(item, body)
        payload = b"".join(body)
        out.append(bytes((NEW_FUN_EXT,)) + _pack_u32(len(payload) + 4) + payload)
    elif isinstance(term, float):
        out.append(b"F" + _pack_f64(float(term)))
    elif isinstance(term, dict):
        _encode(dict(term), out)
    elif isinstance(term, list):
        _encode(list(term), out)
    else:
        raise TypeError(f"cannot encode {type(term).__name__} as an Erlang term")
