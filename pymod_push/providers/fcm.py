"""Firebase Cloud Messaging, HTTP v1 API, with a cached service-account OAuth token
(the legacy 'gcm' API is shut down: backends of type gcm use this too)."""

from __future__ import annotations

import json
from typing import Any

import jwt

from pymod_push.core.calls import ENDED_FIELD
from pymod_push.core.config import Backend
from pymod_push.providers import (
    DeliveryOutcome,
    HttpRequest,
    OAuthToken,
    Reply,
    common_reply,
    fitted,
    summary_payload,
    to_json,
)
from pymod_push.records import RegisteredDevice

BASE = "https://fcm.googleapis.com"
SCOPE = "https://www.googleapis.com/auth/firebase.messaging"
GONE = {"UNREGISTERED"}
TTL = 86400
CALL_TTL = 60  # a call nobody sees within a minute is a missed call, not a ring
MAX_DATA = 4096  # bytes of data (keys and values; counted here as its JSON, which is more)


class Fcm:
    client_certificate: str | None = None

    def __init__(self, backend: Backend) -> None:
        path = backend.option("service_account_file")
        if not path:
            raise ValueError(f"backend {backend.index} ({backend.type}): set "
                             "'service_account_file'")
        with open(path, encoding="utf-8") as handle:
            account: dict[str, Any] = json.load(handle)
        self.client_email = str(account["client_email"])
        self.private_key = str(account["private_key"])
        self.token_uri = str(account.get("token_uri", "https://oauth2.googleapis.com/token"))
        self.project_id = backend.option("project_id") or str(account["project_id"])
        self.base = (backend.option("endpoint") or BASE).rstrip("/")
        self.token = OAuthToken(3600)

    def auth_request(self, now: float) -> HttpRequest | None:
        if not self.token.needed(now):
            return None
        assertion = jwt.encode({"iss": self.client_email, "scope": SCOPE, "aud": self.token_uri,
                                "iat": int(now), "exp": int(now) + 3600},
                               self.private_key, algorithm="RS256")
        return self.token.form_request(self.token_uri, {
            "grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer", "assertion": assertion})

    def auth_reply(self, status: int, body: bytes, now: float) -> None:
        self.token.store(status, body, now)

    def request(self, device: RegisteredDevice, summary: dict[str, str], now: float,
                urgent: bool = False) -> HttpRequest:
        data = json.loads(fitted(summary, lambda s: to_json(summary_payload(s)), MAX_DATA))
        # A call's end (stop ringing) is a data message at normal priority that lives as long
        # as a ring: it shows nothing, and FCM wants high priority only for what shows
        # something (README "What clients get").
        short = urgent or ENDED_FIELD in summary
        message = {"token": device.token, "data": data,
                   "android": {"priority": "high" if urgent else "normal",
                               "ttl": f"{CALL_TTL if short else TTL}s",
                               "collapse_key": device.node[:64]}}
        headers = {"content-type": "application/json",
                   "authorization": f"Bearer {self.token.value}"}
        return HttpRequest("POST", f"{self.base}/v1/projects/{self.project_id}/messages:send",
                           headers, to_json({"message": message}))

    def reply(self, status: int, headers: dict[str, str], body: bytes) -> Reply:
        if 200 <= status < 300:
            self.token.worked()
        try:
            error = json.loads(body or b"{}").get("error", {})
            codes = {d.get("errorCode", "") for d in error.get("details", [])}
            reason = next(iter(codes - {""}), "") or str(error.get("status", ""))
        except (ValueError, AttributeError):
            reason = ""
        if codes & GONE or (status == 404 and not reason):
            return Reply(DeliveryOutcome.UNREGISTERED, reason or "404")
        if status == 401:
            return self.token.refused()
        return common_reply(status, reason)
