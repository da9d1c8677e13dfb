"""UnifiedPush peers for end-to-end tests: a slixmpp client behaving as Conversations the
UnifiedPush distributor (registers, answers <push/> IQs, sends the directed presence to the
push server on every bind), an app server's HTTP POSTs on loopback, and helpers reading the
server's state (is a session pending?)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import http.client
import secrets
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from slixmpp.exceptions import IqError
from slixmpp.xmlstream.handler import Callback
from slixmpp.xmlstream.matcher import MatchXPath

from devtools.instance import Instance
from tests.xmpp_peers import TIMEOUT, Client, Peers

NS_UP = "http://gultsch.de/xmpp/drafts/unified-push"


def up_hash(account_uuid: str, name: str) -> str:
    """What Conversations sends as application / instance: standard base64 (with padding)
    of SHA-256 over the account's UUID, a NUL and the package name / connector token."""
    return base64.b64encode(hashlib.sha256(f"{account_uuid}\0{name}".encode()).digest()).decode()


@dataclass(frozen=True)
class Registered:
    endpoint: str
    expiration: str  # as sent

    @property
    def expires(self) -> datetime:
        assert self.expiration.endswith("Z"), self.expiration
        return datetime.strptime(self.expiration, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)

    @property
    def token(self) -> str:
        return self.endpoint.rsplit("/", 1)[1]


@dataclass(frozen=True)
class Push:
    """One <push/> IQ as the distributor got it."""

    sender: str
    to: str
    application: str
    instance: str
    payload: bytes
    iq_id: str = ""


class Distributor(Client):
    """Conversations as a UnifiedPush distributor on one account."""

    def __init__(self, jid: str, password: str, port: int,
                 push_server: str | None = None) -> None:
        super().__init__(jid, password, port)
        self.push_server = push_server  # Conversations' "Push Server" (default: the domain)
        self.account_uuid = secrets.token_hex(16)
        self.pushes: list[Push] = []
        self.refuse: set[tuple[str, str]] = set()  # (application, instance) -> an error
        self.refusal = "item-not-found"  # the condition of that error
        self.hold = False  # keep the answers until release()
        self.held: list[Any] = []
        self.binds = 0
        self._arrived = asyncio.Condition()
        self.register_handler(Callback("up push", MatchXPath(
            f"{{jabber:client}}iq/{{{NS_UP}}}push"), self._on_push))
        self.add_event_handler("session_start", self._on_bind)

    def _on_bind(self, _: Any) -> None:
        """What Conversations does on every bind of its UP account: an available presence
        to the push server (push_server, else the account's domain)."""
        self.binds += 1
        self.send_presence(pto=self.push_server or self.boundjid.host)

    def _on_push(self, iq: Any) -> None:
        if iq["type"] != "set":
            return
        push = iq.xml.find(f"{{{NS_UP}}}push")
        assert push is not None
        record = Push(iq["from"].full, iq["to"].full, push.get("application", ""),
                      push.get("instance", ""),
                      base64.b64decode(push.text or "", validate=True), iq["id"])
        self.pushes.append(record)
        if self.hold:
            self.held.append(iq)
        else:
            self._answer(iq, (record.application, record.instance) in self.refuse)
        asyncio.ensure_future(self._notify())

    def _answer(self, iq: Any, refused: bool) -> None:
        reply = iq.reply(clear=True)
        if refused:
            reply["type"] = "error"
            reply["error"]["type"] = "cancel"
            reply["error"]["condition"] = self.refusal
        reply.send()

    def release(self) -> None:
        """Answer the held pushes (result, or the refusal) and stop holding."""
        self.hold = False
        held, self.held = self.held, []
        for iq in held:
            push = iq.xml.find(f"{{{NS_UP}}}push")
            self._answer(iq, (push.get("application", ""), push.get("instance", ""))
                         in self.refuse)

    async def _notify(self) -> None:
        async with self._arrived:
            self._arrived.notify_all()

    def payloads(self, application: str | None = None) -> list[bytes]:
        return [p.payload for p in self.pushes
                if application is None or p.application == application]

    async def wait_pushes(self, count: int, application: str | None = None,
                          timeout: float = TIMEOUT) -> list[bytes]:
        """Wait until ``count`` pushes (of that application) have arrived; all of them."""
        async with self._arrived:
            await asyncio.wait_for(self._arrived.wait_for(
                lambda: len(self.payloads(application)) >= count), timeout)
        return self.payloads(application)

    async def wait_payload(self, payload: bytes, timeout: float = TIMEOUT) -> None:
        async with self._arrived:
            await asyncio.wait_for(self._arrived.wait_for(
                lambda: payload in self.payloads()), timeout)

    def hashes(self, app: str, connector: str = "token-1") -> tuple[str, str]:
        return up_hash(self.account_uuid, app), up_hash(self.account_uuid, connector)

    async def register_up(self, application: str, instance: str,
                          to: str | None = None) -> Registered:
        to = to or self.push_server or self.boundjid.host
        iq = self.make_iq_set(ito=to)
        iq.append(ET.fromstring(f"<register xmlns='{NS_UP}' application='{application}' "
                                f"instance='{instance}'/>"))
        answer = await iq.send(timeout=TIMEOUT)
        registered = answer.xml.find(f"{{{NS_UP}}}registered")
        assert registered is not None, str(answer)
        assert answer["from"].full == to
        return Registered(registered.get("endpoint", ""), registered.get("expiration", ""))

    async def register_error(self, xml: str, iq_type: str = "set",
                             to: str | None = None) -> tuple[str, str, str]:
        """Send a register IQ that must fail: (error type, condition, text)."""
        iq = self.make_iq(ito=to or self.boundjid.host, itype=iq_type)
        iq.append(ET.fromstring(xml))
        try:
            await iq.send(timeout=TIMEOUT)
        except IqError as exc:
            error = exc.iq["error"]
            return error["type"], error["condition"], error["text"]
        raise AssertionError("the server accepted a register it should have refused")

    async def resume(self) -> None:
        """Reconnect and resume the pending stream (XEP-0198)."""
        resumed = asyncio.get_running_loop().create_future()
        self.add_event_handler("session_resumed",
                               lambda _: resumed.done() or resumed.set_result(True),
                               disposable=True)
        binds = self.binds
        self.connect("127.0.0.1", self.port)
        await asyncio.wait_for(resumed, TIMEOUT)
        assert self.binds == binds, "a new session, not a resumption"


async def distributor(peers: Peers, jid: str, password: str,
                      push_server: str | None = None) -> Distributor:
    client = Distributor(jid, password, peers.port, push_server)
    peers.clients.append(client)
    await client.online()
    return client


# ------------------------------------------------------------------ the server's side


def session_state(instance: Instance, full_jid: str) -> str:
    """mgmt_state of the c2s process of that full JID (``none`` without a session)."""
    user, rest = full_jid.split("@", 1)
    host, resource = rest.split("/", 1)
    return instance.erl(
        f'case ejabberd_sm:get_session_pid(<<"{user}">>, <<"{host}">>, <<"{resource}">>) of '
        'none -> none; P -> maps:get(mgmt_state, sys:get_state(P), none) end')


def http_waiting(instance: Instance) -> int:
    """HTTP requests of mod_push_py waiting for Python's answer (processes in the shim's
    UnifiedPush module)."""
    return int(instance.erl(
        "length([P || P <- erlang:processes(), "
        "case erlang:process_info(P, current_function) of "
        "{current_function, {mod_push_py_up, _, _}} -> true; _ -> false end])"))


def unacked(instance: Instance, full_jid: str) -> int:
    """Stanzas in the stream-management queue of that full JID's session (-1: none)."""
    user, rest = full_jid.split("@", 1)
    host, resource = rest.split("/", 1)
    return int(instance.erl(
        f'case ejabberd_sm:get_session_pid(<<"{user}">>, <<"{host}">>, <<"{resource}">>) of '
        'none -> -1; P -> p1_queue:len(maps:get(mgmt_queue, sys:get_state(P))) end'))


def wait_until(condition: Callable[[], bool], what: str, timeout: float = TIMEOUT,
               every: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(every)


async def go_pending(instance: Instance, client: Client) -> None:
    """Acknowledge what came, lose the TCP connection, wait until the session is pending."""
    await client.acknowledge()
    full = client.boundjid.full
    client.drop()
    await asyncio.to_thread(wait_until, lambda: session_state(instance, full) == "pending",
                            f"{full} did not become pending")


async def go_offline(instance: Instance, client: Client) -> None:
    """A clean logout; wait until ejabberd has no session for that full JID."""
    await client.acknowledge()
    full = client.boundjid.full
    await client.go_offline()
    await asyncio.to_thread(wait_until, lambda: session_state(instance, full) == "none",
                            f"{full} still has a session")


# ------------------------------------------------------------------ HTTP (the app server)


@dataclass
class Answer:
    status: int
    reason: str
    headers: dict[str, str] = field(default_factory=dict)  # names in lower case
    body: bytes = b""

    def header(self, name: str) -> str:
        return self.headers.get(name.lower(), "")


def http_request(url: str, method: str = "POST", body: bytes | None = None,
                 headers: dict[str, str] | None = None, host: str | None = None,
                 timeout: float = 30.0) -> Answer:
    """One request on a fresh connection. ``host``: the Host header to send instead of the
    URL's (the server must not care)."""
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=timeout)
    try:
        connection.putrequest(method, parts.path, skip_host=True, skip_accept_encoding=True)
        connection.putheader("Host", host or parts.netloc)
        for name, value in (headers or {}).items():
            connection.putheader(name, value)
        if body is not None or method == "POST":
            connection.putheader("Content-Length", str(len(body or b"")))
        connection.endheaders(body or None)
        response = connection.getresponse()
        data = response.read()
        return Answer(response.status, response.reason,
                      {name.lower(): value for name, value in response.getheaders()}, data)
    finally:
        connection.close()


async def post(url: str, body: bytes, headers: dict[str, str] | None = None,
               **kwargs: Any) -> Answer:
    return await asyncio.to_thread(http_request, url, "POST", body, headers, **kwargs)


async def request(url: str, method: str, **kwargs: Any) -> Answer:
    return await asyncio.to_thread(http_request, url, method, **kwargs)
