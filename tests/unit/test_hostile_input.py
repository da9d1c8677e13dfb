"""Hostile input, without ejabberd: random and mutated push IQs, app-server commands and
publishes, entity tricks, floods of publishes, and bad frames at the port edge. Whatever
comes in, nothing raises, every IQ gets exactly one sensible answer, and the service
still works afterwards."""

from __future__ import annotations

import asyncio
import logging
import re
import struct
import time
import xml.etree.ElementTree as ET
from dataclasses import replace
from typing import Any
from xml.sax.saxutils import escape, quoteattr

import h2.config
import h2.connection
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pymod_push import etf
from pymod_push.appserver.server import (
    PUBLISH_BURST,
    PUBLISH_REFILL_PER_SECOND,
    Delivery,
)
from pymod_push.core import safexml
from pymod_push.core.ratelimit import RateLimiter
from pymod_push.delivery.h2wire import Answered, Failed, H2Client
from pymod_push.etf import Atom
from pymod_push.port.app import FrameSplitter
from pymod_push.protocol import (
    Action,
    IqError,
    IqResult,
    ProtocolError,
    PushIq,
    PushOptionsUpdate,
    Route,
    SetPush,
    action_term,
    parse_event,
)
from tests.builders import (
    ACCOUNT,
    NS_COMMANDS,
    NS_DATA,
    NS_PUBLISH_OPTIONS,
    NS_PUBSUB,
    NS_PUSH,
    NS_STANZAS,
    PHONE,
    PUBSUB_HOST,
    REGISTER_HOST,
    USER,
    Clock,
    answer_of,
    iq_xml,
    make_app_server,
    make_service,
    publish,
    publish_xml,
    register,
)
from tests.port_harness import PortUnderTest, batch, hello

FUZZ = settings(max_examples=300, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# What a push IQ may be refused with: the request's fault, never the server's.
PUSH_IQ_CONDITIONS = {"bad-request", "not-acceptable", "jid-malformed", "not-allowed",
                      "forbidden"}
ERROR_TYPES = {"cancel", "modify", "auth", "wait", "continue"}


# ------------------------------------------------------------------ XML material

# Characters XML 1.0 allows (no C0 controls but tab and newlines, no surrogates).
xml_chars = st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")) | st.sampled_from(
    ["\t", "\n", "\r", "<", "&", "'", '"', "]]>", "&amp;", "\u00e9", "\U0001F600"])
short_text = st.lists(xml_chars, max_size=20).map("".join)
huge_text = st.sampled_from([1024, 4097, 70_000]).map(lambda n: "v" * n)
values = (short_text | huge_text
          | st.sampled_from(["", " ", "1", "0", "true", "false", "yes", " TRUE ", "2", "ab" * 32,
                             "https://push.example.net/x", "@", "/", "a@/b", "a b"]))
optional_value = st.none() | values
field_types = st.none() | st.sampled_from(["boolean", "text-single", "list-multi", "x"])
field_contents = (st.lists(values, max_size=3).map(
    lambda vs: "".join(f"<value>{escape(v)}</value>" for v in vs))
    | st.sampled_from(["<value><b xmlns='x'>no</b></value>", "<value/>"])
    | short_text.map(escape))
foreign_namespace = st.sampled_from(["", "", "", " xmlns='urn:other'"])
form_kinds = st.sampled_from(["submit", "form", "result", "cancel", ""])
form_namespaces = st.sampled_from([NS_DATA, NS_DATA, NS_DATA, "jabber:x:nodata"])
# The form limit is 64 fields; beyond it, one field repeated (cheaper to draw than 70).
many = st.sampled_from([0, 0, 0, 60, 70])


def attr(name: str, value: str | None) -> str:
    return "" if value is None else f" {name}={quoteattr(value)}"


@st.composite
def fields(draw: st.DrawFn, names: st.SearchStrategy[str | None]) -> str:
    """A form field: its var missing, known or random; no, one or many values, or a child
    element where text belongs."""
    var = draw(names)
    return (f"<field{draw(foreign_namespace)}{attr('var', var)}"
            f"{attr('type', draw(field_types))}>{draw(field_contents)}</field>")


@st.composite
def forms(draw: st.DrawFn, form_types: st.SearchStrategy[str],
          field: st.SearchStrategy[str]) -> str:
    """A data form: any FORM_TYPE (or none, or twice), fields repeated, too many fields."""
    parts = [f"<field var='FORM_TYPE'><value>{escape(form_type)}</value></field>"
             for form_type in draw(st.lists(form_types, max_size=2))]
    parts += draw(st.lists(field, max_size=4))
    parts += [draw(field)] * draw(many)
    return (f"<x xmlns={quoteattr(draw(form_namespaces))} type={quoteattr(draw(form_kinds))}>"
            f"{''.join(parts)}</x>")


def form_strategy(form_types: list[str], names: list[str]) -> st.SearchStrategy[str]:
    return forms(st.sampled_from(form_types) | short_text,
                 fields(st.none() | st.sampled_from(names) | short_text))


PUSH_FIELDS = ["secret", "include-senders", "include-message-count", "include-message-bodies",
               "include-subscription-count", "endpoint"]
push_forms = form_strategy([NS_PUBLISH_OPTIONS, "urn:xmpp:push:options"], PUSH_FIELDS)
push_children = st.lists(
    push_forms | st.just("<unknown xmlns='urn:x'/>")
    | st.sampled_from([1, 100, 5000]).map(lambda n: "<a>" * n + "</a>" * n), max_size=4)


@st.composite
def push_payloads(draw: st.DrawFn) -> str:
    """<enable/> and <disable/> with attributes missing, empty, huge or odd, forms repeated."""
    tag = draw(st.sampled_from(["enable", "enable", "disable", "other"]))
    namespace = draw(st.sampled_from([NS_PUSH, NS_PUSH, NS_PUSH, "urn:xmpp:push:1"]))
    jid = draw(st.sampled_from([None, "push.example.net", "a@b/c"]) | values)
    node = draw(st.sampled_from([None, "node1"]) | values)
    return (f"<{tag} xmlns={quoteattr(namespace)}{attr('jid', jid)}{attr('node', node)}>"
            f"{''.join(draw(push_children))}</{tag}>")


@st.composite
def mutated(draw: st.DrawFn, base: st.SearchStrategy[str]) -> bytes:
    """Well-formed XML with a few bytes cut out, changed, inserted, or the end cut off."""
    data = bytearray(draw(base).encode())
    for _ in range(draw(st.integers(1, 3))):
        if not data:
            break
        position = draw(st.integers(0, len(data) - 1))
        edit = draw(st.sampled_from(["delete", "replace", "insert", "truncate", "duplicate"]))
        if edit == "delete":
            del data[position:position + draw(st.integers(1, 8))]
        elif edit == "replace":
            data[position] = draw(st.integers(0, 255))
        elif edit == "insert":
            data[position:position] = draw(st.binary(min_size=1, max_size=8)
                                           | st.sampled_from([b"<", b"&", b"'", b"&amp;",
                                                              b"<x/>", b"\x00", b"\xc3"]))
        elif edit == "truncate":
            del data[position:]
        else:
            data[position:position] = data[position:position + draw(st.integers(1, 64))]
    return bytes(data)


# 10^9 "lol"s from under a kilobyte
LAUGHS = ("<!DOCTYPE lolz [<!ENTITY lol0 'lol'>"
          + "".join(f"<!ENTITY lol{i} '" + f"&lol{i - 1};" * 10 + "'>" for i in range(1, 10))
          + "]>")
ENTITY_TRICKS = [
    # billion laughs, in an attribute and in text
    LAUGHS + f"<enable xmlns='{NS_PUSH}' jid='push.example.net' node='&lol9;'/>",
    LAUGHS + f"<enable xmlns='{NS_PUSH}' jid='push.example.net' node='n'>&lol9;</enable>",
    # quadratic blowup: one big entity, referenced many times
    "<!DOCTYPE e [<!ENTITY e '" + "x" * 50_000 + "'>]>"
    + f"<enable xmlns='{NS_PUSH}' jid='push.example.net' node='n'>" + "&e;" * 10_000
    + "</enable>",
    # external entities and parameter entities
    "<!DOCTYPE e [<!ENTITY x SYSTEM 'file:///etc/passwd'>]>"
    f"<enable xmlns='{NS_PUSH}' jid='push.example.net' node='&x;'/>",
    "<!DOCTYPE e [<!ENTITY % p SYSTEM 'http://127.0.0.1:9/evil.dtd'> %p;]>"
    f"<enable xmlns='{NS_PUSH}' jid='push.example.net' node='n'/>",
    "<!DOCTYPE e SYSTEM 'http://127.0.0.1:9/evil.dtd'>"
    f"<enable xmlns='{NS_PUSH}' jid='push.example.net' node='n'/>",
    # undefined entity, no DTD
    f"<enable xmlns='{NS_PUSH}' jid='push.example.net' node='&undefined;'/>",
    # a DOCTYPE behind a declaration of another encoding
    "\ufeff<?xml version='1.0' encoding='utf-16'?>" + LAUGHS
    + f"<enable xmlns='{NS_PUSH}' jid='push.example.net' node='&lol9;'/>",
]
# Declarations of encodings Python's expat binding cannot take (LookupError, ValueError).
ENCODING_TRICKS = [
    "<?xml version='1.0' encoding='x-no-such-encoding'?>"
    f"<enable xmlns='{NS_PUSH}' jid='push.example.net' node='n'/>",
    "<?xml version='1.0' encoding='utf-32'?>"
    f"<enable xmlns='{NS_PUSH}' jid='push.example.net' node='n'/>",
    "<?xml version='1.0' encoding='shift_jis'?>"
    f"<enable xmlns='{NS_PUSH}' jid='push.example.net' node='n'/>",
]


def encodings(text: str) -> list[bytes]:
    return [text.encode("utf-8"), text.encode("utf-16"), text.encode("utf-32"),
            text.encode("utf-16-le")]


TRICK_BYTES = [data for text in ENTITY_TRICKS + ENCODING_TRICKS for data in encodings(text)]


def trick(index: int) -> bytes:
    return TRICK_BYTES[index]


entity_tricks = st.integers(0, len(TRICK_BYTES) - 1).map(trick)  # by index: a short repr
push_xml = (push_payloads().map(str.encode) | mutated(push_payloads()) | entity_tricks
            | st.binary(max_size=300)
            | st.sampled_from([b"", b"<", b"enable", b"\xff\xfe", b"<![CDATA[x]]>",
                               b"<enable xmlns='urn:xmpp:push:0'/><enable/>",
                               b"<?xml version='1.0'?><!-- c --><?pi x?>"
                               b"<enable xmlns='urn:xmpp:push:0' jid='a' node='n'/>"]))


# ------------------------------------------------------------------ push IQs

def valid_enable(ref: object = "check") -> PushIq:
    return PushIq(ref, PHONE, ACCOUNT, "set", "en",
                  f"<enable xmlns='{NS_PUSH}' jid='push.example.net' node='n1'/>".encode())


def assert_one_answer(actions: list[Any], ref: object) -> IqResult | IqError:
    """Exactly one answer to the IQ, a sensible one, and only actions the shim can take."""
    answers = [a for a in actions if isinstance(a, (IqResult, IqError))]
    assert len(answers) == 1, actions
    (answer,) = answers
    assert answer.ref == ref
    assert all(isinstance(a, (IqResult, IqError, SetPush, PushOptionsUpdate)) for a in actions)
    for action in actions:
        etf.encode(action_term(action))  # what goes to the shim encodes
    if isinstance(answer, IqError):
        assert answer.condition in PUSH_IQ_CONDITIONS, answer
        assert answer.error_type in ERROR_TYPES and answer.text
    elif answer.xml is not None:
        ET.fromstring(answer.xml)
    return answer


push_iqs = st.builds(
    lambda xml, iq_type, resource, owner: PushIq(
        "ref", ("alice", "example.org", resource), (owner, "example.org", ""), iq_type, "en",
        xml),
    push_xml,
    st.sampled_from(["set"] * 8 + ["get", "result", "error", "", "SET"]),
    st.sampled_from(["phone"] * 8 + ["", "tablet"]),
    st.sampled_from(["alice"] * 8 + ["bob"]))


@FUZZ
@given(st.lists(push_iqs, min_size=1, max_size=5))
def test_hostile_push_iqs_get_one_sensible_answer_each(iqs: list[PushIq]) -> None:
    service = make_service()
    for number, iq in enumerate(iqs):
        iq = replace(iq, ref=("ref", number))
        assert_one_answer(list(service.handle(iq, 0.0)), iq.ref)
    # ... and the service still serves a valid enable.
    assert list(service.handle(valid_enable(), 0.0)) == [
        SetPush(PHONE, service.config.resume_timeout_ms), IqResult("check")]


@pytest.mark.parametrize("trick", ENTITY_TRICKS, ids=range(len(ENTITY_TRICKS)))
@pytest.mark.parametrize("encoding", ["utf-8", "utf-16", "utf-16-le", "utf-32"])
def test_entities_never_expand(trick: str, encoding: str) -> None:
    started = time.perf_counter()
    service = make_service()
    (answer,) = service.handle(PushIq("r", PHONE, ACCOUNT, "set", "en", trick.encode(encoding)),
                               0.0)
    assert isinstance(answer, IqError) and answer.condition == "bad-request"
    assert len(answer.text) < 200  # not the expansion, nor part of it
    assert time.perf_counter() - started < 1.0
    assert service.store.for_user(PHONE[:2]) == []


@pytest.mark.parametrize("declared", ENCODING_TRICKS, ids=range(len(ENCODING_TRICKS)))
@pytest.mark.parametrize("encoding", ["utf-8", "utf-16", "utf-32"])
def test_declared_encodings_are_not_trusted(declared: str, encoding: str) -> None:
    """XMPP is UTF-8: what is UTF-8 is read as such whatever it declares, the rest refused."""
    service = make_service()
    answer = assert_one_answer(list(service.handle(
        PushIq("r", PHONE, ACCOUNT, "set", "en", declared.encode(encoding)), 0.0)), "r")
    if encoding == "utf-8":
        assert isinstance(answer, IqResult)
    else:
        assert isinstance(answer, IqError) and answer.condition == "bad-request"


def test_doctypes_and_foreign_encodings_are_refused_by_the_parser() -> None:
    plain = b"<a>\xc3\xa9</a>"
    assert safexml.parse(plain).text == "\u00e9"
    for refused in (b"<!DOCTYPE a><a/>", "<a/>".encode("utf-16"), b"<a>\xe9</a>",
                    b"<?xml version='1.0' encoding='latin-1'?><a>\xe9</a>",
                    b"<a>" + b"x" * safexml.MAX_XML_BYTES + b"</a>"):
        with pytest.raises(ET.ParseError):
            safexml.parse(refused)
    # A declaration of another encoding does not change how UTF-8 text is read.
    declared = "<?xml version='1.0' encoding='latin-1'?><a>\u00e9</a>".encode()
    assert safexml.parse(declared).text == "\u00e9"


def test_deep_nesting_and_many_forms_are_answered() -> None:
    """Many forms are read (the unknown ones ignored); nesting beyond safexml.MAX_DEPTH is
    refused with bad-request and says why (was: an IQ result for 100,000 levels, whose
    tree a recursive walk such as ET.tostring could not have handled)."""
    service = make_service()
    deep = ("<a>" * 100_000 + "</a>" * 100_000,
            "<a>" * safexml.MAX_DEPTH + "</a>" * safexml.MAX_DEPTH)
    for ref, inner, accepted in (
            ("deep", f"<x xmlns='{NS_DATA}' type='submit'>{deep[0]}</x>", False),
            ("deepest", deep[1], False),  # with <enable/> around it: one too many
            ("deep enough", deep[1][3:-4], True),
            ("many", f"<x xmlns='{NS_DATA}' type='submit'><field var='secret'><value>s</value>"
                     "</field></x>" * 5000, True)):
        xml = f"<enable xmlns='{NS_PUSH}' jid='push.example.net' node='n'>{inner}</enable>"
        assert len(xml) < safexml.MAX_XML_BYTES
        answer = assert_one_answer(list(service.handle(
            PushIq(ref, PHONE, ACCOUNT, "set", "en", xml.encode()), 0.0)), ref)
        if accepted:
            assert isinstance(answer, IqResult), ref
        else:
            assert isinstance(answer, IqError) and answer.condition == "bad-request", ref
            assert f"nested more than {safexml.MAX_DEPTH} elements deep" in answer.text
    assert list(service.handle(valid_enable(), 0.0))[-1] == IqResult("check")


def test_nesting_is_bounded_whatever_the_markup() -> None:
    """The depth is counted by the parser, not guessed from the text: self-closed elements,
    comments and many siblings do not count, nesting does, in every element's name."""
    at_bound = "<a>" * safexml.MAX_DEPTH + "</a>" * safexml.MAX_DEPTH
    assert sum(1 for _ in safexml.parse(at_bound.encode()).iter()) == safexml.MAX_DEPTH
    wide = "<r>" + "<a/><!-- <b> --><c>x</c>" * 1000 + "</r>"
    assert len(safexml.parse(wide.encode())) == 2000
    for deep in ("<a>" * (safexml.MAX_DEPTH + 1) + "</a>" * (safexml.MAX_DEPTH + 1),
                 "<r>" + "<a/>" * 100 + "<m><f>" * 40 + "</f></m>" * 40 + "</r>",
                 "<a>" * 5000):  # not even closed: refused for its depth first
        with pytest.raises(ET.ParseError, match="nested more than"):
            safexml.parse(deep.encode())
    with pytest.raises(ET.ParseError):  # many elements, not closed
        safexml.parse(("<r>" + "<a/>" * 100).encode())


# ------------------------------------------------------------------ the app server

COMMANDS = ["register-push-apns", "register-push-fcm", "register-push-gcm",
            "register-push-webpush", "register-push-mozilla", "register-push-ubuntu",
            "register-push-wns", "list-push-registrations", "unregister-push"]
COMMAND_FIELDS = ["token", "device-id", "device-name", "voip-token", "device-second-token",
                  "application-id", "application-name", "endpoint", "p256dh", "auth", "nodes"]
command_forms = form_strategy(["", "x"], COMMAND_FIELDS)
summary_forms = form_strategy(["urn:xmpp:push:summary"], ["message-count", "last-message-body"])


def error_of(routes: list[Route | Delivery]) -> tuple[str, str, str]:
    """(type, condition, text) of an error answer."""
    answer = answer_of(routes)
    assert answer.get("type") == "error"
    error = answer.find("error")  # the shim routes it as it is, in the stream's namespace
    assert error is not None
    (condition,) = [c.tag.split("}")[1] for c in error if c.tag != f"{{{NS_STANZAS}}}text"]
    return error.get("type", ""), condition, error.findtext(f"{{{NS_STANZAS}}}text") or ""


@st.composite
def app_server_payloads(draw: st.DrawFn, node: str, secret: str) -> str:
    kind = draw(st.sampled_from(["command", "publish", "disco", "other", "none"]))
    if kind == "command":
        form = draw(st.none() | command_forms
                    | st.lists(command_forms, min_size=2, max_size=3).map("".join))
        command = draw(st.sampled_from(COMMANDS) | short_text)
        action = draw(st.none() | st.sampled_from(["execute", "cancel", "next", "complete"])
                      | short_text)
        namespace = draw(st.sampled_from([NS_COMMANDS] * 4 + ["urn:x"]))
        return (f"<command xmlns={quoteattr(namespace)}{attr('node', command)}"
                f"{attr('action', action)}>{form or ''}</command>")
    if kind == "publish":
        publish_node = draw(st.none() | st.sampled_from([node, node, "unknown"]) | values)
        secrets = draw(st.lists(st.sampled_from([secret, secret, "wrong", ""]) | values,
                                max_size=3))
        summaries = draw(st.lists(summary_forms, max_size=2))
        options = "".join(
            f"<publish-options><x xmlns='{NS_DATA}' type='submit'><field var='secret'>"
            f"<value>{escape(s)}</value></field></x></publish-options>" for s in secrets)
        publishes = draw(st.integers(0, 2))
        inner = "".join(f"<publish{attr('node', publish_node)}><item><notification "
                        f"xmlns='{NS_PUSH}'>{''.join(summaries)}</notification></item>"
                        "</publish>" for _ in range(publishes))
        namespace = draw(st.sampled_from([NS_PUBSUB] * 4 + [NS_PUBSUB + "#owner"]))
        return f"<pubsub xmlns={quoteattr(namespace)}>{inner}{options}</pubsub>"
    if kind == "disco":
        which = draw(st.sampled_from(["info", "items"]))
        query_node = draw(st.none() | st.just(NS_COMMANDS) | short_text)
        return (f"<query xmlns='http://jabber.org/protocol/disco#{which}'"
                f"{attr('node', query_node)}/>")
    if kind == "other":
        return draw(st.sampled_from(["<ping xmlns='urn:xmpp:ping'/>", "<a/><b/>",
                                     "<vCard xmlns='vcard-temp'/>"]))
    return ""


@st.composite
def app_server_iqs(draw: st.DrawFn, node: str, secret: str) -> bytes:
    iq_type = draw(st.sampled_from(["get", "set", "set", "set", "result", "error", "", "x"]))
    to = draw(st.sampled_from([REGISTER_HOST, PUBSUB_HOST, "pubsub2.example.org",
                               "example.org", "other.example.net", PUBSUB_HOST + "/res"]))
    sender = draw(st.sampled_from([USER, "example.org", "mallory@evil.example/x",
                                   "evil.example", ""]) | short_text)
    iq_id = draw(st.sampled_from(["i1", ""]) | short_text)
    prolog = draw(st.sampled_from(["", "", "", "<?xml version='1.0' encoding='x-no-such'?>",
                                   "<?xml version='1.0' encoding='utf-32'?>", LAUGHS]))
    xml = prolog.encode() + iq_xml(iq_type, to, draw(app_server_payloads(node, secret)), iq_id,
                                   sender)
    return draw(st.just(xml) | mutated(st.just(xml.decode())))


def check_app_server_answer(xml: bytes, routes: list[Route | Delivery]) -> None:
    """One answer to every get and set, addressed back to the sender, nothing else."""
    try:
        iq = safexml.parse(xml)
    except ET.ParseError:
        # Answered from its start tag if that is readable (fxml writes no '>' in
        # attribute values), else there is no one to answer.
        head = re.match(rb"<iq\b[^>]*>", xml)
        try:
            iq = safexml.parse(head[0] + b"</iq>" if head and head[0][-2:] != b"/>"
                               else head[0] if head else b"")
        except ET.ParseError:
            assert routes == []
            return
        if iq.get("type") not in ("get", "set"):
            assert routes == []
            return
        (route,) = routes
        assert isinstance(route, Route)
        answer = ET.fromstring(route.xml)
        assert answer.get("type") == "error" and answer.get("id") == iq.get("id", "")
        assert answer.get("to") == iq.get("from", "") and answer.get("from") == iq.get("to", "")
        return
    if iq.get("type") not in ("get", "set"):
        assert routes == []
        return
    assert len(routes) == 1, routes
    (route,) = routes
    if isinstance(route, Delivery):  # a publish for the provider, answered after it
        assert route.publish is not None and route.publish.id == iq.get("id", "")
        return
    answer = ET.fromstring(route.xml)
    assert answer.tag == "iq" and answer.get("type") in ("result", "error")
    assert answer.get("id") == iq.get("id", "")
    assert answer.get("to") == iq.get("from", "") and answer.get("from") == iq.get("to", "")
    if answer.get("type") == "error":
        error = answer.find("error")
        assert error is not None and error.get("type") in ERROR_TYPES
        assert [c for c in error if c.tag != f"{{{NS_STANZAS}}}text"]


@FUZZ
@given(st.data())
def test_hostile_app_server_iqs_get_one_answer_each(data: st.DataObject) -> None:
    server = make_app_server()
    node, secret = register(server)
    for number in range(data.draw(st.integers(1, 6))):
        xml = data.draw(app_server_iqs(node, secret), label=f"iq {number}")
        allowed = data.draw(st.booleans())
        check_app_server_answer(xml, server.handle(allowed, xml))
    # ... and it still registers a device and takes its publishes.
    new_node, new_secret = register(server, token="cd" * 32, sender="bob@example.org/pc")
    (delivery,) = publish(server, new_node, new_secret)
    assert isinstance(delivery, Delivery) and delivery.device.node == new_node


@FUZZ
@given(sender=st.sampled_from(["evil.example", "example.net", "127.0.0.9", "a@b.example/c",
                               ""]) | short_text,
       node=short_text | values,
       secret=st.none() | short_text)
def test_publishes_to_unknown_nodes_get_item_not_found(sender: str, node: str,
                                                       secret: str | None) -> None:
    server = make_app_server()
    registered, _ = register(server)
    if node == registered or not node.strip():
        return
    error_type, condition, _ = error_of(publish(server, node, secret, sender=sender))
    assert (error_type, condition) == ("cancel", "item-not-found")


def test_a_node_is_served_at_its_own_pubsub_host_only() -> None:
    server = make_app_server()
    node, secret = register(server)
    routes = server.handle(True, iq_xml("set", "pubsub2.example.org", publish_xml(node, secret)))
    assert error_of(routes)[:2] == ("cancel", "item-not-found")
    routes = server.handle(True, iq_xml("set", "other.example.net", publish_xml(node, secret)))
    assert error_of(routes)[:2] == ("cancel", "service-unavailable")


def test_app_server_ignores_what_it_cannot_parse(caplog: pytest.LogCaptureFixture) -> None:
    server = make_app_server()
    for xml in (b"<iq", b"\xff\xfe<\x00", ("<!DOCTYPE iq>" + iq_xml("get", PUBSUB_HOST, "")
                                              .decode()).encode(),
                "<iq type='get' id='1' from='a@b' to='pubsub.example.org'/>".encode("utf-16")):
        with caplog.at_level(logging.WARNING, "pymod_push"):
            assert server.handle(True, xml) == []
    assert caplog.text.count("not plain XML was ignored") == 4


# ------------------------------------------------------------------ publish rate limit

def test_a_flood_to_one_node_is_refused_after_the_burst() -> None:
    clock = Clock()
    server = make_app_server(clock)
    flooded, flooded_secret = register(server, token="ab" * 32)
    other, other_secret = register(server, token="cd" * 32, sender="bob@example.org/pc")

    outcomes = [publish(server, flooded, flooded_secret, f"p{i}") for i in range(2 * PUBLISH_BURST)]
    accepted = [o for o in outcomes if isinstance(o[0], Delivery)]
    assert len(accepted) == PUBLISH_BURST  # the first ones, in order
    assert all(isinstance(o[0], Delivery) for o in outcomes[:PUBLISH_BURST])
    for refused in outcomes[PUBLISH_BURST:]:
        error_type, condition, text = error_of(refused)
        assert (error_type, condition) == ("wait", "resource-constraint")
        assert "retry in 1 s" in text
    # Another node is not affected.
    assert isinstance(publish(server, other, other_secret)[0], Delivery)

    # Refilled with time: one a second, up to the burst.
    clock.now += 1 / PUBLISH_REFILL_PER_SECOND
    assert isinstance(publish(server, flooded, flooded_secret)[0], Delivery)
    assert error_of(publish(server, flooded, flooded_secret))[1] == "resource-constraint"
    clock.now += 1000
    refills = [publish(server, flooded, flooded_secret)[0] for _ in range(PUBLISH_BURST + 1)]
    assert [isinstance(r, Delivery) for r in refills] == [True] * PUBLISH_BURST + [False]


def test_only_publishes_with_the_secret_spend_a_nodes_budget() -> None:
    server = make_app_server()
    node, secret = register(server)
    for bad in ("wrong", None, ""):
        for _ in range(3 * PUBLISH_BURST):
            assert error_of(publish(server, node, bad))[1] == "forbidden"
    for _ in range(3 * PUBLISH_BURST):
        assert error_of(publish(server, "no-such-node", secret))[1] == "item-not-found"
    deliveries = [publish(server, node, secret)[0] for _ in range(PUBLISH_BURST)]
    assert all(isinstance(d, Delivery) for d in deliveries)


def test_a_flood_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    server = make_app_server()
    node, secret = register(server)
    with caplog.at_level(logging.WARNING, "pymod_push"):
        for _ in range(3 * PUBLISH_BURST):
            publish(server, node, secret)
    assert caplog.text.count("too many publishes") == 1


def test_idle_buckets_are_forgotten() -> None:
    limiter = RateLimiter(burst=3, per_second=1.0)
    for key in range(1000):
        assert limiter.take(f"node{key}", 0.0) is None
    assert len(limiter) == 1000
    assert limiter.take("late", 2.9) is None  # the others are not full yet
    assert len(limiter) == 1001
    assert limiter.take("later", 3.0) is None  # now they are: gone
    assert len(limiter) == 2


def test_the_number_of_buckets_is_capped() -> None:
    limiter = RateLimiter(burst=2, per_second=0.001, max_keys=10)
    for key in range(100):
        limiter.take(f"node{key}", float(key))
        assert len(limiter) <= 10


@FUZZ
@given(st.lists(st.tuples(st.sampled_from("abcd"), st.floats(0, 3, allow_nan=False)),
                max_size=200),
       st.integers(1, 5), st.sampled_from([0.5, 1.0, 4.0]))
def test_limiter_matches_a_plain_token_bucket(steps: list[tuple[str, float]], burst: int,
                                              per_second: float) -> None:
    """Eviction never changes a decision: the same as buckets kept forever."""
    limiter = RateLimiter(burst, per_second)
    model: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)
    now = 0.0
    for key, step in steps:
        now += step
        tokens, at = model.get(key, (float(burst), now))
        tokens = min(float(burst), tokens + (now - at) * per_second)
        expected = tokens >= 1.0
        model[key] = (tokens - 1.0 if expected else tokens, now)
        refusal = limiter.take(key, now)
        assert (refusal is None) == expected
        if refusal is not None:
            assert 0 < refusal.retry_after <= 1 / per_second + 1e-9
    assert len(limiter) <= 4


def test_a_clock_that_goes_back_refills_nothing() -> None:
    limiter = RateLimiter(burst=1, per_second=1.0)
    assert limiter.take("n", 100.0) is None
    assert limiter.take("n", 50.0) is not None
    assert limiter.take("n", 100.5) is not None
    assert limiter.take("n", 101.0) is None


# ------------------------------------------------------------------ the port edge

def push_iq_event(ref: int, xml: str) -> tuple[Any, ...]:
    user = tuple(p.encode() for p in PHONE)
    return (Atom("iq"), ref, user, (b"alice", b"example.org", b""), Atom("set"), b"en",
            xml.encode())


def run_port(frames_in: list[bytes]) -> PortUnderTest:
    async def main() -> PortUnderTest:
        port = PortUnderTest()
        try:
            port.app.on_frames([hello()])
            for payload in frames_in:
                port.app.on_frames([payload])
        finally:
            await port.app.aclose()
        return port

    return asyncio.run(main())


ENABLE = f"<enable xmlns='{NS_PUSH}' jid='push.example.net' node='n1'/>"


@settings(max_examples=100, deadline=None)
@given(st.lists(st.binary(max_size=64) | st.builds(lambda good, cut: good[:cut],
                                                   st.just(batch(1, push_iq_event(1, ENABLE))),
                                                   st.integers(0, 60)),
                min_size=1, max_size=4))
def test_malformed_frames_are_skipped_and_the_next_good_one_handled(
        bad_frames: list[bytes]) -> None:
    port = run_port([*bad_frames, batch(7, push_iq_event(42, ENABLE))])
    actions = port.actions()
    assert actions[-2:] == [(Atom("iq_result"), 42, Atom("undefined")), (Atom("ack"), 7)]


def test_a_malformed_frame_is_logged_by_size(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, "pymod_push"):
        port = run_port([b"\x83secret-bytes", batch(2, push_iq_event(5, ENABLE))])
    assert "malformed frame from ejabberd ignored (13 bytes)" in caplog.text
    assert "secret-bytes" not in caplog.text
    assert (Atom("iq_result"), 5, Atom("undefined")) in port.actions()


def test_bad_events_spoil_nothing_else_in_their_batch() -> None:
    port = run_port([batch(3, (Atom("iq"), 1), Atom("nonsense"), (Atom("stanza"), b"x"),
                           (Atom("app_server_iq"), True, 10 ** 12),
                           (Atom("iq_reply"), [1, 2], Atom("result")),
                           (Atom("iq"), 2, (b"alice", b"example.org", b"phone"),
                            (b"alice", b"example.org", b""), Atom("set"), b"en", 2 ** 40),
                           push_iq_event(9, ENABLE))])
    assert port.actions()[-2:] == [(Atom("iq_result"), 9, Atom("undefined")), (Atom("ack"), 3)]


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_frames_survive_any_chunking(data: st.DataObject) -> None:
    payloads = data.draw(st.lists(st.binary(max_size=100), max_size=5))
    stream = b"".join(struct.pack(">I", len(p)) + p for p in payloads)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=6)))
    splitter = FrameSplitter()
    got: list[bytes] = []
    for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        got += splitter.feed(stream[start:end])
    assert got == payloads


def test_an_oversized_frame_header_is_fatal() -> None:
    # The stream cannot be resynchronized after it; the process ends and the shim restarts it.
    with pytest.raises(ProtocolError):
        FrameSplitter().feed(struct.pack(">I", 2**31) + b"x")


# Events as the shim sends them, then with parts of the wrong type, and random terms.
leaves = (st.binary(max_size=20) | st.integers(-(2**70), 2**70)
          | st.sampled_from([0, -1, 2**31, 2**40, 2**64, 10**4000])  # bytes(2**40): 1 TiB
          | st.booleans() | st.floats(allow_nan=False) | st.just([]) | st.just({})
          | st.sampled_from([Atom("set"), Atom("result"), Atom(""), Atom("undefined")]))
terms = st.recursive(leaves, lambda inner: st.lists(inner, max_size=4)
                     | st.lists(inner, max_size=7).map(tuple), max_leaves=12)
SESSION = (b"alice", b"example.org", b"phone")
USER_KEY = (b"alice", b"example.org")
STANZA = (Atom("message"), b"bob@example.org/pc", b"m1", Atom("chat"), b"hi",
          b"<message xmlns='jabber:client' type='chat'><body>hi</body></message>")
WELL_FORMED_EVENTS: list[tuple[Any, ...]] = [
    (Atom("stanza"), SESSION, STANZA),
    (Atom("stanza"), SESSION, (*STANZA, {Atom("nick"): b"alice"})),
    (Atom("session_pending"), SESSION, [STANZA]),
    (Atom("session_resumed"), SESSION),
    (Atom("session_opened"), SESSION),
    (Atom("offline"), USER_KEY, STANZA),
    (Atom("archived"), USER_KEY, STANZA),
    (Atom("user_removed"), USER_KEY),
    (Atom("ejabberd_started"),),
    (Atom("iq"), 7, SESSION, (b"alice", b"example.org", b""), Atom("set"), b"en",
     ENABLE.encode()),
    (Atom("app_server_iq"), True, iq_xml("get", PUBSUB_HOST,
                                         "<query xmlns='http://jabber.org/protocol/disco#info'/>")),
    (Atom("iq_reply"), 17, (Atom("error"), Atom("wait"), Atom("resource-constraint"))),
    (Atom("iq_reply"), 17, Atom("timeout")),
]


@st.composite
def spoiled_events(draw: st.DrawFn) -> tuple[Any, ...]:
    """A real event with some of its parts (or their parts) swapped for random terms."""
    event = list(draw(st.sampled_from(WELL_FORMED_EVENTS)))
    for _ in range(draw(st.integers(1, 3))):
        if len(event) < 2:
            break
        position = draw(st.integers(1, len(event) - 1))
        part = event[position]
        if isinstance(part, tuple) and part and draw(st.booleans()):
            inner = list(part)
            inner[draw(st.integers(0, len(inner) - 1))] = draw(leaves | terms)
            event[position] = tuple(inner)
        else:
            event[position] = draw(leaves | terms)
    if draw(st.integers(0, 4)) == 0:  # an argument too many or too few
        event = event[:-1] if draw(st.booleans()) else [*event, draw(terms)]
    return tuple(event)


event_terms = st.sampled_from(WELL_FORMED_EVENTS) | spoiled_events() | terms


@FUZZ
@given(st.lists(event_terms, min_size=1, max_size=5))
def test_any_term_is_an_event_or_a_protocol_error(terms_in: list[Any]) -> None:
    service = make_service()
    for term in terms_in:
        try:
            event = parse_event(term)
        except ProtocolError:
            continue
        actions: list[Action | Delivery] = list(service.handle(event, 0.0))
        for action in actions:
            if not isinstance(action, Delivery):
                etf.encode(action_term(action))
    assert list(service.handle(valid_enable(), 0.0))[-1] == IqResult("check")


# ------------------------------------------------------------------ the codec

def test_deep_terms_fail_cleanly() -> None:
    nested_lists = b"\x83" + b"l\x00\x00\x00\x01" * 100_000 + b"j" * 100_001
    nested_tuples = b"\x83" + b"h\x01" * 100_000 + b"j"
    for data in (nested_lists, nested_tuples, nested_lists[:-50_000]):
        with pytest.raises(etf.DecodeError):
            etf.decode(data)


@pytest.mark.parametrize("header", [
    b"i\xff\xff\xff\xff",  # a tuple of 4 billion elements
    b"t\xff\xff\xff\xff",  # a map of 4 billion pairs
    b"l\xff\xff\xff\xff",  # a list of 4 billion elements
    b"m\xff\xff\xff\xff",  # a binary of 4 GiB
    b"o\xff\xff\xff\xff\x00",  # a bignum of 4 GiB
    b"Z\xff\xffd\x00\x01a\x00\x00\x00\x01",  # a reference of 65535 ids
    b"P\xff\xff\xff\xff\x78\x9c\x03\x00",  # compressed: 4 GiB promised, nothing given
])
def test_huge_claimed_sizes_fail_without_allocating(header: bytes) -> None:
    started = time.perf_counter()
    with pytest.raises(etf.DecodeError):
        etf.decode(b"\x83" + header + b"a\x01" * 10)
    assert time.perf_counter() - started < 1.0


@FUZZ
@given(st.data())
def test_mutated_compressed_frames_fail_cleanly(data: st.DataObject) -> None:
    import zlib
    term = data.draw(terms)
    raw = etf.encode(term)[1:]
    compressed = bytearray(b"\x83P" + struct.pack(">I", len(raw)) + zlib.compress(raw))
    position = data.draw(st.integers(1, len(compressed) - 1))
    compressed[position] = data.draw(st.integers(0, 255))
    try:
        etf.decode(bytes(compressed))
    except etf.DecodeError:
        pass


# ------------------------------------------------------------ numbers from the network

@pytest.mark.parametrize("status", ["\u00b2\u00b2\u00b2", "\u0662\u0660\u0660",
                                    "\uff12\uff10\uff10", "20", "2000", "+20", " 20", "099",
                                    "2e2", ""])
def test_an_http2_status_is_three_ascii_digits(status: str) -> None:
    """Was: '\u00b2\u00b2\u00b2'.isdigit() is true and int() raises out of
    H2Client.receive (the connection and its other streams lost); Arabic-Indic and
    fullwidth digits were taken as 200. Now the stream fails, the connection goes on."""
    from tests.h2_server import Server, answer, exchange, request

    client = H2Client()
    server = Server(h2.connection.H2Connection(h2.config.H2Configuration(
        client_side=False, header_encoding="utf-8", validate_outbound_headers=False)))
    first, second = request(client), request(client)
    exchange(client, server)
    server.h2.send_headers(first, [(":status", status)], end_stream=True)
    answer(server, second, 200, body=b"ok")
    events = exchange(client, server)
    assert [e for e in events if isinstance(e, Failed)] == [
        Failed(first, "an answer without a valid status")]
    (answered,) = [e for e in events if isinstance(e, Answered)]
    assert (answered.stream_id, answered.status, answered.body) == (second, 200, b"ok")


@given(st.text(max_size=2000))
def test_a_peers_text_in_a_log_line_is_short_and_printable(text: str) -> None:
    """Whatever a peer sends (CR/LF, escape codes, 64 KiB): at most 200 characters in the
    log line, escapes included, none of them a control character."""
    from pymod_push.core.limits import PEER_TEXT_CHARS, peer_text

    shown = peer_text(text)
    assert len(shown) <= PEER_TEXT_CHARS and shown.isprintable()
    if len(text) <= PEER_TEXT_CHARS and text.isprintable():
        assert shown == text
