"""Where the server may send, end to end (issue 29, rows 1, 2 and 4): registrations at the
built-in app server refused when a WNS channel is off notify.windows.com or a Web Push
endpoint is not on the public internet, and a publish answered although the endpoint's
server never grants a stream. Only 127.0.0.1 is allowed (endpoint_allow_ips), and only the
test's own listener there is ever sent to."""

from __future__ import annotations

import base64
import shutil
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from slixmpp.exceptions import IqError

from devtools.instance import Instance
from tests.conftest import Scenario
from tests.fake_providers import H2Peer, LoopbackCA
from tests.xmpp_peers import NS_DATA, NS_PUBLISH_OPTIONS, NS_PUSH, Client, Peers, form_fields

pytestmark = pytest.mark.e2e


@dataclass
class Setup:
    scenario: Scenario
    ca: LoopbackCA


@pytest.fixture(scope="module")
def setup() -> Iterator[Setup]:
    folder = Path(tempfile.mkdtemp(prefix="pymod_push-destinations-"))
    folder.chmod(0o755)
    ca = LoopbackCA(folder / "tls")
    (folder / "vapid.pem").write_bytes(ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    common = {"register_host": "localhost", "pubsub_host": "pubsub.localhost",
              "cafile": str(ca.cafile)}
    options = {"endpoint_allow_ips": ["127.0.0.1/32"], "backends": [
        {**common, "type": "webpush", "vapid_private_key_file": str(folder / "vapid.pem")},
        # never sent to here: its login endpoint is a port nobody listens on
        {**common, "type": "wns", "app_name": "winapp", "package_sid": "ms-app://sid",
         "auth_key": "s3cret", "endpoint": "https://127.0.0.1:1"}]}
    instance = Instance(folder, options=options)
    instance.write_config()
    try:
        instance.start()
        yield Setup(Scenario(instance), ca)
    finally:
        instance.discard()
        shutil.rmtree(folder, ignore_errors=True)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _keys() -> dict[str, str]:
    public = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
    return {"p256dh": _b64(public), "auth": _b64(b"0123456789abcdef")}


async def _refusal(phone: Client, node: str, fields: dict[str, str]) -> tuple[str, str]:
    """The (condition, text) a registration is refused with."""
    try:
        await phone.command("localhost", node, fields)
    except IqError as exc:
        return exc.iq["error"]["condition"], exc.iq["error"]["text"]
    raise AssertionError(f"{node} {fields} was accepted")


def test_a_wns_channel_off_notify_windows_com_is_refused(setup: Setup) -> None:
    """Row 1: the app's WNS bearer token would go to whatever host the channel URI names."""
    scenario = setup.scenario

    async def run(peers: Peers) -> None:
        phone = await peers.user(*scenario.account("alice"))
        for channel in ("https://attacker.example/x",
                        "https://notify.windows.com.attacker.example/x",
                        "https://evilnotify.windows.com/x",
                        "http://db5.notify.windows.com/?token=AwYAAAB",
                        "https://u:p@db5.notify.windows.com/?token=AwYAAAB",
                        "https://127.0.0.1/x"):
            condition, text = await _refusal(phone, "register-push-wns", {"token": channel})
            assert condition == "bad-request", channel
            assert text.startswith("field 'token' is refused: ") and \
                "https on a host under notify.windows.com" in text, text
        fields = form_fields((await phone.command(
            "localhost", "register-push-wns",
            {"token": "https://db5.notify.windows.com/?token=AwYAAAB"})).find(
                f"{{{NS_DATA}}}x"))
        assert fields["jid"] == ["pubsub.localhost"] and fields["node"]

    scenario.run(run)


@pytest.mark.parametrize(("endpoint", "why"), [
    ("http://push.example.net/wpush/1", "only https URLs are allowed"),
    ("https://user:pw@push.example.net/wpush/1", "user information"),
    ("https://127.0.0.2/wpush/1", "127.0.0.2 is not on the public internet (loopback)"),
    ("https://[::1]:8443/wpush/1", "::1 is not on the public internet (loopback)"),
    ("https://[::ffff:127.0.0.2]/x", "(loopback (IPv4-mapped))"),
    ("https://localhost/wpush/1", "localhost is this server itself"),
    ("https://169.254.169.254/latest/meta-data/", "(link-local)"),
    ("https://10.0.0.1:6379/", "10.0.0.1 is not on the public internet (private)"),
    ("https://100.64.0.1/", "(shared (carrier-grade NAT))"),
    ("https://[fd00::1]/", "(unique local (ULA))"),
    ("https://0x7f.2/", "127.0.0.2 is not on the public internet"),
])
def test_a_web_push_endpoint_off_the_public_internet_is_refused(setup: Setup, endpoint: str,
                                                                why: str) -> None:
    """Row 2: literal addresses (in any spelling) and localhost names are refused at
    registration, saying why; what endpoint_allow_ips allows (127.0.0.1) is taken."""
    scenario = setup.scenario

    async def run(peers: Peers) -> None:
        phone = await peers.user(*scenario.account("alice"))
        condition, text = await _refusal(phone, "register-push-webpush",
                                         {"endpoint": endpoint, **_keys()})
        assert condition == "bad-request"
        assert text.startswith("field 'endpoint' is refused: ") and why in text, text
        allowed = await phone.command("localhost", "register-push-webpush",
                                      {"endpoint": "https://127.0.0.1:9/wpush/1", **_keys()})
        assert allowed.get("status") == "completed"

    scenario.run(run)


def _publish(node: str, secret: str) -> str:
    return (f"<pubsub xmlns='http://jabber.org/protocol/pubsub'><publish node='{node}'>"
            f"<item><notification xmlns='{NS_PUSH}'><x xmlns='{NS_DATA}' type='submit'>"
            "<field var='FORM_TYPE'><value>urn:xmpp:push:summary</value></field>"
            "<field var='message-count'><value>1</value></field></x></notification></item>"
            f"</publish><publish-options><x xmlns='{NS_DATA}' type='submit'>"
            f"<field var='FORM_TYPE'><value>{NS_PUBLISH_OPTIONS}</value></field>"
            f"<field var='secret'><value>{secret}</value></field></x></publish-options>"
            "</pubsub>")


def test_an_endpoint_that_grants_no_stream_cannot_hold_a_publish(setup: Setup) -> None:
    """Row 4: the endpoint's server advertises SETTINGS_MAX_CONCURRENT_STREAMS 0 (and
    refuses the stream opened before the module heard of it): the push waits for a stream
    only until its deadline, and the publish is answered."""
    scenario = setup.scenario

    async def run(peers: Peers) -> None:
        endpoint = H2Peer(setup.ca.ca, max_streams=0)
        port = await endpoint.start()
        phone = await peers.user(*scenario.account("alice"))
        registered = await phone.command("localhost", "register-push-webpush", {
            "endpoint": f"https://127.0.0.1:{port}/wpush/stuck", **_keys()})
        fields = form_fields(registered.find(f"{{{NS_DATA}}}x"))
        iq = phone.make_iq(ito="pubsub.localhost", itype="set")
        iq.append(ET.fromstring(_publish(fields["node"][0], fields["secret"][0])))
        # The HTTP/2 client's timeout is 15 s; unanswered, the IQ would wait forever.
        answer: Any = await iq.send(timeout=60)
        assert answer["type"] == "result"
        assert {path for _, path in endpoint.requests} == {"/wpush/stuck"}  # refused
        await endpoint.close()

    scenario.run(run)
