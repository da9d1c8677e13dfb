"""Tigase's push extensions end to end, as Siskin IM and Snikket iOS use them: a real
ejabberd with mod_push_py (SQLite and PostgreSQL), a slixmpp client that enables with each
extension, and a slixmpp app server that receives the publishes and decrypts them with the
client's key.

As in test_content.py, a push that should not have happened shows up in the count
every push carries (``unread``), and in the number of publishes the app server got: before
each message that must push, those that must not were sent, and the server had them (a
round trip of their sender, or the room's echo) before the next one went out.
"""

from __future__ import annotations

import asyncio
import base64
import os
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from typing import Any

import pytest

from devtools.instance import Instance
from tests.conftest import Scenario, _instance
from tests.xmpp_peers import (
    NS_ENCRYPT,
    PROPOSE,
    TIMEOUT,
    Peers,
    Publish,
    join,
    opened,
    round_trip,
    send,
    siskin_enable_xml,
    subscribe_to,
)

pytestmark = pytest.mark.e2e

NS_PRIORITY = "tigase:push:priority:0"
NS_JINGLE = "tigase:push:jingle:0"
FEATURES = {"tigase:push:encrypt:0", "tigase:push:encrypt:aes-128-gcm",
            "tigase:push:priority:0", "tigase:push:filter:muted:0",
            "tigase:push:filter:groupchat:0", "tigase:push:filter:ignore-unknown:0",
            "tigase:push:jingle:0"}


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def ios(request: pytest.FixtureRequest) -> Iterator[Instance]:
    """An ejabberd at the default options (ios_extensions on), its push state in SQLite or
    in PostgreSQL."""
    options: dict[str, Any] = {}
    if request.param == "postgresql":
        options["db_url"] = request.getfixturevalue("postgres").new_database()
    yield from _instance(options)


@pytest.fixture
def scenario(ios: Instance) -> Scenario:
    return Scenario(ios)


def priority(push: Publish) -> str | None:
    found = [e.text for e in push.elements if e.tag == f"{{{NS_PRIORITY}}}priority"]
    assert len(found) <= 1
    return found[0] if found else None


def test_the_account_advertises_the_extensions(scenario: Scenario) -> None:
    async def run(peers: Peers) -> None:
        (_app, phone) = await scenario.app_and_users(peers, "alice")
        info = await phone.plugin["xep_0030"].get_info(jid=phone.boundjid.bare,
                                                       timeout=TIMEOUT)
        features = set(info["disco_info"]["features"])
        assert FEATURES <= features and "urn:xmpp:push:0" in features
        assert "tigase:push:away:0" not in features  # not implemented, not offered

    scenario.run(run)


def test_malformed_extensions_are_refused_and_nothing_is_kept(scenario: Scenario) -> None:
    async def run(peers: Peers) -> None:
        app, phone = await scenario.app_and_users(peers, "alice")
        to = app.boundjid.full
        good = siskin_enable_xml(to, "good", os.urandom(16))
        await phone.push_iq(good)
        for bad in (siskin_enable_xml(to, "bad", b"short"),
                    good.replace("'good'", "'bad'").replace("aes-128-gcm", "aes-256-gcm"),
                    good.replace("'good'", "'bad'").replace(
                        "<muted xmlns='tigase:push:filter:muted:0'>",
                        "<muted xmlns='tigase:push:filter:muted:0'>"
                        + "<item jid='x@example.org'/>" * 1001),
                    good.replace("'good'", "'bad'").replace(
                        "</groupchat>", "<room jid='r@muc.example.org' allow='loud'/>"
                        "</groupchat>")):
            assert await phone.push_iq_error(bad) == ("modify", "bad-request")
        user, host = phone.boundjid.user, phone.boundjid.host
        listing = await asyncio.to_thread(scenario.instance.ctl, "push_list", user, host)
        assert "node good" in listing and "node bad" not in listing
        assert ("extensions: encrypt priority groupchat ignore-unknown jingle"
                in listing), listing
        assert base64.b64encode(b"short").decode() not in listing

    scenario.run(run)


def test_encrypted_pushes_with_filters_and_priority(scenario: Scenario) -> None:
    async def run(peers: Peers) -> None:
        app, phone, bob, carol, dave = await scenario.app_and_users(
            peers, "alice", "bob", "carol", "dave")
        key = os.urandom(16)
        await subscribe_to(phone, bob)
        await subscribe_to(phone, carol)
        await phone.push_iq(siskin_enable_xml(app.boundjid.full, "ios", key,
                                              muted=carol.boundjid.bare))
        await scenario.go_pending(phone)
        to = phone.boundjid.full

        send(dave, to, "dave is a stranger")  # ignore-unknown: no push
        await round_trip(dave)
        send(carol, to, "carol is muted")  # muted: no push
        await round_trip(carol)
        send(bob, to, "hello from bob")
        (first,) = await app.wait_for("ios", 1)
        assert opened(first, key) == {"unread": 1, "sender": bob.boundjid.bare, "type": "chat",
                                      "message": "hello from bob"}
        assert priority(first) == "high"
        assert "hello from bob" not in first.xml and bob.boundjid.bare not in first.xml

        dave.send_presence(pto=phone.boundjid.bare, ptype="subscribe")  # unknown: none
        await round_trip(dave)
        bob.send_presence(pto=phone.boundjid.bare, ptype="subscribe")
        pushes = await app.wait_for("ios", 2)
        assert opened(pushes[1], key) == {"unread": 1, "sender": bob.boundjid.bare,
                                          "type": "subscribe"}
        assert priority(pushes[1]) == "high"

        send(bob, phone.boundjid.bare, payload=PROPOSE.format(id="call-7"))
        pushes = await app.wait_for("ios", 3)
        call = pushes[2]
        assert opened(call, key) == {"unread": 2, "sender": bob.boundjid.full, "type": "call",
                                     "sid": "call-7", "media": ["audio"]}
        assert priority(call) == "high"
        elements = {e.tag: e for e in call.elements}
        assert elements[f"{{{NS_ENCRYPT}}}encrypted"].get("type") == "voip"
        jingle = elements[f"{{{NS_JINGLE}}}jingle"]
        assert (jingle.get("action"), jingle.get("sid")) == ("propose", "call-7")
        assert [m.text for m in jingle] == ["audio"]

        omemo = ("<encrypted xmlns='eu.siacs.conversations.axolotl'><header sid='1'>"
                 "<iv>AAAA</iv></header><payload>c2VjcmV0</payload></encrypted>")
        send(bob, to, "This message is OMEMO encrypted", omemo)
        pushes = await app.wait_for("ios", 4)
        assert opened(pushes[3], key)["message"] == \
            "New secure message. Open to see the message."
        # a fresh IV each time, and nothing else arrived
        ivs = {e.get("iv") for p in pushes for e in p.elements if e.get("iv")}
        assert len(ivs) == 4
        await round_trip(bob)
        assert len(app.received["ios"]) == 4
        # neither the key nor a body reached ejabberd's log (Python logs through it)
        log = await asyncio.to_thread(scenario.instance.log_file.read_text)
        assert base64.b64encode(key).decode() not in log and "hello from bob" not in log

    scenario.run(run)


def test_group_chat_rules(scenario: Scenario) -> None:
    async def run(peers: Peers) -> None:
        app, phone, bob = await scenario.app_and_users(peers, "alice", "bob")
        key = os.urandom(16)
        service = f"conference.{scenario.host}"
        rooms = {name: f"{name}{phone.boundjid.user}@{service}"
                 for name in ("loud", "quiet", "off", "unlisted")}
        for room in rooms.values():
            await join(bob, room, "Bob")
            await join(phone, room, "Alice")
        rules = (f"<room jid='{rooms['loud']}' allow='always'/>"
                 f"<room jid='{rooms['quiet']}' allow='mentioned' nick='Alice'/>"
                 f"<room jid='{rooms['off']}' allow='never'/>")
        await phone.push_iq(siskin_enable_xml(app.boundjid.full, "muc", key, rules))
        await scenario.go_pending(phone)

        async def say(room: str, body: str) -> None:
            send(bob, rooms[room], body, mtype="groupchat")
            while True:  # the room's echo: it has sent the message to every occupant
                echo = await asyncio.wait_for(bob.messages.get(), TIMEOUT)
                if echo["body"] == body:
                    return

        await say("quiet", "lunch anyone?")  # not mentioned
        await say("off", "Alice, lunch?")  # never
        await say("unlisted", "Alice, lunch?")  # not listed
        await say("loud", "cake in the kitchen")  # always (no mention needed)
        (first,) = await app.wait_for("muc", 1)
        assert opened(first, key) == {"unread": 1, "sender": rooms["loud"],
                                      "type": "groupchat", "message": "cake in the kitchen",
                                      "nickname": "Bob"}
        assert priority(first) == "high"
        await say("quiet", "alice: are you coming?")  # mentioned, any case
        pushes = await app.wait_for("muc", 2)
        assert opened(pushes[1], key) == {"unread": 2, "sender": rooms["quiet"],
                                          "type": "groupchat",
                                          "message": "alice: are you coming?",
                                          "nickname": "Bob"}
        await say("quiet", "see you")
        await say("loud", "last call")
        pushes = await app.wait_for("muc", 3)
        assert opened(pushes[2], key)["message"] == "last call"
        assert opened(pushes[2], key)["unread"] == 3
        assert len(app.received["muc"]) == 3

    scenario.run(run)


def test_the_payload_fits_max_size(scenario: Scenario) -> None:
    async def run(peers: Peers) -> None:
        app, phone, bob = await scenario.app_and_users(peers, "alice", "bob")
        key = os.urandom(16)
        await subscribe_to(phone, bob)
        await phone.push_iq(siskin_enable_xml(app.boundjid.full, "small", key, max_size="400"))
        await scenario.go_pending(phone)
        body = "ä" * 2000
        send(bob, phone.boundjid.full, body)
        (push,) = await app.wait_for("small", 1)
        (encrypted,) = [e for e in push.elements if e.tag == f"{{{NS_ENCRYPT}}}encrypted"]
        assert len(ET.tostring(encrypted, encoding="unicode").encode()) <= 400 + 20
        payload = opened(push, key)
        assert payload["message"].endswith("\u2026") and body.startswith(payload["message"][:-1])
        assert len(payload["message"]) > 50
        assert payload["sender"] == bob.boundjid.bare

    scenario.run(run)


@pytest.fixture(scope="module")
def ios_off() -> Iterator[Instance]:
    """An ejabberd whose admin turned the extensions off."""
    yield from _instance({"ios_extensions": False})


def test_the_option_turns_the_whole_set_off(ios_off: Instance) -> None:
    scenario = Scenario(ios_off)

    async def run(peers: Peers) -> None:
        app, phone, bob = await scenario.app_and_users(peers, "alice", "bob")
        info = await phone.plugin["xep_0030"].get_info(jid=phone.boundjid.bare,
                                                       timeout=TIMEOUT)
        features = set(info["disco_info"]["features"])
        assert "urn:xmpp:push:0" in features and not features & FEATURES
        # a client that sends them anyway gets ordinary pushes
        await phone.push_iq(siskin_enable_xml(app.boundjid.full, "plain", os.urandom(16)))
        listing = await asyncio.to_thread(scenario.instance.ctl, "push_list",
                                          phone.boundjid.user, phone.boundjid.host)
        assert "node plain" in listing and "extensions" not in listing
        await scenario.go_pending(phone)
        send(bob, phone.boundjid.full, "hello")  # not in the roster: pushes all the same
        (push,) = await app.wait_for("plain", 1)
        assert push.elements == [] and push.summary["message-count"] == "1"

    scenario.run(run)


def test_a_wake_up_is_low_priority_and_carries_no_message(scenario: Scenario) -> None:
    """What only wakes the device (push_test, the wake before a resume timeout ends, after
    a restart) is low priority: there is nothing to show."""
    async def run(peers: Peers) -> None:
        app, phone = await scenario.app_and_users(peers, "alice")
        await phone.push_iq(siskin_enable_xml(app.boundjid.full, "wake", os.urandom(16)))
        await asyncio.to_thread(scenario.instance.ctl, "push_test", phone.boundjid.user,
                                phone.boundjid.host)
        (push,) = await app.wait_for("wake", 1)
        assert priority(push) == "low"
        assert not [e for e in push.elements if e.tag == f"{{{NS_ENCRYPT}}}encrypted"]
        assert push.summary["message-count"] == "0"
        assert "last-message-body" not in push.summary

    scenario.run(run)
