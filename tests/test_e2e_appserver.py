"""The built-in app server end to end: registration by ad-hoc commands, the pubsub endpoint,
and a fake APNs (HTTP/2 over TLS, test CA) receiving what a pending user's messages cause."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from slixmpp.exceptions import IqError

from devtools.instance import Instance, free_port
from tests.conftest import Scenario
from tests.fake_providers import FakeProvider, LoopbackCA, serve_in_thread
from tests.xmpp_peers import NS_DATA, NS_PUSH, Peers, form_fields

pytestmark = pytest.mark.e2e

TOKEN = "ab" * 32
TOPIC = "org.example.chatninja"


@dataclass
class AppServerSetup:
    scenario: Scenario
    apns: FakeProvider
    public_key: ec.EllipticCurvePublicKey


@pytest.fixture(scope="module")
def setup() -> Iterator[AppServerSetup]:
    folder = Path(tempfile.mkdtemp(prefix="pymod_push-appserver-"))
    folder.chmod(0o755)
    ca = LoopbackCA(folder / "tls")
    key = ec.generate_private_key(ec.SECP256R1())
    (folder / "AuthKey_KEY123.p8").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    port = free_port()
    apns = {"type": "apns", "app_name": "chatninja", "topic": TOPIC,
            "key_file": str(folder / "AuthKey_KEY123.p8"), "key_id": "KEY123",
            "team_id": "TEAM456", "endpoint": f"https://127.0.0.1:{port}",
            "cafile": str(ca.cafile), "pubsub_host": "pubsub.localhost"}
    options = {"access_backends": "push_users",
               "backends": [{**apns, "register_host": "localhost"},
                            {**apns, "app_name": "otherapp", "register_host": "push.localhost"}]}
    instance = Instance(folder, options=options, extra_config={
        "acl": {"local": {"user_regexp": ""}, "denied": {"user_regexp": "^mallory"}},
        "access_rules": {"push_users": [{"deny": "denied"}, {"allow": "local"}]}})
    instance.write_config()
    apns_server = FakeProvider()
    serve_in_thread(apns_server, ca, port)
    try:
        instance.start()
        yield AppServerSetup(Scenario(instance), apns_server, key.public_key())
    finally:
        instance.stop()
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
