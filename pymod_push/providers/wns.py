"""Windows Push Notification Services, raw notifications, OAuth client credentials."""

from __future__ import annotations

import json
from urllib.parse import urlencode

from ..core.config import Backend
from ..store import Device
from . import HttpRequest, Outcome, Reply, common_reply, summary_payload, to_json

LOGIN = "https://login.live.com"


class Wns:
    client_certificate: str | None = None

    def __init__(self, backend: Backend) -> None:
        self.package_sid = backend.option("package_sid") or ""
        self.secret = backend.option("auth_key") or ""
        self.login = (backend.option("endpoint") or LOGIN).rstrip("/")
        self._token: str | None = None
        self._expires = 0.0

    def auth_request(self, now: float) -> HttpRequest | None:
        if self._token is not None and now < self._expires - 60:
            return None
        body = urlencode({"grant_type": "client_credentials", "client_id": self.package_sid,
                          "client_secret": self.secret, "scope": "notify.windows.com"}).encode()
        return HttpRequest("POST", f"{self.login}/accesstoken.srf",
                           {"content-type": "application/x-www-form-urlencoded"}, body)

    def auth_reply(self, status: int, body: bytes, now: float) -> None:
        if status != 200:
            raise ValueError(f"the WNS token endpoint answered {status}")
        answer = json.loads(body)
        self._token = str(answer["access_token"])
        self._expires = now + float(answer.get("expires_in", 86400))

    def request(self, device: Device, summary: dict[str, str], now: float,
                urgent: bool = False) -> HttpRequest:
        headers = {"x-wns-type": "wns/raw", "content-type": "application/octet-stream",
                   "authorization": f"Bearer {self._token}", "x-wns-ttl": "86400",
                   "x-wns-priority": "1" if urgent else "2", "x-wns-tag": device.node[:32]}
        return HttpRequest("POST", device.token, headers, to_json(summary_payload(summary)))

    def reply(self, status: int, headers: dict[str, str], body: bytes) -> Reply:
        if status == 401:  # token expired or refused: refresh once
            self._token = None
            return Reply(Outcome.RETRY, "401", 0)
        if status == 406:  # throttled
            return Reply(Outcome.RETRY, "406")
        return common_reply(status, headers.get("x-wns-notificationstatus", ""))
