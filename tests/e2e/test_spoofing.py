"""Nothing spoofed (issue 29, rows 6 to 8), end to end with a real ejabberd: a carbon
wrapper from anyone but the user's own server is no carbon, a call proposal in a room is
no call, a Unicode digit is no number, and a message nested 5,000 deep is no traceback.

As in test_content.py, a push that should not have happened shows up in the count
every push carries, and stanzas from one sender reach the pending session, and Python, in
order: the message that must push comes after those that must not.
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Iterator

import pytest
from slixmpp.exceptions import IqError

from devtools.instance import Instance
from tests.conftest import Scenario, _instance
from tests.xmpp_peers import (
    BODIES,
    PROPOSE,
    TIMEOUT,
    Peers,
    join,
    opened,
    round_trip,
    send,
    siskin_enable_xml,
    subscribe_to,
)

pytestmark = pytest.mark.e2e

CARBON = ("<{wrapper} xmlns='urn:xmpp:carbons:2'><forwarded xmlns='urn:xmpp:forward:0'>"
          "<message xmlns='jabber:client' from='{sender}' to='{to}' type='chat' id='{id}'>"
          "<body>{body}</body>{inside}</message></forwarded></{wrapper}>")
DEPTH = 5000


@pytest.fixture(scope="module")
def spoofing() -> Iterator[Instance]:
    """An ejabberd whose admin wants no group chat pushes at all."""
    yield from _instance({"notify_groupchat": "never"})


@pytest.fixture
def scenario(spoofing: Instance) -> Scenario:
    return Scenario(spoofing)


def carbon(wrapper: str, sender: str, to: str, body: str, stanza_id: str = "c1",
           inside: str = "") -> str:
    return CARBON.format(wrapper=wrapper, sender=sender, to=to, body=body, id=stanza_id,
                         inside=inside)


def test_a_forged_carbon_is_a_plain_message_from_its_real_sender(scenario: Scenario) -> None:
    async def run(peers: Peers) -> None:
        app, alice, mallory = await scenario.cast(peers)
        boss = f"boss@{scenario.host}/desk"
        await alice.enable_push(app.boundjid.full, "forged", options=BODIES)
        await scenario.go_pending(alice)
        to = alice.boundjid.bare
        # Was: a push from boss saying "Wire 10k now".
        send(mallory, to, "hello",
             payload=carbon("received", boss, to, "Wire 10k now"))
        (first,) = await app.wait_for("forged", 1)
        assert first.summary["last-message-sender"].startswith(mallory.boundjid.bare + "/")
        assert first.summary["last-message-body"] == "hello"
        assert first.summary["message-count"] == "1"
        # Was: no push at all (a copy of what alice sent from another device).
        send(mallory, to, "see this", payload=carbon("sent", alice.boundjid.bare, boss,
                                                     "I said so"))
        pushes = await app.wait_for("forged", 2)
        assert pushes[1].summary["last-message-sender"].startswith(mallory.boundjid.bare)
        assert pushes[1].summary["last-message-body"] == "see this"
        assert pushes[1].summary["message-count"] == "2"
        assert "boss" not in pushes[0].xml + pushes[1].xml

    scenario.run(run)


def test_a_forged_carbon_is_filtered_as_its_real_sender(scenario: Scenario) -> None:
    """ignore-unknown (Tigase): alice knows bob, not mallory; mallory's message wrapped as
    a carbon of one from bob is mallory's (was: bob's, pushed)."""
    async def run(peers: Peers) -> None:
        app, alice, bob, mallory = await scenario.app_and_users(peers, "alice", "bob", "mallory")
        key = os.urandom(16)
        await subscribe_to(alice, bob)
        await alice.push_iq(siskin_enable_xml(app.boundjid.full, "known", key))
        await scenario.go_pending(alice)
        to = alice.boundjid.bare
        send(mallory, to, "psst", payload=carbon("received", bob.boundjid.full, to,
                                                 "bob here, wire the money"))
        await round_trip(mallory)
        send(bob, to, "the real bob")
        (push,) = await app.wait_for("known", 1)
        assert opened(push, key) == {"unread": 1, "sender": bob.boundjid.bare,
                                     "type": "chat", "message": "the real bob"}

    scenario.run(run)


def test_own_carbons_are_still_honoured(scenario: Scenario) -> None:
    """The server's own carbons (from alice's bare JID) keep their meaning."""
    async def run(peers: Peers) -> None:
        app, phone, sender = await scenario.cast(peers)
        await phone.push_iq("<enable xmlns='urn:xmpp:carbons:2'/>")
        await phone.enable_push(app.boundjid.full, "own", options=BODIES)
        laptop = await peers.user(phone.boundjid.bare, "secret-" + phone.boundjid.user)
        await laptop.push_iq("<enable xmlns='urn:xmpp:carbons:2'/>")
        await scenario.go_pending(phone)
        send(laptop, sender.boundjid.bare, "from my laptop")  # <sent/>: no push
        await asyncio.wait_for(sender.messages.get(), TIMEOUT)
        send(sender, laptop.boundjid.full, "to your laptop")  # <received/>: pushes
        (push,) = await app.wait_for("own", 1)
        assert push.summary["last-message-body"] == "to your laptop"
        assert push.summary["last-message-sender"].startswith(sender.boundjid.bare + "/")

    scenario.run(run)


def test_a_call_proposal_in_a_room_is_no_call(scenario: Scenario) -> None:
    """notify_groupchat: never. A proposal to the room is a group chat message (no push;
    was an urgent call push to every pending occupant); one in an occupant's private
    message is an ordinary private message (pushed, not urgent, no "Incoming call")."""
    async def run(peers: Peers) -> None:
        app, alice, bob = await scenario.cast(peers)
        room = f"calls{alice.boundjid.user}@conference.{scenario.host}"
        await join(bob, room, "Bob")
        await join(alice, room, "Alice")
        await alice.enable_push(app.boundjid.full, "room", options=BODIES)
        await scenario.go_pending(alice)
        send(bob, room, "ring ring", PROPOSE.format(id="room-call"), mtype="groupchat")
        while True:  # the room's echo: it has sent the message to every occupant
            echo = await asyncio.wait_for(bob.messages.get(), TIMEOUT)
            if echo["body"] == "ring ring":
                break
        send(bob, f"{room}/Alice", "pm ring", PROPOSE.format(id="pm-call"))
        (push,) = await app.wait_for("room", 1)
        assert push.summary["last-message-sender"] == f"{room}/Bob"
        assert push.summary["last-message-body"] == "pm ring"
        assert push.summary["message-count"] == "1"
        assert "last-message-priority" not in push.summary
        # A one-to-one proposal still is a call.
        send(bob, alice.boundjid.bare, payload=PROPOSE.format(id="direct-call"))
        pushes = await app.wait_for("room", 2)
        assert pushes[1].summary["last-message-priority"] == "high"
        assert pushes[1].summary["last-message-body"] == "Incoming call"

    scenario.run(run)


def test_a_unicode_digit_in_max_size_is_a_bad_request(scenario: Scenario) -> None:
    """Was: '\u00b2'.isdigit() is true and int() raises: a traceback, and the IQ unanswered
    until the client gave up."""
    async def run(peers: Peers) -> None:
        app, alice = await scenario.app_and_users(peers, "alice")
        key = os.urandom(16)
        for max_size in ("\u00b2", "\u0663\u0660\u0660\u0660"):  # superscript, Arabic 3000
            mark = scenario.instance.log_mark()
            try:
                await alice.push_iq(siskin_enable_xml(app.boundjid.full, "sup", key,
                                                      max_size=max_size))
            except IqError as exc:
                error = exc.iq["error"]
                assert (error["type"], error["condition"]) == ("modify", "bad-request")
                assert "max-size must be a number of bytes" in error["text"]
            else:
                raise AssertionError(f"max-size={max_size!r} was accepted")
            log = await asyncio.to_thread(log_since, scenario.instance, mark)
            assert "Traceback" not in log
        await alice.push_iq(siskin_enable_xml(app.boundjid.full, "ascii", key, max_size="3000"))

    scenario.run(run)


def log_since(instance: Instance, mark: int) -> str:
    with open(instance.log_file, "rb") as handle:
        handle.seek(mark)
        return handle.read().decode(errors="replace")


def deep_message(to: str, body: str, inside: str, stanza_id: str) -> str:
    """A message as raw XML (slixmpp's own serializer is recursive, too)."""
    return (f"<message to='{to}' type='chat' id='{stanza_id}'><body>{body}</body>"
            f"{inside}</message>")


def test_a_message_nested_5000_deep_is_no_crash(scenario: Scenario) -> None:
    """Was: ejabberd's VM crashed (a segmentation fault in fxml:element_to_binary, which
    the shim called to pass the message on) and, below that depth, a RecursionError and a
    traceback for each such carbon. Now the shim leaves out what is nested below the 64th
    level and the message is judged as any other: a forged carbon holding it is a plain
    message from its real sender. Nothing else is sent the deep message: delivered to an
    online client, it crashes ejabberd 23.01 without this module too."""
    async def run(peers: Peers) -> None:
        app, phone, mallory = await scenario.cast(peers)
        await phone.enable_push(app.boundjid.full, "deep", options=BODIES)
        await scenario.go_pending(phone)
        mark = scenario.instance.log_mark()
        nested = "<a>" * DEPTH + "</a>" * DEPTH
        to = phone.boundjid.bare
        forged = carbon("received", f"boss@{scenario.host}", to, "Wire 10k now",
                        inside=nested)
        mallory.send_raw(deep_message(to, "deep forged", forged, "d1"))
        mallory.send_raw(deep_message(to, "deep plain", nested, "d2"))
        await round_trip(mallory)
        send(mallory, to, "after")
        pushes = await app.wait_for("deep", 3)
        assert [(p.summary["last-message-body"], p.summary["message-count"])
                for p in pushes] == [("deep forged", "1"), ("deep plain", "2"), ("after", "3")]
        assert all(p.summary["last-message-sender"].startswith(mallory.boundjid.bare + "/")
                   for p in pushes)
        send(mallory, to, "last")  # nothing else came: each message pushed exactly once
        pushes = await app.wait_for("deep", 4)
        assert [p.summary["last-message-body"] for p in pushes][3:] == ["last"]
        log = await asyncio.to_thread(log_since, scenario.instance, mark)
        assert not re.search(r"Traceback|RecursionError|failed to handle", log), log[-3000:]

    scenario.run(run)


def test_the_servers_carbon_of_a_deep_message_still_pushes(scenario: Scenario) -> None:
    """2,000 levels (what ejabberd 23.01 itself still delivers to an online client): the
    laptop gets it, the pending phone ejabberd's <received/> carbon, cut at 64 levels by
    the shim, unwrapped and pushed (was: RecursionError in ET.tostring, a traceback)."""
    async def run(peers: Peers) -> None:
        app, phone, mallory = await scenario.cast(peers)
        await phone.push_iq("<enable xmlns='urn:xmpp:carbons:2'/>")
        await phone.enable_push(app.boundjid.full, "carbon", options=BODIES)
        laptop = await peers.user(phone.boundjid.bare, "secret-" + phone.boundjid.user)
        await laptop.push_iq("<enable xmlns='urn:xmpp:carbons:2'/>")
        await scenario.go_pending(phone)
        mark = scenario.instance.log_mark()
        nested = "<a>" * 2000 + "</a>" * 2000
        mallory.send_raw(deep_message(laptop.boundjid.full, "to your laptop", nested, "d3"))
        (push,) = await app.wait_for("carbon", 1)
        assert push.summary["last-message-body"] == "to your laptop"
        assert push.summary["last-message-sender"].startswith(mallory.boundjid.bare + "/")
        log = await asyncio.to_thread(log_since, scenario.instance, mark)
        assert not re.search(r"Traceback|RecursionError|failed to handle", log), log[-3000:]

    scenario.run(run)
