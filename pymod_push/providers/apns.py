"""Apple Push Notification service (HTTP/2 provider API), token or certificate auth."""

from __future__ import annotations

import json
from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from cryptography.x509.oid import NameOID

from pymod_push.core.calls import ENDED_FIELD, MISSED_CALL_BODY, MISSED_REASONS
from pymod_push.core.config import Backend
from pymod_push.core.ios_extensions import ENCRYPTED_FIELD
from pymod_push.providers import (
    DeliveryOutcome,
    HttpRequest,
    Reply,
    fitted,
    notification_text,
    summary_payload,
    to_json,
)
from pymod_push.records import RegisteredDevice

PRODUCTION = "https://api.push.apple.com"
SANDBOX = "https://api.sandbox.push.apple.com"
TOKEN_LIFETIME = 40 * 60  # Apple wants a new JWT at most every 20 min, at least every 60
EXPIRATION = 24 * 3600
URGENT_TEXT = "Incoming call"
CALL_END_EXPIRATION = 60  # a stop-ringing push later than the ring window is worth nothing
GONE = {"BadDeviceToken", "Unregistered", "DeviceTokenNotForTopic"}
MAX_PAYLOAD = 4096  # bytes, Apple's limit for alert and background pushes
MAX_VOIP_PAYLOAD = 5120


def topic_from_certificate(certfile: str) -> str | None:
    """Apple's push certificates carry the bundle id as the subject's UID."""
    with open(certfile, "rb") as handle:
        certificate = x509.load_pem_x509_certificate(handle.read())
    uids = certificate.subject.get_attributes_for_oid(NameOID.USER_ID)
    return str(uids[0].value) if uids else None


class Apns:
    def __init__(self, backend: Backend) -> None:
        sandbox = str(backend.option("sandbox", "false")).lower() == "true"
        self.base = (backend.option("endpoint") or (SANDBOX if sandbox else PRODUCTION)).rstrip("/")
        self.key_id = backend.option("key_id")
        self.team_id = backend.option("team_id")
        key_file = backend.option("key_file")
        self._key: Any = None
        if key_file:
            with open(key_file, "rb") as handle:
                self._key = load_pem_private_key(handle.read(), password=None)
        certfile = backend.option("certfile")
        self.client_certificate: str | None = None if key_file else certfile
        topic = backend.option("topic")
        if topic is None and certfile and not key_file:
            topic = topic_from_certificate(certfile)
        if topic is None:
            raise ValueError(f"backend {backend.index} (apns): set 'topic' (the app's bundle id)")
        self.topic = topic
        # PushKit (VoIP) pushes for calls go to '<bundle id>.voip' with the device's VoIP token
        self.voip_topic = backend.option("voip_topic")
        # A call that ended unanswered as an alert "Missed call" instead of a background push
        self.call_end_alert = str(backend.option("call_end_alert", "false")).lower() == "true"
        self._token: str | None = None
        self._token_at = 0.0

    def bearer(self, now: float) -> str | None:
        if self._key is None:
            return None
        if self._token is None or now - self._token_at > TOKEN_LIFETIME:
            self._token = jwt.encode({"iss": self.team_id, "iat": int(now)}, self._key,
                                     algorithm="ES256", headers={"kid": self.key_id})
            self._token_at = now
        return self._token

    def auth_request(self, now: float) -> HttpRequest | None:
        return None  # the JWT is made here, no round trip

    def auth_reply(self, status: int, body: bytes, now: float) -> None:
        pass

    def request(self, device: RegisteredDevice, summary: dict[str, str], now: float,
                urgent: bool = False) -> HttpRequest:
        reason = summary.get(ENDED_FIELD)
        if reason is not None:  # never VoIP: PushKit requires each VoIP push to report a call
            return self._call_ended(device, summary, reason, now)
        if urgent and self.voip_topic and device.voip_token:
            return self._voip_request(device, summary, now)
        token, node = device.token, device.node
        # An encrypted notification (Tigase's, see core/appserver.encrypted_fields) is shown:
        # its mutable-content lets the app's notification service extension decrypt it
        # and replace the placeholder text with the sender and the message.
        shown = any(notification_text(summary)) or urgent or ENCRYPTED_FIELD in summary
        push_type, priority = ("alert", "10") if shown else ("background", "5")

        def payload(fields: dict[str, str]) -> bytes:
            title, body = notification_text(fields)
            if shown and not (title or body):
                body = URGENT_TEXT if urgent else "New message"  # what was shown got cut
            if shown:
                alert = {"title": title, "body": body} if title else {"body": body}
                aps: dict[str, Any] = {"alert": alert, "mutable-content": 1,
                                       "sound": "default"}
                if urgent:
                    aps["interruption-level"] = "time-sensitive"
            else:  # nothing to show: wake the app so that it fetches its messages
                aps = {"content-available": 1}
            return to_json({"aps": aps, **summary_payload(fields)})

        headers = {"apns-topic": self.topic, "apns-push-type": push_type,
                   "apns-priority": priority,
                   "apns-expiration": str(int(now) + EXPIRATION),
                   "apns-collapse-id": node[:64], "content-type": "application/json"}
        return self._signed(token, headers, fitted(summary, payload, MAX_PAYLOAD), now)

    def _call_ended(self, device: RegisteredDevice, summary: dict[str, str], reason: str,
                    now: float) -> HttpRequest:
        """Stop ringing: a background push that wakes the app (it reads the call's end over
        XMPP), or, with call_end_alert, an alert "Missed call" for a call nobody answered,
        which replaces an "Incoming call" alert of the same node (collapse id)."""
        alert = self.call_end_alert and reason in MISSED_REASONS
        aps: dict[str, Any] = ({"alert": {"body": MISSED_CALL_BODY}, "sound": "default",
                                "mutable-content": 1} if alert else {"content-available": 1})
        headers = {"apns-topic": self.topic,
                   "apns-push-type": "alert" if alert else "background",
                   "apns-priority": "10" if alert else "5",
                   "apns-expiration": str(int(now) + CALL_END_EXPIRATION),
                   "apns-collapse-id": device.node[:64], "content-type": "application/json"}
        payload = fitted(summary, lambda fields: to_json({"aps": aps, **summary_payload(fields)}),
                         MAX_PAYLOAD)
        return self._signed(device.token, headers, payload, now)

    def _voip_request(self, device: RegisteredDevice, summary: dict[str, str],
                      now: float) -> HttpRequest:
        # A call is worth nothing later: expiration 0 means deliver now or never.
        headers = {"apns-topic": str(self.voip_topic), "apns-push-type": "voip",
                   "apns-priority": "10", "apns-expiration": "0",
                   "content-type": "application/json"}
        payload = fitted(summary, lambda fields: to_json({"aps": {}, **summary_payload(fields)}),
                         MAX_VOIP_PAYLOAD)
        return self._signed(device.voip_token, headers, payload, now)

    def _signed(self, token: str, headers: dict[str, str], payload: bytes,
                now: float) -> HttpRequest:
        bearer = self.bearer(now)
        if bearer:
            headers["authorization"] = f"bearer {bearer}"
        return HttpRequest("POST", f"{self.base}/3/device/{token}", headers, payload)

    def reply(self, status: int, headers: dict[str, str], body: bytes) -> Reply:
        if status == 200:
            return Reply(DeliveryOutcome.DELIVERED)
        try:
            reason = str(json.loads(body or b"{}").get("reason", ""))
        except ValueError:
            reason = ""
        if status == 410 or reason in GONE:
            return Reply(DeliveryOutcome.UNREGISTERED, reason or str(status))
        if reason == "ExpiredProviderToken":
            self._token = None
            return Reply(DeliveryOutcome.RETRY, reason, 0)
        if status == 429 or status >= 500:
            return Reply(DeliveryOutcome.RETRY, reason or str(status))
        return Reply(DeliveryOutcome.FAILED, reason or str(status))
