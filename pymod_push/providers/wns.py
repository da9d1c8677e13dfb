"""Windows Push Notification Services, raw notifications, OAuth client credentials."""

from __future__ import annotations

from pymod_push.core import destination
from pymod_push.core.config import Backend
from pymod_push.core.destination import DestinationDenied
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

LOGIN = "https://login.live.com"
MAX_PAYLOAD = 5120  # bytes: Microsoft's limit for any notification, raw ones included


class Wns:
    client_certificate: str | None = None

    def __init__(self, backend: Backend) -> None:
        self.package_sid = backend.option("package_sid") or ""
        self.secret = backend.option("auth_key") or ""
        self.login = (backend.option("endpoint") or LOGIN).rstrip("/")
        self.token = OAuthToken(86400)
        self.channel_domains = destination.channel_domains(backend)

    def auth_request(self, now: float) -> HttpRequest | None:
        if not self.token.needed(now):
            return None
        return self.token.form_request(f"{self.login}/accesstoken.srf", {
            "grant_type": "client_credentials", "client_id": self.package_sid,
            "client_secret": self.secret, "scope": "notify.windows.com"})

    def auth_reply(self, status: int, body: bytes, now: float) -> None:
        self.token.store(status, body, now)

    def request(self, device: RegisteredDevice, summary: dict[str, str], now: float,
                urgent: bool = False) -> HttpRequest:
        """The raw notification; DestinationDenied if the channel URI is not on a channel domain (a
        row registered before that was checked): the app's bearer token goes nowhere else."""
        try:
            destination.check_channel(device.token, self.channel_domains)
        except destination.UrlRefused as refused:
            raise DestinationDenied(str(refused)) from None
        headers = {"x-wns-type": "wns/raw", "content-type": "application/octet-stream",
                   "authorization": f"Bearer {self.token.value}",
                   "x-wns-ttl": "60" if urgent else "86400",
                   "x-wns-priority": "1" if urgent else "2", "x-wns-tag": device.node[:32]}
        return HttpRequest("POST", device.token, headers,
                           fitted(summary, lambda s: to_json(summary_payload(s)), MAX_PAYLOAD))

    def reply(self, status: int, headers: dict[str, str], body: bytes) -> Reply:
        if 200 <= status < 300:
            self.token.worked()
        if status == 401:  # token expired or refused: refresh once
            return self.token.refused()
        if status == 406:  # throttled
            return Reply(DeliveryOutcome.RETRY, "406")
        return common_reply(status, headers.get("x-wns-notificationstatus", ""))
