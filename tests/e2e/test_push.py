"""XEP-0357 end to end: a real ejabberd with mod_push_py, slixmpp users and an app server.

Absence of a push is shown with counters: every push carries the number of
messages since the client went away, so a push that should not have happened
shows up as a wrong count in the pushes that must happen.
"""

from __future__ import annotations

import asyncio
import re

import pytest

from tests.conftest import Scenario
from tests.xmpp_peers import NS_PUSH, Peers

pytestmark = pytest.mark.e2e


def test_disco_lists_push_feature(scenario: Scenario) -> None:
    alice = scenario.account("alice")

    async def run(peers: Peers) -> None:
        client = await peers.user(*alice)
        info = await client.plugin["xep_0030"].get_info(jid=client.boundjid.bare)
        assert NS_PUSH in info["disco_info"]["features"]

    scenario.run(run)


def test_bad_push_iqs_get_errors(scenario: Scenario) -> None:
    alice, bob, app = scenario.account("alice"), scenario.account("bob"), scenario.account("app")

    async def run(peers: Peers) -> None:
        client = await peers.user(*alice)
        enable = f"<enable xmlns='{NS_PUSH}' jid='{app[0]}' node='n1'/>"
        assert await client.push_iq_error(enable, iq_type="get") == ("cancel", "not-allowed")
        no_node = f"<enable xmlns='{NS_PUSH}' jid='{app[0]}'/>"
        assert await client.push_iq_error(no_node) == ("modify", "bad-request")
        no_jid = f"<enable xmlns='{NS_PUSH}' node='n1'/>"
        assert await client.push_iq_error(no_jid) == ("modify", "bad-request")
        # Someone else's account is not yours to configure.
        assert await client.push_iq_error(enable, to=bob[0]) == ("auth", "forbidden")
        # The module is still serving after all that.
        await client.enable_push(app[0], "n1")

    scenario.run(run)


def test_pending_client_gets_counted_pushes_with_publish_options(scenario: Scenario) -> None:
    async def run(peers: Peers) -> None:
        server, phone, sender = await scenario.cast(peers)
        await phone.enable_push(server.boundjid.full, "node-1", secret="s3cr3t")
        await scenario.go_pending(phone)

        sender.send_message(mto=phone.boundjid.bare, mbody="hello", mtype="chat")
        first, = await server.wait_for("node-1", 1)
        sender.send_message(mto=phone.boundjid.bare, mbody="again", mtype="chat")
        pushes = await server.wait_for("node-1", 2)

        assert first.sender == scenario.host  # from the server's domain
        assert first.publish_options == {"FORM_TYPE": "http://jabber.org/protocol/pubsub#"
                                         "publish-options", "secret": "s3cr3t"}
        assert [p.summary.get("message-count") for p in pushes] == ["1", "2"]
        # The seed's defaults: counts yes, senders and bodies no.
        assert pushes[1].summary == {"FORM_TYPE": "urn:xmpp:push:summary", "message-count": "2",
                                     "pending-subscription-count": "0"}

    scenario.run(run)


def test_no_push_while_online_nor_for_chat_states(scenario: Scenario) -> None:
    async def run(peers: Peers) -> None:
        server, phone, sender = await scenario.cast(peers)
        await phone.enable_push(server.boundjid.full, "n")
        sender.send_message(mto=phone.boundjid.full, mbody="while online", mtype="chat")
        await asyncio.wait_for(phone.messages.get(), 10)  # delivered, so handled
        await phone.acknowledge()  # else it is still in the server's resend queue
        await scenario.go_pending(phone)

        composing = sender.make_message(mto=phone.boundjid.full, mtype="chat")
        composing.append(_element("<composing xmlns='http://jabber.org/protocol/chatstates'/>"))
        composing.send()
        sender.send_message(mto=phone.boundjid.full, mbody="while away", mtype="chat")
        pushes = await server.wait_for("n", 1)
        sender.send_message(mto=phone.boundjid.full, mbody="still away", mtype="chat")
        pushes = await server.wait_for("n", 2)
        # Neither the online message nor the chat state was counted or pushed.
        assert [p.summary["message-count"] for p in pushes] == ["1", "2"]

    scenario.run(run)


def test_offline_client_gets_a_push(scenario: Scenario) -> None:
    mark = scenario.instance.log_mark()

    async def run(peers: Peers) -> None:
        server, phone, sender = await scenario.cast(peers)
        await phone.enable_push(server.boundjid.full, "offline-node")
        await phone.go_offline()
        sender.send_message(mto=phone.boundjid.bare, mbody="are you there?", mtype="chat")
        sender.send_message(mto=phone.boundjid.bare, mbody="hello?", mtype="chat")
        pushes = await server.wait_for("offline-node", 2)
        # One push per message, though mod_mam and mod_offline both store each one.
        assert [p.summary["message-count"] for p in pushes] == ["1", "2"]

    scenario.run(run)
    # The store_mam_message hook fits this ejabberd (7 arguments, 8 since 26.07): no
    # "undefined function mod_push_py:mam_message/8" when mod_mam archived them.
    with open(scenario.instance.log_file, "rb") as log:
        log.seek(mark)
        assert b"mod_push_py:mam_message" not in log.read()


def test_subscription_request_pushes(scenario: Scenario) -> None:
    async def run(peers: Peers) -> None:
        server, phone, sender = await scenario.cast(peers)
        await phone.enable_push(server.boundjid.full, "sub-node")
        await scenario.go_pending(phone)
        sender.send_presence(pto=phone.boundjid.bare, ptype="subscribe")
        push, = await server.wait_for("sub-node", 1)
        assert push.summary["pending-subscription-count"] == "1"
        assert push.summary["message-count"] == "0"

    scenario.run(run)


def test_disable_stops_pushes(scenario: Scenario) -> None:
    async def run(peers: Peers) -> None:
        server, phone, sender = await scenario.cast(peers)
        await phone.enable_push(server.boundjid.full, "gone")
        await phone.enable_push(server.boundjid.full, "kept")
        await phone.disable_push(server.boundjid.full, "gone")
        await scenario.go_pending(phone)
        sender.send_message(mto=phone.boundjid.full, mbody="one", mtype="chat")
        await server.wait_for("kept", 1)
        # "gone" was enabled first: its push would have been routed before "kept"'s.
        assert "gone" not in server.received

    scenario.run(run)


def test_disable_everything_ends_push_for_the_session(scenario: Scenario) -> None:
    other_app = scenario.account("app")

    async def run(peers: Peers) -> None:
        server, phone, sender = await scenario.cast(peers)
        witness = await peers.app_server(*other_app)
        await phone.enable_push(server.boundjid.full, "a")
        await phone.enable_push(server.boundjid.full, "b")
        await phone.disable_push(server.boundjid.full)  # all nodes at that app server
        await phone.enable_push(witness.boundjid.full, "w")
        await scenario.go_pending(phone)
        sender.send_message(mto=phone.boundjid.full, mbody="one", mtype="chat")
        await witness.wait_for("w", 1)
        assert server.received == {}

    scenario.run(run)


def test_one_push_per_message_across_the_resume_timeout(short_timeout: Scenario) -> None:
    scenario = short_timeout

    async def run(peers: Peers) -> None:
        server, phone, sender = await scenario.cast(peers)
        await phone.enable_push(server.boundjid.full, "t")
        await scenario.go_pending(phone)
        sender.send_message(mto=phone.boundjid.bare, mbody="before the timeout", mtype="chat")
        await server.wait_for("t", 1)
        # The session times out (2 s) and ejabberd moves the message to offline storage.
        user, host = phone.boundjid.user, phone.boundjid.domain
        await asyncio.to_thread(_wait_offline_count, scenario, user, host, 1)
        sender.send_message(mto=phone.boundjid.bare, mbody="after the timeout", mtype="chat")
        pushes = await server.wait_for("t", 2)
        assert [(p.summary["message-count"], p.summary["last-message-body"]) for p in pushes] \
            == [("1", "before the timeout"), ("2", "after the timeout")]
        assert pushes[0].summary["last-message-sender"].startswith(sender.boundjid.bare)

    scenario.run(run)


def _wait_offline_count(scenario: Scenario, user: str, host: str, count: int) -> None:
    import time
    deadline = time.monotonic() + 30
    while int(scenario.instance.ctl("get_offline_count", user, host).strip() or 0) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{user} has no {count} offline messages")
        time.sleep(0.1)


def _element(xml: str):  # type: ignore[no-untyped-def]
    import xml.etree.ElementTree as ET
    return ET.fromstring(xml)


def test_resume_resets_the_count(scenario: Scenario) -> None:
    async def run(peers: Peers) -> None:
        server, phone, sender = await scenario.cast(peers)
        await phone.enable_push(server.boundjid.full, "r")
        await scenario.go_pending(phone)
        sender.send_message(mto=phone.boundjid.full, mbody="one", mtype="chat")
        await server.wait_for("r", 1)

        resumed = asyncio.get_running_loop().create_future()
        phone.add_event_handler("session_resumed", lambda _: resumed.set_result(True),
                                disposable=True)
        phone.connect("127.0.0.1", phone.port)  # xep_0198 resumes the stream
        await asyncio.wait_for(resumed, 20)
        await asyncio.wait_for(phone.messages.get(), 10)  # "one", redelivered

        await scenario.go_pending(phone)
        sender.send_message(mto=phone.boundjid.full, mbody="two", mtype="chat")
        pushes = await server.wait_for("r", 2)
        assert [p.summary["message-count"] for p in pushes] == ["1", "1"]

    scenario.run(run)


def test_a_burst_of_app_server_errors_counts_once_and_is_retried(scenario: Scenario) -> None:
    """Errors of one spell count once toward max_publish_errors (publish_error_window) and
    the notifications are tried again: nothing is lost when the app server recovers. (An
    app server overloaded for a while; errors by which a target says it is no app server
    count each time: test_exposure.py.)"""
    async def run(peers: Peers) -> None:
        server, phone, sender = await scenario.cast(peers)
        server.errors["bad"] = ("wait", "resource-constraint")
        await phone.enable_push(server.boundjid.full, "bad")
        await phone.enable_push(server.boundjid.full, "witness")
        await scenario.go_pending(phone)
        mark = scenario.instance.log_mark()
        for n in range(3):  # max_publish_errors defaults to 3
            sender.send_message(mto=phone.boundjid.full, mbody=f"m{n}", mtype="chat")
        await server.wait_for("witness", 3)
        assert len(await server.wait_for("bad", 3)) == 3
        del server.errors["bad"]  # recovered: the retries (after 5 s) go through
        retried = await server.wait_for("bad", 6)
        assert sorted(p.summary["message-count"] for p in retried[3:]) == ["1", "2", "3"]
        log = scenario.instance.log_file.read_bytes()[mark:].decode(errors="replace")
        assert len(re.findall(rf"push to {phone.boundjid.user}/\S+ at \S+ failed", log)) == 1
        assert "push disabled" not in log
        sender.send_message(mto=phone.boundjid.full, mbody="after", mtype="chat")
        await server.wait_for("witness", 4)
        assert len(await server.wait_for("bad", 7)) == 7

    scenario.run(run)
