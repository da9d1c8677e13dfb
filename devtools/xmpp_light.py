"""A minimal asyncio XMPP client for many connections at once: plain TCP, SASL PLAIN, no TLS,
in-band registration (XEP-0077), stream management enabled by hand, stanzas as ElementTree.
The benchmarks use it as their load side and the tests for hundreds of users, where slixmpp
and `ejabberdctl register` would be the slow part. The instance needs mod_register with
`access: all`, `ip_access: all` and top-level `registration_timeout: infinity`
(IN_BAND_REGISTRATION below)."""

from __future__ import annotations

import asyncio
import base64
import socket
import struct
import xml.etree.ElementTree as ET
from collections.abc import Callable
from typing import Any

# Instance(modules=..., extra_config=...) for in-band registration without ejabberd's pause
# between two registrations from one IP.
IN_BAND_MODULES: dict[str, Any] = {"mod_register": {"access": "all", "ip_access": "all"}}
IN_BAND_CONFIG: dict[str, Any] = {"registration_timeout": "infinity"}


class Xmpp:
    """Just enough XMPP for a load generator: connect, PLAIN, bind, stanzas in and out."""

    def __init__(self, port: int, user: str, password: str, resource: str) -> None:
        self.port, self.user, self.password, self.resource = port, user, password, resource
        self.on_stanza: Callable[[ET.Element], None] = lambda element: None
        self._waiters: list[tuple[Callable[[ET.Element], bool], asyncio.Future[ET.Element]]] = []

    async def connect(self, register: bool = False) -> None:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        await self._open_stream()
        await self._until(lambda e: e.tag.endswith("features"))
        if register:  # in-band (XEP-0077): thousands of accounts in seconds
            await self.request(f"<iq type='set' id='r'><query xmlns='jabber:iq:register'>"
                               f"<username>{self.user}</username><password>{self.password}"
                               "</password></query></iq>", "r")
        self.send("<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>"
                  + base64.b64encode(f"\0{self.user}\0{self.password}".encode()).decode()
                  + "</auth>")
        await self._until(lambda e: e.tag.endswith("success"))
        await self._open_stream()
        await self._until(lambda e: e.tag.endswith("features"))
        self.send(f"<iq type='set' id='b'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'>"
                  f"<resource>{self.resource}</resource></bind></iq>")
        await self._until(lambda e: e.get("id") == "b")

    async def _open_stream(self) -> None:
        self.parser = ET.XMLPullParser(events=("start", "end"))
        self.depth = 0
        self.send("<?xml version='1.0'?><stream:stream xmlns='jabber:client' "
                  "xmlns:stream='http://etherx.jabber.org/streams' to='localhost' "
                  "version='1.0'>")

    def send(self, text: str) -> None:
        self.writer.write(text.encode())

    async def _until(self, match: Callable[[ET.Element], bool]) -> ET.Element:
        future: asyncio.Future[ET.Element] = asyncio.get_running_loop().create_future()
        self._waiters.append((match, future))
        while not future.done():
            data = await self.reader.read(1 << 16)
            if not data:
                raise ConnectionError("stream closed")
            self._feed(data)
        return future.result()

    def _feed(self, data: bytes) -> None:
        self.parser.feed(data)
        for event, element in self.parser.read_events():
            if event == "start":
                self.depth += 1
                continue
            self.depth -= 1
            if self.depth != 1:
                continue
            for waiter in list(self._waiters):
                if not waiter[1].done() and waiter[0](element):
                    waiter[1].set_result(element)  # kept whole: the caller reads it
                    self._waiters.remove(waiter)
                    break
            else:
                self.on_stanza(element)
                element.clear()  # the bulk of a load run: nothing keeps these

    async def request(self, text: str, stanza_id: str) -> ET.Element:
        self.send(text)
        return await self._until(lambda e: e.get("id") == stanza_id)

    async def run(self) -> None:
        """Read stanzas until the connection ends (for the app server)."""
        while data := await self.reader.read(1 << 16):
            self._feed(data)

    def abort(self) -> None:
        """Lose the connection without </stream>: the session becomes pending."""
        sock = self.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()
