"""The built-in app server's wire formats: XEP-0050 registration commands, the pubsub
publish endpoint and disco. Pure functions over XML text; no I/O.

Command names and fields follow the 2015 mod_push ("App server usage"), plus
register-push-fcm and register-push-webpush as today's names.
"""

from __future__ import annotations

import base64
import binascii
import secrets
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from xml.sax.saxutils import escape, quoteattr

from pymod_push.core import destination, safexml
from pymod_push.core.config import COMMAND_GROUPS, Backend, IpNetwork
from pymod_push.core.ios_extensions import ENCRYPTED_FIELD, IV_FIELD
from pymod_push.core.limits import cut_utf8
from pymod_push.core.shim_facts import REGISTER_PREFIX, command_items
from pymod_push.core.xep0357 import (
    MAX_FORM_FIELDS,
    NS_DATA,
    NS_PUBSUB,
    NS_PUSH,
    field_xml,
    parse_form,
)
from pymod_push.core.xmpp import RequestError
from pymod_push.protocol import FormFields

NS_COMMANDS = "http://jabber.org/protocol/commands"
NS_DISCO_INFO = "http://jabber.org/protocol/disco#info"
NS_DISCO_ITEMS = "http://jabber.org/protocol/disco#items"
NS_STANZAS = "urn:ietf:params:xml:ns:xmpp-stanzas"
FORM_APPS = "urn:xmpp:push:appserver"  # our disco extension form: app names per provider

# register-push-TYPE for each shipped type, and the provider it registers at
REGISTER_COMMANDS = {REGISTER_PREFIX + type_: group for type_, group in COMMAND_GROUPS.items()}
MAX_FIELD = 4096
# Tigase's encrypted notification (core/ios_extensions): its blob and IV go to the device
# as they are, in these data fields (Siskin's notification service extension reads them);
# a call's (type='voip') is urgent. A blob is never cut (it would not decrypt): a larger
# one than this is left out, and the providers leave it out when it does not fit.
NS_TIGASE_ENCRYPT = "tigase:push:encrypt:0"
MAX_ENCRYPTED = 16 * 1024


@dataclass(frozen=True, slots=True)
class Iq:
    id: str
    type: str
    sender: str
    to: str
    payload: ET.Element | None

    @property
    def sender_bare(self) -> str:
        return self.sender.split("/", 1)[0]

    @property
    def sender_resource(self) -> str:
        return self.sender.partition("/")[2]


@dataclass(frozen=True, slots=True)
class DeviceRegistration:
    """What a register command asks for (validated)."""

    backend: Backend
    device_id: str
    device_name: str
    token: str  # APNs: hex; WNS: channel URI; Web Push: endpoint URL
    application_id: str = ""
    p256dh: str = ""
    auth: str = ""
    voip_token: str = ""  # APNs: the app's PushKit token, for urgent pushes (calls)
    extra: tuple[tuple[str, str], ...] = ()  # a Python provider's declared fields


def parse_iq(xml: bytes) -> Iq:
    """The IQ's addressing and its first child; ET.ParseError if it is not plain XML."""
    element = safexml.parse(xml)
    payload = element[0] if len(element) else None
    return Iq(element.get("id", ""), element.get("type", ""), element.get("from", ""),
              element.get("to", ""), payload)


MAX_HEAD_BYTES = 64 * 1024  # two JIDs and an id, escaped, fit many times over


def parse_iq_head(xml: bytes) -> Iq | None:
    """The addressing of an IQ whose whole is not usable (too large, not plain XML),
    from its start tag alone, so that it can be answered; None if not even that parses.
    fxml writes '>' in attribute values as an entity: the first '>' ends the tag."""
    end = xml.find(b">", 0, MAX_HEAD_BYTES)
    if not xml.startswith(b"<iq") or end < 0:
        return None
    head = xml[:end + 1]
    try:
        element = safexml.parse(head if head.endswith(b"/>") else head + b"</iq>")
    except ET.ParseError:
        return None
    if element.tag.rpartition("}")[2] != "iq":
        return None
    return Iq(element.get("id", ""), element.get("type", ""), element.get("from", ""),
              element.get("to", ""), None)


def error_iq(iq: Iq, error_type: str, condition: str, text: str = "") -> str:
    text_xml = (f"<text xmlns='{NS_STANZAS}'>{escape(text)}</text>" if text else "")
    return (f"<iq type='error' id={quoteattr(iq.id)} from={quoteattr(iq.to)} "
            f"to={quoteattr(iq.sender)}><error type={quoteattr(error_type)}>"
            f"<{condition} xmlns='{NS_STANZAS}'/>{text_xml}</error></iq>")


def result_reply(iq: Iq, payload: str = "") -> str:
    return (f"<iq type='result' id={quoteattr(iq.id)} from={quoteattr(iq.to)} "
            f"to={quoteattr(iq.sender)}>{payload}</iq>")


def new_node() -> str:
    return secrets.token_urlsafe(12)


def new_secret() -> str:
    return secrets.token_urlsafe(24)


# ----------------------------------------------------------------------- commands

@dataclass(frozen=True, slots=True)
class Command:
    node: str
    session_id: str
    action: str
    fields: dict[str, tuple[str, ...]] | None  # None: no form submitted yet


def parse_command(iq: Iq) -> Command:
    payload = iq.payload
    if payload is None or payload.tag != f"{{{NS_COMMANDS}}}command":
        raise RequestError("bad-request", "expected a command")
    form = payload.find(f"{{{NS_DATA}}}x")
    fields = dict(parse_form(form).fields) if form is not None else None
    return Command(payload.get("node", ""), payload.get("sessionid", ""),
                   payload.get("action", "execute"), fields)


def command_reply(iq: Iq, command: Command, status: str, form: str = "",
                  session_id: str = "") -> str:
    session = session_id or command.session_id or secrets.token_hex(8)
    return result_reply(iq, f"<command xmlns='{NS_COMMANDS}' node={quoteattr(command.node)} "
                            f"sessionid={quoteattr(session)} status={quoteattr(status)}>"
                            f"{form}</command>")


def command_group(node: str, backends: Iterable[Backend]) -> str | None:
    """The provider a register-push-* command registers at (a Python provider: its name)."""
    if node in REGISTER_COMMANDS:
        return REGISTER_COMMANDS[node]
    name = node.removeprefix(REGISTER_PREFIX)
    if name != node and any(b.type == "python" and b.group == name for b in backends):
        return name
    return None


def registration_form(group: str, declared: dict[str, str] | None = None) -> str:
    """The form a client fills for register-push-*, for clients that ask first (declared:
    a Python provider's fields, var -> label)."""
    fields = {"webpush": ["endpoint", "p256dh", "auth"], "ubuntu": ["token", "application-id"],
              "apns": ["token", "voip-token"]}
    wanted = (list(declared) if declared is not None else fields.get(group, ["token"])
              ) + ["device-id", "device-name"]
    labels = declared or {}
    inner = "".join(f"<field var={quoteattr(name)} type='text-single'"
                    + (f" label={quoteattr(labels[name])}/>" if name in labels else "/>")
                    for name in wanted)
    return (f"<x xmlns='{NS_DATA}' type='form'><title>Push registration</title>"
            f"{inner}</x>")


def form_value(fields: dict[str, tuple[str, ...]], name: str) -> str:
    values = fields.get(name, ())
    value = values[0].strip() if values else ""
    if len(value) > MAX_FIELD:
        raise RequestError("not-acceptable", f"field '{name}' is too long")
    return value


def _apns_token(token: str, name: str = "token") -> str:
    """APNs device tokens: hex as iOS gives them today, or base64 as the 2015 design had it."""
    cleaned = token.replace(" ", "").strip("<>")
    try:
        if len(cleaned) % 2 == 0 and all(c in "0123456789abcdefABCDEF" for c in cleaned):
            return cleaned.lower()
        return base64.b64decode(cleaned, validate=True).hex()
    except (binascii.Error, ValueError):
        raise RequestError("bad-request", f"field '{name}' is not a hex or base64 APNs token") \
            from None


def _b64url(value: str, name: str) -> str:
    try:
        base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    except (binascii.Error, ValueError):
        raise RequestError("bad-request", f"field '{name}' is not base64url") from None
    return value


def parse_registration(command: Command, iq: Iq, backend: Backend,
                       declared: Iterable[str] = (),
                       allowed_ips: Sequence[IpNetwork] = ()) -> DeviceRegistration:
    """What a register command asks for (declared: a Python provider's fields, whose
    values its module checks; allowed_ips: endpoint_allow_ips, what the destination
    policy lets URLs reach besides the public internet)."""
    fields = command.fields or {}
    device_id = form_value(fields, "device-id") or iq.sender_resource
    device_name = form_value(fields, "device-name")
    group = backend.group
    if backend.type == "python":
        return DeviceRegistration(backend, device_id, device_name, "", extra=tuple(
            (name, form_value(fields, name)) for name in declared))
    if group == "webpush":
        endpoint = form_value(fields, "endpoint") or form_value(fields, "token")
        if not endpoint:
            raise RequestError("bad-request", "field 'endpoint' must be the subscription's URL")
        try:
            destination.check_url(endpoint, allowed_ips)
        except destination.UrlRefused as refused:
            raise RequestError("bad-request", f"field 'endpoint' is refused: {refused}") \
                from None
        return DeviceRegistration(backend, device_id, device_name, endpoint,
                                  p256dh=_b64url(form_value(fields, "p256dh"), "p256dh"),
                                  auth=_b64url(form_value(fields, "auth"), "auth"))
    token = form_value(fields, "token")
    if not token:
        raise RequestError("bad-request", "field 'token' is required")
    if group == "wns":  # the app's bearer token goes there
        try:
            destination.check_channel(token, destination.channel_domains(backend),
                                      allowed_ips)
        except destination.UrlRefused as refused:
            raise RequestError("bad-request", f"field 'token' is refused: {refused}") \
                from None
    voip_token = ""
    if group == "apns":
        token = _apns_token(token)
        # Siskin/Tigase's app server calls the PushKit token the device's second token
        voip = form_value(fields, "voip-token") or form_value(fields, "device-second-token")
        voip_token = _apns_token(voip, "voip-token") if voip else ""
    application_id = form_value(fields, "application-id")
    if group == "ubuntu" and not application_id:
        raise RequestError("bad-request", "field 'application-id' is required")
    return DeviceRegistration(backend, device_id, device_name, token, application_id,
                              voip_token=voip_token)


def result_form(fields: list[tuple[str, list[str], str | None]]) -> str:
    inner = "".join(field_xml(var, values, field_type) for var, values, field_type in fields)
    return f"<x xmlns='{NS_DATA}' type='result'>{inner}</x>"


def registrations_form(rows: list[tuple[str, str]]) -> str:
    """list-push-registrations: (device-name, node) per registration."""
    items = "".join(f"<item>{field_xml('device-name', [name])}{field_xml('node', [node])}</item>"
                    for name, node in rows)
    return (f"<x xmlns='{NS_DATA}' type='result'><reported><field var='device-name'/>"
            f"<field var='node'/></reported>{items}</x>")


# ---------------------------------------------------------------------- publishes

@dataclass(slots=True)  # per push: not frozen (see protocol.Stanza)
class PublishRequest:
    node: str
    secret: str | None
    summary: dict[str, str]


def parse_publish(iq: Iq) -> PublishRequest:
    pubsub = iq.payload
    if pubsub is None or pubsub.tag != f"{{{NS_PUBSUB}}}pubsub":
        raise RequestError("feature-not-implemented", "only pubsub publishes are served",
                           "cancel")
    publish = pubsub.find(f"{{{NS_PUBSUB}}}publish")
    if publish is None or not publish.get("node"):
        raise RequestError("bad-request", "publish needs a node")
    summary: dict[str, str] = {}
    for form in publish.iter(f"{{{NS_DATA}}}x"):
        summary = _lenient_fields(form)
        break
    notification = publish.find(f"{{{NS_PUBSUB}}}item/{{{NS_PUSH}}}notification")
    if notification is not None:
        summary.update(encrypted_fields(notification))
    secret = None
    options = pubsub.find(f"{{{NS_PUBSUB}}}publish-options/{{{NS_DATA}}}x")
    if options is not None:
        secret = _lenient_fields(options).get("secret")
    return PublishRequest(publish.get("node", ""), secret, summary)


def _lenient_fields(form: ET.Element) -> dict[str, str]:
    """A publish's form, first values only: whatever another server sends is pushed
    rather than refused (which would lose the notification), within bounds: a value is
    cut at MAX_FIELD bytes (marked), a field with a long name or beyond the 64th is
    left out. The providers shorten further to fit their payloads."""
    return _first_values((field.get("var"), field.findtext(f"{{{NS_DATA}}}value"))
                         for field in form.findall(f"{{{NS_DATA}}}field")[:MAX_FORM_FIELDS + 1])


def _first_values(pairs: Iterable[tuple[str | None, str | None]]) -> dict[str, str]:
    fields: dict[str, str] = {}
    for var, value in pairs:
        if var is None or len(var) > 256 or var in fields:
            continue
        fields[var] = cut_utf8(value or "", MAX_FIELD)
    return fields


def _as_parsed(value: str) -> str:
    """A value as an XML parser reads it back: line ends are one line feed (XML 1.0, 2.11)."""
    return value.replace("\r\n", "\n").replace("\r", "\n") if "\r" in value else value


_WHITESPACE = str.maketrans("\t\n\r", "   ")


def _as_attribute(value: str) -> str:
    """An attribute value as an XML parser reads it back: line ends are one line feed,
    then each whitespace character a space (XML 1.0, 3.3.3)."""
    if "\t" in value or "\n" in value or "\r" in value:
        return value.replace("\r\n", "\n").translate(_WHITESPACE)
    return value


def lenient_form(fields: FormFields) -> dict[str, str]:
    """:func:`_lenient_fields` of the form the shim would build from these fields, without
    the XML: the same fields, values and bounds."""
    return _first_values([(_as_attribute(var), _as_parsed(values[0]) if values else None)
                          for var, values in fields[:MAX_FORM_FIELDS + 1]])


def encrypted_fields(elements: Iterable[ET.Element]) -> dict[str, str]:
    """The data fields of a Tigase <encrypted/> among a notification's children."""
    for element in elements:
        if element.tag != f"{{{NS_TIGASE_ENCRYPT}}}encrypted":
            continue
        blob, iv = "".join((element.text or "").split()), element.get("iv", "")
        if not blob or not iv or len(blob) > MAX_ENCRYPTED or len(iv) > 64:
            return {}
        fields = {ENCRYPTED_FIELD: blob, IV_FIELD: iv}
        if element.get("type") == "voip":
            fields["last-message-priority"] = "high"  # a call: urgent
        return fields
    return {}


def direct_publish(node: str, fields: FormFields, publish_options: FormFields | None,
                   elements: Iterable[str] = ()) -> PublishRequest:
    """What :func:`parse_publish` reads from the publish IQ the shim would build from a
    :class:`~pymod_push.protocol.Publish`'s parts (its node, summary form and
    publish-options), for a publish to this process's own app server (no round trip)."""
    node = _as_attribute(node)
    if not node:
        raise RequestError("bad-request", "publish needs a node")
    secret = lenient_form(publish_options).get("secret") if publish_options else None
    summary = lenient_form(fields)
    if elements:
        summary.update(encrypted_fields(safexml.parse(e.encode()) for e in elements))
    return PublishRequest(node, secret, summary)


def secret_matches(expected: str, given: str | None) -> bool:
    """Constant-time comparison: how long it takes says nothing about the secret."""
    return given is not None and secrets.compare_digest(expected.encode(), given.encode())


# -------------------------------------------------------------------------- disco

def disco_info(iq: Iq, backends: list[Backend], *, pubsub: bool, register: bool) -> str:
    identities = []
    features = [NS_DISCO_INFO]
    if pubsub:
        identities.append("<identity category='pubsub' type='push'/>")
        features += [NS_PUBSUB, "urn:xmpp:push:0"]
    if register:
        identities.append("<identity category='component' type='generic' name='Push app "
                          "server'/>")
        features.append(NS_COMMANDS)
    apps: dict[str, list[str]] = {}
    for backend in backends:
        apps.setdefault(backend.group, []).append(backend.app_name)
    form = ""
    if register and apps:
        form = (f"<x xmlns='{NS_DATA}' type='result'>"
                f"{field_xml('FORM_TYPE', [FORM_APPS], 'hidden')}"
                + "".join(field_xml(group, sorted(set(names)), "list-multi")
                          for group, names in sorted(apps.items())) + "</x>")
    inner = "".join(identities) + "".join(f"<feature var={quoteattr(f)}/>" for f in features)
    return result_reply(iq, f"<query xmlns='{NS_DISCO_INFO}'>{inner}{form}</query>")


def disco_items(iq: Iq, host: str, backends: list[Backend]) -> str:
    node = iq.payload.get("node", "") if iq.payload is not None else ""
    inner = ""
    if node == NS_COMMANDS:
        inner = "".join(f"<item jid={quoteattr(host)} node={quoteattr(n)} name={quoteattr(name)}/>"
                        for n, name in command_items(backends))
    node_attr = f" node={quoteattr(node)}" if node else ""
    return result_reply(iq, f"<query xmlns='{NS_DISCO_ITEMS}'{node_attr}>{inner}</query>")
