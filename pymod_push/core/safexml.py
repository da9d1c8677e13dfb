"""Parsing XML that others wrote (clients, other servers, app servers), safely.

ejabberd hands Python XML that fxml serialized: UTF-8, no XML declaration, no DTD.
Python does not rely on that alone. ElementTree would honour an encoding declaration
(and fail with LookupError or ValueError on an unknown or multi-byte one) and expand
the internal entities of a DOCTYPE (expat only caps the amplification, after 8 MiB).
XMPP forbids DTDs (RFC 6120, 11.1), so a DOCTYPE is refused before expat sees it.
Nesting is bounded too: expat and ElementTree's C parts build and free a tree of any depth,
but what walks it recursively in Python (ET.tostring) raises RecursionError past some
hundreds of levels, and no stanza or IQ of any XEP nests that deep.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET

# Ten times what a legitimate push IQ can hold (64 form fields of at most 4 KiB: 256 KiB);
# ejabberd's own max_stanza_size is usually smaller still.
MAX_XML_BYTES = 1024 * 1024
# Elements nested in one another, at most. The deepest legitimate stanzas are some ten
# levels (an archived carbon of a forwarded message: message, result, forwarded, message,
# received, forwarded, message, body); XHTML-IM formatting adds a few more.
MAX_DEPTH = 64


def parse(data: bytes) -> ET.Element:
    """The root element of ``data``; :class:`ET.ParseError` for anything that is not
    plain UTF-8 XML without a DTD, for more than MAX_XML_BYTES and for elements nested
    more than MAX_DEPTH deep."""
    if len(data) > MAX_XML_BYTES:
        raise ET.ParseError(f"more than {MAX_XML_BYTES} bytes of XML")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ET.ParseError("XML that is not UTF-8") from None
    # Given text, expat reads it as UTF-8 whatever the document declares; but it still
    # takes "<\0" for UTF-16 (its byte order detection), so NUL, which XML never allows,
    # is refused first. Then a DOCTYPE cannot hide in another encoding: it is markup that
    # starts with this literal. Refusing the literal everywhere (even in a comment or a
    # CDATA section, which fxml never writes) keeps the check this simple.
    if "\0" in text:
        raise ET.ParseError("XML with a NUL character")
    if "<!DOCTYPE" in text:
        raise ET.ParseError("XML with a DOCTYPE (XMPP forbids DTDs)")
    # Each element nested in another starts with a '<' that no '</' begins: with no more
    # of those than MAX_DEPTH (nearly every document), none can be deeper.
    if text.count("<") - text.count("</") <= MAX_DEPTH:
        return ET.fromstring(text)
    return _parse_bounded(text)


def _parse_bounded(text: str) -> ET.Element:
    """ET.fromstring, refusing elements nested more than MAX_DEPTH deep (the same expat
    parser, its events counted)."""
    parser: ET.XMLPullParser[ET.Element] = ET.XMLPullParser(events=("start", "end"))
    parser.feed(text)
    root: ET.Element | None = None
    depth = 0
    for event in parser.read_events():  # ("start" | "end", element): no other kinds asked
        if event[0] == "end":
            depth -= 1
            continue
        depth += 1
        if depth > MAX_DEPTH:
            raise ET.ParseError(f"XML nested more than {MAX_DEPTH} elements deep")
        if root is None and isinstance(event[-1], ET.Element):
            root = event[-1]
    parser.close()  # ParseError for a document not complete
    if root is None:
        raise ET.ParseError("XML without an element")
    return root
