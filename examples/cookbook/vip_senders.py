"""Cookbook: VIP senders. Messages from the people a user marked as VIP always push and
push urgently (a high-priority, time-sensitive notification), even in a group chat where
the user was not mentioned; everyone else gets the server's usual decisions.

    modules:
      mod_push_py:
        logic: /etc/ejabberd/push/vip_senders.py

The VIP lists live in a JSON file next to this module (``vip_senders.json``, or the path
in the environment variable PYMOD_PUSH_VIP_FILE): {"juliet@example.org": ["romeo@example.net"]}.
It is read when the module loads: after editing it, ``ejabberdctl push_reload_logic HOST``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

from pymod_push.logic import Message, Recipient

VIP_FILE = Path(os.environ.get("PYMOD_PUSH_VIP_FILE",
                               Path(__file__).with_name("vip_senders.json")))


def _load() -> dict[str, frozenset[str]]:
    try:
        raw = json.loads(VIP_FILE.read_text())
    except FileNotFoundError:
        return {}
    return {user.lower(): frozenset(s.lower() for s in senders) for user, senders in raw.items()}


VIPS = _load()  # a file that is not valid JSON fails the load: the running module stays


def _sender(message: Message) -> str:
    """The sender's bare JID; in a group chat the room's JID (rooms can be VIPs too)."""
    return message.sender.partition("/")[0].lower()


def _is_vip(message: Message, recipient: Recipient) -> bool:
    return _sender(message) in VIPS.get(recipient.jid.lower(), frozenset())


def should_push(message: Message, recipient: Recipient, default: bool) -> bool:
    if message.kind == "message" and message.body and _is_vip(message, recipient):
        return True
    return default


def summary(message: Message, recipient: Recipient,
            fields: Mapping[str, str]) -> Mapping[str, str]:
    if message.kind == "message" and _is_vip(message, recipient):
        return {**fields, "last-message-priority": "high"}
    return fields
