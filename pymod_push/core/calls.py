"""Calls (XEP-0353 Jingle Message Initiation) as push sees them: how old a proposal is
(a stale one is a missed call, never urgent), and which messages end a call that rang
(the caller's retract, reject or finish; the callee's own proceed, accept or reject,
answered or declined on another device, seen as a sent carbon or, for Conversations'
<accept/>, a message to the user's own bare JID). Pure functions, no state.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from datetime import datetime

from pymod_push.core import safexml
from pymod_push.core.notify import MISSED_CALL_BODY, MISSED_FIELD, is_own_bare_jid
from pymod_push.protocol import Stanza, UserKey

__all__ = ["MISSED_CALL_BODY", "MISSED_FIELD", "CallEnd", "call_end", "end_fields",
           "is_stale", "sent_at"]

NS_JMI = "urn:xmpp:jingle-message:0"
NS_DELAY = "urn:xmpp:delay"
NS_CARBONS = "urn:xmpp:carbons:2"
NS_FORWARD = "urn:xmpp:forward:0"
_NS_JMI_BYTES = NS_JMI.encode()
_NS_MUC_USER = b"http://jabber.org/protocol/muc#user"

# Summary fields (urn:xmpp:push:summary) of the push that stops a device ringing (README
# "What clients get"; a stale proposal's is notify.MISSED_FIELD):
ENDED_FIELD = "call-ended"  # stop ringing: why (one of the reasons below)
SID_FIELD = "call-sid"  # with call-ended: the call's id

# What the caller's message means for the callee's devices
_FROM_CALLER = {"retract": "retracted", "reject": "rejected", "finish": "finished"}
# What the user's own message (another device of theirs) means for their other devices
_FROM_SELF = {"proceed": "answered-elsewhere", "accept": "answered-elsewhere",
              "reject": "declined-elsewhere"}
# Reasons after which the call was missed (an alert "Missed call" where the backend asks)
MISSED_REASONS = frozenset({"retracted", "finished", "rejected"})


@dataclass(frozen=True, slots=True)
class CallEnd:
    """A message that ends a call before it was answered, for the callee's devices."""

    sid: str  # the call's JMI session id
    caller: str  # the caller's bare JID; "" when the callee's own device said it
    reason: str  # retracted, rejected, finished, answered-elsewhere, declined-elsewhere


def bare(jid: str) -> str:
    return jid.partition("/")[0]


def _own(jid: str, user: UserKey) -> bool:
    """Is ``jid`` (bare or full) one of the user's own? (the shim gives it stringprep'ed
    for the user's own sessions; compared as notify.is_own_bare_jid does)."""
    return is_own_bare_jid(bare(jid), user)


def _jmi_child(message: ET.Element, names: dict[str, str]) -> tuple[str, str] | None:
    """(reason, sid) of the message's own JMI child among names."""
    for child in message:
        namespace, _, name = child.tag[1:].partition("}")
        if namespace == NS_JMI and name in names:
            sid = child.get("id", "")
            return (names[name], sid) if sid else None
    return None


def call_end(stanza: Stanza, user: UserKey) -> CallEnd | None:
    """The end of a call that this stanza to ``user`` tells, or None. From the caller: a
    retract, reject or finish (a chat or normal message, no room occupant's). From the
    user's own account: a sent carbon of a proceed, accept or reject (answered or declined
    on another device) or such a message sent by another device of theirs to them."""
    xml = stanza.xml
    if stanza.kind != "message" or _NS_JMI_BYTES not in xml or _NS_MUC_USER in xml \
            or stanza.type not in ("chat", "normal"):
        return None
    try:
        root = safexml.parse(xml)
    except ET.ParseError:
        return None
    if _own(stanza.sender, user):
        inner = root.find(f"{{{NS_CARBONS}}}sent/{{{NS_FORWARD}}}forwarded/"
                          "{jabber:client}message")
        if inner is None and root.find(f"{{{NS_CARBONS}}}received") is not None:
            inner = root.find(f"{{{NS_CARBONS}}}received/{{{NS_FORWARD}}}forwarded/"
                              "{jabber:client}message")
            if inner is not None and not _own(inner.get("from", ""), user):
                found = _jmi_child(inner, _FROM_CALLER)
                return CallEnd(found[1], bare(inner.get("from", "")), found[0]) \
                    if found else None
            return None
        message = root if inner is None else inner
        if inner is not None and not _own(inner.get("from", stanza.sender), user):
            return None
        found = _jmi_child(message, _FROM_SELF)
        return CallEnd(found[1], "", found[0]) if found else None
    found = _jmi_child(root, _FROM_CALLER)
    return CallEnd(found[1], bare(stanza.sender), found[0]) if found else None


def parse_stamp(stamp: str) -> float | None:
    """A XEP-0082 date-time as seconds since the epoch (None if it is none)."""
    if not stamp.isascii():  # a peer's text: ASCII digits only, whatever Python accepts
        return None
    try:
        moment = datetime.fromisoformat(stamp.strip().replace("Z", "+00:00"))
    except ValueError:
        return None
    if moment.tzinfo is None:
        return None  # XEP-0082 requires the zone: a stamp without one is not trusted
    return moment.timestamp()


def sent_at(xml: bytes, arrival: float) -> float:
    """When a message was first sent: the oldest XEP-0203 delay stamp among its own
    children (ejabberd adds one when it re-routes an unacknowledged message, 'Resent', and
    when it stores it offline), else its arrival. A stamp in the future counts as now."""
    if b"urn:xmpp:delay" not in xml:
        return arrival
    try:
        root = safexml.parse(xml)
    except ET.ParseError:
        return arrival
    stamps = [parse_stamp(d.get("stamp", "")) for d in root.findall(f"{{{NS_DELAY}}}delay")]
    known = [s for s in stamps if s is not None]
    return min([arrival, *known])


def is_stale(xml: bytes, arrival: float, window_s: float) -> bool:
    """Is a call proposal older than the ring window (measured from sent_at)?"""
    return arrival - sent_at(xml, arrival) > window_s


def end_fields(end: CallEnd) -> list[tuple[str, str]]:
    """The summary of the push that stops a device ringing: why and which call, nothing
    else (no body or count: on APNs it goes as a background push)."""
    return [(ENDED_FIELD, end.reason), (SID_FIELD, end.sid)]
