"""What a stanza means for push, what a notification says, what a reply means."""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass

from ..protocol import Stanza
from .config import Config
from .options import PushOptions


class Trigger(enum.Enum):
    MESSAGE = "message"
    SUBSCRIPTION = "subscription"


def trigger_of(stanza: Stanza, config: Config) -> Trigger | None:
    """Why this stanza warrants a push, or None (chat states, receipts, empty bodies)."""
    if stanza.kind == "presence":
        return Trigger.SUBSCRIPTION if stanza.type == "subscribe" else None
    if stanza.kind != "message" or stanza.type == "error":
        return None
    if stanza.body.strip() or config.notify_on == "all":
        return Trigger.MESSAGE
    return None


# End-to-end encryption: OMEMO (both namespaces), legacy OpenPGP (XEP-0027), OpenPGP for
# XMPP (XEP-0373). Their <body/> is a plaintext fallback ("This message is encrypted...")
# that must never be shown as if it were the message.
ENCRYPTION_NAMESPACES = (b"eu.siacs.conversations.axolotl", b"urn:xmpp:omemo:2",
                         b"jabber:x:encrypted", b"urn:xmpp:openpgp:0")
ENCRYPTED_BODY = "Encrypted message"


def is_encrypted(stanza: Stanza) -> bool:
    return any(namespace in stanza.xml for namespace in ENCRYPTION_NAMESPACES)


def fingerprint(stanza: Stanza) -> bytes:
    """Identifies one message across its re-routings (pending queue -> offline -> archive).

    ejabberd adds a <delay/> when it re-routes, so the XML differs; sender, id
    and body do not.
    """
    digest = hashlib.blake2b(digest_size=12)
    for part in (stanza.kind, stanza.sender, stanza.id, stanza.body):
        digest.update(part.encode())
        digest.update(b"\0")
    return digest.digest()


@dataclass(slots=True)
class Counts:
    messages: int = 0
    subscriptions: int = 0


def summary_fields(options: PushOptions, counts: Counts, trigger: Trigger,
                   stanza: Stanza) -> list[tuple[str, str]]:
    """The urn:xmpp:push:summary fields, as the user's options allow."""
    fields: list[tuple[str, str]] = []
    if options.message_count:
        fields.append(("message-count", str(counts.messages)))
    if options.subscription_count:
        fields.append(("pending-subscription-count", str(counts.subscriptions)))
    if trigger is Trigger.MESSAGE:
        if options.senders:
            fields.append(("last-message-sender", stanza.sender))
        if options.message_bodies and stanza.body:
            body = ENCRYPTED_BODY if is_encrypted(stanza) else stanza.body
            fields.append(("last-message-body", body))
    elif options.senders:
        fields.append(("last-subscription-sender", stanza.sender))
    return fields


class Outcome(enum.Enum):
    DELIVERED = "delivered"
    TRANSIENT = "transient"  # try again later
    REJECTED = "rejected"  # counts toward disabling the registration


def classify_reply(outcome: str, error_type: str = "") -> Outcome:
    """An app server's answer to a publish: 'wait' errors and silence are transient."""
    if outcome == "result":
        return Outcome.DELIVERED
    if outcome == "timeout" or error_type == "wait":
        return Outcome.TRANSIENT
    return Outcome.REJECTED
