"""slixmpp peers for end-to-end tests: push users, a sender, and an external app server; what
they send (messages, call proposals, MUC joins, Siskin's enable) and read (Tigase's
<encrypted/>)."""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import struct
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import Any
from xml.sax.saxutils import escape, quoteattr

from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from slixmpp import ClientXMPP
from slixmpp.exceptions import IqError
from slixmpp.xmlstream.handler import Callback
from slixmpp.xmlstream.matcher import MatchXPath

from tests.builders import NS_COMMANDS, NS_DATA, NS_PUBLISH_OPTIONS, NS_PUBSUB, NS_PUSH

TIMEOUT = 20.0


class Client(ClientXMPP):
    """A plain-c2s client on 127.0.0.1 with stream management."""

    def __init__(self, jid: str, password: str, port: int) -> None:
        super().__init__(jid, password,
                         plugin_config={"feature_mechanisms": {"unencrypted_scram": True,
                                                               "unencrypted_plain": True}})
        self.enable_plaintext = True
        self.enable_direct_tls = False
        self.enable_starttls = False
        self.port = port
        self.register_plugin("xep_0030")
        self.register_plugin("xep_0198")
        self.messages: asyncio.Queue[Any] = asyncio.Queue()
        self.add_event_handler("message", self.messages.put_nowait)

    async def online(self) -> Client:
        started = asyncio.get_running_loop().create_future()
        sm_ready = asyncio.get_running_loop().create_future()
        self.add_event_handler("session_start", lambda _: started.done() or started.set_result(1),
                               disposable=True)
        self.add_event_handler("sm_enabled", lambda _: sm_ready.done() or sm_ready.set_result(1),
                               disposable=True)
        self.connect("127.0.0.1", self.port)
        await asyncio.wait_for(started, TIMEOUT)
        await asyncio.wait_for(sm_ready, TIMEOUT)
        self.send_presence()
        # A round trip makes sure the server has processed the presence.
        await self.plugin["xep_0030"].get_info(jid=self.boundjid.bare, timeout=TIMEOUT)
        return self

    async def push_iq(self, xml: str, iq_type: str = "set", to: str | None = None) -> Any:
        iq = self.make_iq(ito=to, itype=iq_type)
        iq.append(ET.fromstring(xml))
        return await iq.send(timeout=TIMEOUT)

    async def enable_push(self, push_jid: str, node: str, secret: str | None = None,
                          options: dict[str, str] | None = None) -> Any:
        """Enable push; ``options`` is an urn:xmpp:push:options form (var -> value)."""
        form = ""
        if options is not None:
            form += (f"<x xmlns='{NS_DATA}' type='submit'><field var='FORM_TYPE'>"
                     "<value>urn:xmpp:push:options</value></field>"
                     + "".join(f"<field var={quoteattr(var)}><value>{escape(value)}</value>"
                               "</field>" for var, value in options.items()) + "</x>")
        if secret is not None:
            form += (f"<x xmlns='{NS_DATA}' type='submit'>"
                     f"<field var='FORM_TYPE'><value>{NS_PUBLISH_OPTIONS}</value></field>"
                     f"<field var='secret'><value>{secret}</value></field></x>")
        return await self.push_iq(f"<enable xmlns='{NS_PUSH}' jid='{push_jid}' node='{node}'>"
                                  f"{form}</enable>")

    async def push_options(self) -> dict[str, list[str]]:
        """The urn:xmpp:push:options form of disco#info on the own bare JID."""
        info = await self.plugin["xep_0030"].get_info(jid=self.boundjid.bare, timeout=TIMEOUT)
        for form in info.xml.iter(f"{{{NS_DATA}}}x"):
            fields = form_fields(form)
            if fields.get("FORM_TYPE") == ["urn:xmpp:push:options"]:
                return fields
        raise AssertionError("no urn:xmpp:push:options form in disco#info")

    async def disable_push(self, push_jid: str, node: str | None = None) -> Any:
        node_attr = f" node='{node}'" if node else ""
        return await self.push_iq(f"<disable xmlns='{NS_PUSH}' jid='{push_jid}'{node_attr}/>")

    async def push_iq_error(self, xml: str, **kwargs: Any) -> tuple[str, str]:
        """Send a push IQ that must fail; returns (error type, condition)."""
        try:
            await self.push_iq(xml, **kwargs)
        except IqError as exc:
            return exc.iq["error"]["type"], exc.iq["error"]["condition"]
        raise AssertionError("the server accepted an IQ it should have refused")

    async def command(self, to: str, node: str,
                      fields: dict[str, str | list[str]] | None = None) -> ET.Element:
        """Execute an ad-hoc command in one stage; the <command/> of the result."""
        form = ""
        if fields is not None:
            form = f"<x xmlns='{NS_DATA}' type='submit'>" + "".join(
                f"<field var={quoteattr(var)}>"
                + "".join(f"<value>{escape(v)}</value>"
                          for v in ([value] if isinstance(value, str) else value))
                + "</field>" for var, value in fields.items()) + "</x>"
        result = await self.push_iq(f"<command xmlns='{NS_COMMANDS}' node={quoteattr(node)} "
                                    f"action='execute'>{form}</command>", to=to)
        command = result.xml.find(f"{{{NS_COMMANDS}}}command")
        assert command is not None
        return command

    async def acknowledge(self) -> None:
        """Acknowledge (XEP-0198) all stanzas received so far, and wait until the server has
        the ack: what it still holds unacknowledged when the connection drops is pending
        (resent on resumption) and counts as such."""
        self.plugin["xep_0198"].send_ack()
        # The server reads the stream in order: the answer to a later IQ means it has the <a/>.
        await self.plugin["xep_0030"].get_info(jid=self.boundjid.bare, timeout=TIMEOUT)

    def drop(self) -> None:
        """Lose the TCP connection without </stream>: the session becomes pending."""
        assert self.transport is not None
        sock = self.transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.transport.abort()

    async def go_offline(self) -> None:
        """A clean logout: the session ends, it does not become pending."""
        self.disconnect()
        await asyncio.wait_for(self.disconnected, TIMEOUT)


@dataclass
class Publish:
    """One publish IQ as the app server saw it."""

    sender: str
    node: str
    summary: dict[str, str]
    publish_options: dict[str, str]
    # the other children of <notification/> (Tigase's <encrypted/>, <priority/>, <jingle/>)
    elements: list[ET.Element] = field(default_factory=list)
    xml: str = ""  # the whole publish IQ

    @classmethod
    def parse(cls, iq: ET.Element) -> Publish:
        pubsub = iq.find(f"{{{NS_PUBSUB}}}pubsub")
        assert pubsub is not None
        publish = pubsub.find(f"{{{NS_PUBSUB}}}publish")
        assert publish is not None
        notification = publish.find(f"{{{NS_PUBSUB}}}item/{{{NS_PUSH}}}notification")
        form = None if notification is None else notification.find(f"{{{NS_DATA}}}x")
        options = pubsub.find(f"{{{NS_PUBSUB}}}publish-options/{{{NS_DATA}}}x")
        elements = [] if notification is None else [
            e for e in notification if e.tag != f"{{{NS_DATA}}}x"]
        return cls(iq.get("from", ""), publish.get("node", ""), _fields(form), _fields(options),
                   elements, ET.tostring(iq, encoding="unicode"))


def form_fields(form: ET.Element | None) -> dict[str, list[str]]:
    """Every field of a data form with all its values."""
    if form is None:
        return {}
    return {f.get("var", ""): [v.text or "" for v in f.findall(f"{{{NS_DATA}}}value")]
            for f in form.findall(f"{{{NS_DATA}}}field")}


def _fields(form: ET.Element | None) -> dict[str, str]:
    if form is None:
        return {}
    return {f.get("var", ""): (f.findtext(f"{{{NS_DATA}}}value") or "")
            for f in form.findall(f"{{{NS_DATA}}}field")}


class AppServer(Client):
    """An external app server: records every publish and answers it (result or an error)."""

    def __init__(self, jid: str, password: str, port: int) -> None:
        super().__init__(jid, password, port)
        self.received: dict[str, list[Publish]] = {}
        self.errors: dict[str, tuple[str, str]] = {}  # node -> (type, condition) to answer
        self._arrived = asyncio.Condition()
        self.register_handler(Callback("push publish", MatchXPath(
            f"{{jabber:client}}iq/{{{NS_PUBSUB}}}pubsub"), self._on_publish))

    def _on_publish(self, iq: Any) -> None:
        if iq["type"] != "set":
            return
        record = Publish.parse(iq.xml)
        self.received.setdefault(record.node, []).append(record)
        reply = iq.reply(clear=True)
        if record.node in self.errors:
            error_type, condition = self.errors[record.node]
            reply["type"] = "error"
            reply["error"]["type"] = error_type
            reply["error"]["condition"] = condition
        reply.send()
        asyncio.ensure_future(self._notify())

    async def _notify(self) -> None:
        async with self._arrived:
            self._arrived.notify_all()

    async def wait_for(self, node: str, count: int, timeout: float = TIMEOUT) -> list[Publish]:
        """Wait until ``count`` publishes for ``node`` have arrived; return them all."""
        async with self._arrived:
            await asyncio.wait_for(
                self._arrived.wait_for(lambda: len(self.received.get(node, [])) >= count),
                timeout)
        return self.received[node]


@dataclass
class Peers:
    """The clients of one test, disconnected at the end."""

    port: int
    clients: list[Client] = field(default_factory=list)

    async def user(self, jid: str, password: str) -> Client:
        client = Client(jid, password, self.port)
        self.clients.append(client)
        return await client.online()

    async def app_server(self, jid: str, password: str) -> AppServer:
        client = AppServer(jid, password, self.port)
        self.clients.append(client)
        await client.online()
        return client

    async def close(self) -> None:
        for client in self.clients:
            if client.transport is not None:
                client.disconnect()
                try:
                    await asyncio.wait_for(client.disconnected, 5)
                except TimeoutError:
                    client.abort()


# ------------------------------------------------------------------ what the tests send

BODIES = {"include-message-bodies": "1", "include-senders": "1"}  # push options of a user
PROPOSE = ("<propose xmlns='urn:xmpp:jingle-message:0' id='{id}'>"
           "<description xmlns='urn:xmpp:jingle:apps:rtp:1' media='audio'/></propose>")


def send(sender: Client, to: str, body: str | None = None, payload: str = "",
         mtype: str = "chat") -> None:
    message = sender.make_message(mto=to, mbody=body, mtype=mtype)
    if payload:
        message.append(ET.fromstring(payload))
    message.send()


async def join(client: Client, room: str, nick: str) -> None:
    """Join a MUC room and wait for the room's own presence (status 110)."""
    joined = asyncio.get_running_loop().create_future()

    def on_presence(presence: object) -> None:
        if str(presence["from"]) == f"{room}/{nick}" and not joined.done():  # type: ignore[index]
            joined.set_result(None)

    client.add_event_handler("presence", on_presence)
    presence = client.make_presence(pto=f"{room}/{nick}")
    presence.append(ET.fromstring("<x xmlns='http://jabber.org/protocol/muc'>"
                                  "<history maxstanzas='0'/></x>"))
    presence.send()
    await asyncio.wait_for(joined, TIMEOUT)
    client.del_event_handler("presence", on_presence)


async def round_trip(client: Client) -> None:
    """The server has handled (and routed) what the client sent before."""
    await client.plugin["xep_0030"].get_info(jid=client.boundjid.host, timeout=TIMEOUT)


async def subscribe_to(client: Client, contact: Client) -> None:
    """The client asks for the contact's presence: a roster item with ask=out (known)."""
    contact.roster.auto_authorize = None  # neither accept nor refuse: ask stays out
    contact.roster.auto_subscribe = False
    client.send_presence(pto=contact.boundjid.bare, ptype="subscribe")
    await round_trip(client)


# ------------------------------------------------------------------ Tigase's extensions (iOS)

NS_ENCRYPT = "tigase:push:encrypt:0"


def siskin_enable_xml(app: str, node: str, key: bytes, rooms: str = "", muted: str = "",
                      max_size: str = "") -> str:
    """What Siskin sends (SiskinPushNotificationsModule): every extension advertised."""
    size = f" max-size='{max_size}'" if max_size else ""
    muted_items = f"<item jid='{muted}'/>" if muted else ""
    return (f"<enable xmlns='urn:xmpp:push:0' jid='{app}' node='{node}'>"
            "<ignore-unknown xmlns='tigase:push:filter:ignore-unknown:0'/>"
            f"<muted xmlns='tigase:push:filter:muted:0'>{muted_items}</muted>"
            f"<groupchat xmlns='tigase:push:filter:groupchat:0'>{rooms}</groupchat>"
            "<priority xmlns='tigase:push:priority:0'/>"
            f"<encrypt xmlns='{NS_ENCRYPT}' alg='aes-128-gcm'{size}>"
            f"{base64.b64encode(key).decode()}</encrypt>"
            "<jingle xmlns='tigase:push:jingle:0'/></enable>")


def opened(push: Publish, key: bytes) -> dict[str, Any]:
    """The device's part: decrypt <encrypted/> (checking the GCM tag) and read the JSON."""
    (encrypted,) = [e for e in push.elements if e.tag == f"{{{NS_ENCRYPT}}}encrypted"]
    iv = base64.b64decode(encrypted.get("iv", ""))
    assert len(iv) == 12
    plaintext = AESGCM(key).decrypt(iv, base64.b64decode(encrypted.text or ""), None)
    value: dict[str, Any] = json.loads(plaintext)
    assert push.summary == {}  # no form: nothing of the message in clear
    return value
