"""Cookbook: calls by SMS. When someone calls a user whose phone app is asleep (its session
pending), an SMS gateway of yours texts the user's phone number: "Call from romeo@example.net".
Everything else is left to the user's app and its usual pushes.

A provider written in Python, next to the app's usual backend:

    modules:
      mod_push_py:
        backends:
          - type: python
            module: /etc/ejabberd/push/missed_calls.py
            name: sms                            # users register with register-push-sms
            register_host: example.org
            pubsub_host: push.example.org
            url: "https://sms-gateway.example.org/send"
            token: "the gateway's API key"

A user's client (or your web page, through an XMPP library) registers the number with the
ad-hoc command register-push-sms (field ``phone``, E.164 such as +33612345678) and enables
the node and secret it gets, like any push registration. The server marks calls urgent;
urgent pushes reach the gateway as ``{"to": "+33612345678", "text": "..."}``, at most one
per number and minute (a caller who tries again does not flood the user), and a gateway
that is busy or down gets the call again later, also after a restart.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from typing import Any

from pymod_push.python_provider import (
    Delivered,
    Notification,
    PushDevice,
    Refused,
    Result,
    RetryLater,
)

FIELDS = {"phone": "Phone number for calls, E.164 (+33612345678)"}
E164 = re.compile(r"\+[1-9][0-9]{6,14}")
QUIET_S = 60.0  # one SMS per number and minute at most
_last_sent: dict[str, float] = {}


def check_registration(fields: dict[str, str]) -> dict[str, str]:
    phone = re.sub(r"[ .()-]", "", fields["phone"])
    if not E164.fullmatch(phone):
        raise ValueError("the phone number must be in E.164 form, such as +33612345678")
    return {"phone": phone}


async def send(device: PushDevice, notification: Notification,
               options: Mapping[str, Any]) -> Result:
    phone = device.fields["phone"]
    if not notification.urgent:
        return Delivered()  # not a call: the app's own pushes tell the user
    if time.monotonic() - _last_sent.get(phone, -QUIET_S) < QUIET_S:
        return Delivered()
    who = f" from {notification.title}" if notification.title else ""
    body = json.dumps({"to": phone, "text": f"Call{who} on XMPP"}).encode()
    request = urllib.request.Request(
        str(options["url"]), body, {"content-type": "application/json",
                                    "authorization": f"Bearer {options.get('token', '')}"})
    try:
        status = await asyncio.to_thread(_post, request)
    except (urllib.error.URLError, OSError):
        return RetryLater(reason="SMS gateway unreachable")
    if status == 429 or status >= 500:
        return RetryLater(reason=f"SMS gateway said {status}")
    if status >= 300:
        return Refused(f"SMS gateway said {status}")
    _last_sent[phone] = time.monotonic()
    return Delivered()


def _post(request: urllib.request.Request) -> int:
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return error.code
