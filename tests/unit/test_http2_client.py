"""The HTTP/2 client the providers are reached with: its hand framing (delivery/h2wire.py)
against h2's server side, another implementation, both sans-IO, bytes passed between them in
arbitrary pieces; HPACK (delivery/hpack_cache.py) against hpack; then the client
(delivery/http2.py) over TLS: retries, deadlines, bounded connections, GOAWAY."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import random
import ssl
import struct
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import hpack
import pytest
import trustme
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hpack import Decoder
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pymod_push.appserver.requests import Iq
from pymod_push.appserver.server import Delivery
from pymod_push.core.config import Backend, Config
from pymod_push.core.destination import IpAddress
from pymod_push.delivery import h2wire, http2
from pymod_push.delivery.dispatcher import Dispatcher
from pymod_push.delivery.h2wire import Answered, Failed, GoneAway, H2Client
from pymod_push.delivery.hpack_cache import Encoder, decode_plain
from pymod_push.delivery.http2 import (
    SWEEP_S,
    Denied,
    Http2Client,
    HttpError,
    Response,
    UserDestinations,
)
from pymod_push.records import RegisteredDevice
from pymod_push.store import Store
from tests.fake_providers import H2Peer, LoopbackCA
from tests.h2_server import Server, answer, exchange, request


def replies_in(events: list[h2wire.Event]) -> list[h2wire.Event]:
    return [e for e in events if isinstance(e, Answered | Failed)]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(requests=st.lists(st.tuples(st.binary(max_size=200_000),
                                   st.binary(max_size=100_000),
                                   st.sampled_from([200, 400, 410, 503])),
                         min_size=1, max_size=6),
       pieces=st.integers(1, 40))
def test_requests_and_answers_arrive_whole_whatever_their_size_and_cut(
        requests: list[tuple[bytes, bytes, int]], pieces: int) -> None:
    client, server = H2Client(), Server()
    ids = [request(client, f"/3/device/{i}", body, (("apns-topic", "org.example"),))
           for i, (body, _, _) in enumerate(requests)]
    events = exchange(client, server, pieces)  # bodies beyond 64 KiB wait for windows
    assert sorted(server.ended) == ids
    for stream_id, (body, _, _) in zip(ids, requests, strict=True):
        assert bytes(server.bodies[stream_id]) == body
        assert server.headers[stream_id][":path"] == f"/3/device/{ids.index(stream_id)}"
        assert server.headers[stream_id]["apns-topic"] == "org.example"
    for stream_id, (_, reply, status) in zip(ids, requests, strict=True):
        answer(server, stream_id, status, (("apns-id", f"id-{stream_id}"),), reply)
    events += exchange(client, server, pieces)
    answered = {e.stream_id: e for e in events if isinstance(e, Answered)}
    assert len(answered) == len(events) == len(ids)
    for stream_id, (_, reply, status) in zip(ids, requests, strict=True):
        assert answered[stream_id] == Answered(stream_id, status,
                                               {"apns-id": f"id-{stream_id}"}, reply)
    assert not client.streams


def test_header_blocks_beyond_a_frame_go_as_continuations_both_ways() -> None:
    client, server = H2Client(), Server()
    big = "x" * 40_000
    stream_id = request(client, extra=(("authorization", f"bearer {big}"),))
    exchange(client, server)
    assert server.headers[stream_id]["authorization"] == f"bearer {big}"
    answer(server, stream_id, 400, (("x-reason", big),))
    events = replies_in(exchange(client, server, pieces=7))
    assert events == [Answered(stream_id, 400, {"x-reason": big}, b"")]


def test_the_servers_stream_limit_and_windows_are_kept() -> None:
    client, server = H2Client(), Server(acknowledge=False)
    server.h2.update_settings({h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 2,
                               h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 10})
    exchange(client, server)
    first = request(client, body=b"0123456789abcdef")
    request(client)
    assert not client.can_open()
    exchange(client, server)
    assert bytes(server.bodies[first]) == b"0123456789"  # the rest waits for the window
    server.h2.increment_flow_control_window(100, stream_id=first)
    exchange(client, server)
    assert bytes(server.bodies[first]) == b"0123456789abcdef"
    answer(server, first)
    exchange(client, server)
    assert client.can_open()


def test_ping_is_answered_and_goaway_fails_only_the_streams_not_taken() -> None:
    client, server = H2Client(), Server()
    ids = [request(client) for _ in range(3)]
    exchange(client, server)
    server.h2.ping(b"12345678")
    exchange(client, server)
    assert server.pings == 1
    answer(server, ids[0])
    taken = server.h2.data_to_send()  # h2 answers nothing after its GOAWAY: sent after it
    server.h2.close_connection(last_stream_id=ids[0])
    events = client.receive(server.h2.data_to_send())
    assert Failed(ids[1], "GOAWAY", True) in events and Failed(ids[2], "GOAWAY", True) in events
    assert GoneAway(ids[0], 0) in events
    assert not client.can_open() and list(client.streams) == [ids[0]]
    assert client.receive(taken) == [Answered(ids[0], 200, {}, b"")]


def test_a_reset_or_an_oversized_answer_fails_its_stream_and_the_connection_goes_on() -> None:
    client, server = H2Client(), Server()
    reset, big, fine = request(client), request(client), request(client)
    exchange(client, server)
    server.h2.reset_stream(reset, 2)
    refused = request(client)
    events = exchange(client, server)
    server.h2.reset_stream(refused, h2wire.REFUSED_STREAM)
    answer(server, big, body=b"z" * (h2wire.MAX_BODY + 1))
    answer(server, fine, body=b"{}")
    events += exchange(client, server)
    assert Failed(reset, "stream reset (2)") in events
    assert Failed(refused, "stream reset (7)", unprocessed=True) in events
    assert Failed(big, f"an answer beyond {h2wire.MAX_BODY} bytes") in events
    assert Answered(fine, 200, {}, b"{}") in events
    assert not client.closed and client.can_open()


def test_a_given_up_stream_is_reset_and_its_late_answer_ignored() -> None:
    client, server = H2Client(), Server()
    late, other = request(client), request(client)
    exchange(client, server)
    client.reset(late)
    answer(server, late, body=b"late")  # crossed on the wire: still keeps HPACK in step
    answer(server, other, headers=(("apns-id", "1"),))
    assert replies_in(exchange(client, server)) == [Answered(other, 200, {"apns-id": "1"}, b"")]


def test_the_last_stream_id_closes_the_connection_to_new_streams_only() -> None:
    client, server = H2Client(), Server()
    exchange(client, server)
    client._next_id = h2wire.MAX_STREAM_ID  # as after a billion requests
    last = request(client)
    assert last == h2wire.MAX_STREAM_ID and client.closed and not client.can_open()
    exchange(client, server)
    answer(server, last)
    assert replies_in(exchange(client, server)) == [Answered(last, 200, {}, b"")]


def test_server_push_is_refused_as_a_protocol_error() -> None:
    client = H2Client()
    frame = (8 << 8 | h2wire.PUSH_PROMISE).to_bytes(4, "big") + bytes((h2wire.END_HEADERS,)) \
        + (1).to_bytes(4, "big") + (2).to_bytes(4, "big") + b"\x82\x84\x87\x88"
    with pytest.raises(h2wire.FramingError):
        client.receive(frame)
    assert client.closed and b"\x00\x00\x08\x07" in client.data_to_send()  # a GOAWAY


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_garbage_is_a_protocol_error_or_nothing_never_another_exception(data: bytes) -> None:
    client = H2Client()
    request(client)
    try:
        client.receive(data)
    except h2wire.FramingError:
        assert client.closed


@settings(max_examples=200, deadline=None)
@given(kind=st.integers(0, 12), flags=st.integers(0, 255), stream_id=st.integers(0, 5),
       payload=st.binary(max_size=64))
def test_any_well_framed_frame_is_handled_or_a_protocol_error(
        kind: int, flags: int, stream_id: int, payload: bytes) -> None:
    client = H2Client()
    request(client, body=b"b" * 100_000)
    frame = (len(payload) << 8 | kind).to_bytes(4, "big") + bytes((flags,)) \
        + struct.pack(">I", stream_id) + payload
    try:
        client.receive(frame)
    except h2wire.FramingError:
        assert client.closed


header_lists = st.lists(st.tuples(
    st.sampled_from([":status", "apns-id", "content-type", "retry-after", "x-other"]),
    st.one_of(st.sampled_from(["200", "404", "500", ""]), st.text(max_size=150))),
    max_size=6)


@settings(max_examples=300, deadline=None)
@given(headers=header_lists, huffman=st.booleans(), never_indexed=st.booleans())
def test_the_plain_decoder_agrees_with_hpack_or_leaves_the_block_to_it(
        headers: list[tuple[str, str]], huffman: bool, never_indexed: bool) -> None:
    """Blocks as servers make them (hpack's encoder: indexed literals, Huffman or not, and
    literals never indexed), twice in a row so that the second refers to the dynamic
    table: decode_plain decodes exactly as hpack does, or declines."""
    encoder, reference = hpack.Encoder(), hpack.Decoder()
    fields = [hpack.NeverIndexedHeaderTuple(k, v) if never_indexed else (k, v)
              for k, v in headers]
    for _ in range(2):
        block = encoder.encode(fields, huffman=huffman)
        expected = [(bytes(k), bytes(v)) for k, v in reference.decode(block, raw=True)]
        plain = decode_plain(block)
        assert plain is None or plain == expected


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=80))
def test_the_plain_decoder_on_any_bytes_agrees_with_hpack_or_declines(block: bytes) -> None:
    plain = decode_plain(block)
    if plain is not None:
        assert plain == [(bytes(k), bytes(v)) for k, v in hpack.Decoder().decode(block, raw=True)]


def test_a_providers_answer_is_decoded_plainly() -> None:
    block = b"\x88" + b"\x00\x07apns-id\x05abcde" + b"\x0f\x10\x05text/"  # 0x0f 0x10: index 31
    assert decode_plain(block) is None  # a two-byte name index: left to hpack
    assert decode_plain(b"\x88\x00\x07apns-id\x85abcde") is None  # Huffman
    assert decode_plain(b"\x88\x40\x01a\x01b") is None  # indexed: the table changes
    assert decode_plain(b"\xbe") is None  # the first dynamic entry
    block = b"\x8e" + b"\x00\x07apns-id\x05abcde" + b"\x1f\x00"
    assert decode_plain(block) is None  # never indexed, name index 15 + 0: two bytes
    block = b"\x8e" + b"\x00\x07apns-id\x05abcde" + b"\x10\x0bretry-after\x0210"
    assert decode_plain(block) == [(b":status", b"500"), (b"apns-id", b"abcde"),
                                   (b"retry-after", b"10")]  # 0x10: never indexed


# ------------------------------------------------------------ over TLS, with the dispatcher
def test_requests_the_server_did_not_process_go_again_and_are_delivered_once(
        tmp_path: Path) -> None:
    """A server that refuses the first streams (REFUSED_STREAM), then sends GOAWAY before
    processing the next, answers on a second connection: every push is delivered, once,
    not deferred as a provider failure would be."""
    processed: Counter[str] = Counter()
    refusals = connections = 0
    ca, key_file = _tls_and_key(tmp_path)

    async def peer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal refusals, connections
        connections += 1
        first = connections == 1
        server = _h2_server(writer)
        while data := await reader.read(65536):
            for event in server.receive_data(data):
                if isinstance(event, h2.events.StreamEnded):
                    path = paths[event.stream_id]
                    if first and refusals < 3 and path not in refused:
                        refusals += 1
                        refused.add(path)
                        server.reset_stream(event.stream_id, h2wire.REFUSED_STREAM)
                    elif first:  # taken none of what came after the last refused one
                        server.close_connection(last_stream_id=event.stream_id - 2)
                        writer.write(server.data_to_send())
                        writer.close()
                        return
                    else:
                        processed[path] += 1
                        answer_to(server, event.stream_id)
                elif isinstance(event, h2.events.RequestReceived):
                    paths[event.stream_id] = dict(event.headers)[":path"]
            writer.write(server.data_to_send())

    paths: dict[int, str] = {}
    refused: set[str] = set()  # each refused once

    def answer_to(server: h2.connection.H2Connection, stream_id: int) -> None:
        server.send_headers(stream_id, [(":status", "200")], end_stream=True)

    counters = asyncio.run(_push_through(peer, ca, key_file, 8))
    assert 1 <= refusals <= 3 and connections == 2
    assert counters == Counter({("apns", "delivered"): 8}), counters
    assert processed == Counter({f"/3/device/{n:064x}": 1 for n in range(8)})


def test_requests_beyond_the_servers_stream_limit_wait_in_order_and_survive_its_close(
        tmp_path: Path) -> None:
    """A server that allows 2 streams: the pushes beyond wait for a free stream and go in
    the order they came. It closes its first connection after 10 answers: those waiting
    for a stream then go on a second connection; every push is delivered once."""
    ca, key_file = _tls_and_key(tmp_path)
    processed: Counter[str] = Counter()
    arrived: list[int] = []  # push numbers, in the order the first connection got them
    most_open = connections = 0

    async def peer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal most_open, connections
        connections += 1
        first = connections == 1
        server = _h2_server(writer, max_streams=2)
        paths: dict[int, str] = {}
        while data := await reader.read(65536):
            for event in server.receive_data(data):
                if isinstance(event, h2.events.RequestReceived):
                    paths[event.stream_id] = dict(event.headers)[":path"]
                    most_open = max(most_open, len(server.streams))
                    if first:
                        arrived.append(int(paths[event.stream_id].rsplit("/", 1)[1], 16))
                elif isinstance(event, h2.events.StreamEnded):
                    if first and sum(processed.values()) == 10:
                        writer.write(server.data_to_send())  # the answers given
                        writer.close()  # gone, with what it had not answered
                        return
                    processed[paths[event.stream_id]] += 1
                    server.send_headers(event.stream_id, [(":status", "200")],
                                        end_stream=True)
            writer.write(server.data_to_send())

    counters = asyncio.run(_push_through(peer, ca, key_file, 30))
    assert counters[("apns", "delivered")] == 30, counters
    assert processed == Counter({f"/3/device/{n:064x}": 1 for n in range(30)})
    assert connections == 2 and most_open <= 2
    assert arrived == sorted(arrived) and len(arrived) >= 11


def _h2_server(writer: asyncio.StreamWriter, max_streams: int | None = None
               ) -> h2.connection.H2Connection:
    """h2's server side of a connection, its preface (and stream limit) written."""
    server = h2.connection.H2Connection(h2.config.H2Configuration(
        client_side=False, header_encoding="utf-8"))
    server.initiate_connection()
    if max_streams is not None:
        server.update_settings({h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: max_streams})
    writer.write(server.data_to_send())
    return server


def _tls_and_key(folder: Path) -> tuple[LoopbackCA, Path]:
    key_file = folder / "key.p8"
    key_file.write_bytes(ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    return LoopbackCA(folder / "tls"), key_file


async def _push_through(peer: Callable[[asyncio.StreamReader, asyncio.StreamWriter],
                                       Awaitable[None]],
                        ca: LoopbackCA, key_file: Path, pushes: int) -> Counter[tuple[str, str]]:
    """pushes pushes submitted to a dispatcher whose APNs backend is the server peer (over
    TLS), the first alone (the others find its connection open); its counters once each
    push is finished (20 s at most)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(ca.certfile, ca.keyfile)
    context.set_alpn_protocols(["h2"])
    listening = await asyncio.start_server(peer, "127.0.0.1", 0, ssl=context)
    port = listening.sockets[0].getsockname()[1]
    backend = Backend(0, "apns", "app", "localhost", "pubsub.localhost", {
        "topic": "org.example", "key_file": str(key_file), "key_id": "K",
        "team_id": "T", "endpoint": f"https://127.0.0.1:{port}",
        "cafile": str(ca.cafile)})
    dispatcher = Dispatcher(Config("localhost", backends=(backend,)), Store(":memory:"),
                            lambda node: None, lambda xml: None)
    for n in range(pushes):
        device = RegisteredDevice(f"node{n}", "s", "user@localhost", "d", "", "apns", "app",
                        "pubsub.localhost", f"{n:064x}")
        dispatcher.submit(Delivery(backend, device, {"message-count": "1"},
                                   Iq(str(n), "set", "localhost", "pubsub.localhost", None)))
        if n == 0:  # the connection is open when the others come: they go at once
            while not dispatcher._clients[0]._connections:
                await asyncio.sleep(0.01)
    finished = ("delivered", "failed", "given_up", "unregistered", "dropped")
    deadline = time.monotonic() + 20
    while sum(v for (_, what), v in dispatcher.counters.items() if what in finished) < pushes \
            and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    await dispatcher.close()
    listening.close()
    return dispatcher.counters


# ------------------------------------------------------- deadlines and bounded connections
def _trusting(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


def test_a_server_that_grants_no_stream_cannot_hold_a_request() -> None:
    """SETTINGS_MAX_CONCURRENT_STREAMS 0 (and the stream opened before the client heard
    of it refused): every request fails within its timeout, whether it went by request
    (its first stream refused, then waiting for another) or by request_now on the open
    connection (waiting from the start), and the connection is not stuck for later ones."""
    ca = trustme.CA()

    async def run() -> list[BaseException | Response]:
        peer = H2Peer(ca, max_streams=0)
        port = await peer.start()
        client = Http2Client(_trusting(ca), timeout=0.5)
        url = f"https://127.0.0.1:{port}/wpush/x"
        answers: list[BaseException | Response] = list(await asyncio.wait_for(asyncio.gather(
            *(client.request("POST", url, {}, b"x") for _ in range(3)),
            return_exceptions=True), 20))
        later: asyncio.Future[Response | HttpError] = asyncio.get_running_loop().create_future()
        assert client.request_now("POST", url, {}, b"x", later.set_result)
        answers.append(await asyncio.wait_for(later, 20))  # type: ignore[arg-type]
        assert peer.requests  # the first stream reached it, and was refused
        await client.aclose()
        await peer.close()
        return answers

    answers = asyncio.run(run())
    assert len(answers) == 4 and all(isinstance(a, HttpError) for a in answers), answers
    assert "no stream granted in time" in str(answers[-1])


def _named_client(ca: trustme.CA, names: list[str], **bounds: float) -> Http2Client:
    """A client for user destinations whose names all resolve to 127.0.0.1 (no lookup)."""
    async def resolve(host: str, port: int) -> list[ipaddress.IPv4Address]:
        assert host in names
        return [ipaddress.IPv4Address("127.0.0.1")]
    return Http2Client(_trusting(ca), timeout=5, destinations=UserDestinations(
        (ipaddress.ip_network("127.0.0.0/8"),), resolve, **bounds))  # type: ignore[arg-type]


def test_idle_user_connections_are_closed_and_the_admins_are_kept() -> None:
    """A user destination's connection without requests for idle_s is closed (APNs' and
    FCM's, without destinations, stay open)."""
    ca = trustme.CA()

    async def run() -> None:
        peer = H2Peer(ca, "push.test", "127.0.0.1")
        port = await peer.start()
        user = _named_client(ca, ["push.test"], idle_s=0.4)
        plain = Http2Client(_trusting(ca), timeout=5)
        for client, host in ((user, "push.test"), (plain, "127.0.0.1")):
            answer = await client.request("POST", f"https://{host}:{port}/x", {}, b"x")
            assert answer.status_code == 200
        await peer.wait_until(lambda: bool(peer.ended))
        assert peer.ended == ["push.test"] and sorted(map(str, peer.connected)) == [
            "None", "push.test"]
        assert user.open_connections() == 0 and plain.open_connections() == 1
        assert user._connections == {} and user._connecting == {}
        answer = await user.request("POST", f"https://push.test:{port}/y", {}, b"x")
        assert answer.status_code == 200  # opened again when needed
        await user.aclose()
        await plain.aclose()
        await peer.close()

    asyncio.run(asyncio.wait_for(run(), 30))


def test_user_connections_are_capped_the_least_recently_used_closed_first() -> None:
    ca = trustme.CA()
    names = [f"{letter}.test" for letter in "abcde"]

    async def run() -> None:
        peer = H2Peer(ca, *names)
        port = await peer.start()
        client = _named_client(ca, names, max_connections=3)

        async def use(name: str) -> None:
            answer = await client.request("POST", f"https://{name}:{port}/x", {}, b"x")
            assert answer.status_code == 200
        for name in ("a.test", "b.test", "c.test", "a.test", "d.test"):
            await use(name)
        await peer.wait_until(lambda: peer.ended == ["b.test"])
        await use("e.test")
        await peer.wait_until(lambda: peer.ended == ["b.test", "c.test"])
        assert sorted(host for host, _ in client._connections) == ["a.test", "d.test",
                                                                    "e.test"]
        assert client.open_connections() == 3 and client._connecting == {}
        await client.aclose()
        await peer.close()

    asyncio.run(asyncio.wait_for(run(), 30))


# ------------------------- GOAWAY, opening connections, the bound on user connections
class Sockets:
    """A test listener's connections: accepted, still open, and what the test waits for."""

    def __init__(self) -> None:
        self.accepted = 0
        self.open = 0
        self.goaways = 0
        self.requests: list[str] = []  # :authority/:path of each request, as they came
        self.changed = asyncio.Condition()

    async def note(self, change: Callable[[], None]) -> None:
        async with self.changed:
            change()
            self.changed.notify_all()

    async def wait_until(self, condition: Callable[[], bool], timeout: float = 10) -> None:
        async with self.changed:
            await asyncio.wait_for(self.changed.wait_for(condition), timeout)


async def _listen(ca: trustme.CA, serve: Callable[[asyncio.StreamReader, asyncio.StreamWriter],
                                                  Awaitable[None]],
                  *names: str) -> tuple[asyncio.Server, int]:
    """A TLS listener on 127.0.0.1 (certificate for names) where serve gets each connection."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*(names or ("127.0.0.1",))).configure_cert(context)
    context.set_alpn_protocols(["h2"])
    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=context)
    return server, int(server.sockets[0].getsockname()[1])


def _user_client(ca: trustme.CA, resolve: Callable[[str, int], Awaitable[list[IpAddress]]],
                 timeout: float = 5, **bounds: float) -> Http2Client:
    return Http2Client(_trusting(ca), timeout=timeout, destinations=UserDestinations(
        (ipaddress.ip_network("127.0.0.0/8"),), resolve, **bounds))  # type: ignore[arg-type]


async def _loopback(host: str, port: int) -> list[IpAddress]:
    return [ipaddress.IPv4Address("127.0.0.1")]


@pytest.mark.parametrize("users", [False, True], ids=["admins", "users"])
def test_a_goaway_with_nothing_open_closes_the_clients_socket(users: bool) -> None:
    """A server that answers, then (once the client has acknowledged a PING, so that the
    GOAWAY comes alone) sends GOAWAY and keeps its socket open: the client closes each
    such connection itself, the server is not left one open socket per request."""
    ca = trustme.CA()
    sockets = Sockets()

    async def answer_then_goaway(reader: asyncio.StreamReader,
                                 writer: asyncio.StreamWriter) -> None:
        await sockets.note(lambda: setattr(sockets, "accepted", sockets.accepted + 1))
        await sockets.note(lambda: setattr(sockets, "open", sockets.open + 1))
        server = _h2_server(writer)
        try:
            while data := await reader.read(65536):
                gone = False
                for event in server.receive_data(data):
                    if isinstance(event, h2.events.StreamEnded):
                        server.send_headers(event.stream_id, [(":status", "200")],
                                            end_stream=True)
                        server.ping(b"answered")
                    elif isinstance(event, h2.events.PingAckReceived):
                        server.close_connection()
                        gone = True
                writer.write(server.data_to_send())
                if gone:
                    await sockets.note(lambda: setattr(sockets, "goaways", sockets.goaways + 1))
                    while await reader.read(65536):  # open until the client closes it
                        pass
                    break
        except (ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()
            await sockets.note(lambda: setattr(sockets, "open", sockets.open - 1))

    async def run() -> None:
        listener, port = await _listen(ca, answer_then_goaway, "push.test", "127.0.0.1")
        client = _user_client(ca, _loopback) if users else Http2Client(_trusting(ca), 5)
        url = f"https://{'push.test' if users else '127.0.0.1'}:{port}/x"
        for n in range(8):
            answer = await client.request("POST", url, {}, b"x")
            assert answer.status_code == 200
            await sockets.wait_until(lambda n=n: sockets.goaways == n + 1)  # type: ignore[misc]
            while client.open_connections():  # the client has read it
                await asyncio.sleep(0.01)
        with contextlib.suppress(TimeoutError):
            await sockets.wait_until(lambda: sockets.open == 0, timeout=5)
        assert sockets.accepted == 8
        assert sockets.open == 0, f"{sockets.open} connections left open by the client"
        await client.aclose()
        listener.close()

    asyncio.run(asyncio.wait_for(run(), 60))


@pytest.mark.parametrize("kind", ["admins", "users", "users, the lookup hangs"])
def test_requests_waiting_for_a_connection_share_its_failure(kind: str) -> None:
    """Six requests at once to an origin whose connection never opens (a listener that
    takes TCP and never answers TLS, or a name whose lookup never ends): one attempt is
    made, and all six fail with it, not one timeout after another."""
    ca = trustme.CA()
    accepted: list[asyncio.StreamWriter] = []
    lookups: list[str] = []
    never = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)  # kept: open, and silent
        await never.wait()

    async def hanging(host: str, port: int) -> list[IpAddress]:
        lookups.append(host)
        await never.wait()
        return []

    async def run() -> list[BaseException | Response]:
        listener = await asyncio.start_server(silent, "127.0.0.1", 0)  # no TLS
        port = listener.sockets[0].getsockname()[1]
        if kind == "admins":
            client = Http2Client(_trusting(ca), timeout=0.5)
            url = f"https://127.0.0.1:{port}/x"
        else:
            client = _user_client(ca, hanging if "hangs" in kind else _loopback, timeout=0.5)
            url = f"https://push.test:{port}/x"
        answers = await asyncio.wait_for(asyncio.gather(
            *(client.request("POST", url, {}, b"x") for _ in range(6)),
            return_exceptions=True), 30)
        await client.aclose()
        for writer in accepted:
            writer.close()
        listener.close()
        return list(answers)

    answers = asyncio.run(run())
    assert all(isinstance(a, HttpError) for a in answers), answers
    assert len(accepted) + len(lookups) == 1, (len(accepted), lookups)


def test_a_request_has_one_deadline_whatever_it_waits_for(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A server that, 0.8 timeouts after each request, says with a GOAWAY that it did
    not process it (the request may go again): the request does not go on for three such
    rounds (2.4 timeouts); it fails by its deadline (two timeouts) as unanswered."""
    monkeypatch.setattr(http2, "SWEEP_S", 0.02)  # deadlines looked at often: no waiting
    ca = trustme.CA()
    timeout = 1.0
    sockets = Sockets()

    async def goaway_later(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        server = _h2_server(writer)

        def goaway() -> None:
            server.close_connection(last_stream_id=0)  # processed none of them
            writer.write(server.data_to_send())
        try:
            while data := await reader.read(65536):
                for event in server.receive_data(data):
                    if isinstance(event, h2.events.RequestReceived):
                        await sockets.note(lambda: sockets.requests.append("x"))
                        asyncio.get_running_loop().call_later(0.8 * timeout, goaway)
                writer.write(server.data_to_send())
        except (ConnectionError, ssl.SSLError, h2.exceptions.ProtocolError):
            pass
        finally:
            writer.close()

    async def run() -> BaseException | Response:
        listener, port = await _listen(ca, goaway_later)
        client = Http2Client(_trusting(ca), timeout=timeout)
        try:
            return await asyncio.wait_for(
                client.request("POST", f"https://127.0.0.1:{port}/x", {}, b"x"), 30)
        except HttpError as exc:
            return exc
        finally:
            await client.aclose()
            listener.close()

    answer = asyncio.run(run())
    assert isinstance(answer, HttpError), answer
    assert "did not take the request" not in str(answer), answer
    assert 2 <= len(sockets.requests) <= 3  # the third, if it went before the deadline


class Held:
    """An HTTP/2 server that answers its requests only once released; with goaway, it
    says at each request that it takes no more (GOAWAY, that request processed)."""

    def __init__(self, goaway: bool = False) -> None:
        self.sockets = Sockets()
        self.released = asyncio.Event()
        self.goaway = goaway

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        server = _h2_server(writer)
        held: list[int] = []

        async def answer_when_released() -> None:
            await self.released.wait()
            for stream_id in held:
                server.send_headers(stream_id, [(":status", "200")], end_stream=True)
            writer.write(server.data_to_send())
        answering = asyncio.get_running_loop().create_task(answer_when_released())
        try:
            while data := await reader.read(65536):
                for event in server.receive_data(data):
                    if isinstance(event, h2.events.RequestReceived):
                        authority = dict(event.headers)[":authority"]
                        await self.sockets.note(
                            lambda a=authority: self.sockets.requests.append(a))  # type: ignore[misc]
                        if self.goaway:  # raw: h2 would send nothing more after it
                            writer.write(server.data_to_send() + struct.pack(
                                ">IBIII", 8 << 8 | 0x7, 0, 0, event.stream_id, 0))
                    elif isinstance(event, h2.events.StreamEnded):
                        if self.released.is_set():
                            server.send_headers(event.stream_id, [(":status", "200")],
                                                end_stream=True)
                        else:
                            held.append(event.stream_id)
                writer.write(server.data_to_send())
        except (ConnectionError, ssl.SSLError, h2.exceptions.ProtocolError):
            pass
        finally:
            answering.cancel()
            writer.close()


def test_a_full_pool_of_busy_user_connections_is_not_disturbed() -> None:
    """Two connections allowed, both with a request the server has not answered yet: a
    third origin's request fails at once (a retry: HttpError), the two requests are
    answered once the server answers them."""
    ca = trustme.CA()
    held = Held()

    async def run() -> None:
        listener, port = await _listen(ca, held.serve, "a.test", "b.test", "c.test")
        client = _user_client(ca, _loopback, max_connections=2)
        waiting = [asyncio.get_running_loop().create_task(
            client.request("POST", f"https://{name}:{port}/x", {}, b"x"))
            for name in ("a.test", "b.test")]
        await held.sockets.wait_until(lambda: len(held.sockets.requests) == 2)
        with pytest.raises(HttpError, match="busy"):
            await asyncio.wait_for(
                client.request("POST", f"https://c.test:{port}/x", {}, b"x"), 10)
        held.released.set()
        answers = await asyncio.wait_for(asyncio.gather(*waiting), 10)
        assert [answer.status_code for answer in answers] == [200, 200]
        assert sorted(held.sockets.requests) == [f"a.test:{port}", f"b.test:{port}"]
        await client.aclose()
        listener.close()

    asyncio.run(asyncio.wait_for(run(), 60))


def test_a_full_pool_is_checked_before_anything_is_closed_to_make_room() -> None:
    """Three connections allowed, one open and idle (a.test): a name that resolves to a
    denied address is refused without closing it; so are three lookups that hang (they
    count as connections being opened) and a fourth origin's request meanwhile (it fails
    at once: too many are being opened)."""
    ca = trustme.CA()
    never = asyncio.Event()

    async def resolve(host: str, port: int) -> list[IpAddress]:
        if host.startswith("hang"):
            await never.wait()
        return [ipaddress.IPv4Address("10.0.0.1" if host == "denied.test" else "127.0.0.1")]

    async def run() -> None:
        peer = H2Peer(ca, "a.test")
        port = await peer.start()
        client = _user_client(ca, resolve, max_connections=3)
        answer = await client.request("POST", f"https://a.test:{port}/x", {}, b"x")
        assert answer.status_code == 200
        with pytest.raises(Denied):
            await client.request("POST", f"https://denied.test:{port}/x", {}, b"x")
        assert client.open_connections() == 1
        hanging = [asyncio.get_running_loop().create_task(
            client.request("POST", f"https://hang{n}.test:{port}/x", {}, b"x"))
            for n in range(3)]
        while client._opening < 3:
            await asyncio.sleep(0.01)
        with pytest.raises(HttpError, match="being opened"):
            await asyncio.wait_for(
                client.request("POST", f"https://c.test:{port}/x", {}, b"x"), 10)
        assert client.open_connections() == 1 and peer.ended == []
        answer = await client.request("POST", f"https://a.test:{port}/y", {}, b"x")
        assert answer.status_code == 200  # on the same connection
        assert peer.connected == ["a.test"]
        for task in hanging:
            task.cancel()
        await asyncio.gather(*hanging, return_exceptions=True)
        assert client._opening == 0
        await client.aclose()
        await peer.close()

    asyncio.run(asyncio.wait_for(run(), 60))


def test_a_user_connection_draining_after_a_goaway_still_counts_against_the_cap() -> None:
    """One connection allowed; a.test answers GOAWAY to its request but has yet to answer
    it: the request goes on, and while it does, another origin's request fails (a retry)
    rather than open a second connection; once it is answered, the other origin is
    reached."""
    ca = trustme.CA()
    held = Held(goaway=True)

    async def run() -> None:
        listener, port = await _listen(ca, held.serve, "a.test", "b.test")
        client = _user_client(ca, _loopback, max_connections=1)
        first = asyncio.get_running_loop().create_task(
            client.request("POST", f"https://a.test:{port}/x", {}, b"x"))
        await held.sockets.wait_until(lambda: len(held.sockets.requests) == 1)
        while client.open_connections():  # the GOAWAY read
            await asyncio.sleep(0.01)
        with pytest.raises(HttpError, match="busy"):
            await asyncio.wait_for(
                client.request("POST", f"https://b.test:{port}/x", {}, b"x"), 10)
        held.released.set()
        assert (await asyncio.wait_for(first, 10)).status_code == 200
        answer = await asyncio.wait_for(
            client.request("POST", f"https://b.test:{port}/x", {}, b"x"), 10)
        assert answer.status_code == 200
        assert held.sockets.requests == [f"a.test:{port}", f"b.test:{port}"]
        await client.aclose()
        listener.close()

    asyncio.run(asyncio.wait_for(run(), 60))


# ------------------------------------------------------------------ HPACK
def test_the_hpack_encoder_round_trips_through_hpacks_decoder() -> None:
    encoder, decoder = Encoder(), Decoder()
    rng = random.Random(15)
    for n in range(3000):
        headers = [(":method", "POST"), (":scheme", "https"), (":authority", "api.example"),
                   (":path", f"/3/device/{rng.randrange(40):064x}"),
                   ("apns-topic", "org.example"),
                   ("apns-push-type", rng.choice(["alert", "background", "voip"])),
                   # a new bearer token now and then, of any size: the table fills up
                   ("authorization", f"bearer {'t' * rng.randrange(50, 900)}"
                    if n % 7 == 0 else "bearer steady"),
                   ("apns-expiration", str(1000 + n // 100)),
                   ("content-length", str(rng.randrange(400)))]
        if n == 1500:  # the peer shrinks the table (SETTINGS_HEADER_TABLE_SIZE)
            encoder.header_table_size = 300
            decoder.max_allowed_table_size = 300
        assert [(k, v) for k, v in decoder.decode(encoder.encode(headers))] == headers


def test_repeated_headers_cost_a_byte_or_two() -> None:
    encoder = Encoder()
    headers = [(":method", "POST"), (":scheme", "https"), (":authority", "api.example"),
               (":path", "/3/device/ab"), ("authorization", "bearer " + "t" * 200),
               ("apns-topic", "org.example")]
    first, second = encoder.encode(headers), encoder.encode(headers)
    assert len(second) < 40 < len(first)


# ------------------------------------------------------------------ the HTTP/2 client
def _deadline() -> float:
    """A connection's deadline (a loop time) far enough for a loopback connect."""
    return asyncio.get_running_loop().time() + 30


async def _silent_server(ca: LoopbackCA) -> tuple[asyncio.Server, int]:
    """A TLS server (h2 by ALPN) that takes connections and requests and never answers;
    its port."""
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(ca.certfile, ca.keyfile)
    server_context.set_alpn_protocols(["h2"])
    peers: list[asyncio.StreamWriter] = []  # kept: a writer collected closes (3.13)

    async def silent_peer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peers.append(writer)
        await reader.read()

    server = await asyncio.start_server(silent_peer, "127.0.0.1", 0, ssl=server_context)
    return server, server.sockets[0].getsockname()[1]


def test_an_unanswered_request_fails_in_time_and_the_writes_are_coalesced(
        tmp_path: Path) -> None:
    """A server that takes the TLS connection and requests but never answers: each request
    fails with 'no answer in time' (the sweep, not a timer per request), and a burst of
    requests went out in one TLS write."""
    ca = LoopbackCA(tmp_path / "tls")

    async def run() -> tuple[list[BaseException | Response], int, float]:
        silent, port = await _silent_server(ca)
        client = Http2Client(ssl.create_default_context(cafile=str(ca.cafile)), timeout=0.5)
        connection = await client._connection("127.0.0.1", port, _deadline())
        assert connection.transport is not None
        writes = 0
        write = connection.transport.write

        def counted(data: bytes | bytearray | memoryview) -> None:
            nonlocal writes
            writes += 1
            write(data)
        connection.transport.write = counted  # type: ignore[method-assign]
        started = time.monotonic()
        answers = await asyncio.gather(
            *(client.request("POST", f"https://127.0.0.1:{port}/3/device/{n}", {"x": "y"},
                             b"{}") for n in range(20)), return_exceptions=True)
        elapsed = time.monotonic() - started
        await client.aclose()
        silent.close()
        return answers, writes, elapsed

    answers, writes, elapsed = asyncio.run(run())
    assert all(isinstance(a, HttpError) and "in time" in str(a) for a in answers), answers
    assert 0.5 <= elapsed < 0.5 + SWEEP_S + 1.0
    assert writes <= 3  # the 20 requests (and the resets) in a write or two, not 20


def test_an_answer_function_that_raises_is_reported_and_the_others_are_called(
        tmp_path: Path) -> None:
    """request_now hands each answer to its function, without a future: one that raises is
    reported to the loop's exception handler (as a future's callback would be), and the
    other requests on the connection are answered all the same. Without a connection,
    request_now says so and calls nothing."""
    ca = LoopbackCA(tmp_path / "tls")

    async def run() -> tuple[list[BaseException | Response], list[dict[str, Any]], bool]:
        silent, port = await _silent_server(ca)
        loop = asyncio.get_running_loop()
        reported: list[dict[str, Any]] = []
        loop.set_exception_handler(lambda _, context: reported.append(context))
        client = Http2Client(ssl.create_default_context(cafile=str(ca.cafile)), timeout=0.3)
        url = f"https://127.0.0.1:{port}/3/device/x"
        unconnected = client.request_now("POST", url, {}, b"{}", lambda _: None)
        await client._connection("127.0.0.1", port, _deadline())
        answers: list[BaseException | Response] = []
        all_answered = asyncio.Event()

        def answered(answer: Response | HttpError) -> None:
            answers.append(answer)
            if len(answers) == 5:
                all_answered.set()
            if len(answers) == 1:
                raise RuntimeError("a bug in the caller")
        sent = [client.request_now("POST", url, {}, b"{}", answered) for _ in range(5)]
        assert sent == [True] * 5
        await asyncio.wait_for(all_answered.wait(), 0.3 + SWEEP_S + 2)
        await client.aclose()
        silent.close()
        return answers, reported, unconnected

    answers, reported, unconnected = asyncio.run(run())
    assert unconnected is False
    assert len(answers) == 5 and all(isinstance(a, HttpError) for a in answers), answers
    assert [str(c.get("exception")) for c in reported] == ["a bug in the caller"], reported
    assert reported[0]["message"] == "exception in an HTTP/2 answer's callback"
