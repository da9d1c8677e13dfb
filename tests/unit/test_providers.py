"""Provider requests and replies, without a network: what is sent, what an answer means."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import http_ece  # type: ignore[import-untyped]
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import given
from hypothesis import strategies as st

from pymod_push.core.config import Backend
from pymod_push.core.destination import DestinationDenied
from pymod_push.delivery.dispatcher import RETRY_DELAYS, retry_delay
from pymod_push.providers import DeliveryOutcome, Reply, to_json, webpush
from pymod_push.providers.apns import Apns
from pymod_push.providers.fcm import Fcm
from pymod_push.providers.ubuntu import UbuntuPush
from pymod_push.providers.webpush import WebPush
from pymod_push.providers.wns import Wns
from tests.builders import device

COUNTS = {"FORM_TYPE": "urn:xmpp:push:summary", "message-count": "2",
          "pending-subscription-count": "0"}


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20)


@given(JSON_VALUES)
def test_payloads_are_the_json_of_json_dumps(value: Any) -> None:
    """to_json keeps one C encoder for all calls: byte for byte what json.dumps makes."""
    assert to_json(value) == json.dumps(value, separators=(",", ":")).encode()


def pem(key: Any) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def backend(kind: str, **options: str) -> Backend:
    return Backend(0, kind, "app", "push.example.org", "pubsub.example.org", options)


@pytest.fixture
def apns(tmp_path: Path) -> tuple[Apns, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    (tmp_path / "key.p8").write_bytes(pem(key))
    return Apns(backend("apns", key_file=str(tmp_path / "key.p8"), key_id="K1", team_id="T1",
                        topic="org.example.app")), key


def test_apns_alert_when_there_is_something_to_show(apns: tuple[Apns, Any]) -> None:
    provider, key = apns
    request = provider.request(device(), COUNTS, 1000.0)
    assert request.url == f"https://api.push.apple.com/3/device/{'ab' * 32}"
    assert request.headers["apns-push-type"] == "alert"
    assert request.headers["apns-priority"] == "10"
    assert request.headers["apns-expiration"] == str(1000 + 24 * 3600)
    payload = json.loads(request.body)
    assert payload["aps"]["alert"] == {"body": "2 new messages"}
    assert payload["aps"]["mutable-content"] == 1
    assert payload["message-count"] == "2" and "FORM_TYPE" not in payload
    token = request.headers["authorization"].removeprefix("bearer ")
    assert jwt.decode(token, key.public_key(), algorithms=["ES256"])["iss"] == "T1"


def test_apns_background_push_when_nothing_to_show(apns: tuple[Apns, Any]) -> None:
    provider, _ = apns
    request = provider.request(device(), {"FORM_TYPE": "urn:xmpp:push:summary"}, 1000.0)
    assert request.headers["apns-push-type"] == "background"
    assert request.headers["apns-priority"] == "5"
    assert json.loads(request.body)["aps"] == {"content-available": 1}


def test_apns_sender_and_body_only_when_the_summary_has_them(apns: tuple[Apns, Any]) -> None:
    provider, _ = apns
    summary = {**COUNTS, "last-message-sender": "bob@example.org/pc",
               "last-message-body": "Hi"}
    request = provider.request(device(), summary, 1000.0)
    assert json.loads(request.body)["aps"]["alert"] == {"title": "bob@example.org", "body": "Hi"}


CALL = {"FORM_TYPE": "urn:xmpp:push:summary", "message-count": "1",
        "last-message-priority": "high"}


def test_apns_urgent_push_alerts_at_once_even_with_nothing_to_show(
        apns: tuple[Apns, Any]) -> None:
    provider, _ = apns
    request = provider.request(device(), {"FORM_TYPE": "urn:xmpp:push:summary",
                                          "last-message-priority": "high"}, 1000.0, urgent=True)
    assert request.headers["apns-push-type"] == "alert"
    assert request.headers["apns-priority"] == "10"
    aps = json.loads(request.body)["aps"]
    assert aps["alert"] == {"body": "Incoming call"}
    assert aps["interruption-level"] == "time-sensitive"


def test_apns_urgent_push_is_a_voip_push_where_configured(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    (tmp_path / "key.p8").write_bytes(pem(key))
    provider = Apns(backend("apns", key_file=str(tmp_path / "key.p8"), key_id="K1",
                            team_id="T1", topic="org.example.app",
                            voip_topic="org.example.app.voip"))
    phone = device(voip_token="cd" * 32)
    call = provider.request(phone, CALL, 1000.0, urgent=True)
    assert call.url.endswith(f"/3/device/{'cd' * 32}")
    assert (call.headers["apns-topic"], call.headers["apns-push-type"],
            call.headers["apns-priority"], call.headers["apns-expiration"]) == (
        "org.example.app.voip", "voip", "10", "0")
    assert json.loads(call.body)["last-message-priority"] == "high"
    assert call.headers["authorization"].startswith("bearer ")
    # Ordinary pushes, and calls to devices without a VoIP token, stay alert pushes.
    message = provider.request(phone, COUNTS, 1000.0)
    assert (message.headers["apns-topic"], message.headers["apns-push-type"]) == (
        "org.example.app", "alert")
    without_voip = provider.request(device(), CALL, 1000.0, urgent=True)
    assert without_voip.headers["apns-push-type"] == "alert"
    assert without_voip.headers["apns-priority"] == "10"


def test_apns_token_is_reused_for_40_minutes(apns: tuple[Apns, Any]) -> None:
    provider, _ = apns
    first = provider.bearer(0.0)
    assert provider.bearer(39 * 60.0) == first
    assert provider.bearer(41 * 60.0) != first


@pytest.mark.parametrize(("status", "reason", "outcome"), [
    (200, "", DeliveryOutcome.DELIVERED), (410, "Unregistered", DeliveryOutcome.UNREGISTERED),
    (400, "BadDeviceToken", DeliveryOutcome.UNREGISTERED),
    (429, "TooManyRequests", DeliveryOutcome.RETRY),
    (503, "ServiceUnavailable", DeliveryOutcome.RETRY),
    (400, "PayloadTooLarge", DeliveryOutcome.FAILED),
    (403, "ExpiredProviderToken", DeliveryOutcome.RETRY),
])
def test_apns_replies(apns: tuple[Apns, Any], status: int, reason: str,
                      outcome: DeliveryOutcome) -> None:
    provider, _ = apns
    body = json.dumps({"reason": reason}).encode() if reason else b""
    assert provider.reply(status, {}, body).outcome is outcome


@pytest.fixture
def fcm(tmp_path: Path) -> tuple[Fcm, rsa.RSAPrivateKey]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    (tmp_path / "sa.json").write_text(json.dumps({
        "project_id": "proj", "client_email": "svc@proj.iam", "private_key": pem(key).decode(),
        "token_uri": "https://oauth.example/token"}))
    return Fcm(backend("fcm", service_account_file=str(tmp_path / "sa.json"))), key


def test_fcm_oauth_token_then_data_message(fcm: tuple[Fcm, Any]) -> None:
    provider, key = fcm
    auth = provider.auth_request(1000.0)
    assert auth is not None and auth.url == "https://oauth.example/token"
    assertion = dict(pair.split("=", 1) for pair in auth.body.decode().split("&"))["assertion"]
    claims = jwt.decode(assertion, key.public_key(), algorithms=["RS256"],
                        audience="https://oauth.example/token", options={"verify_exp": False})
    assert claims["iss"] == "svc@proj.iam"
    provider.auth_reply(200, b'{"access_token": "tok", "expires_in": 3600}', 1000.0)
    assert provider.auth_request(2000.0) is None  # cached
    assert provider.auth_request(1000.0 + 3590) is not None  # about to expire
    request = provider.request(device("fcm-token"), COUNTS, 1000.0, urgent=True)
    assert request.url == "https://fcm.googleapis.com/v1/projects/proj/messages:send"
    assert request.headers["authorization"] == "Bearer tok"
    message = json.loads(request.body)["message"]
    assert message["token"] == "fcm-token" and message["android"]["priority"] == "high"
    assert message["android"]["ttl"] == "60s"
    ordinary = json.loads(provider.request(device("fcm-token"), COUNTS, 1000.0).body)["message"]
    assert ordinary["android"] == {"priority": "normal", "ttl": "86400s",
                                   "collapse_key": "node-1"}
    assert message["data"] == {"message-count": "2", "pending-subscription-count": "0"}


def test_fcm_replies(fcm: tuple[Fcm, Any]) -> None:
    provider, _ = fcm
    gone = json.dumps({"error": {"status": "NOT_FOUND", "details": [
        {"errorCode": "UNREGISTERED"}]}}).encode()
    assert provider.reply(404, {}, gone).outcome is DeliveryOutcome.UNREGISTERED
    provider.auth_reply(200, b'{"access_token": "tok"}', 0.0)
    assert provider.reply(401, {}, b"{}") == Reply(DeliveryOutcome.RETRY, "401", 0)
    assert provider.auth_request(1.0) is not None  # a refused token is fetched again
    assert provider.reply(503, {}, b"").outcome is DeliveryOutcome.RETRY
    assert provider.reply(200, {}, b"{}").outcome is DeliveryOutcome.DELIVERED


def test_webpush_encrypts_for_the_subscription_and_signs_vapid(tmp_path: Path) -> None:
    vapid = ec.generate_private_key(ec.SECP256R1())
    (tmp_path / "vapid.pem").write_bytes(pem(vapid))
    provider = WebPush(backend("webpush", vapid_private_key_file=str(tmp_path / "vapid.pem"),
                               vapid_subject="mailto:ops@example.org"))
    receiver = ec.generate_private_key(ec.SECP256R1())
    auth = b"sixteen byte key"

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    p256dh = receiver.public_key().public_bytes(serialization.Encoding.X962,
                                                serialization.PublicFormat.UncompressedPoint)
    subscription = device("https://push.example.net/wpush/abc", p256dh=b64(p256dh),
                          auth=b64(auth))
    request = provider.request(subscription, COUNTS, 1000.0)
    plain = http_ece.decrypt(request.body, private_key=receiver, auth_secret=auth,
                             version="aes128gcm")
    assert json.loads(plain) == {"message-count": "2", "pending-subscription-count": "0"}
    assert request.headers["content-encoding"] == "aes128gcm"
    assert (request.headers["urgency"], request.headers["ttl"]) == ("normal", "86400")
    call = provider.request(subscription, COUNTS, 1000.0, urgent=True)
    assert (call.headers["urgency"], call.headers["ttl"]) == ("high", "60")
    token = request.headers["authorization"].split("t=", 1)[1].split(",", 1)[0]
    claims = jwt.decode(token, vapid.public_key(), algorithms=["ES256"],
                        audience="https://push.example.net", options={"verify_exp": False})
    assert claims["sub"] == "mailto:ops@example.org"
    assert provider.reply(410, {}, b"").outcome is DeliveryOutcome.UNREGISTERED
    assert provider.reply(404, {}, b"").outcome is DeliveryOutcome.UNREGISTERED
    assert provider.reply(429, {}, b"").outcome is DeliveryOutcome.RETRY
    assert provider.reply(201, {}, b"").outcome is DeliveryOutcome.DELIVERED


def test_wns_token_refreshed_once_on_401() -> None:
    provider = Wns(backend("wns", package_sid="ms-app://sid", auth_key="secret"))
    auth = provider.auth_request(0.0)
    assert auth is not None and auth.url == "https://login.live.com/accesstoken.srf"
    assert b"client_id=ms-app%3A%2F%2Fsid" in auth.body
    provider.auth_reply(200, b'{"access_token": "w1", "expires_in": 86400}', 0.0)
    request = provider.request(device("https://db5.notify.windows.com/?token=x"), COUNTS, 0.0)
    assert request.headers["authorization"] == "Bearer w1"
    assert request.headers["x-wns-type"] == "wns/raw"
    assert provider.reply(401, {}, b"").outcome is DeliveryOutcome.RETRY
    assert provider.auth_request(1.0) is not None
    provider.auth_reply(200, b'{"access_token": "w2"}', 1.0)
    assert provider.reply(401, {}, b"").outcome is DeliveryOutcome.FAILED  # refreshed once only
    assert provider.reply(410, {}, b"").outcome is DeliveryOutcome.UNREGISTERED


def test_vapid_tokens_are_kept_for_at_most_128_origins_least_recently_used_dropped(
        tmp_path: Path) -> None:
    """Users choose the origins (one new each re-registration): the cache is bounded; an
    origin in use keeps its token while the others come and go."""
    (tmp_path / "vapid.pem").write_bytes(pem(ec.generate_private_key(ec.SECP256R1())))
    provider = WebPush(backend("webpush", vapid_private_key_file=str(tmp_path / "vapid.pem")))
    busy = provider.vapid("https://fcm.googleapis.com/fcm/send/a", 1000.0)
    for n in range(1000):
        provider.vapid(f"https://h{n}.example/x", 1000.0)
        if n % 100 == 0:  # ECDSA signs anew each time: the same text is the cached one
            assert provider.vapid("https://fcm.googleapis.com/fcm/send/b", 1000.0) == busy
    assert len(provider._vapid_cache) == webpush.MAX_VAPID_CACHE == 128
    assert provider.vapid("https://fcm.googleapis.com/fcm/send/c", 1000.0) == busy
    assert "https://h0.example" not in provider._vapid_cache


def test_a_wns_channel_off_the_channel_domains_is_denied_when_sending() -> None:
    """A device registered before channel URIs were checked: the request is not made (the
    bearer token would go there); DestinationDenied, a failure for good."""
    provider = Wns(backend("wns", package_sid="ms-app://sid", auth_key="secret"))
    provider.auth_reply(200, b'{"access_token": "w1"}', 0.0)
    for channel in ("https://attacker.example/x", "https://evilnotify.windows.com/x",
                    "http://db5.notify.windows.com/?token=x",
                    "https://u:p@db5.notify.windows.com/?token=x"):
        with pytest.raises(DestinationDenied, match="notify.windows.com"):
            provider.request(device(channel), COUNTS, 0.0)
    assert provider.request(device("https://DB5.Notify.Windows.com./?token=x"), COUNTS, 0.0)
    own = Wns(backend("wns", package_sid="s", auth_key="k",
                      channel_domains=["wns.example"]))  # type: ignore[arg-type]
    own.auth_reply(200, b'{"access_token": "w1"}', 0.0)
    assert own.request(device("https://a.wns.example/c"), COUNTS, 0.0).url == \
        "https://a.wns.example/c"
    with pytest.raises(DestinationDenied):
        own.request(device("https://db5.notify.windows.com/?token=x"), COUNTS, 0.0)


def test_ubuntu_push_to_the_configured_endpoint() -> None:
    provider = UbuntuPush(backend("ubuntu", endpoint="https://push.example.org/"))
    request = provider.request(device("tok", application_id="app.id_app"), COUNTS, 0.0)
    assert request.url == "https://push.example.org/notify"
    body = json.loads(request.body)
    assert body["appid"] == "app.id_app" and body["token"] == "tok"
    assert body["data"]["message-count"] == "2"
    reply = provider.reply(400, {}, b'{"error": "unknown-token"}')
    assert reply.outcome is DeliveryOutcome.UNREGISTERED
    assert provider.reply(200, {}, b"{}").outcome is DeliveryOutcome.DELIVERED


def test_retry_delays_honour_retry_after_with_bounds_and_jitter() -> None:
    retry = Reply(DeliveryOutcome.RETRY, "503")
    assert retry_delay(retry, {"retry-after": "7"}, 0) == 7.0
    assert retry_delay(retry, {"retry-after": "99999"}, 0) == 600.0
    delays = {retry_delay(retry, {}, 1) for _ in range(20)}
    assert all(0.8 * RETRY_DELAYS[1] <= d <= 1.2 * RETRY_DELAYS[1] for d in delays)
    assert len(delays) > 1


@pytest.mark.parametrize("expires_in", ['"NaN"', "NaN", "Infinity", '"\u00b2"', "-5", "true",
                                         '"99999999999999999999"', "1e308"])
def test_an_oauth_lifetime_that_is_no_sane_number_gets_the_default(
        fcm: tuple[Fcm, Any], expires_in: str) -> None:
    """float() takes "NaN" and "Infinity": a token kept for ever (until refused) would be
    the result; anything but a positive number of seconds within reason is the default."""
    provider, _ = fcm
    provider.auth_reply(200, f'{{"access_token": "tok", "expires_in": {expires_in}}}'.encode(),
                        1000.0)
    assert provider.auth_request(1000.0 + 3000) is None  # the default: an hour
    assert provider.auth_request(1000.0 + 3600) is not None
