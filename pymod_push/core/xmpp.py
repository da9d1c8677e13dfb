"""What every XMPP wire format here shares: the error a client is told about, JID sanity
and the size of text in XML. Pure functions; no I/O."""

from __future__ import annotations

import ipaddress
import unicodedata

MAX_JID_PART_BYTES = 1023  # RFC 7622, and ejabberd's jid module


class RequestError(ValueError):
    """A request the client must be told about: an XMPP error condition and a text."""

    def __init__(self, condition: str, text: str, error_type: str = "modify") -> None:
        super().__init__(text)
        self.condition = condition
        self.error_type = error_type
        self.text = text


# "<field var=''><value></value></field>": what a field with one value adds to its text
FIELD_XML_BYTES = 38


def escaped_size(text: str) -> int:
    """Bytes of ``text`` in XML at worst: UTF-8, and every character that some writer
    escapes (fxml escapes all five) as its entity."""
    return (len(text.encode()) + 4 * text.count("&") + 3 * (text.count("<") + text.count(">"))
            + 5 * (text.count("'") + text.count('"')))


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
