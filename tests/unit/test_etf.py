"""The ETF codec, checked against Erlang itself (an escript on {packet,4}) and by properties."""

from __future__ import annotations

import shutil
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from pymod_push import etf
from pymod_push.etf import (
    Atom,
    BitBinary,
    Export,
    Fun,
    HashableList,
    HashableMap,
    ImproperList,
    Pid,
    Port,
    Reference,
)

ORACLE = Path(__file__).resolve().parent.parent / "etf_oracle.escript"


class Erlang:
    def __init__(self) -> None:
        escript = shutil.which("escript")
        if escript is None:
            pytest.fail("Erlang is not installed: run the tests with 'make test'")
        self.proc = subprocess.Popen([escript, str(ORACLE)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE)

    def call(self, request: Any) -> Any:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        payload = etf.encode(request)
        self.proc.stdin.write(struct.pack(">I", len(payload)) + payload)
        self.proc.stdin.flush()
        (size,) = struct.unpack(">I", self.proc.stdout.read(4))
        return etf.decode(self.proc.stdout.read(size))

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(10)


@pytest.fixture(scope="module")
def erlang() -> Iterator[Erlang]:
    oracle = Erlang()
    yield oracle
    oracle.close()


def canon(term: Any) -> Any:
    """A comparable form that keeps the distinctions Erlang makes (1 vs 1.0 vs true)."""
    if isinstance(term, bool):
        return ("bool", term)
    if isinstance(term, Atom):
        return ("atom", str(term))
    if isinstance(term, int):
        return ("int", term)
    if isinstance(term, float):
        return ("float", term)
    if isinstance(term, bytes):
        return ("bytes", term)
    if isinstance(term, (HashableList, list)):
        return ("list", tuple(canon(t) for t in term))
    if isinstance(term, HashableMap):
        return ("map", frozenset((canon(k), canon(v)) for k, v in term))
    if isinstance(term, dict):
        return ("map", frozenset((canon(k), canon(v)) for k, v in term.items()))
    if isinstance(term, tuple):
        return ("tuple", tuple(canon(t) for t in term))
    if isinstance(term, ImproperList):
        return ("improper", tuple(canon(t) for t in term.elements), canon(term.tail))
    if isinstance(term, Fun):
        return ("fun", term.arity, term.uniq, term.index, term.module, canon(term.old_index),
                canon(term.old_uniq), term.pid, tuple(canon(t) for t in term.free_vars))
    return (type(term).__name__, term)


A = Atom
ERLANG_MADE: list[tuple[str, Any]] = [
    ("ok", A("ok")),
    ("'ünïcødé'", A("ünïcødé")),
    ("list_to_atom(lists:duplicate(255, $x))", A("x" * 255)),
    ("list_to_atom(lists:duplicate(100, 16#1F600))", A("\U0001F600" * 100)),
    ("{true, false, undefined, nil}", (True, False, A("undefined"), A("nil"))),
    ("[]", []),
    ("\"abc\"", [97, 98, 99]),
    ("[1, 2 | 3]", ImproperList((1, 2), 3)),
    ("[a | <<\"b\">>]", ImproperList((A("a"),), b"b")),
    ("[1000, -1, a]", [1000, -1, A("a")]),
    ("lists:seq(1, 70000)", list(range(1, 70001))),
    ("<<1, 2, 3>>", b"\x01\x02\x03"),
    ("<<>>", b""),
    ("<<5:3>>", BitBinary(bytes([0b10100000]), 3)),
    ("<<1, 2, 3:7>>", BitBinary(bytes([1, 2, 6]), 7)),
    ("{}", ()),
    ("list_to_tuple(lists:seq(1, 300))", tuple(range(1, 301))),
    ("{0, 255, 256, -1, 2147483647, -2147483648, 2147483648, -2147483649}",
     (0, 255, 256, -1, 2147483647, -2147483648, 2147483648, -2147483649)),
    ("{1 bsl 64, -(1 bsl 70), 1 bsl 2100}", (1 << 64, -(1 << 70), 1 << 2100)),
    ("{3.14, -2.5e-300, 1.0e308, 0.0}", (3.14, -2.5e-300, 1.0e308, 0.0)),
    ("#{}", {}),
    ("#{a => 1, [1] => 2, {x, [y]} => 3, #{k => v} => 4}",
     {A("a"): 1, HashableList((1,)): 2, (A("x"), HashableList((A("y"),))): 3,
      HashableMap(((A("k"), A("v")),)): 4}),
    ("#{1 => a, 1.0 => b, true => c}",
     HashableMap(((1, A("a")), (1.0, A("b")), (True, A("c"))))),
    ("maps:from_list([{N, [N]} || N <- lists:seq(1, 100)])", {n: [n] for n in range(1, 101)}),
    ("list_to_binary(lists:duplicate(100000, $a))", b"a" * 100000),
    ("fun lists:map/2", Export(A("lists"), A("map"), 2)),
]
OPAQUE = ["self()", "make_ref()", "hd(erlang:ports())", "fun(X) -> X + 1 end",
          "begin Y = {1, 2}, fun(X) -> {X, Y} end end", "{self(), make_ref(), [self()]}",
          "list_to_pid(\"<0.1234.5>\")"]


@pytest.mark.parametrize(("expression", "expected"), ERLANG_MADE, ids=[e for e, _ in ERLANG_MADE])
def test_terms_made_by_erlang(erlang: Erlang, expression: str, expected: Any) -> None:
    tag, plain, compressed, minor0 = erlang.call((A("eval"), expression.encode()))
    assert tag == "ok"
    for encoded in (plain, compressed, minor0):
        assert canon(etf.decode(encoded)) == canon(expected)
    # Python's encoding of what it decoded is the same term to Erlang.
    assert erlang.call((A("check"), etf.encode(etf.decode(plain)))) is True


@pytest.mark.parametrize("expression", OPAQUE)
def test_pids_refs_ports_funs_made_by_erlang(erlang: Erlang, expression: str) -> None:
    _, plain, compressed, minor0 = erlang.call((A("eval"), expression.encode()))
    decoded = etf.decode(plain)
    assert canon(etf.decode(compressed)) == canon(decoded) == canon(etf.decode(minor0))
    assert erlang.call((A("check"), etf.encode(decoded))) is True


def test_pid_ref_port_types(erlang: Erlang) -> None:
    _, plain, _, _ = erlang.call((A("eval"), b"{self(), make_ref(), hd(erlang:ports()), "
                                               b"fun() -> ok end, "
                                               b"list_to_integer(erlang:system_info(otp_release))}"))
    pid, ref, port, fun, otp_release = etf.decode(plain)
    assert isinstance(pid, Pid) and pid.node == "nonode@nohost"
    assert isinstance(ref, Reference) and len(ref.ids) >= 3
    assert isinstance(port, Port)
    assert isinstance(fun, Fun) and fun.arity == 0 and isinstance(fun.pid, Pid)
    if otp_release < 27:  # OTP 27+ no longer records the creating process in a fun
        assert fun.pid == pid


# ------------------------------------------------------------------ property tests

nodes = st.sampled_from([A("n@h"), A("ejabberd@localhost"), A("x@127.0.0.1"), A("true")])
u32 = st.integers(0, 2**32 - 1)
# The atoms true and false are Python's True and False (see pymod_push.etf).
atoms = (st.text(max_size=40).filter(lambda t: t not in ("true", "false")).map(Atom)
         | st.sampled_from([A("ok"), A("undefined"), A("")]))
any_atom = atoms | st.sampled_from([A("true"), A("false")])  # where only atoms may stand
leaves = (
    atoms | st.booleans() | st.integers(-(2**40), 2**40) | st.integers(-(2**3000), 2**3000)
    | st.floats(allow_nan=False, allow_infinity=False) | st.binary(max_size=64)
    | st.builds(BitBinary, st.binary(min_size=1, max_size=8), st.integers(1, 7))
    | st.builds(Pid, nodes, st.integers(0, 2**28 - 1), st.integers(0, 2**13 - 1), u32)
    | st.builds(Port, nodes, st.integers(0, 2**64 - 1), u32)
    | st.builds(Reference, nodes, u32, st.lists(u32, min_size=3, max_size=5).map(tuple))
    | st.builds(Export, any_atom, any_atom, st.integers(0, 255))
)
keys = st.recursive(atoms | st.integers() | st.binary(max_size=8),
                    lambda inner: st.lists(inner, max_size=3).map(tuple), max_leaves=5)


def _containers(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return (
        st.lists(inner, max_size=6)
        | st.lists(inner, max_size=6).map(tuple)
        | st.dictionaries(keys, inner, max_size=5)
        | st.builds(ImproperList, st.lists(inner, min_size=1, max_size=4).map(tuple),
                    leaves.filter(lambda t: not isinstance(t, list)))
    )


terms = st.recursive(leaves, _containers, max_leaves=30)
OPTIONS = st.sampled_from([[], [A("compressed")], [(A("minor_version"), 0)]])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(term=terms, options=OPTIONS)
def test_python_terms_survive_erlang(erlang: Erlang, term: Any, options: list[Any]) -> None:
    echoed = erlang.call((A("echo"), etf.encode(term), options))
    assert canon(etf.decode(echoed)) == canon(term)


@settings(max_examples=300, deadline=None)
@given(term=terms)
def test_round_trip_in_python(term: Any) -> None:
    assert canon(etf.decode(etf.encode(term))) == canon(term)


@settings(max_examples=300, deadline=None)
@given(term=terms, data=st.data())
def test_truncated_or_mutated_frames_fail_cleanly(term: Any, data: st.DataObject) -> None:
    encoded = etf.encode(term)
    cut = data.draw(st.integers(0, len(encoded) - 1))
    with pytest.raises(etf.DecodeError):
        etf.decode(encoded[:cut])
    position = data.draw(st.integers(0, len(encoded) - 1))
    mutated = bytearray(encoded)
    mutated[position] = data.draw(st.integers(0, 255))
    try:
        etf.decode(bytes(mutated))
    except etf.DecodeError:
        pass


@given(st.binary(max_size=200))
def test_random_bytes_never_crash_the_decoder(data: bytes) -> None:
    try:
        etf.decode(b"\x83" + data)
    except etf.DecodeError:
        pass


def test_encoding_errors_are_type_errors() -> None:
    with pytest.raises(TypeError):
        etf.encode(object())
    with pytest.raises(ValueError):
        etf.encode(A("x" * 256))


@given(term=terms, part=terms)
def test_encoded_parts_are_written_as_they_are(term: Any, part: Any) -> None:
    """A part encoded once and embedded gives the bytes of the whole term encoded at once.
    Not where the whole would be a list of bytes, which Erlang writes as a string
    (STRING_EXT): an encoded part is a term of its own (the module encodes fields and forms
    so, never a lone byte)."""
    assume(not all(type(t) is int and 0 <= t < 256 for t in (term, part)))
    assert etf.encode([term, etf.encoded(part)]) == etf.encode([term, part])
    assert etf.encode((etf.encoded(part),)) == etf.encode((part,))
