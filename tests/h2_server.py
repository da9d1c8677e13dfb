"""h2's server side, sans-IO, for the hand-framed HTTP/2 client's tests: bytes are passed
between the two by the test, in any pieces."""

from __future__ import annotations

from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events

from pymod_push.delivery import h2wire
from pymod_push.delivery.h2wire import H2Client


@dataclass
class Server:
    """h2's server side, keeping what each stream received."""
    h2: h2.connection.H2Connection = field(default_factory=lambda: h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=False, header_encoding="utf-8")))
    headers: dict[int, dict[str, str]] = field(default_factory=dict)
    bodies: dict[int, bytearray] = field(default_factory=dict)
    ended: list[int] = field(default_factory=list)
    pings: int = 0
    acknowledge: bool = True  # give back the window for DATA received

    def __post_init__(self) -> None:
        self.h2.initiate_connection()

    def feed(self, data: bytes) -> None:
        for event in self.h2.receive_data(data):
            if isinstance(event, h2.events.RequestReceived):
                self.headers[event.stream_id] = dict(event.headers)
                self.bodies[event.stream_id] = bytearray()
            elif isinstance(event, h2.events.DataReceived):
                self.bodies[event.stream_id] += event.data
                if self.acknowledge:
                    self.h2.acknowledge_received_data(event.flow_controlled_length,
                                                      event.stream_id)
            elif isinstance(event, h2.events.StreamEnded):
                self.ended.append(event.stream_id)
            elif isinstance(event, h2.events.PingAckReceived):
                self.pings += 1


def exchange(client: H2Client, server: Server, pieces: int = 1) -> list[h2wire.Event]:
    """Bytes both ways until neither has anything to say; the server's bytes reach the
    client cut into ``pieces`` parts."""
    events: list[h2wire.Event] = []
    for _ in range(1000):
        to_server, to_client = client.data_to_send(), server.h2.data_to_send()
        if not to_server and not to_client:
            return events
        if to_server:
            server.feed(to_server)
        step = max(1, len(to_client) // pieces)
        for start in range(0, len(to_client), step):
            events += client.receive(to_client[start:start + step])
    raise AssertionError("the two sides never went quiet")


def answer(server: Server, stream_id: int, status: int = 200,
           headers: tuple[tuple[str, str], ...] = (), body: bytes = b"") -> None:
    server.h2.send_headers(stream_id, [(":status", str(status)), *headers],
                           end_stream=not body)
    while body:  # within the client's window (1<<24: never the limit here) and frame size
        chunk = body[:server.h2.max_outbound_frame_size]
        body = body[len(chunk):]
        server.h2.send_data(stream_id, chunk, end_stream=not body)


def request(client: H2Client, path: str = "/3/device/abc", body: bytes = b"",
            extra: tuple[tuple[str, str], ...] = ()) -> int:
    return client.request([(":method", "POST"), (":scheme", "https"),
                           (":authority", "localhost"), (":path", path), *extra], body)
