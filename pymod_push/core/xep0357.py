"""XEP-0357 wire formats: parse enable/disable requests, the forms of a publish.

Pure functions over XML text; no I/O. Input comes from ejabberd's own XML
parser (fxml), so it is well-formed and carries no DTD, but its content is the
client's: it is parsed with :mod:`.safexml` and every value is checked before it
is trusted.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from xml.sax.saxutils import escape, quoteattr

from pymod_push.core import ios_extensions, safexml
from pymod_push.core.ios_extensions import Extensions
from pymod_push.core.xmpp import (
    RequestError,
    check_jid,
    escaped_size,
)
from pymod_push.protocol import FormFields

NS_PUSH = "urn:xmpp:push:0"
NS_DATA = "jabber:x:data"
NS_PUBSUB = "http://jabber.org/protocol/pubsub"
FORM_PUBLISH_OPTIONS = "http://jabber.org/protocol/pubsub#publish-options"
FORM_PUSH_OPTIONS = "urn:xmpp:push:options"
FORM_SUMMARY = "urn:xmpp:push:summary"

MAX_NODE_BYTES = 1023
MAX_FORM_FIELDS = 64
# An enable's publish-options form, as stored and sent with every publish (a secret, an
# endpoint: a few hundred bytes in practice).
MAX_PUBLISH_OPTIONS_XML_BYTES = 4096
MAX_VALUE_BYTES = 4096


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


def form_size(form: Form) -> int:
    """Bytes of a form's fields in XML at most (see escaped_size)."""
    return sum(escaped_size(var) + sum(escaped_size(v) + 15 for v in values) + 23
               for var, values in (("FORM_TYPE", (form.form_type,)), *form.fields))


def field_xml(var: str, values: list[str] | tuple[str, ...], field_type: str | None = None) -> str:
    type_attr = f" type={quoteattr(field_type)}" if field_type else ""
    inner = "".join(f"<value>{escape(v)}</value>" for v in values)
    return f"<field var={quoteattr(var)}{type_attr}>{inner}</field>"


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
        extensions = ios_extensions.parse_enable(element)
        return Enable(jid, node, publish_options, push_options, extensions or None)
    if element.tag == f"{{{NS_PUSH}}}disable":
        jid = check_jid(element.get("jid"), "disable")
        node = element.get("node") or None
        return Disable(jid, node)
    raise RequestError("bad-request", "expected <enable/> or <disable/> in urn:xmpp:push:0")


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
