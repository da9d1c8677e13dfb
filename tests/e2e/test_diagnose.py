"""The push check-up on a real ejabberd: ejabberdctl push_diagnose / push_diagnose_test for a
healthy, an erroring and a disabled registration, and the users' own ad-hoc command
push-diagnose (their registrations only, a test push on request, rate limited)."""

from __future__ import annotations

import asyncio
import re
import secrets
import xml.etree.ElementTree as ET

import pytest

from pymod_push.core.push_history import short_hash
from tests.conftest import Scenario
from tests.xmpp_peers import Peers

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
