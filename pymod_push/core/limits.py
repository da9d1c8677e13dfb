"""Size limits: what one hostile or careless user can make the server send or store.

Pure functions, no I/O. A message body is cut on a character boundary and marked as
cut; a notification that would not fit a provider's payload (or the bound on a publish
IQ) is shortened the same way, the body first, then optional fields are dropped.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from pymod_push.core.xmpp import FIELD_XML_BYTES, RequestError, escaped_size

CUT_MARK = "\u2026"  # "…": the body was cut here
BODY = "last-message-body"
# What a notification must keep as long as anything can: the counts and whether it is
# urgent (a call). Everything else (sender, body, an admin's extra fields) is optional.
ESSENTIAL = ("message-count", "pending-subscription-count", "last-message-priority")

# The summary form of a publish IQ, its fields as XML escaped at worst (escaped_size): room
# for a body of max_body_length (the default 1024 bytes, escaped) and a sender's full JID.
MAX_SUMMARY_XML_BYTES = 16 * 1024
# A publish IQ as the shim writes it, at most: the summary (16 KiB), the publish-options
# (xep0357.MAX_PUBLISH_OPTIONS_XML_BYTES, 4 KiB), the app server's JID (3 x 1023 bytes)
# and the node (1023 bytes) escaped at worst six-fold (18 KiB + 6 KiB), the server's
# domain and the envelope (2 KiB).
MAX_PUBLISH_IQ_BYTES = 48 * 1024


def cut_utf8(text: str, max_bytes: int) -> str:
    """``text`` if its UTF-8 has at most ``max_bytes``, else its longest prefix that fits
    with the cut mark after it (never half a character)."""
    if len(text) * 4 <= max_bytes or len(text.encode()) <= max_bytes:
        return text
    room = max_bytes - len(CUT_MARK.encode())
    if room <= 0:
        return CUT_MARK if max_bytes >= len(CUT_MARK.encode()) else ""
    prefix = text.encode()[:room].decode("utf-8", "ignore")  # drops a split character
    return prefix + CUT_MARK


def cut_chars(text: str, length: int) -> str:
    """The first ``length`` characters, the cut mark counted among them."""
    if len(text) <= length:
        return text
    return text[:max(0, length - 1)] + CUT_MARK if length > 0 else ""


# Numbers from the network are ASCII digits only: str.isdigit() and int() also take other
# scripts' digits and superscripts ('\u00b2'.isdigit() is true, int('\u00b2') raises).
_ASCII_DIGITS = frozenset("0123456789")


def ascii_number(text: str, max_digits: int = 18) -> int | None:
    """``text`` as a non-negative integer if it is 1 to ``max_digits`` ASCII digits
    (surrounding whitespace allowed), else None."""
    text = text.strip()
    if not text or len(text) > max_digits or not _ASCII_DIGITS.issuperset(text):
        return None
    return int(text)


PEER_TEXT_CHARS = 200  # a remote peer's text in a log line, at most


def peer_text(text: str, length: int = PEER_TEXT_CHARS) -> str:
    """Text a remote peer chose (a provider's reason, a JID, a header), fit for one log
    line: cut to ``length`` characters (marked), control and other non-printable
    characters escaped (no forged lines, no terminal escapes)."""
    if not text.isprintable():  # escaped first: the escapes count toward the length
        text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text[:length])
    return cut_chars(text, length)


Summary = Mapping[str, str]
SizeOf = Callable[[dict[str, str]], int]


def fit(summary: Summary, size_of: SizeOf, limit: int) -> dict[str, str]:
    """The summary, shortened until ``size_of`` it is at most ``limit``: the body is cut
    first (as little as needed), then optional fields go (largest first, the body last),
    then the essential ones. ``size_of`` must grow with the body's length (every
    serialization does). An empty summary is returned if even that does not fit: the
    caller's payload without any summary field is assumed to fit."""
    fields = dict(summary)
    if size_of(fields) <= limit:
        return fields
    while True:
        body = fields.get(BODY)
        if body:
            shortened = _shortest_cut(fields, body, size_of, limit)
            if shortened is not None:
                return shortened
        optional = [k for k in fields if k not in ESSENTIAL and k != BODY]
        if optional:
            del fields[max(optional, key=lambda k: len(k) + len(fields[k]))]
        elif BODY in fields:
            del fields[BODY]
        elif fields:
            del fields[max(fields, key=lambda k: len(k) + len(fields[k]))]
        else:
            return fields
        if size_of(fields) <= limit:
            return fields


def _shortest_cut(fields: dict[str, str], body: str, size_of: SizeOf,
                  limit: int) -> dict[str, str] | None:
    """The fields with the body cut to the most characters that fit, None if not even
    the cut mark alone does. Binary search: a size is at least one byte per character,
    so no more than ``limit`` characters can fit."""
    def with_body(length: int) -> dict[str, str]:
        return {**fields, BODY: cut_chars(body, length)}

    low, high = 1, min(len(body), limit)
    if size_of(with_body(low)) > limit:
        return None
    while low < high:  # invariant: with_body(low) fits
        middle = (low + high + 1) // 2
        if size_of(with_body(middle)) <= limit:
            low = middle
        else:
            high = middle - 1
    return with_body(low)


def summary_xml_size(fields: dict[str, str]) -> int:
    """How many bytes the summary's fields take in a data form at most."""
    return sum(escaped_size(k) + escaped_size(v) + FIELD_XML_BYTES for k, v in fields.items())


def bound_summary(summary: list[tuple[str, str]], max_body_bytes: int) -> list[tuple[str, str]]:
    """A notification's summary as it goes into a publish IQ: the body cut at
    ``max_body_bytes`` (option max_body_length), the whole within MAX_SUMMARY_XML_BYTES
    (an admin's summary() may add anything). The order of the fields is kept."""
    if not summary:
        return summary
    pairs = [(k, cut_utf8(v, max_body_bytes) if k == BODY else v) for k, v in summary]
    # The common case, without measuring: a character takes at most 6 bytes escaped ('&quot;'
    # and 4-byte UTF-8 both fit), so a small summary fits whatever it holds (once per push).
    if sum(len(k) + len(v) for k, v in pairs) * 6 + FIELD_XML_BYTES * len(pairs) \
            <= MAX_SUMMARY_XML_BYTES and len({k for k, _ in pairs}) == len(pairs):
        return pairs
    fields = dict(pairs)
    if len(fields) == len(pairs) and summary_xml_size(fields) <= MAX_SUMMARY_XML_BYTES:
        return pairs
    kept = fit(fields, summary_xml_size, MAX_SUMMARY_XML_BYTES)
    bounded = []
    for key, _ in pairs:  # in their order, a field given twice once
        if key in kept:
            bounded.append((key, kept.pop(key)))
    return bounded


# ------------------------------------------------------------------ per account

def check_count(held: int, limit: int, what: str, option: str) -> None:
    """RequestError when an account holding ``held`` may add none: resource-constraint
    of type cancel (waiting does not help). policy-violation would fit as well, but
    RFC 3920 did not have it and client libraries still built on that list (slixmpp)
    cannot read it."""
    if held >= limit:
        raise RequestError("resource-constraint", f"an account may hold at most {limit} {what} "
                           f"(option {option}); remove one first", "cancel")
