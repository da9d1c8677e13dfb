"""Web Push (RFC 8030) with RFC 8291 aes128gcm encryption and VAPID (RFC 8292); UnifiedPush
distributors speak the same protocol at the endpoint the device registered."""

from __future__ import annotations

import os
import time
from collections import OrderedDict
from typing import Any
from urllib.parse import urlsplit

import http_ece  # type: ignore[import-untyped]
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from pymod_push.core.calls import ENDED_FIELD
from pymod_push.core.config import Backend
from pymod_push.providers import (
    HttpRequest,
    Reply,
    b64url_decode,
    b64url_encode,
    common_reply,
    fitted,
    summary_payload,
    to_json,
)
from pymod_push.records import RegisteredDevice

TTL = 24 * 3600
CALL_TTL = 60  # a call nobody sees within a minute is a missed call, not a ring
VAPID_LIFETIME = 12 * 3600
# RFC 8030 7.2: push services take at least 4096 bytes of payload, which RFC 8291 fills
# with an 86-byte header, a 16-byte tag and one padding delimiter: 3993 bytes of plaintext.
MAX_PLAINTEXT = 4096 - 86 - 16 - 1
# VAPID tokens kept, one per push service origin (users choose the origins): the least
# recently used go first, as the connections to them do (http2.MAX_USER_CONNECTIONS).
MAX_VAPID_CACHE = 128


class WebPush:
    client_certificate: str | None = None

    def __init__(self, backend: Backend) -> None:
        self._vapid_key: Any = None
        key_file = backend.option("vapid_private_key_file")
        if key_file:
            with open(key_file, "rb") as handle:
                self._vapid_key = serialization.load_pem_private_key(handle.read(), None)
            if not isinstance(self._vapid_key, ec.EllipticCurvePrivateKey):
                raise ValueError("vapid_private_key_file must hold a P-256 EC key")
            public = self._vapid_key.public_key().public_bytes(
                serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
            self._vapid_public = b64url_encode(public)
        self.subject = backend.option("vapid_subject") or f"mailto:admin@{backend.register_host}"
        self._vapid_cache: OrderedDict[str, tuple[str, float]] = OrderedDict()

    def auth_request(self, now: float) -> HttpRequest | None:
        return None

    def auth_reply(self, status: int, body: bytes, now: float) -> None:
        pass

    def vapid(self, endpoint: str, now: float) -> str | None:
        if self._vapid_key is None:
            return None
        parts = urlsplit(endpoint)
        audience = f"{parts.scheme}://{parts.netloc}"
        cache = self._vapid_cache
        cached = cache.get(audience)
        if cached is None or now > cached[1] - 3600:
            expires = now + VAPID_LIFETIME
            token = jwt.encode({"aud": audience, "exp": int(expires), "sub": self.subject},
                               self._vapid_key, algorithm="ES256")
            cached = (token, expires)
            cache[audience] = cached
            if len(cache) > MAX_VAPID_CACHE:
                cache.popitem(last=False)
        cache.move_to_end(audience)
        return f"vapid t={cached[0]}, k={self._vapid_public}"

    def request(self, device: RegisteredDevice, summary: dict[str, str], now: float,
                urgent: bool = False) -> HttpRequest:
        body = http_ece.encrypt(
            fitted(summary, lambda s: to_json(summary_payload(s)), MAX_PLAINTEXT),
            salt=os.urandom(16),
            private_key=ec.generate_private_key(ec.SECP256R1()),
            dh=b64url_decode(device.p256dh), auth_secret=b64url_decode(device.auth),
            version="aes128gcm")
        # a call's end (stop ringing) lives as long as a ring; its topic (the node's)
        # replaces the call's push where that still waits
        headers = {"ttl": str(CALL_TTL if urgent or ENDED_FIELD in summary else TTL),
                   "urgency": "high" if urgent else "normal",
                   "content-encoding": "aes128gcm", "content-type": "application/octet-stream",
                   "topic": b64url_encode(device.node.encode())[:32]}
        authorization = self.vapid(device.token, now or time.time())
        if authorization:
            headers["authorization"] = authorization
        return HttpRequest("POST", device.token, headers, body)

    def reply(self, status: int, headers: dict[str, str], body: bytes) -> Reply:
        return common_reply(status)
