"""Pushes for absent room members (option groupchat_pushes): the shim's muc_message
events in, publishes out. What is decided is core/groupchat.py's; this keeps the state:
the coalescing spells (in memory: a restart forgets them, at worst one push more) and the
XEP-0492 settings read from the users' bookmarks (bookmark events)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from pymod_push.core import groupchat, ios_extensions
from pymod_push.core import user_options as push_options
from pymod_push.core.config import Config
from pymod_push.core.groupchat import Bookmark, Coalescer, Room, Setting
from pymod_push.core.notify import Counts, Trigger, fingerprint, summary_fields
from pymod_push.protocol import (
    Bookmarks,
    MucMessage,
    Publish,
    PushUsers,
    ReadBookmarks,
    Stanza,
    UserKey,
)
from pymod_push.records import Registration
from pymod_push.store import Store

log = logging.getLogger("pymod_push")

# Users whose bookmarks were asked for (read_bookmarks) since the process started, at
# most: beyond, the set starts again (each asked once more)
MAX_READ_USERS = 100_000
# Rooms whose bookmark is kept per user, at most (a user's bookmarks beyond: the oldest
# read are forgotten, their rooms then follow the defaults)
MAX_BOOKMARKS_PER_USER = 1000

# PushService._push_once, without the service (registration, read_with, stanza, trigger,
# mark, options, now, summary) -> Publish | None
PushOnce = Callable[[Registration, list[Registration], Stanza, Trigger, bytes,
                     push_options.PushOptions, float, list[tuple[str, str]]], Publish | None]


@dataclass(frozen=True, slots=True)
class _Held:
    room: Room
    stanza: Stanza
    keys: tuple[tuple[str, str, str, str], ...]  # the registrations that wanted it


class GroupchatPushes:
    def __init__(self, config: Config, store: Store,
                 options_of: Callable[[UserKey], push_options.PushOptions],
                 push_once: PushOnce) -> None:
        self.config = config
        self.store = store
        self._options_of = options_of
        self._push_once = push_once
        self.coalescer: Coalescer[tuple[UserKey, str], _Held] = Coalescer(
            config.groupchat_push_interval_ms / 1000)
        self.bookmarks: dict[UserKey, dict[str, Bookmark]] = {}
        self._asked: set[UserKey] = set()  # read_bookmarks sent for them
        self.counters = {"considered": 0, "pushed": 0, "held": 0}

    def initial_actions(self) -> list[PushUsers]:
        """After each hello: the shim's set of push users, whole. The shim adds a user
        when it executes a set_push with a timeout (an enable, a push session that
        reconnects); users who lose their last registration stay in it until the next
        reset (a superset: an event for them decides nothing)."""
        if not self.config.groupchat_pushes:
            return []
        return [PushUsers("reset", tuple(self.store.push_users()))]

    # ------------------------------------------------------------------ bookmarks
    def set_bookmark(self, user: UserKey, room: str, xml: bytes | None) -> None:
        """A room's bookmark of the user as published (xml), or retracted (None)."""
        rooms = self.bookmarks.setdefault(user, {})
        rooms.pop(room, None)
        if xml is not None:
            bookmark = groupchat.read_bookmark(xml)
            if bookmark != Bookmark():
                rooms[room] = bookmark
                while len(rooms) > MAX_BOOKMARKS_PER_USER:
                    del rooms[next(iter(rooms))]
        if not rooms:
            del self.bookmarks[user]

    def bookmarks_event(self, event: Bookmarks) -> None:
        if event.replace:
            self.bookmarks.pop(event.user, None)
        for room, xml in event.items[-MAX_BOOKMARKS_PER_USER:]:
            self.set_bookmark(event.user, ios_extensions.fold(room), xml)

    def _read_once(self, user: UserKey) -> list[ReadBookmarks]:
        """Ask for a user's bookmarks the first time one of their rooms has a message
        (after a restart too): that message follows what is known (the defaults); publishes
        after the read come as they happen."""
        if user in self._asked:
            return []
        if len(self._asked) >= MAX_READ_USERS:
            self._asked.clear()
        self._asked.add(user)
        return [ReadBookmarks(user)]

    # ------------------------------------------------------------------ messages
    def handle(self, event: MucMessage, now: float) -> list[Publish | ReadBookmarks]:
        stanza = event.stanza
        if not self.config.groupchat_pushes or self.config.notify_groupchat == "never" \
                or not stanza.body.strip():
            return []
        room = Room(ios_extensions.fold(event.room), event.members_only, event.anonymous)
        publishes: list[Publish | ReadBookmarks] = []
        for user in event.users:
            self.counters["considered"] += 1
            registrations = self.store.for_user(user)
            if not registrations:
                continue
            publishes += self._read_once(user)
            wanted, mention = self._wanted(user, registrations, room, stanza)
            if not wanted:
                continue
            key = (user, room.jid)
            count = self.coalescer.offer(key, now, mention)
            if count == 0:
                self.counters["held"] += 1
                self.coalescer.hold(key, _Held(room, stanza, tuple(r.key for r in wanted)))
                continue
            publishes += self._push(user, registrations, wanted, room, stanza, count, now)
        return publishes

    def _wanted(self, user: UserKey, registrations: list[Registration], room: Room,
                stanza: Stanza) -> tuple[list[Registration], bool]:
        """The registrations that want this message (first match wins: the bookmark's
        XEP-0492 setting, the registration's Tigase groupchat filter, the room's
        default), and whether the user is mentioned."""
        bookmark = self.bookmarks.get(user, {}).get(room.jid) or Bookmark()
        user_jid = f"{user[0]}@{user[1]}"
        wanted: list[Registration] = []
        mention = False
        for registration in registrations:
            tigase: Setting | None = None
            tigase_nick = ""
            if registration.extensions:
                extensions = registration.parsed_extensions
                if extensions is None:  # parsed once, kept with it (as decisions does)
                    extensions = registration.parsed_extensions = ios_extensions.from_json(
                        registration.extensions)
                if room.jid in extensions.muted:
                    continue
                if extensions.groupchat is not None:
                    rule = next((r for r in extensions.groupchat if r.room == room.jid), None)
                    tigase = groupchat.tigase_setting(rule.allow if rule else None)
                    tigase_nick = rule.nick if rule else ""
            setting = groupchat.choose(bookmark.setting, tigase, room)
            if setting is Setting.NEVER:
                continue
            nicks = groupchat.nicks(bookmark.nick, tigase_nick, user[0])
            is_mentioned = groupchat.mentioned(stanza.body, stanza.xml, user_jid, room.jid,
                                               nicks)
            if groupchat.wants(setting, is_mentioned):
                wanted.append(registration)
                mention = mention or is_mentioned
        return wanted, mention

    def _push(self, user: UserKey, registrations: list[Registration],
              wanted: list[Registration], room: Room, stanza: Stanza, count: int,
              now: float) -> list[Publish]:
        """One push to each registration that wanted it, counting count messages: the
        room is named (last-message-sender: room/nick with senders, else the room)."""
        options = self._options_of(user)
        mark = fingerprint(stanza)
        publishes: list[Publish] = []
        for registration in wanted:
            registration.message_count += count - 1  # _push_once adds this one
            counts = Counts(registration.message_count + 1, registration.subscription_count)
            summary = summary_fields(options, counts, Trigger.MESSAGE, stanza)
            if not options.senders:
                summary.append(("last-message-sender", room.jid))
            publish = self._push_once(registration, registrations, stanza, Trigger.MESSAGE,
                                      mark, options, now, summary)
            if publish is not None:
                self.counters["pushed"] += 1
                publishes.append(publish)
        return publishes

    # ------------------------------------------------------------------ timers
    def next_deadline(self) -> float | None:
        return self.coalescer.next_deadline()

    def due(self, now: float) -> list[Publish]:
        """The trailing pushes: the newest held message of each spell whose interval
        ended, counting the held ones."""
        publishes: list[Publish] = []
        for (user, _room), held, count in self.coalescer.due(now):
            registrations = self.store.for_user(user)
            wanted = [r for r in registrations if r.key in held.keys]
            if wanted:
                publishes += self._push(user, registrations, wanted, held.room, held.stanza,
                                        count, now)
        return publishes
