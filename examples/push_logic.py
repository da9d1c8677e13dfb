"""An example of push logic for mod_push_py's `logic` option.

    modules:
      mod_push_py:
        logic: /etc/ejabberd/push_logic.py

- Messages from bots (a JID whose local part starts with "bot") never wake anyone.
- A message that says "urgent" is marked urgent: the built-in app server then sends it
  as a high-priority push (APNs priority 10, FCM high, Web Push Urgency: high).
- FCM devices get a "channel" data field, which the app uses as its notification channel.
"""

from __future__ import annotations

from collections.abc import Mapping

from pymod_push.logic import Device, Message, Recipient


def should_push(message: Message, recipient: Recipient, default: bool) -> bool:
    if message.sender.split("@", 1)[0].startswith("bot"):
        return False
    return default


def summary(message: Message, recipient: Recipient,
            fields: Mapping[str, str]) -> Mapping[str, str]:
    if "urgent" in message.body.lower() and not message.encrypted:
        return {**fields, "last-message-priority": "high"}
    return fields


def provider_data(device: Device, data: Mapping[str, str]) -> Mapping[str, str]:
    if device.provider == "fcm":
        return {**data, "channel": "messages"}
    return data
