"""Cookbook: quiet hours per user, from an HTTP service of your own. During a user's quiet
hours their messages do not push (calls and messages from the user's contacts marked
urgent still do); the user's devices fetch them when they next connect.

    modules:
      mod_push_py:
        logic: /etc/ejabberd/push/quiet_hours.py
        logic_budget: 200   # ms: how long a push may wait for the service

The service answers ``GET {QUIET_HOURS_URL}?user=juliet%40example.org`` with
``{"quiet": true}`` or ``{"quiet": false}``. should_push is ``async def``: while the service
thinks, only this user's notifications wait; if it does not answer within logic_budget,
or is down, the server's default is used (the message pushes). Answers are kept for a
minute.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from urllib.parse import quote, urlsplit

from pymod_push.logic import Message, Recipient

QUIET_HOURS_URL = os.environ.get("PYMOD_PUSH_QUIET_HOURS_URL", "http://127.0.0.1:8090/quiet")
CACHE_S = 60.0
_cache: dict[str, tuple[float, bool]] = {}


async def _is_quiet(user: str) -> bool:
    found = _cache.get(user)
    if found is not None and time.monotonic() - found[0] < CACHE_S:
        return found[1]
    url = urlsplit(QUIET_HOURS_URL)
    reader, writer = await asyncio.open_connection(url.hostname, url.port or 80)
    try:
        writer.write(f"GET {url.path}?user={quote(user)} HTTP/1.1\r\nHost: {url.netloc}\r\n"
                     "Connection: close\r\n\r\n".encode())
        response = await reader.read()
    finally:
        writer.close()
    head, _, body = response.partition(b"\r\n\r\n")
    status = head.split(b" ", 2)[1:2]
    quiet = status == [b"200"] and json.loads(body).get("quiet") is True
    _cache[user] = (time.monotonic(), quiet)
    return quiet


async def should_push(message: Message, recipient: Recipient, default: bool) -> bool:
    if not default or message.call:
        return default  # nothing to ask: no push anyway, or a call (always rings)
    try:
        return not await _is_quiet(recipient.jid)
    except (OSError, ValueError):  # the service is down or says nonsense: push as usual
        return default
