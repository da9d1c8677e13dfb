"""What the unit tests build their input from, and read the code's output with, written once:
one user's session (PHONE), push IQs and enables, messages, publish IQs as the shim writes
them, a push service over the test's store, the built-in app server and registrations at it,
devices and registrations as the store keeps them, JIDs good and hostile, and readers of a
publish's summary and of ``pymod-push logic check``'s output."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any
from xml.sax.saxutils import escape, quoteattr

from pymod_push.appserver.server import AppServer, Delivery
from pymod_push.core.config import Backend, Config
from pymod_push.protocol import AppServerIq, Publish, PushIq, Route, Stanza
from pymod_push.records import RegisteredDevice, Registration
from pymod_push.service.decisions import PushService
from pymod_push.store import Store

# ------------------------------------------------------------------ who and where

HOST = "example.org"  # the server's own host
ALICE = ("alice", HOST)  # the push user: (user, server)
PHONE = (*ALICE, "phone")  # her session
ACCOUNT = (*ALICE, "")  # her bare JID, the "to" of her IQs
USER = "alice@example.org/phone"  # PHONE as a JID
APP = "push.example.net"  # an external app server
SENDER = "bob@example.org/pc"  # who writes to her
PUBSUB_HOST = "pubsub.example.org"  # the built-in app server's pubsub host
REGISTER_HOST = "push.example.org"  # where devices register at it
NOW = 1_000_000.0  # a time for services that are given one

NS_PUSH = "urn:xmpp:push:0"
NS_DATA = "jabber:x:data"
NS_PUBSUB = "http://jabber.org/protocol/pubsub"
NS_COMMANDS = "http://jabber.org/protocol/commands"
NS_STANZAS = "urn:ietf:params:xml:ns:xmpp-stanzas"
NS_PUBLISH_OPTIONS = "http://jabber.org/protocol/pubsub#publish-options"

OPEN = {"include_message_bodies": True, "include_senders": True}  # module options
SECRET_FORM = ("<x xmlns='jabber:x:data' type='submit'><field var='FORM_TYPE'><value>"
               "http://jabber.org/protocol/pubsub#publish-options</value></field>"
               "<field var='secret'><value>s3cr3t</value></field></x>")  # publish-options


def xml_escape(text: str) -> str:
    """As fxml writes text and attribute values: all five escaped."""
    return (text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            .replace("'", "&apos;").replace('"', "&quot;"))


def xml_attr(value: str) -> str:
    """An attribute value as fxml writes it, quotes included."""
    return "'" + xml_escape(value) + "'"


# ------------------------------------------------------------------ push IQs and stanzas

def push_iq(xml: str, ref: object = "ref", sender: tuple[str, str, str] = PHONE,
            to: tuple[str, str, str] = ACCOUNT, iq_type: str = "set") -> PushIq:
    """An IQ of the user's session to her account, as the shim passes it on."""
    return PushIq(ref, sender, to, iq_type, "en", xml.encode())


def enable_xml(node: str = "node1", jid: str = APP, form: str = SECRET_FORM,
               attrs: str = "") -> str:
    """<enable/> of XEP-0357 (the form is the children: publish-options, or any)."""
    return (f"<enable xmlns='{NS_PUSH}' jid={xml_attr(jid)} node={xml_attr(node)}{attrs}>"
            f"{form}</enable>")


def enable(node: str = "node1", jid: str = APP, form: str = SECRET_FORM) -> PushIq:
    return push_iq(enable_xml(node, jid, form))


def message(body: str = "hi", stanza_id: str = "m1", sender: str = SENDER,
            stanza_type: str = "chat", extra: str = "", nick: str = "",
            known: bool | None = None, escaped: bool = False) -> Stanza:
    """A message to the user as the shim reports it; no <body/> for an empty body. ``escaped``:
    the sender and the body escaped in the XML as fxml writes them (else as given, markup
    included)."""
    quoted = xml_attr(sender) if escaped else f"'{sender}'"
    text = xml_escape(body) if escaped else body
    xml = (f"<message xmlns='jabber:client' from={quoted} id='{stanza_id}' "
           f"type='{stanza_type}'>" + (f"<body>{text}</body>" if body else "")
           + f"{extra}</message>")
    return Stanza("message", sender, stanza_id, stanza_type, body, xml.encode(), nick, known)


def fields(action: object) -> dict[str, str]:
    """The summary form of a publish (single values)."""
    assert isinstance(action, Publish)
    return {var: values[0] for var, values in action.fields}


def publish_iq_xml(publish: Publish, host: str = HOST) -> bytes:
    """The publish IQ as the shim builds it from a Publish (fxml escaping every special
    character)."""
    def form(form_fields: Any) -> str:
        return (f"<x xmlns='{NS_DATA}' type='submit'>" + "".join(
            f"<field var={xml_attr(var)}>" + "".join(
                f"<value>{xml_escape(v)}</value>" for v in values)
            + "</field>" for var, values in form_fields) + "</x>")
    options = (f"<publish-options>{form(publish.publish_options)}</publish-options>"
               if publish.publish_options else "")
    return (f"<iq xmlns='jabber:server' type='set' id='{'x' * 36}' from={xml_attr(host)} "
            f"to={xml_attr(publish.to)}><pubsub xmlns='{NS_PUBSUB}'>"
            f"<publish node={xml_attr(publish.node)}><item><notification xmlns='{NS_PUSH}'>"
            f"{form(publish.fields)}</notification></item></publish>{options}</pubsub>"
            "</iq>").encode()


# ------------------------------------------------------------------ a push service

# Where make_service opens its store: SQLite in memory, unless the ``database`` fixture
# (conftest.py) has put a PostgreSQL database of the test's own on top.
_new_store: list[Callable[[], Store]] = [lambda: Store(":memory:")]


@contextmanager
def stores_from(new_store: Callable[[], Store]) -> Iterator[None]:
    """make_service opens its stores with new_store meanwhile."""
    _new_store.append(new_store)
    try:
        yield
    finally:
        _new_store.pop()


def make_service(**options: object) -> PushService:
    """A push service of HOST with these module options over a fresh store."""
    return PushService(replace(Config(HOST), **options), _new_store[-1]())


# ------------------------------------------------------------------ the built-in app server

BACKENDS = (
    Backend(0, "apns", "chatninja", REGISTER_HOST, PUBSUB_HOST, {"topic": "org.example"}),
    Backend(1, "fcm", "chatninja", REGISTER_HOST, PUBSUB_HOST, {}),
    Backend(2, "webpush", "any", REGISTER_HOST, PUBSUB_HOST, {}),
    Backend(3, "ubuntu", "any", HOST, PUBSUB_HOST, {}),
    Backend(4, "wns", "chatninja", REGISTER_HOST, "pubsub2.example.org", {}),
)
# APNs only, registered at the server's own host (as the service's own app server).
OWN_HOST_BACKENDS = (Backend(0, "apns", "chatninja", HOST, PUBSUB_HOST,
                             {"topic": "org.example"}),)


class Clock:
    """A clock the test moves."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_app_server(clock: Callable[[], float] | None = None) -> AppServer:
    return AppServer(Config(HOST, backends=BACKENDS), Store(":memory:"), clock or Clock())


def iq_xml(iq_type: str, to: str, payload: str, iq_id: str = "i1", sender: str = USER) -> bytes:
    return (f"<iq xmlns='jabber:client' type={quoteattr(iq_type)} id={quoteattr(iq_id)} "
            f"from={quoteattr(sender)} to={quoteattr(to)}>{payload}</iq>").encode()


def command_xml(node: str, form_fields: dict[str, str] | None = None,
                action: str = "execute") -> str:
    form = "" if form_fields is None else (
        f"<x xmlns='{NS_DATA}' type='submit'>" + "".join(
            f"<field var={quoteattr(k)}><value>{escape(v)}</value></field>"
            for k, v in form_fields.items()) + "</x>")
    return (f"<command xmlns='{NS_COMMANDS}' node={quoteattr(node)} "
            f"action={quoteattr(action)}>{form}</command>")


def publish_xml(node: str, secret: str | None, summary: str = "") -> str:
    options = "" if secret is None else (
        f"<publish-options><x xmlns='{NS_DATA}' type='submit'><field var='FORM_TYPE'>"
        f"<value>{NS_PUBLISH_OPTIONS}</value></field><field var='secret'>"
        f"<value>{escape(secret)}</value></field></x></publish-options>")
    summary = summary or (f"<x xmlns='{NS_DATA}' type='submit'><field var='message-count'>"
                          "<value>1</value></field></x>")
    return (f"<pubsub xmlns='{NS_PUBSUB}'><publish node={quoteattr(node)}><item>"
            f"<notification xmlns='{NS_PUSH}'>{summary}</notification></item></publish>"
            f"{options}</pubsub>")


def answer_of(routes: list[Route | Delivery]) -> ET.Element:
    (route,) = routes
    assert isinstance(route, Route)
    return ET.fromstring(route.xml)


def form_values(answer: ET.Element) -> dict[str | None, str | None]:
    return {f.get("var"): f.findtext(f"{{{NS_DATA}}}value")
            for f in answer.iter(f"{{{NS_DATA}}}field")}


def register(server: AppServer, token: str = "ab" * 32, sender: str = USER) -> tuple[str, str]:
    """Register an APNs device; its (node, secret)."""
    answer = answer_of(server.handle(True, iq_xml(
        "set", REGISTER_HOST, command_xml("register-push-apns", {"token": token}),
        sender=sender)))
    assert answer.get("type") == "result", ET.tostring(answer)
    values = form_values(answer)
    node, secret = values["node"], values["secret"]
    assert node and secret
    return node, secret


def publish(server: AppServer, node: str, secret: str | None, iq_id: str = "p1",
            sender: str = HOST) -> list[Route | Delivery]:
    return server.handle(True, iq_xml("set", PUBSUB_HOST, publish_xml(node, secret), iq_id,
                                      sender))


def command(node: str, form: str = "") -> bytes:
    """An ad-hoc command of the user's phone to the server's own host."""
    return (f"<iq xmlns='jabber:client' type='set' id='c' from='alice@{HOST}/phone' to='{HOST}'>"
            f"<command xmlns='{NS_COMMANDS}' node='{node}' "
            f"action='execute'>{form}</command></iq>").encode()


def registered(service: PushService, token: str = "ab" * 32) -> tuple[str, str]:
    """Register an APNs device at the service's own app server (OWN_HOST_BACKENDS); its
    (node, secret)."""
    form = (f"<x xmlns='{NS_DATA}' type='submit'><field var='token'><value>{token}</value>"
            "</field></x>")
    (route,) = service.handle(AppServerIq(True, command("register-push-apns", form)), NOW)
    assert isinstance(route, Route)
    values = form_values(ET.fromstring(route.xml))
    return str(values["node"]), str(values["secret"])


# ------------------------------------------------------------------ what the store keeps

def device(token: str = "ab" * 32, node: str = "node-1", *, secret: str = "secret",
           user: str = "alice@example.org", device_id: str = "phone", device_name: str = "",
           provider: str = "x", app_name: str = "app", pubsub_host: str = PUBSUB_HOST,
           **extra: str) -> RegisteredDevice:
    """A device registered at the built-in app server."""
    return RegisteredDevice(node, secret, user, device_id, device_name, provider, app_name,
                            pubsub_host, token, **extra)


def registration(resource: str = "phone", node: str = "n1",
                 push_jid: str = APP) -> Registration:
    """The user's push registration of one of her sessions."""
    return Registration(*ALICE, resource, push_jid, node, "<x/>")


# ------------------------------------------------------------------ JIDs

HOSTILE_JIDS = [
    "a@.localhost", "..", ".", "a@[zz]", "a@[::1", "a@[::1]x", "[zz]", "x" * 1024 + "@h",
    "a@" + "d" * 1100, "a@b/" + "r" * 1100, "a@" + "d" * 64 + ".org", "a\u200b@b",
    "push.exa\u200bmple.org", "a@b\u202e", "push.\u202eorg", "a@b\u200d", "a@b\ufeff",
    "a@b\u2028", "a@b\u2029", "a@b\u0000", "a@b\u0007", "a@b\u007f", "a@b\u0085",
    "a@b\ue000", "a@b\U000f0000", "a@b\u0378", "a b@c", "a@b c", "a@b/c d", "a@b\t",
    "a@b\u00a0", "a@b\u3000", "@b", "a@", "a@/r", "a@b/", "/r", "a@b@c", "a\"b@c",
    "a&b@c", "a'b@c", "a:b@c", "a<b@c", "a>b@c", "a@b..c", "a@b.", "a@.b.", "a@-/x/",
    "a@b!c", "a@b$c", "a@b*c", "a@b,c", "a@b;c", "a@b=c", "a@b+c", "a@b(c)", "a@b%c",
    "a@b\\c", "a@b|c", "a@b~c", "a@b`c", "a@b{c}", "a@b?c", "a@b#c", "a@\u2024b",
    "a@b\u2000c", "a@[]", "a@[1.2.3.4]", "a@[fe80::1%eth0]",
]
GOOD_JIDS = ["push.example.net", "p2.siacs.eu", "127.0.0.2", "a@[::1]", "user@example.org",
             "user@example.org/res with space".replace(" ", "-"), "münchen.de",
             "push_up.example.org", "a@xn--mnchen-3ya.de", "Alice@Example.ORG/Phone",
             "d" * 63 + ".org", "\u0928\u092e\u0938\u094d\u0924\u0947.example"]


# ------------------------------------------------------------------ pymod-push logic check

def sections(out: str) -> dict[str, str]:
    """The output's parts by sample name."""
    parts = re.split(r"^== (.+) \([\d,]+ bytes\)$", out, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def payload_sizes(section: str) -> dict[str, int]:
    return {kind: int(size) for kind, size in
            re.findall(r"^(apns|fcm|webpush|wns|ubuntu): (\d+) bytes", section, re.M)}
