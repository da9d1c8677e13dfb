"""XEP-0357 wire formats: parse enable/disable requests, the forms of a publish.

Pure functions over XML text; no I/O. Input comes from ejabberd's own XML
parser (fxml), so it is well-formed and carries no DTD, but its content is the
client's: it is parsed with :mod:`.safexml` and every value is checked before it
is trusted.
"""

from __future__ import annotations

import ipaddress
import unicodedata
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import TYPE_CHECKING
from xml.sax.saxutils import escape, quoteattr

from . import safexml

if TYPE_CHECKING:
    from .ios_extensions import Extensions

NS_PUSH = "urn:xmpp:push:0"
NS_DATA = "jabber:x:data"
NS_PUBSUB = "http://jabber.org/protocol/pubsub"
FORM_PUBLISH_OPTIONS = "http://jabber.org/protocol/pubsub#publish-options"
FORM_PUSH_OPTIONS = "urn:xmpp:push:options"
FORM_SUMMARY = "urn:xmpp:push:summary"

MAX_JID_PART_BYTES = 1023  # RFC 7622, and ejabberd's jid module
MAX_NODE_BYTES = 1023
MAX_FORM_FIELDS = 64
# An enable's publish-options form, as stored and sent with every publish (a secret, an
# endpoint: a few hundred bytes in practice).
MAX_PUBLISH_OPTIONS_XML_BYTES = 4096
MAX_VALUE_BYTES = 4096


class RequestError(ValueError):
    """A request the client must be told about: an XMPP error condition and a text."""

    def __init__(self, condition: str, text: str, error_type: str = "modify") -> None:
        super().__init__(text)
        self.condition = condition
        self.error_type = error_type
        self.text = text


@dataclass(frozen=True, slots=True)
class Form:
    """A XEP-0004 form reduced to what push needs: its type and fields."""

    form_type: str
    fields: tuple[tuple[str, tuple[str, ...]], ...]

    def to_xml(self, form_kind: str = "submit") -> str:
        parts = [f"<x xmlns='{NS_DATA}' type={quoteattr(form_kind)}>"]
        if self.form_type:
            parts.append(field_xml("FORM_TYPE", [self.form_type], "hidden"))
        parts.extend(field_xml(var, values) for var, values in self.fields)
        parts.append("</x>")
        return "".join(parts)


@dataclass(frozen=True, slots=True)
class Enable:
    jid: str
    node: str
    publish_options: Form | None
    push_options: Form | None
    extensions: Extensions | None = None  # Tigase's (ios_extensions); None: none sent


@dataclass(frozen=True, slots=True)
class Disable:
    jid: str
    node: str | None


# "<field var=''><value></value></field>": what a field with one value adds to its text
FIELD_XML_BYTES = 38


def escaped_size(text: str) -> int:
    """Bytes of ``text`` in XML at worst: UTF-8, and every character that some writer
    escapes (fxml escapes all five) as its entity."""
    return (len(text.encode()) + 4 * text.count("&") + 3 * (text.count("<") + text.count(">"))
            + 5 * (text.count("'") + text.count('"')))


def form_size(form: Form) -> int:
    """Bytes of a form's fields in XML at most (see escaped_size)."""
    return sum(escaped_size(var) + sum(escaped_size(v) + 15 for v in values) + 23
               for var, values in (("FORM_TYPE", (form.form_type,)), *form.fields))


def field_xml(var: str, values: list[str] | tuple[str, ...], field_type: str | None = None) -> str:
    type_attr = f" type={quoteattr(field_type)}" if field_type else ""
    inner = "".join(f"<value>{escape(v)}</value>" for v in values)
    return f"<field var={quoteattr(var)}{type_attr}>{inner}</field>"


def check_jid(text: str | None, what: str) -> str:
    """The app server's JID: the shim has checked it with ejabberd's own jid:decode
    (stringprep, 1023 bytes a part); this refuses what that lets through but no app
    server can be (see jid_problem), and checks again what Python can of ejabberd's rules."""
    if not text:
        raise RequestError("bad-request", f"{what} needs a 'jid' attribute")
    problem = jid_problem(text)
    if problem:
        raise RequestError("jid-malformed", f"the 'jid' of {what} is not a valid JID: {problem}")
    return text


# Characters no part of a push JID may hold: controls, format characters (zero-width
# space and joiners, bidi overrides such as U+202E), private use, surrogates, unassigned,
# line and paragraph separators. Some of them stringprep maps to nothing (U+200B), so
# ejabberd would accept a JID that looks like another.
_BAD_CATEGORIES = frozenset({"Cc", "Cf", "Co", "Cs", "Cn", "Zl", "Zp"})
# RFC 7622 3.3.1 (nodeprep's prohibited ASCII) and what splits a JID
_BAD_IN_LOCAL = frozenset("\"&'/:<>@")


def jid_problem(text: str) -> str | None:
    """Why ``text`` is not a sane JID to publish to, or None. "Sane": ejabberd's rules
    (RFC 7622: each part 1 to 1023 bytes, no '@' or '/' where they split) plus a domain
    that is a DNS name (labels of 1 to 63 letters, marks, digits, '-' and '_', not
    starting or ending with '-'; no empty label, no trailing dot), an IPv4 address or a
    bracketed IPv6 address (no zone); no whitespace, controls or invisible characters."""
    bare, slash, resource = text.partition("/")
    local, at, domain = bare.rpartition("@")
    if not at:
        local, domain = "", bare
    if any(c.isspace() or unicodedata.category(c) in _BAD_CATEGORIES for c in text):
        return "whitespace, a control or an invisible character"
    for name, part, present in (("local part", local, at), ("domain", domain, True),
                                ("resource", resource, slash)):
        if present and not part:
            return f"empty {name}"
        if len(part.encode()) > MAX_JID_PART_BYTES:
            return f"the {name} is longer than {MAX_JID_PART_BYTES} bytes"
    if _BAD_IN_LOCAL.intersection(local):
        return "a character the local part may not hold"
    if domain.startswith("["):
        try:
            if not domain.endswith("]") or "%" in domain:
                raise ValueError(domain)
            ipaddress.IPv6Address(domain[1:-1])
        except ValueError:
            return "not an IPv6 address in brackets"
        return None
    for label in domain.split("."):
        if not label or len(label) > 63 or label[0] == "-" or label[-1] == "-":
            return "an empty, over-long or hyphen-edged label in the domain"
        if not all(c in "-_" or unicodedata.category(c)[0] in "LMN" for c in label):
            return "a character a domain may not hold"
    return None


def parse_form(element: ET.Element) -> Form:
    form_type = ""
    fields: list[tuple[str, tuple[str, ...]]] = []
    for field in element.findall(f"{{{NS_DATA}}}field"):
        var = field.get("var")
        if var is None:
            continue
        values = tuple(v.text or "" for v in field.findall(f"{{{NS_DATA}}}value"))
        if any(len(v.encode()) > MAX_VALUE_BYTES for v in values) or len(var) > 256:
            raise RequestError("bad-request", f"form field {var[:64]!r} is too long")
        if var == "FORM_TYPE":
            form_type = values[0] if values else ""
        else:
            fields.append((var, values))
    if len(fields) > MAX_FORM_FIELDS:
        raise RequestError("bad-request", "the form has too many fields")
    return Form(form_type, tuple(fields))


def parse_push_request(xml: bytes) -> Enable | Disable:
    """Parse the payload of an IQ set in urn:xmpp:push:0, or raise RequestError."""
    try:
        element = safexml.parse(xml)
    except ET.ParseError as exc:
        raise RequestError("bad-request", f"the request is not usable XML: {exc}") from None
    if element.tag == f"{{{NS_PUSH}}}enable":
        jid = check_jid(element.get("jid"), "enable")
        node = element.get("node")
        if not node:
            raise RequestError("bad-request", "enable needs a 'node' attribute")
        if len(node.encode()) > MAX_NODE_BYTES:
            raise RequestError("not-acceptable", "the 'node' attribute is too long")
        publish_options = push_options = None
        for x in element.findall(f"{{{NS_DATA}}}x"):
            form = parse_form(x)
            if form.form_type == FORM_PUSH_OPTIONS:
                push_options = push_options or form
            elif publish_options is None:
                # XEP-0357 says publish-options; clients that leave out FORM_TYPE
                # still mean them, so any other form is passed on verbatim.
                publish_options = form
        if publish_options is not None \
                and form_size(publish_options) > MAX_PUBLISH_OPTIONS_XML_BYTES:
            # sent with every publish: a big one would make every push big
            raise RequestError("not-acceptable", "the publish-options form is larger than "
                               f"{MAX_PUBLISH_OPTIONS_XML_BYTES} bytes")
        from . import ios_extensions  # noqa: PLC0415  (it builds on this module)
        extensions = ios_extensions.parse(element)
        return Enable(jid, node, publish_options, push_options, extensions or None)
    if element.tag == f"{{{NS_PUSH}}}disable":
        jid = check_jid(element.get("jid"), "disable")
        node = element.get("node") or None
        return Disable(jid, node)
    raise RequestError("bad-request", "expected <enable/> or <disable/> in urn:xmpp:push:0")


FormFields = tuple[tuple[str, tuple[str, ...]], ...]


def summary_form(summary: list[tuple[str, str]]) -> FormFields:
    """The notification's data form (urn:xmpp:push:summary) as the shim builds it."""
    return (("FORM_TYPE", (FORM_SUMMARY,)), *((var, (value,)) for var, value in summary))


def publish_options_form(xml: str) -> FormFields:
    """A registration's stored publish-options (Form.to_xml), FORM_TYPE first. Each
    registration's are its own (they hold its secret): the service keeps the result with
    the registration (Registration.publish_form), so it is parsed once per registration."""
    form = parse_form(safexml.parse(xml.encode()))
    head = (("FORM_TYPE", (form.form_type,)),) if form.form_type else ()
    return (*head, *form.fields)
