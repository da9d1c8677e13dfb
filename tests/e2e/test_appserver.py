"""The built-in app server end to end: registration by ad-hoc commands, the pubsub endpoint,
and a fake APNs (HTTP/2 over TLS, test CA) receiving what a pending user's messages cause."""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from slixmpp.exceptions import IqError

from devtools.instance import Instance, free_port
from pymod_push.appserver.server import PUBLISH_BURST, PUBLISH_REFILL_PER_SECOND
from tests.conftest import Scenario
from tests.fake_providers import (
    FakeProvider,
    LoopbackCA,
    apns_check,
    client_certificate,
    fcm_check,
    serve_in_thread,
    webpush_check,
)
from tests.xmpp_peers import NS_DATA, NS_PUSH, PROPOSE, Peers, form_fields

pytestmark = pytest.mark.e2e

TOKEN = "ab" * 32
VOIP_TOKEN = "cd" * 32
TOPIC = "org.example.chatninja"


@dataclass
class AppServerSetup:
    scenario: Scenario
    apns: FakeProvider
    apns_certificate_auth: FakeProvider
    fcm: FakeProvider
    webpush: FakeProvider
    webpush_url: str
    webpush_keys: dict[str, tuple[ec.EllipticCurvePrivateKey, bytes]]
    public_key: ec.EllipticCurvePublicKey
    s2s_port: int  # this server's
    remote_s2s_port: int  # where the other server of the s2s test listens


def _pem(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


@pytest.fixture(scope="module")
def setup() -> Iterator[AppServerSetup]:
    folder = Path(tempfile.mkdtemp(prefix="pymod_push-appserver-"))
    folder.chmod(0o755)
    ca = LoopbackCA(folder / "tls")
    apns_key = ec.generate_private_key(ec.SECP256R1())
    (folder / "AuthKey_KEY123.p8").write_bytes(_pem(apns_key))
    fcm_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    vapid_key = ec.generate_private_key(ec.SECP256R1())
    (folder / "vapid.pem").write_bytes(_pem(vapid_key))
    apns_port, fcm_port, webpush_port = free_port(), free_port(), free_port()
    apns_cert_port = free_port()
    s2s_port, remote_s2s_port = free_port(), free_port()
    apns_certificate = client_certificate(ca, "org.example.certapp", folder / "apns-cert.pem")
    (folder / "service-account.json").write_text(json.dumps({
        "type": "service_account", "project_id": "fake-project",
        "client_email": "push@fake-project.iam.gserviceaccount.com",
        "private_key": _pem(fcm_key).decode(), "token_uri": f"https://127.0.0.1:{fcm_port}/token"}))
    common = {"cafile": str(ca.cafile), "pubsub_host": "pubsub.localhost"}
    apns = {**common, "type": "apns", "app_name": "chatninja", "topic": TOPIC,
            "key_file": str(folder / "AuthKey_KEY123.p8"), "key_id": "KEY123",
            "team_id": "TEAM456", "endpoint": f"https://127.0.0.1:{apns_port}"}
    options = {"access_backends": "push_users",
               # the fake Web Push service is on loopback, which endpoints may not reach
               "endpoint_allow_ips": ["127.0.0.0/8", "::1/128"], "backends": [
        {**apns, "register_host": "localhost", "voip_topic": f"{TOPIC}.voip"},
        {**apns, "app_name": "otherapp", "register_host": "push.localhost"},
        {**common, "type": "fcm", "app_name": "chatninja", "register_host": "push.localhost",
         "service_account_file": str(folder / "service-account.json"),
         "endpoint": f"https://127.0.0.1:{fcm_port}"},
        # Published to over s2s: other servers find it by its name, an IP address here
        # since the test has no DNS.
        {**apns, "app_name": "s2sapp", "register_host": "localhost", "pubsub_host": "127.0.0.2"},
        {**common, "type": "apns", "app_name": "certapp", "register_host": "certs.localhost",
         "certfile": str(apns_certificate), "endpoint": f"https://127.0.0.1:{apns_cert_port}"},
        {**common, "type": "webpush", "register_host": "push.localhost",
         "vapid_private_key_file": str(folder / "vapid.pem"),
         "vapid_subject": "mailto:admin@localhost"}]}
    instance = Instance(folder, options=options, extra_config={
        "acl": {"local": {"user_regexp": ""}, "denied": {"user_regexp": "^mallory"}},
        "access_rules": {"push_users": [{"deny": "denied"}, {"allow": "local"}]}},
        s2s_port=s2s_port, s2s_peer_port=remote_s2s_port, s2s_ip="127.0.0.2")
    instance.write_config()
    fakes = {"apns": FakeProvider(apns_check(apns_key.public_key(), "TEAM456", "KEY123", TOPIC)),
             "fcm": FakeProvider(fcm_check(fcm_key.public_key(),
                                           "push@fake-project.iam.gserviceaccount.com",
                                           "fake-project", fcm_port))}
    webpush_keys: dict[str, tuple[ec.EllipticCurvePrivateKey, bytes]] = {}
    fakes["webpush"] = FakeProvider(webpush_check(webpush_keys))
    for name, port in (("apns", apns_port), ("fcm", fcm_port), ("webpush", webpush_port)):
        serve_in_thread(fakes[name], ca, port)
    fakes["apns_cert"] = FakeProvider()
    serve_in_thread(fakes["apns_cert"], ca, apns_cert_port, require_client_certificate=True)
    try:
        instance.start()
        yield AppServerSetup(Scenario(instance), fakes["apns"], fakes["apns_cert"], fakes["fcm"],
                             fakes["webpush"],
                             f"https://127.0.0.1:{webpush_port}", webpush_keys,
                             apns_key.public_key(), s2s_port, remote_s2s_port)
    finally:
        instance.discard()
        shutil.rmtree(folder, ignore_errors=True)


def _result(command: object) -> dict[str, list[str]]:
    return form_fields(command.find(f"{{{NS_DATA}}}x"))  # type: ignore[attr-defined]


def test_register_enable_and_push_through_apns(setup: AppServerSetup) -> None:
    scenario = setup.scenario

    apns = setup.apns
    apns.reset()

    async def run(peers: Peers) -> None:
        _, phone, sender = await scenario.cast(peers)
        registered = await phone.command("localhost", "register-push-apns",
                                         {"token": TOKEN, "device-name": "Phone"})
        assert registered.get("status") == "completed"
        fields = _result(registered)
        assert fields["jid"] == ["pubsub.localhost"]
        node, secret = fields["node"][0], fields["secret"][0]
        await phone.enable_push("pubsub.localhost", node, secret=secret)
        await scenario.go_pending(phone)
        sender.send_message(mto=phone.boundjid.full, mbody="hello", mtype="chat")

        (request,) = await apns.wait_for(1)
        assert request.http_version == "2"
        assert request.method == "POST" and request.path == f"/3/device/{TOKEN}"
        assert request.headers["apns-topic"] == TOPIC
        assert request.headers["apns-push-type"] == "alert"
        assert request.headers["apns-collapse-id"] == node[:64]
        assert int(request.headers["apns-expiration"]) > 0
        scheme, token = request.headers["authorization"].split(" ", 1)
        assert scheme == "bearer"
        claims = jwt.decode(token, setup.public_key, algorithms=["ES256"])
        assert claims["iss"] == "TEAM456"
        assert jwt.get_unverified_header(token)["kid"] == "KEY123"
        aps = request.json()["aps"]
        assert aps["alert"]["body"] == "1 new message" and aps["mutable-content"] == 1

    scenario.run(run)


def test_publish_needs_the_right_secret_and_a_known_node(setup: AppServerSetup) -> None:
    scenario = setup.scenario
    setup.apns.reset()

    async def run(peers: Peers) -> None:
        server, phone, _ = await scenario.cast(peers)
        fields = _result(await phone.command("push.localhost", "register-push-apns",
                                             {"token": TOKEN}))
        node = fields["node"][0]
        for bad_secret, condition in (("wrong", "forbidden"), (None, "forbidden")):
            options = "" if bad_secret is None else (
                f"<publish-options><x xmlns='{NS_DATA}' type='submit'>"
                "<field var='FORM_TYPE'><value>http://jabber.org/protocol/pubsub#publish-options"
                f"</value></field><field var='secret'><value>{bad_secret}</value></field></x>"
                "</publish-options>")
            publish = (f"<pubsub xmlns='http://jabber.org/protocol/pubsub'><publish node='{node}'>"
                       f"<item><notification xmlns='{NS_PUSH}'/></item></publish>{options}"
                       "</pubsub>")
            with pytest.raises(IqError) as caught:
                await server.push_iq(publish, to="pubsub.localhost")
            assert caught.value.iq["error"]["condition"] == condition
        unknown = ("<pubsub xmlns='http://jabber.org/protocol/pubsub'><publish node='nope'>"
                   "<item/></publish></pubsub>")
        with pytest.raises(IqError) as caught:
            await server.push_iq(unknown, to="pubsub.localhost")
        assert caught.value.iq["error"]["condition"] == "item-not-found"
        assert setup.apns.received == []  # nothing reached the provider
        info = await server.plugin["xep_0030"].get_info(jid="pubsub.localhost")
        assert ("pubsub", "push", None, None) in info["disco_info"]["identities"]

    scenario.run(run)


def test_list_and_unregister(setup: AppServerSetup) -> None:
    scenario = setup.scenario

    async def run(peers: Peers) -> None:
        _, phone, _ = await scenario.cast(peers)
        first = _result(await phone.command("push.localhost", "register-push-apns",
                                            {"token": TOKEN, "device-name": "Phone",
                                             "device-id": "d1"}))
        second = _result(await phone.command("push.localhost", "register-push-apns",
                                             {"token": "cd" * 32, "device-name": "Tablet",
                                              "device-id": "d2"}))
        listed = await phone.command("push.localhost", "list-push-registrations", {})
        items = listed.findall(f"{{{NS_DATA}}}x/{{{NS_DATA}}}item")
        rows = [form_fields(item) for item in items]
        assert rows == [{"device-name": ["Phone"], "node": first["node"]},
                        {"device-name": ["Tablet"], "node": second["node"]}]
        removed = _result(await phone.command("push.localhost", "unregister-push",
                                              {"nodes": second["node"]}))
        assert removed["nodes"] == second["node"]
        removed = _result(await phone.command("push.localhost", "unregister-push",
                                              {"device-id": "d1"}))
        assert removed["nodes"] == first["node"]

    scenario.run(run)


def test_commands_listed_on_both_hosts_and_access_enforced(setup: AppServerSetup) -> None:
    scenario = setup.scenario
    mallory = scenario.account("mallory")

    async def run(peers: Peers) -> None:
        _, phone, _ = await scenario.cast(peers)
        disco = phone.plugin["xep_0030"]
        for host, app_name in (("localhost", "chatninja"), ("push.localhost", "otherapp")):
            items = await disco.get_items(jid=host, node="http://jabber.org/protocol/commands")
            names = {node: name for _, node, name in items["disco_items"]["items"]}
            assert "register-push-apns" in names and app_name in names["register-push-apns"]
            assert {"list-push-registrations", "unregister-push"} <= set(names)
        info = await disco.get_info(jid="push.localhost")
        assert "http://jabber.org/protocol/commands" in info["disco_info"]["features"]
        # ejabberd's own commands are still there on the server's host.
        items = await disco.get_items(jid="localhost", node="http://jabber.org/protocol/commands")
        assert any(node == "ping" for _, node, _ in items["disco_items"]["items"])

        denied = await peers.user(*mallory)
        for host in ("localhost", "push.localhost"):
            with pytest.raises(IqError) as caught:
                await denied.command(host, "register-push-apns", {"token": TOKEN})
            assert caught.value.iq["error"]["condition"] == "forbidden"

    scenario.run(run)


async def _register_enable_pending(scenario: Scenario, peers: Peers, command: str,
                                   fields: dict[str, str | list[str]],
                                   host: str = "push.localhost") -> tuple[Any, Any, str]:
    """A user registered at the app server, push enabled with what it answered, pending."""
    _, phone, sender = await scenario.cast(peers)
    result = _result(await phone.command(host, command, fields))
    node = result["node"][0]
    await phone.enable_push(result["jid"][0], node, secret=result["secret"][0])
    await scenario.go_pending(phone)
    return phone, sender, node


def test_fcm_gets_a_data_message_with_an_oauth_token(setup: AppServerSetup) -> None:
    scenario = setup.scenario
    setup.fcm.reset()

    async def run(peers: Peers) -> None:
        phone, sender, node = await _register_enable_pending(
            scenario, peers, "register-push-fcm", {"token": "fcm-token-1"})
        sender.send_message(mto=phone.boundjid.full, mbody="hello", mtype="chat")
        token_request, send = await setup.fcm.wait_for(2)
        assert token_request.path == "/token" and token_request.refused == ""
        assert send.refused == "" and send.http_version == "2"
        message = send.json()["message"]
        assert message["token"] == "fcm-token-1"
        assert message["data"] == {"message-count": "1", "pending-subscription-count": "0"}
        assert message["android"]["collapse_key"] == node[:64]

    scenario.run(run)


def test_webpush_payload_is_encrypted_for_the_subscription(setup: AppServerSetup) -> None:
    scenario = setup.scenario
    setup.webpush.reset()
    receiver = ec.generate_private_key(ec.SECP256R1())
    auth = b"0123456789abcdef"
    setup.webpush_keys["/sub/device-1"] = (receiver, auth)
    p256dh = receiver.public_key().public_bytes(serialization.Encoding.X962,
                                                serialization.PublicFormat.UncompressedPoint)

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    async def run(peers: Peers) -> None:
        phone, sender, _ = await _register_enable_pending(
            scenario, peers, "register-push-webpush",
            {"endpoint": f"{setup.webpush_url}/sub/device-1", "p256dh": b64(p256dh),
             "auth": b64(auth)})
        sender.send_message(mto=phone.boundjid.full, mbody="secret words", mtype="chat")
        (request,) = await setup.webpush.wait_for(1)
        assert request.refused == ""
        assert json.loads(request.decrypted) == {"message-count": "1",
                                                 "pending-subscription-count": "0"}
        assert b"secret words" not in request.body
        assert request.headers["urgency"] == "normal" and int(request.headers["ttl"]) > 0

    scenario.run(run)


def test_a_gone_token_removes_the_registration(setup: AppServerSetup) -> None:
    scenario = setup.scenario
    setup.apns.reset()
    setup.apns.answers[f"/3/device/{'ef' * 32}"] = (410, {"reason": "Unregistered"})

    async def run(peers: Peers) -> None:
        mark = scenario.instance.log_mark()
        phone, sender, node = await _register_enable_pending(
            scenario, peers, "register-push-apns", {"token": "ef" * 32, "device-id": "gone"})
        sender.send_message(mto=phone.boundjid.full, mbody="hello", mtype="chat")
        await setup.apns.wait_for(1)
        # The publishing server (this one) was told, with an error reply.
        await asyncio.to_thread(scenario.instance.wait_for_log,
                                r"push disabled for .*\(last: cancel item-not-found\)", mark)
        listed = await _owner_listing(scenario, peers, phone)
        assert node not in listed

    scenario.run(run)


async def _owner_listing(scenario: Scenario, peers: Peers, phone: Any) -> list[str]:
    """The nodes list-push-registrations gives the phone's account, from a new session."""
    user = phone.boundjid.bare
    again = await peers.user(user, "secret-" + phone.boundjid.user)
    listed = await again.command("push.localhost", "list-push-registrations", {})
    return [form_fields(item)["node"][0]
            for item in listed.findall(f"{{{NS_DATA}}}x/{{{NS_DATA}}}item")]


def test_busy_provider_is_retried_after_retry_after(setup: AppServerSetup) -> None:
    scenario = setup.scenario
    setup.apns.reset()
    setup.apns.next_answers[f"/3/device/{'aa' * 32}"] = [(429, {"retry-after": "1"})]

    async def run(peers: Peers) -> None:
        phone, sender, _ = await _register_enable_pending(
            scenario, peers, "register-push-apns", {"token": "aa" * 32})
        sender.send_message(mto=phone.boundjid.full, mbody="hello", mtype="chat")
        first, second = await setup.apns.wait_for(2)
        assert first.path == second.path
        assert first.body == second.body or json.loads(first.body) == json.loads(second.body)

    scenario.run(run)


def test_apns_certificate_auth_and_topic_from_the_certificate(setup: AppServerSetup) -> None:
    scenario = setup.scenario
    fake = setup.apns_certificate_auth
    fake.reset()

    async def run(peers: Peers) -> None:
        phone, sender, _ = await _register_enable_pending(
            scenario, peers, "register-push-apns", {"token": TOKEN}, host="certs.localhost")
        sender.send_message(mto=phone.boundjid.full, mbody="hello", mtype="chat")
        # The fake requires a client certificate from the test CA: no certificate, no request.
        (request,) = await fake.wait_for(1)
        assert request.headers["apns-topic"] == "org.example.certapp"
        assert "authorization" not in request.headers

    scenario.run(run)


def test_bad_backend_options_are_refused_naming_the_option(setup: AppServerSetup) -> None:
    instance = setup.scenario.instance
    conf = instance.folder / "modules" / "mod_push_py" / "conf" / "mod_push_py.yml"
    original = conf.read_text()
    broken = original.replace("key_id: KEY123", "key_idd: KEY123", 1)
    assert broken != original
    try:
        conf.write_text(broken)
        mark = instance.log_mark()
        instance.ctl("reload_config", check=False)
        line = instance.wait_for_log(r"Configuration reload aborted|Invalid value", mark)
        assert "key_id" in line
    finally:
        conf.write_text(original)


def test_registrations_survive_a_restart(setup: AppServerSetup) -> None:
    scenario = setup.scenario
    setup.apns.reset()
    token = "ef" * 32  # registered here only
    accounts: dict[str, tuple[str, str]] = {}

    async def register(peers: Peers) -> None:
        _, phone, _ = await scenario.cast(peers)
        fields = _result(await phone.command("localhost", "register-push-apns",
                                             {"token": token}))
        accounts["device"] = (fields["node"][0], fields["secret"][0])

    scenario.run(register)
    scenario.instance.stop()
    scenario.instance.start()  # module_upgrade of the installed module, same database

    async def publish(peers: Peers) -> None:
        server, _, _ = await scenario.cast(peers)
        node, secret = accounts["device"]
        await server.push_iq(
            f"<pubsub xmlns='http://jabber.org/protocol/pubsub'><publish node='{node}'><item>"
            f"<notification xmlns='{NS_PUSH}'/></item></publish><publish-options>"
            f"<x xmlns='{NS_DATA}' type='submit'><field var='FORM_TYPE'><value>"
            "http://jabber.org/protocol/pubsub#publish-options</value></field>"
            f"<field var='secret'><value>{secret}</value></field></x></publish-options>"
            "</pubsub>", to="pubsub.localhost")
        # After the restart the push users of earlier tests are woken too (wake_on_start).
        while not [r for r in setup.apns.received if r.path == f"/3/device/{token}"]:
            await setup.apns.wait_for(len(setup.apns.received) + 1)

    scenario.run(publish)


def _publish_xml(node: str, secret: str) -> str:
    return (f"<pubsub xmlns='http://jabber.org/protocol/pubsub'><publish node='{node}'><item>"
            f"<notification xmlns='{NS_PUSH}'><x xmlns='{NS_DATA}' type='submit'>"
            "<field var='FORM_TYPE'><value>urn:xmpp:push:summary</value></field>"
            "<field var='message-count'><value>3</value></field></x></notification></item>"
            f"</publish><publish-options><x xmlns='{NS_DATA}' type='submit'>"
            "<field var='FORM_TYPE'><value>http://jabber.org/protocol/pubsub#publish-options"
            f"</value></field><field var='secret'><value>{secret}</value></field></x>"
            "</publish-options></pubsub>")


def test_publishes_from_another_server_over_s2s(setup: AppServerSetup) -> None:
    """A second ejabberd (no push module), domain 127.0.0.3, publishes to our pubsub host."""
    scenario = setup.scenario
    setup.apns.reset()
    folder = Path(tempfile.mkdtemp(prefix="pymod_push-remote-"))
    folder.chmod(0o755)
    remote = Instance(folder, host="127.0.0.3", s2s_port=setup.remote_s2s_port,
                      s2s_peer_port=setup.s2s_port, s2s_ip="127.0.0.3")
    remote.write_config()
    try:
        remote.start(install=False)
        remote_scenario = Scenario(remote)
        publisher = remote_scenario.account("carol")

        async def register(peers: Peers) -> tuple[str, str]:
            _, phone, _ = await scenario.cast(peers)
            fields = _result(await phone.command("localhost", "register-push-apns",
                                                 {"token": TOKEN, "application-name": "s2sapp"}))
            assert fields["jid"] == ["127.0.0.2"]
            return fields["node"][0], fields["secret"][0]

        device: list[tuple[str, str]] = []

        async def run_register(peers: Peers) -> None:
            device.append(await register(peers))

        scenario.run(run_register)
        node, secret = device[0]

        async def publish(peers: Peers) -> None:
            client = await peers.user(*publisher)
            await client.push_iq(_publish_xml(node, secret), to="127.0.0.2")
            (request,) = await setup.apns.wait_for(1)
            assert request.path == f"/3/device/{TOKEN}"
            assert json.loads(request.body)["message-count"] == "3"
            with pytest.raises(IqError) as caught:
                await client.push_iq(_publish_xml(node, "wrong"), to="127.0.0.2")
            assert caught.value.iq["error"]["condition"] == "forbidden"

        remote_scenario.run(publish)
    finally:
        remote.discard()
        shutil.rmtree(folder, ignore_errors=True)


def test_calls_go_as_urgent_pushes(setup: AppServerSetup) -> None:
    """APNs: a VoIP push where the backend has a voip_topic and the device a VoIP token,
    else an alert at priority 10; FCM: priority high."""
    scenario = setup.scenario
    setup.apns.reset()
    setup.fcm.reset()

    async def call(sender: Any, phone: Any) -> None:
        message = sender.make_message(mto=phone.boundjid.bare, mtype="chat")
        message.append(ET.fromstring(PROPOSE.format(id="call-1")))
        message.send()

    async def run(peers: Peers) -> None:
        _, phone, sender = await scenario.cast(peers)
        fields = _result(await phone.command("localhost", "register-push-apns", {
            "token": TOKEN, "voip-token": VOIP_TOKEN}))
        await phone.enable_push("pubsub.localhost", fields["node"][0],
                                secret=fields["secret"][0])
        _, android, _ = await scenario.cast(peers)
        fields = _result(await android.command("push.localhost", "register-push-fcm",
                                               {"token": "fcm-call-token"}))
        await android.enable_push("pubsub.localhost", fields["node"][0],
                                  secret=fields["secret"][0])
        await scenario.go_pending(phone)
        await scenario.go_pending(android)
        await call(sender, phone)
        (voip,) = await setup.apns.wait_for(1)
        assert voip.path == f"/3/device/{VOIP_TOKEN}" and not voip.refused
        assert voip.headers["apns-push-type"] == "voip"
        assert voip.headers["apns-topic"] == f"{TOPIC}.voip"
        assert voip.headers["apns-priority"] == "10"
        assert voip.json()["last-message-priority"] == "high"
        sender.send_message(mto=phone.boundjid.bare, mbody="call me", mtype="chat")
        requests = await setup.apns.wait_for(2)
        assert requests[1].path == f"/3/device/{TOKEN}" and not requests[1].refused
        assert requests[1].headers["apns-push-type"] == "alert"
        await call(sender, android)
        sends = await setup.fcm.wait_for(1)
        if sends[0].path == "/token":  # the OAuth token is cached once fetched
            sends = (await setup.fcm.wait_for(2))[1:]
        assert sends[0].json()["message"]["android"]["priority"] == "high"

    scenario.run(run)


def test_a_flood_of_publishes_to_one_node_is_rate_limited(setup: AppServerSetup) -> None:
    """Beyond the burst a node's publishes get wait/resource-constraint and never reach the
    provider; another node is served as usual."""
    scenario = setup.scenario
    setup.apns.reset()
    flooded_token, other_token = "f1" * 32, "f2" * 32
    flood = 2 * PUBLISH_BURST

    async def run(peers: Peers) -> None:
        server, phone, _ = await scenario.cast(peers)
        flooded = _result(await phone.command("push.localhost", "register-push-apns",
                                              {"token": flooded_token, "device-id": "flooded"}))
        other = _result(await phone.command("push.localhost", "register-push-apns",
                                            {"token": other_token, "device-id": "other"}))
        publish = _publish_xml(flooded["node"][0], flooded["secret"][0])
        started = time.monotonic()
        answers = await asyncio.gather(
            *(server.push_iq(publish, to="pubsub.localhost") for _ in range(flood)),
            return_exceptions=True)
        elapsed = time.monotonic() - started
        refused = [a for a in answers if isinstance(a, IqError)]
        assert all(not isinstance(a, BaseException) or isinstance(a, IqError) for a in answers)
        for error in refused:
            assert error.iq["error"]["type"] == "wait"
            assert error.iq["error"]["condition"] == "resource-constraint"
            assert error.iq["error"]["text"]
        accepted = flood - len(refused)
        # The burst, and what refilled while the flood went on (nothing if it took < 1 s).
        assert PUBLISH_BURST <= accepted <= PUBLISH_BURST + elapsed * PUBLISH_REFILL_PER_SECOND
        # A publish is answered once the provider has answered it: all of them are in.
        # (Filtered by token: wake-ups of earlier tests' users may arrive meanwhile.)
        paths = [r.path for r in setup.apns.received]
        assert paths.count(f"/3/device/{flooded_token}") == accepted

        await server.push_iq(_publish_xml(other["node"][0], other["secret"][0]),
                             to="pubsub.localhost")
        paths = [r.path for r in setup.apns.received]
        assert paths.count(f"/3/device/{other_token}") == 1
        assert paths.count(f"/3/device/{flooded_token}") == accepted

    scenario.run(run)


def test_an_encrypted_registration_gets_the_blob_in_its_apns_payload(
        setup: AppServerSetup) -> None:
    """Siskin-style encryption (tigase:push:encrypt:0) to the built-in app server: the
    APNs payload carries the blob and IV for the app's notification service extension,
    which decrypts it with the key the client enabled with."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    scenario = setup.scenario
    setup.apns.reset()
    key = bytes(range(16, 32))

    async def run(peers: Peers) -> None:
        _, phone, sender = await scenario.cast(peers)
        fields = _result(await phone.command("localhost", "register-push-apns",
                                             {"token": TOKEN}))
        node, secret = fields["node"][0], fields["secret"][0]
        await phone.push_iq(
            f"<enable xmlns='{NS_PUSH}' jid='pubsub.localhost' node='{node}'>"
            f"<x xmlns='{NS_DATA}' type='submit'><field var='FORM_TYPE'><value>"
            "http://jabber.org/protocol/pubsub#publish-options</value></field>"
            f"<field var='secret'><value>{secret}</value></field></x>"
            "<encrypt xmlns='tigase:push:encrypt:0' alg='aes-128-gcm'>"
            f"{base64.b64encode(key).decode()}</encrypt>"
            "<priority xmlns='tigase:push:priority:0'/></enable>")
        await scenario.go_pending(phone)
        sender.send_message(mto=phone.boundjid.full, mbody="for the extension", mtype="chat")
        (request,) = await setup.apns.wait_for(1)
        assert not request.refused and request.headers["apns-push-type"] == "alert"
        payload = request.json()
        assert payload["aps"]["mutable-content"] == 1
        assert "for the extension" not in json.dumps(payload)
        plaintext = AESGCM(key).decrypt(base64.b64decode(payload["iv"]),
                                        base64.b64decode(payload["encrypted"]), None)
        assert json.loads(plaintext) == {"unread": 1, "sender": sender.boundjid.bare,
                                         "type": "chat", "message": "for the extension"}

    scenario.run(run)
