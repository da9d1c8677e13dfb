"""What a push contains and when one is sent, end to end: encrypted messages, receipts and
markers, carbons, group chat mentions (ejabberd's mod_muc) and call proposals.

As in test_push.py, a push that should not have happened shows up because every
push carries the number of messages counted since the client went away, and because
stanzas from one sender reach the pending session, and Python, in order.
"""

from __future__ import annotations

import asyncio

import pytest

from tests.conftest import Scenario
from tests.xmpp_peers import BODIES, PROPOSE, TIMEOUT, Peers, join, send

pytestmark = pytest.mark.e2e

OMEMO = ("<encrypted xmlns='eu.siacs.conversations.axolotl'><header sid='1'><iv>AAAA</iv>"
         "</header><payload>c2VjcmV0</payload></encrypted>")
def test_encrypted_receipts_and_markers(scenario: Scenario) -> None:
    async def run(peers: Peers) -> None:
        server, phone, sender = await scenario.cast(peers)
        await phone.enable_push(server.boundjid.full, "content", options=BODIES)
        await scenario.go_pending(phone)
        to = phone.boundjid.full
        send(sender, to, payload="<received xmlns='urn:xmpp:receipts' id='m0'/>")
        send(sender, to, payload="<displayed xmlns='urn:xmpp:chat-markers:0' id='m0'/>")
        send(sender, to, payload="<active xmlns='http://jabber.org/protocol/chatstates'/>")
        send(sender, to, "I sent you an OMEMO encrypted message but your client doesn't seem "
             "to support that.", OMEMO)
        (encrypted,) = await server.wait_for("content", 1)
        assert encrypted.summary["message-count"] == "1"  # nothing counted before it
        assert encrypted.summary["last-message-body"] == "Encrypted message"
        send(sender, to, "plain text")
        pushes = await server.wait_for("content", 2)
        assert pushes[1].summary["last-message-body"] == "plain text"
        assert pushes[1].summary["message-count"] == "2"

    scenario.run(run)


def test_carbons_of_own_messages_do_not_push(scenario: Scenario) -> None:
    async def run(peers: Peers) -> None:
        server, phone, sender = await scenario.cast(peers)
        await phone.push_iq("<enable xmlns='urn:xmpp:carbons:2'/>")
        await phone.enable_push(server.boundjid.full, "carbons", options=BODIES)
        laptop = await peers.user(phone.boundjid.bare, "secret-" + phone.boundjid.user)
        await laptop.push_iq("<enable xmlns='urn:xmpp:carbons:2'/>")
        await scenario.go_pending(phone)
        # Sent from the laptop: the phone gets a <sent/> carbon, which must not push.
        send(laptop, sender.boundjid.bare, "from my laptop")
        await asyncio.wait_for(sender.messages.get(), TIMEOUT)
        # To the laptop: the phone gets a <received/> carbon, which does push.
        send(sender, laptop.boundjid.full, "to your laptop")
        (push,) = await server.wait_for("carbons", 1)
        assert push.summary["last-message-body"] == "to your laptop"
        assert push.summary["last-message-sender"].startswith(sender.boundjid.bare)
        assert push.summary["message-count"] == "1"

    scenario.run(run)


def test_group_chat_pushes_on_mentions_only(scenario: Scenario) -> None:
    async def run(peers: Peers) -> None:
        server, phone, sender = await scenario.cast(peers)
        room = f"lunch{phone.boundjid.user}@conference.{scenario.host}"
        await join(sender, room, "Bob")
        await join(phone, room, "Alice")
        await phone.enable_push(server.boundjid.full, "muc", options=BODIES)
        await scenario.go_pending(phone)
        send(sender, room, "lunch anyone?", mtype="groupchat")
        send(sender, room, "Alice, lunch?", mtype="groupchat")
        (push,) = await server.wait_for("muc", 1)
        assert push.summary["last-message-body"] == "Alice, lunch?"
        assert push.summary["last-message-sender"] == f"{room}/Bob"
        assert push.summary["message-count"] == "1"

    scenario.run(run)


def test_a_call_proposal_pushes_at_once_marked_urgent(scenario: Scenario) -> None:
    async def run(peers: Peers) -> None:
        server, phone, sender = await scenario.cast(peers)
        await phone.enable_push(server.boundjid.full, "call", options=BODIES)
        await scenario.go_pending(phone)
        send(sender, phone.boundjid.bare, payload=PROPOSE.format(id="call-1"))
        (push,) = await server.wait_for("call", 1)
        assert push.summary["last-message-priority"] == "high"
        assert push.summary["last-message-body"] == "Incoming call"
        assert push.summary["last-message-sender"].startswith(sender.boundjid.bare)
        # An ordinary message afterwards is not urgent.
        send(sender, phone.boundjid.bare, "call me back")
        pushes = await server.wait_for("call", 2)
        assert "last-message-priority" not in pushes[1].summary

    scenario.run(run)
