"""core/groupchat.py: who of a room's absent members gets a push, and how often."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pymod_push.core.groupchat import (
    Bookmark,
    Coalescer,
    Room,
    Setting,
    choose,
    mentioned,
    nicks,
    read_bookmark,
    tigase_setting,
    wants,
)
from pymod_push.etf import Atom
from pymod_push.protocol import (
    Bookmarks,
    MucMessage,
    Publish,
    PushUsers,
    ReadBookmarks,
    action_term,
    parse_event,
)
from tests.builders import ALICE, NOW, enable, fields, make_service

ROOM = "team@conference.example.org"
PRIVATE = Room(ROOM, members_only=True, anonymous=False)
PUBLIC = Room(ROOM, members_only=False, anonymous=True)


def conference(extensions: str = "", nick: str = "") -> bytes:
    nick_el = f"<nick>{nick}</nick>" if nick else ""
    ext = f"<extensions>{extensions}</extensions>" if extensions else ""
    return (f"<conference xmlns='urn:xmpp:bookmarks:1' autojoin='true'>{nick_el}{ext}"
            "</conference>").encode()


def notify(ns: str, *children: str) -> str:
    return f"<notify xmlns='urn:xmpp:notification-settings:{ns}'>{''.join(children)}</notify>"


def test_bookmark_v1_prefers_phone_then_category_then_fallback() -> None:
    xml = conference(notify("1", "<always/>",
                            "<never identity-category='client' identity-type='pc'/>",
                            "<on-mention identity-category='client' identity-type='phone'/>"),
                     nick="ali")
    assert read_bookmark(xml) == Bookmark(Setting.ON_MENTION, "ali")
    xml = conference(notify("1", "<never identity-category='client' identity-type='pc'/>",
                            "<always/>"))
    assert read_bookmark(xml).setting is Setting.ALWAYS
    xml = conference(notify("1", "<always/>", "<never identity-category='client'/>"))
    assert read_bookmark(xml).setting is Setting.NEVER


def test_bookmark_v0_client_type_and_v1_wins() -> None:
    xml = conference(notify("0", "<always/>", "<never client-type='handheld'/>"))
    assert read_bookmark(xml).setting is Setting.NEVER
    xml = conference(notify("0", "<never client-type='handheld'/>",
                            "<on-mention client-type='phone'/>"))
    assert read_bookmark(xml).setting is Setting.ON_MENTION
    xml = conference(notify("0", "<never/>") + notify("1", "<always/>"))
    assert read_bookmark(xml).setting is Setting.ALWAYS


def test_bookmark_without_setting_or_unreadable() -> None:
    assert read_bookmark(conference(nick="bob")) == Bookmark(None, "bob")
    assert read_bookmark(conference(notify("1", "<never identity-type='pc' "
                                                 "identity-category='client'/>"))) == Bookmark()
    assert read_bookmark(b"<conference") == Bookmark()
    assert read_bookmark(b"<item id='x'/>") == Bookmark()
    item = b"<item xmlns='http://jabber.org/protocol/pubsub' id='r'>" + conference(
        notify("1", "<never/>")) + b"</item>"
    assert read_bookmark(item).setting is Setting.NEVER


def test_first_match_wins() -> None:
    assert choose(Setting.NEVER, Setting.ALWAYS, PRIVATE) is Setting.NEVER
    assert choose(None, Setting.NEVER, PRIVATE) is Setting.NEVER
    assert choose(None, None, PRIVATE) is Setting.ALWAYS
    assert choose(None, None, PUBLIC) is Setting.ON_MENTION
    assert choose(None, None, Room(ROOM, True, True)) is Setting.ON_MENTION
    assert tigase_setting("mentioned") is Setting.ON_MENTION
    assert tigase_setting(None) is Setting.NEVER  # not listed
    assert wants(Setting.ALWAYS, False) and wants(Setting.ON_MENTION, True)
    assert not wants(Setting.ON_MENTION, False) and not wants(Setting.NEVER, True)


def test_mentions() -> None:
    names = nicks("", "", "alice")
    assert names == ("alice",)
    assert nicks("Ali", "ali2", "alice") == ("Ali", "ali2")
    assert mentioned("hey Alice, lunch?", b"", "alice@example.org", ROOM, names)
    assert not mentioned("malice aforethought", b"", "alice@example.org", ROOM, names)
    ref = (b"<message><body>hi you</body><reference xmlns='urn:xmpp:reference:0' "
           b"type='mention' uri='xmpp:Alice@example.org' begin='3' end='6'/></message>")
    assert mentioned("hi you", ref, "alice@example.org", ROOM, ())
    occupant = ref.replace(b"xmpp:Alice@example.org", f"xmpp:{ROOM}/ali".encode())
    assert mentioned("hi you", occupant, "alice@example.org", ROOM, ("ali",))
    other = ref.replace(b"type='mention'", b"type='data'")
    assert not mentioned("hi you", other, "alice@example.org", ROOM, ())


@given(st.text(max_size=40), st.text(min_size=1, max_size=10))
def test_mention_never_raises(body: str, nick: str) -> None:
    result = mentioned(body, body.encode(), "a@b", ROOM, (nick,))
    assert isinstance(result, bool)


def test_coalescing_leading_then_trailing() -> None:
    c: Coalescer[str, str] = Coalescer(30)
    assert c.offer("k", 0, False) == 1
    assert c.next_deadline() is None
    assert c.offer("k", 1, False) == 0
    c.hold("k", "m2")
    assert c.offer("k", 2, False) == 0
    c.hold("k", "m3")
    assert c.next_deadline() == 30
    assert c.due(29) == []
    assert c.due(30) == [("k", "m3", 2)]
    assert c.due(100) == []
    assert c.offer("k", 31, False) == 0  # within the interval of the trailing push
    c.hold("k", "m4")
    assert c.offer("k", 32, True) == 2  # a mention: at once, counting the held one
    assert c.next_deadline() is None
    assert c.offer("k", 62, False) == 1


@given(st.lists(st.tuples(st.floats(0, 5), st.booleans()), max_size=60))
def test_coalescing_counts_every_message_once(steps: list[tuple[float, bool]]) -> None:
    """Every offered message is counted by exactly one push (leading, mention or
    trailing), and no two non-mention pushes of a key are closer than the interval."""
    c: Coalescer[str, int] = Coalescer(10)
    now, counted, last_plain = 0.0, 0, None
    for i, (gap, urgent) in enumerate(steps):
        now += gap
        for _key, _payload, n in c.due(now):
            counted += n
            assert last_plain is None or now - last_plain >= 10
            last_plain = now
        n = c.offer("k", now, urgent)
        if n:
            counted += n
            last_plain = now  # a mention's push starts a new interval too
        else:
            c.hold("k", i)
    for _key, _payload, n in c.due(now + 10):
        counted += n
    assert counted == len(steps)


def test_coalescer_is_bounded() -> None:
    c: Coalescer[int, int] = Coalescer(30, max_keys=3)
    for key in range(10):
        c.offer(key, 0, False)
    assert len(c) == 3


# ------------------------------------------------------------------ the port and the service

def _muc_term(room: str, users: list[tuple[bytes, bytes]], body: str, members_only: bool = True,
              anonymous: bool = False) -> tuple[object, ...]:
    xml = (f"<message xmlns='jabber:client' type='groupchat' from='{room}/Bob' id='g1'>"
           f"<body>{body}</body></message>").encode()
    return (Atom("muc_message"), room.encode(),
            {Atom("members_only"): members_only, Atom("anonymous"): anonymous}, users,
            (Atom("message"), f"{room}/Bob".encode(), b"g1", Atom("groupchat"), body.encode(),
             xml))


def test_protocol_terms() -> None:
    event = parse_event(_muc_term(ROOM, [(b"alice", b"example.org")], "hi"))
    assert isinstance(event, MucMessage)
    assert event.users == (("alice", "example.org"),) and event.members_only
    assert not event.anonymous and event.stanza.sender == f"{ROOM}/Bob"
    one = parse_event((Atom("bookmark"), (b"alice", b"example.org"), ROOM.encode(),
                       Atom("undefined")))
    assert one == Bookmarks(("alice", "example.org"), ((ROOM, None),), False)
    everything = parse_event((Atom("bookmarks"), (b"alice", b"example.org"),
                              [(ROOM.encode(), b"<conference/>")]))
    assert everything == Bookmarks(("alice", "example.org"), ((ROOM, b"<conference/>"),), True)
    assert action_term(PushUsers("reset", (("alice", "example.org"),))) == (
        "groupchat", ("users", "reset", [(b"alice", b"example.org")]))
    assert action_term(ReadBookmarks(("alice", "example.org"))) == (
        "groupchat", ("read_bookmarks", (b"alice", b"example.org")))


def _muc(body: str, members_only: bool = True) -> MucMessage:
    event = parse_event(_muc_term(ROOM, [(b"alice", b"example.org")], body, members_only,
                                  not members_only))
    assert isinstance(event, MucMessage)
    return event


def test_service_pushes_coalesces_and_reads_bookmarks_once() -> None:
    service = make_service(groupchat_push_interval_ms=30_000, include_message_bodies=True)
    service.handle(enable(), NOW)
    assert service.groupchat.initial_actions() == [PushUsers("reset", (ALICE,))]
    first = service.handle(_muc("one"), NOW)
    assert first[0] == ReadBookmarks(ALICE)
    assert fields(first[1])["message-count"] == "1"
    assert fields(first[1])["last-message-sender"] == ROOM  # senders off: the room
    assert service.handle(_muc("two"), NOW + 1) == []
    assert service.handle(_muc("three"), NOW + 2) == []
    assert service.next_deadline() == NOW + 30
    (trailing,) = [a for a in service.tick(NOW + 30) if isinstance(a, Publish)]
    assert fields(trailing)["message-count"] == "3"
    assert fields(trailing)["last-message-body"] == "three"
    # a public channel: on mention only; the user's local part is a nick
    assert service.handle(_muc("hello all", members_only=False), NOW + 100) == []
    (mention,) = service.handle(_muc("Alice: here", members_only=False), NOW + 101)
    assert fields(mention)["message-count"] == "4"


def test_service_bookmark_setting_first() -> None:
    service = make_service()
    service.handle(enable(), NOW)
    never = conference(notify("1", "<never/>"))
    service.handle(Bookmarks(ALICE, ((ROOM.upper(), never),), True), NOW)
    assert [a for a in service.handle(_muc("alice!"), NOW) if isinstance(a, Publish)] == []
    service.handle(Bookmarks(ALICE, ((ROOM, None),), False), NOW)  # retracted
    assert [a for a in service.handle(_muc("x"), NOW) if isinstance(a, Publish)] != []


# ------------------------------------------------------------------ the shim's record positions

def local_ejabberd() -> tuple[str, Path, Path] | None:
    """This machine's ejabberd: its release, include folder and xmpp library's include
    folder (Debian's layout). Each suite (bookworm 23.01, trixie 24.12, sid 26.07) checks
    its own release."""
    includes = sorted(Path("/usr/lib").glob("*/ejabberd-*/include/mod_muc_room.hrl"))
    xmpps = sorted(Path("/usr/lib/erlang/lib").glob("*xmpp-*/include/xmpp.hrl"))
    if not includes or not xmpps:
        return None
    release = re.match(r"ejabberd-(\d+\.\d+)", includes[-1].parent.parent.name)
    if release is None:
        return None
    return release.group(1), includes[-1].parent, xmpps[-1].parent


POSITIONS = """-module(room_positions).
-export([main/0]).
-include("xmpp.hrl").
-include("mod_muc_room.hrl").
main() ->
    P = fun(L, N) -> length(lists:takewhile(fun(X) -> X =/= N end, L)) + 2 end,
    S = record_info(fields, state), C = record_info(fields, config),
    io:format("~w~n", [[length(S) + 1, P(S, server_host), P(S, jid), P(S, config),
                        P(S, users), P(S, muc_subscribers), P(S, affiliations),
                        P(C, members_only), P(C, anonymous),
                        P(record_info(fields, muc_subscribers), subscribers),
                        P(record_info(fields, subscriber), nodes)]]),
    halt().
"""


def test_room_state_positions_the_shim_reads(tmp_path: Path) -> None:
    """mod_push_py_muc reads the room's #state{} by position (no hrl, one beam for all
    releases): the positions are those of this machine's release's mod_muc_room.hrl."""
    found = local_ejabberd()
    if found is None or shutil.which("erlc") is None:
        pytest.skip("ejabberd's include files are not installed here (make test installs them)")
    release, include, xmpp_include = found
    source = tmp_path / "room_positions.erl"
    source.write_text(POSITIONS)
    subprocess.run(["erlc", "-o", str(tmp_path), "-I", str(include), "-I", str(xmpp_include),
                    str(source)], check=True, capture_output=True)
    out = subprocess.run(["erl", "-noshell", "-pa", str(tmp_path), "-s", "room_positions",
                          "main"], check=True, capture_output=True, text=True,
                         env={**os.environ, "ERL_CRASH_DUMP_SECONDS": "0"}).stdout
    size = 25 if release >= "26" else 23
    # size, server_host, jid, config, users, muc_subscribers, affiliations; config's
    # members_only, anonymous; #muc_subscribers.subscribers; #subscriber.nodes
    assert out.strip() == f"[{size},4,6,7,8,9,13,16,21,2,4]"
    shim = (Path(__file__).parents[2] / "erl_shim/src/mod_push_py_muc.erl").read_text()
    for read in ("element(4, S)", "element(6, S)", "element(7, S)", "element(8, S)",
                 "element(9, S)", "element(13, S)", "element(16, Config)",
                 "element(21, Config)", "element(4, Subscriber)",
                 "tuple_size(S) =:= 23 orelse tuple_size(S) =:= 25"):
        assert read in shim
