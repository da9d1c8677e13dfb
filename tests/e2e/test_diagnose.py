"""The push check-up on a real ejabberd: ejabberdctl push_diagnose / push_diagnose_test for a
healthy, an erroring and a disabled registration, and the users' own ad-hoc command
push-diagnose (their registrations only, a test push on request, rate limited)."""

from __future__ import annotations

import asyncio
import re
import secrets
import shutil
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest

from devtools.instance import Instance
from pymod_push.core.push_history import short_hash
from tests.conftest import Scenario
from tests.fake_providers import FakeProvider, fake_apns
from tests.xmpp_peers import Peers, form_fields

pytestmark = pytest.mark.e2e

NS_COMMANDS = "http://jabber.org/protocol/commands"
NS_DATA = "jabber:x:data"


def _lines(command: ET.Element) -> list[str]:
    form = command.find(f"{{{NS_DATA}}}x")
    assert form is not None
    return [f.findtext(f"{{{NS_DATA}}}value") or ""
            for f in form.findall(f"{{{NS_DATA}}}field") if f.get("type") == "fixed"]


def _section(text: str, number: int) -> str:
    """The lines of registration number in a check-up."""
    match = re.search(rf"^registration {number}, .*?(?=^\S|\Z)", text, re.M | re.S)
    assert match, text
    return match.group(0)


def test_push_diagnose_healthy_erroring_and_disabled(scenario: Scenario) -> None:
    nodes = {kind: f"{kind}-{secrets.token_hex(6)}" for kind in ("ok", "err", "gone")}

    async def run(peers: Peers) -> None:
        server, phone, _ = await scenario.cast(peers)
        user, host = phone.boundjid.user, phone.boundjid.host
        for node in nodes.values():  # in this order: registrations 1, 2, 3
            await phone.enable_push(server.boundjid.full, node, secret="s3cret-value")
        server.errors[nodes["err"]] = ("cancel", "not-acceptable")  # counted, kept
        server.errors[nodes["gone"]] = ("cancel", "item-not-found")  # disabled at once

        before = await asyncio.to_thread(scenario.instance.ctl, "push_diagnose", user, host)
        assert f"push check-up of {user}@{host}" in before
        assert "3 push registration(s)" in before
        assert "last push: no push since this process started" in before
        assert "reachable from here: a host of this server (local route)" in before

        tested = await asyncio.to_thread(scenario.instance.ctl, "push_diagnose_test", user,
                                         host)
        for node in nodes.values():
            await server.wait_for(node, 1)
        assert tested.startswith("sent 3 test push(es)\n"), tested
        assert "not all answered" not in tested
        # healthy: the test push and its answer, with the latency
        healthy = _section(tested, 1)
        assert re.search(r"last push: \S+ \S+ UTC \(a test push\), sent message-count 0, "
                         r"pending-subscription-count 0; answer: delivered after \d+ ms",
                         healthy), healthy
        assert "errors: 0 of 3 (max_publish_errors): healthy" in healthy
        # erroring: counted, and how far from being disabled
        erroring = _section(tested, 2)
        assert "answer: rejected: cancel not-acceptable after" in erroring, erroring
        assert "errors: 1 of 3 (max_publish_errors): disabled after 2 more" in erroring
        # disabled: gone from the registrations, said why
        assert "registration 3," not in tested
        assert re.search(rf"disabled \S+ \S+ UTC: the registration at "
                         rf"{re.escape(server.boundjid.full)} node "
                         rf"{short_hash(nodes['gone'])} after 3 error\(s\), the last: "
                         r"cancel item-not-found", tested), tested
        # the module's log lines about the user
        assert f"newest log lines about {user}@{host}:" in tested
        assert "push disabled for" in tested and "error 1 of 3" in tested
        # the user's options and filters
        assert "push options (the server's defaults): include-senders off" in tested
        assert "no Tigase push extensions (filters)" in tested
        # never a node or its secret
        for node in nodes.values():
            assert node not in tested and node not in before
        assert "s3cret-value" not in tested

        again = await asyncio.to_thread(scenario.instance.ctl, "push_diagnose", user, host)
        assert "(a test push)" in _section(again, 1)
        listed = await asyncio.to_thread(scenario.instance.ctl, "push_list", user, host)
        assert nodes["gone"] not in listed and nodes["ok"] in listed

        nobody = await asyncio.to_thread(scenario.instance.ctl, "push_diagnose_test",
                                         "nobody", host)
        assert nobody.startswith("sent 0 test push(es)") and "no push registrations" in nobody

    scenario.run(run)


def test_the_users_own_adhoc_check_up(scenario: Scenario) -> None:
    node_a, node_b = f"a-{secrets.token_hex(6)}", f"b-{secrets.token_hex(6)}"

    async def run(peers: Peers) -> None:
        server, alice, bob = await scenario.cast(peers)
        host = alice.boundjid.host
        await alice.enable_push(server.boundjid.full, node_a)
        await bob.enable_push(f"{server.boundjid.bare}/other", node_b)

        items = await alice.plugin["xep_0030"].get_items(jid=host, node=NS_COMMANDS)
        assert ("push-diagnose", "Push notifications check-up") in [
            (item[1], item[2]) for item in items["disco_items"]["items"]]

        first = await alice.command(host, "push-diagnose")
        assert first.get("status") == "executing"
        shown = "\n".join(_lines(first))
        assert f"push check-up of {alice.boundjid.bare}" in shown
        assert server.boundjid.full in shown and f"{server.boundjid.bare}/other" not in shown
        assert node_a not in shown and short_hash(node_a) in shown
        assert bob.boundjid.bare not in shown
        offered = first.find(f"{{{NS_DATA}}}x/{{{NS_DATA}}}field[@var='test']")
        assert offered is not None and offered.get("type") == "boolean"

        tested = await alice.command(host, "push-diagnose", {"test": "1"})
        assert tested.get("status") == "completed"
        assert "Sent 1 test push(es)" in (tested.findtext(f"{{{NS_COMMANDS}}}note") or "")
        (test_push,) = await server.wait_for(node_a, 1)
        assert test_push.summary["message-count"] == "0"
        assert node_b not in server.received  # bob's registration got nothing

        limited = await alice.command(host, "push-diagnose", {"test": "1"})
        note = limited.find(f"{{{NS_COMMANDS}}}note")
        assert note is not None and note.get("type") == "warn"
        assert re.fullmatch(r"A test push can be sent once every 60 s: try again in \d+ s\.",
                            note.text or ""), note.text

        async def answered() -> str:
            while True:
                report = "\n".join(_lines(await alice.command(host, "push-diagnose",
                                                              {"test": "0"})))
                if "answer: delivered" in report:
                    return report
                await asyncio.sleep(0.1)

        report = await asyncio.wait_for(answered(), 10)
        assert "(a test push)" in report and node_a not in report
        assert len(server.received[node_a]) == 1  # the refused test sent nothing

        # bob sees his own only
        own = "\n".join(_lines(await bob.command(host, "push-diagnose")))
        assert f"{server.boundjid.bare}/other" in own and server.boundjid.full not in own

    scenario.run(run)


@pytest.fixture
def with_apns() -> Iterator[tuple[Scenario, FakeProvider]]:
    """An ejabberd whose module has a built-in app server with a (fake) APNs backend."""
    folder = Path(tempfile.mkdtemp(prefix="pymod_push-diagnose-"))
    folder.chmod(0o755)
    apns, backend = fake_apns(folder, "diagapp", "org.example.diag")
    instance = Instance(folder, options={"backends": [backend]})
    instance.write_config()
    try:
        instance.start()
        yield Scenario(instance), apns
    finally:
        instance.discard()
        shutil.rmtree(folder, ignore_errors=True)


def test_the_check_up_of_a_device_at_the_built_in_app_server(
        with_apns: tuple[Scenario, FakeProvider]) -> None:
    scenario, apns = with_apns
    token = secrets.token_hex(32)

    async def run(peers: Peers) -> None:
        jid, password = await asyncio.to_thread(scenario.account, "ios")
        phone = await peers.user(jid, password)
        host = phone.boundjid.host
        command = await phone.command(host, "register-push-apns",
                                      {"token": token, "device-id": "d1",
                                       "device-name": "Alice's iPhone"})
        fields = form_fields(command.find(f"{{{NS_DATA}}}x"))
        node, secret = fields["node"][0], fields["secret"][0]
        await phone.enable_push("pubsub.localhost", node, secret=secret)

        text = await asyncio.to_thread(scenario.instance.ctl, "push_diagnose_test",
                                       phone.boundjid.user, host)
        await apns.wait_for(1)
        assert text.startswith("sent 1 test push(es)\n"), text
        assert ("this server's app server (pubsub.localhost): apns (app 'diagapp'), device "
                f"\"Alice's iPhone\", node {short_hash(node)}") in text, text
        assert re.search(r"last push: .*\(a test push\).*; answer: delivered after \d+ ms",
                         text), text
        assert re.search(r"last push to the device's provider: \S+ \S+ UTC, sent "
                         r"message-count 0.*; answer: delivered \(HTTP 200\) after \d+ ms",
                         text), text
        for hidden in (token, node, secret):
            assert hidden not in text
        assert apns.received[-1].path == f"/3/device/{token}"

    scenario.run(run)
