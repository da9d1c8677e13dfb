"""Ubuntu Push (UBports' push service) at a configurable endpoint."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

from pymod_push.core.config import Backend
from pymod_push.providers import (
    DeliveryOutcome,
    HttpRequest,
    Reply,
    common_reply,
    fitted,
    summary_payload,
    to_json,
)
from pymod_push.records import RegisteredDevice

BASE = "https://push.ubports.com"
# The whole request, not only its data: the Ubuntu Push server's limit is not documented
# (the facts file says unverified); 4 KiB is what the others take.
MAX_BODY = 4096


class UbuntuPush:
    client_certificate: str | None = None

    def __init__(self, backend: Backend) -> None:
        self.base = (backend.option("endpoint") or BASE).rstrip("/")

    def auth_request(self, now: float) -> HttpRequest | None:
        return None

    def auth_reply(self, status: int, body: bytes, now: float) -> None:
        pass

    def request(self, device: RegisteredDevice, summary: dict[str, str], now: float,
                urgent: bool = False) -> HttpRequest:
        expires = datetime.fromtimestamp(now, UTC) + timedelta(days=1)

        def body(fields: dict[str, str]) -> bytes:
            return to_json({"appid": device.application_id, "token": device.token,
                            "expire_on": expires.strftime("%Y-%m-%dT%H:%M:%S.000Z"),
                            "data": summary_payload(fields)})
        return HttpRequest("POST", f"{self.base}/notify",
                           {"content-type": "application/json"},
                           fitted(summary, body, MAX_BODY))

    def reply(self, status: int, headers: dict[str, str], body: bytes) -> Reply:
        try:
            error = str(json.loads(body or b"{}").get("error", ""))
        except (ValueError, AttributeError):
            error = ""
        if error in ("unknown-token", "unauthorized"):
            return Reply(DeliveryOutcome.UNREGISTERED, error)
        return common_reply(status, error)
