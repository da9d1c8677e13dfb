"""Pushes for absent room members (groupchat_pushes), end to end on ejabberd's mod_muc:
a private group (members-only, non-anonymous) and a public channel; with and without a
mention; a XEP-0492 setting in the member's XEP-0402 bookmark; Tigase's groupchat
filter; coalescing; members who are in the room (online or pending) get nothing extra.

Every push carries the member's message count since they went away, so a push too many
or too few shows in the counts of the next one.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.conftest import Scenario, _instance
from tests.xmpp_peers import (
    BODIES,
    Client,
    Peers,
    join,
    opened,
    round_trip,
    send,
    siskin_enable_xml,
)

pytestmark = pytest.mark.e2e

INTERVAL = 2  # groupchat_push_interval, seconds
MUC_OWNER = "http://jabber.org/protocol/muc#owner"
MUC_ADMIN = "http://jabber.org/protocol/muc#admin"
PEP = {"mod_pubsub": {"plugins": ["flat", "pep"]}}  # the members' bookmarks


@pytest.fixture(scope="module")
def groupchat() -> Iterator[Scenario]:
    yield from (Scenario(i) for i in _instance({"groupchat_push_interval": INTERVAL}, PEP))


async def room_of(owner: Client, room: str, nick: str, private: bool,
                  members: list[str]) -> None:
    """Create a room: private (members-only, real JIDs to anyone) or a public channel
    (open, semi-anonymous, ejabberd's default); the members affiliated."""
    await join(owner, room, nick)
    fields = {"FORM_TYPE": "http://jabber.org/protocol/muc#roomconfig",
              "muc#roomconfig_membersonly": "1" if private else "0",
              "muc#roomconfig_whois": "anyone" if private else "moderators",
              "muc#roomconfig_allow_subscription": "1"}
    form = "".join(f"<field var='{var}'><value>{value}</value></field>"
                   for var, value in fields.items())
    await owner.push_iq(f"<query xmlns='{MUC_OWNER}'><x xmlns='jabber:x:data' type='submit'>"
                        f"{form}</x></query>", to=room)
    items = "".join(f"<item affiliation='member' jid='{jid}'/>" for jid in members)
    await owner.push_iq(f"<query xmlns='{MUC_ADMIN}'>{items}</query>", to=room)


def bookmark(room: str, nick: str, setting: str) -> str:
    return (f"<pubsub xmlns='http://jabber.org/protocol/pubsub'>"
            "<publish node='urn:xmpp:bookmarks:1'>"
            f"<item id='{room}'><conference xmlns='urn:xmpp:bookmarks:1' autojoin='true'>"
            f"<nick>{nick}</nick><extensions>"
            f"<notify xmlns='urn:xmpp:notification-settings:1'><{setting}/></notify>"
            "</extensions></conference></item></publish>"
            "<publish-options><x xmlns='jabber:x:data' type='submit'>"
            "<field var='FORM_TYPE' type='hidden'>"
            "<value>http://jabber.org/protocol/pubsub#publish-options</value></field>"
            "<field var='pubsub#persist_items'><value>true</value></field>"
            "<field var='pubsub#access_model'><value>whitelist</value></field>"
            "</x></publish-options></pubsub>")


def test_private_group_pushes_absent_members_and_coalesces(groupchat: Scenario) -> None:
    async def run(peers: Peers) -> None:
        app, owner, alice, carol, dave, erin = await groupchat.app_and_users(
            peers, "owner", "alice", "carol", "dave", "erin")
        room = f"team{owner.boundjid.user}@conference.{groupchat.host}"
        await room_of(owner, room, "Owner", True, [c.boundjid.bare for c in
                                                   (alice, carol, dave, erin)])
        for client, node in ((alice, "alice"), (carol, "carol"), (dave, "dave"),
                             (erin, "erin")):
            await client.enable_push(app.boundjid.full, node, options=BODIES)
        await join(carol, room, "Carol")
        await join(erin, room, "Erin")  # stays online in the room: no push at all
        # Dave is a MUC/Sub subscriber of the messages: they reach him by that path (a
        # wrapper without a body when offline: no push), never by this one.
        await dave.push_iq("<subscribe xmlns='urn:xmpp:mucsub:0' nick='Dave'>"
                           "<event node='urn:xmpp:mucsub:nodes:messages'/></subscribe>",
                           to=room)
        await dave.go_offline()
        await alice.go_offline()  # absent: no session at all
        await groupchat.go_pending(carol)  # pending: still an occupant

        send(owner, room, "first", mtype="groupchat")
        (push,) = await app.wait_for("alice", 1)
        assert push.summary["message-count"] == "1"
        assert push.summary["last-message-sender"] == f"{room}/Owner"
        assert push.summary["last-message-body"] == "first"
        # Within the interval: held and counted, pushed once when it ends.
        send(owner, room, "second", mtype="groupchat")
        send(owner, room, "third", mtype="groupchat")
        await round_trip(owner)
        assert len(app.received["alice"]) == 1
        pushes = await app.wait_for("alice", 2, timeout=INTERVAL + 10)
        assert pushes[1].summary["message-count"] == "3"
        assert pushes[1].summary["last-message-body"] == "third"
        # A mention pushes at once, within the interval of the last push.
        send(owner, room, f"done, {alice.boundjid.user}?", mtype="groupchat")
        pushes = await app.wait_for("alice", 3)
        assert [p.summary["message-count"] for p in pushes] == ["1", "3", "4"]
        await round_trip(app)
        assert "dave" not in app.received and "erin" not in app.received
        # Carol is pending in the room: the normal path (mentions only), nothing extra.
        send(owner, room, "Carol: you too", mtype="groupchat")
        (carols,) = await app.wait_for("carol", 1)
        assert carols.summary["message-count"] == "1"
        assert carols.summary["last-message-body"] == "Carol: you too"

    groupchat.run(run)


def test_public_channel_pushes_on_mention_and_follows_filters(groupchat: Scenario) -> None:
    async def run(peers: Peers) -> None:
        app, owner, alice, siskin = await groupchat.app_and_users(
            peers, "owner", "alice", "siskin")
        room = f"chan{owner.boundjid.user}@conference.{groupchat.host}"
        await room_of(owner, room, "Owner", False, [alice.boundjid.bare, siskin.boundjid.bare])
        await alice.enable_push(app.boundjid.full, "alice", options=BODIES)
        key = os.urandom(16)
        await siskin.push_iq(siskin_enable_xml(
            app.boundjid.full, "siskin", key,
            rooms=f"<room jid='{room}' allow='always' nick='sis'/>"))
        await alice.go_offline()
        await siskin.go_offline()

        send(owner, room, "hello channel", mtype="groupchat")
        # Siskin's filter says always: pushed, encrypted, as group chat with the nick.
        (sis,) = await app.wait_for("siskin", 1)
        data = opened(sis, key)
        assert data["type"] == "groupchat" and data["nickname"] == "Owner"
        assert data["unread"] == 1
        # Alice: on mention only (a public channel), by nick or by a XEP-0372 reference.
        user = alice.boundjid.user
        send(owner, room, f"{user}: look", mtype="groupchat")
        (push,) = await app.wait_for("alice", 1)
        assert push.summary["last-message-body"] == f"{user}: look"
        assert push.summary["message-count"] == "1"
        reference = (f"<reference xmlns='urn:xmpp:reference:0' type='mention' "
                     f"uri='xmpp:{alice.boundjid.bare}' begin='0' end='3'/>")
        send(owner, room, "you, see above", payload=reference, mtype="groupchat")
        pushes = await app.wait_for("alice", 2)
        assert pushes[1].summary["message-count"] == "2"  # "hello channel" not counted

    groupchat.run(run)


def test_bookmark_setting_comes_first(groupchat: Scenario) -> None:
    async def run(peers: Peers) -> None:
        app, owner, alice = await groupchat.app_and_users(peers, "owner", "alice")
        room = f"quiet{owner.boundjid.user}@conference.{groupchat.host}"
        await room_of(owner, room, "Owner", True, [alice.boundjid.bare])
        await alice.enable_push(app.boundjid.full, "alice", options=BODIES)
        # A private group would push every message; her bookmark says on-mention, nick Ally.
        await alice.push_iq(bookmark(room, "Ally", "on-mention"))
        await alice.go_offline()
        send(owner, room, "no one named", mtype="groupchat")
        send(owner, room, "ally: now you", mtype="groupchat")
        (push,) = await app.wait_for("alice", 1)
        assert push.summary["last-message-body"] == "ally: now you"
        assert push.summary["message-count"] == "1"

    groupchat.run(run)


def test_groupchat_pushes_off() -> None:
    for instance in _instance({"groupchat_pushes": False}, PEP):
        scenario = Scenario(instance)

        async def run(peers: Peers, scenario: Scenario = scenario) -> None:
            app, owner, alice = await scenario.app_and_users(peers, "owner", "alice")
            room = f"off{owner.boundjid.user}@conference.{scenario.host}"
            await room_of(owner, room, "Owner", True, [alice.boundjid.bare])
            await alice.enable_push(app.boundjid.full, "alice", options=BODIES)
            await alice.go_offline()
            send(owner, room, "unheard", mtype="groupchat")
            # Then a direct message, pushed (offline): Python handles events in order, so
            # a push for the room's message would have come first and been counted.
            send(owner, alice.boundjid.bare, "direct")
            (push,) = await app.wait_for("alice", 1)
            assert push.summary["last-message-body"] == "direct"
            assert push.summary["message-count"] == "1"

        scenario.run(run)


def test_bookmarks_published_before_push_are_read(groupchat: Scenario) -> None:
    async def run(peers: Peers) -> None:
        app, owner, alice = await groupchat.app_and_users(peers, "owner", "alice")
        room = f"read{owner.boundjid.user}@conference.{groupchat.host}"
        await room_of(owner, room, "Owner", True, [alice.boundjid.bare])
        # Published while she has no push registration: not passed on then.
        await alice.push_iq(bookmark(room, "Ally", "never"))
        await alice.enable_push(app.boundjid.full, "alice", options=BODIES)
        await alice.go_offline()
        # The first message of her rooms follows the default (a private group: always)
        # and has her bookmarks read; from then on her setting holds.
        send(owner, room, "first", mtype="groupchat")
        (push,) = await app.wait_for("alice", 1)
        assert push.summary["last-message-body"] == "first"
        await round_trip(owner)
        send(owner, room, "ally: not for you", mtype="groupchat")
        send(owner, alice.boundjid.bare, "direct")
        pushes = await app.wait_for("alice", 2)
        assert pushes[1].summary["last-message-body"] == "direct"
        assert pushes[1].summary["message-count"] == "2"

    groupchat.run(run)
