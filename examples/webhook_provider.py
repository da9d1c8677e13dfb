"""A push provider written in Python: each notification is POSTed as JSON to a webhook of
yours (a chat bot, an SMS gateway, your own push service), which knows where to take it.

    modules:
      mod_push_py:
        backends:
          - type: python
            module: /etc/ejabberd/push/webhook_provider.py
            name: webhook                    # devices register with register-push-webhook
            register_host: example.org
            pubsub_host: push.example.org
            url: "https://hooks.example.org/xmpp-push"
            token: "a long random string"    # sent as 'Authorization: Bearer ...'

A device registers a ``channel`` (where your webhook is to take its notifications: a chat
id, a phone number, a topic). The webhook gets::

    {"user": "juliet@example.org", "device": "phone", "channel": "...", "urgent": false,
     "title": "romeo@example.net", "text": "Hello", "summary": {"message-count": "1", ...}}

and answers 2xx (delivered), 404 or 410 (this channel is gone: the device is unregistered),
429 or 5xx (busy: retried later, after Retry-After if it gives one), or another 4xx
(refused: not retried). Sender and text are there only when the user's push options and the
server's allow them (include_senders, include_message_bodies).
"""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from collections.abc import Mapping
from typing import Any

from pymod_push.python_provider import (
    Delivered,
    Gone,
    Notification,
    PushDevice,
    Refused,
    Result,
    RetryLater,
)

FIELDS = {"channel": "Where the webhook takes this device's notifications"}


def check_registration(fields: dict[str, str]) -> dict[str, str]:
    if len(fields["channel"]) > 256:
        raise ValueError("the channel is longer than 256 characters")
    return fields


async def send(device: PushDevice, notification: Notification,
               options: Mapping[str, Any]) -> Result:
    body = json.dumps({
        "user": device.user, "device": device.device_id, "channel": device.fields["channel"],
        "urgent": notification.urgent, "title": notification.title,
        "text": notification.text, "summary": dict(notification.summary)}).encode()
    headers = {"content-type": "application/json"}
    if options.get("token"):
        headers["authorization"] = f"Bearer {options['token']}"
    request = urllib.request.Request(str(options["url"]), body, headers, method="POST")
    try:  # urllib blocks: in a thread, so that other pushes go on meanwhile
        status, retry_after = await asyncio.to_thread(_post, request)
    except (urllib.error.URLError, OSError) as exc:
        return RetryLater(reason=f"webhook unreachable ({type(exc).__name__})")
    if 200 <= status < 300:
        return Delivered()
    if status in (404, 410):
        return Gone(f"webhook said {status}")
    if status == 429 or status >= 500:
        return RetryLater(float(retry_after) if retry_after.isdigit() else None,
                          f"webhook said {status}")
    return Refused(f"webhook said {status}")


def _post(request: urllib.request.Request) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.headers.get("retry-after", "")
    except urllib.error.HTTPError as error:
        return error.code, error.headers.get("retry-after", "")
