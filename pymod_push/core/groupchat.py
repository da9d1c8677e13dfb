"""Pushes for absent room members: whether a member gets one for a room's message, and
how often (pure: no I/O).

A member of a room on this server who has no occupant in it (the app was killed, the
phone was off longer than the resume timeout) and no MUC/Sub subscription to its
messages is told by the shim (a ``muc_message`` event). Per user and room, first match
wins:

1. the user's XEP-0492 setting for that room, from the ``<notify/>`` in the room's
   XEP-0402 bookmark (``urn:xmpp:notification-settings:1``, else ``:0``);
2. the registration's Tigase ``groupchat`` filter (``tigase:push:filter:groupchat:0``);
3. the clients' default: always in a private group (members-only and non-anonymous),
   on mention in any other room.

A mention is a XEP-0372 reference to the user's bare JID or to ``room/nick``, or one of
the user's nicks as a word in the body. The nicks: the ``<nick/>`` of the room's
bookmark, the nick of the Tigase rule for the room, else the user's local part (what
Conversations, Monal and Siskin offer as the nick when joining).

Coalescing (:class:`Coalescer`): at most one push per user and room per interval, unless
mentioned; a push counts the messages since the last one.
"""

from __future__ import annotations

import enum
import heapq
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Generic, TypeVar

from pymod_push.core import safexml

NS_BOOKMARKS = "urn:xmpp:bookmarks:1"
NS_SETTINGS = ("urn:xmpp:notification-settings:1", "urn:xmpp:notification-settings:0")
NS_REFERENCE = "urn:xmpp:reference:0"


class Setting(enum.Enum):
    ALWAYS = "always"
    ON_MENTION = "on-mention"
    NEVER = "never"


_BY_NAME = {s.value: s for s in Setting}
# The Tigase filter's words (ios_extensions.RoomRule.allow)
_TIGASE = {"always": Setting.ALWAYS, "mentioned": Setting.ON_MENTION, "never": Setting.NEVER}


@dataclass(frozen=True, slots=True)
class Bookmark:
    """What a room's XEP-0402 bookmark says for pushes: the XEP-0492 setting (None: none
    stored, or none for a phone) and the nick."""

    setting: Setting | None = None
    nick: str = ""


def read_bookmark(xml: bytes) -> Bookmark:
    """A bookmark item's payload (``<conference xmlns='urn:xmpp:bookmarks:1'>``, or the
    ``<item/>`` holding it). A push device is a phone: in ``:1`` (XEP-0492 0.2) the
    element for identity ``client``/``phone``, else for category ``client``, else the
    fallback (no identity attributes); in ``:0`` (0.1) ``client-type`` ``phone``, then
    ``handheld``, then the fallback. ``:1`` wins over ``:0``. Anything unreadable: no
    setting."""
    try:
        root = safexml.parse(xml)
    except ET.ParseError:
        return Bookmark()
    conference = root if root.tag == f"{{{NS_BOOKMARKS}}}conference" else \
        root.find(f"{{{NS_BOOKMARKS}}}conference")
    if conference is None:
        return Bookmark()
    nick = (conference.findtext(f"{{{NS_BOOKMARKS}}}nick") or "").strip()
    extensions = conference.find(f"{{{NS_BOOKMARKS}}}extensions")
    setting = None
    if extensions is not None:
        for namespace in NS_SETTINGS:
            notify = extensions.find(f"{{{namespace}}}notify")
            if notify is not None:
                setting = _pick(notify, namespace)
                if setting is not None:
                    break
    return Bookmark(setting, nick)


def _pick(notify: ET.Element, namespace: str) -> Setting | None:
    choices: list[tuple[int, Setting]] = []
    for child in notify:
        name = child.tag.rpartition("}")[2]
        setting = _BY_NAME.get(name)
        if setting is None or not child.tag.startswith(f"{{{namespace}}}"):
            continue
        if namespace == NS_SETTINGS[0]:
            category = child.get("identity-category")
            kind = child.get("identity-type")
            if category == "client" and kind == "phone":
                rank = 0
            elif category == "client" and kind is None:
                rank = 1
            elif category is None and kind is None:
                rank = 2
            else:
                continue
        else:
            client_type = child.get("client-type")
            rank = {"phone": 0, "handheld": 1, None: 2}.get(client_type, -1)
            if rank < 0:
                continue
        choices.append((rank, setting))
    return min(choices, key=lambda c: c[0])[1] if choices else None


@dataclass(frozen=True, slots=True)
class Room:
    jid: str  # bare
    members_only: bool
    anonymous: bool  # semi-anonymous: only moderators see real JIDs

    @property
    def private(self) -> bool:
        """A private group: members-only and non-anonymous (Conversations, Monal)."""
        return self.members_only and not self.anonymous


def default_setting(room: Room) -> Setting:
    return Setting.ALWAYS if room.private else Setting.ON_MENTION


def tigase_setting(rule_allow: str | None) -> Setting:
    """The Tigase groupchat filter's word for the room (None: the room is not listed,
    which the clients do for the rooms set to none)."""
    return _TIGASE.get(rule_allow or "", Setting.NEVER)


def choose(bookmark: Setting | None, tigase: Setting | None, room: Room) -> Setting:
    """First match wins: XEP-0492 bookmark setting, the Tigase filter, the default."""
    if bookmark is not None:
        return bookmark
    if tigase is not None:
        return tigase
    return default_setting(room)


def nicks(bookmark_nick: str, tigase_nick: str, user: str) -> tuple[str, ...]:
    """The nicks that count as a mention of the user: the bookmark's, the Tigase rule's,
    else the local part of the JID."""
    found = tuple(dict.fromkeys(n for n in (bookmark_nick, tigase_nick) if n))
    return found or ((user,) if user else ())


def mentioned(body: str, xml: bytes, user_jid: str, room_jid: str,
              nick_list: Iterable[str]) -> bool:
    """A nick as a word in the body (any case), or a XEP-0372 mention of the user's bare
    JID or of room/nick."""
    names = [n for n in nick_list if n]
    for nick in names:
        if re.search(rf"(?<!\w){re.escape(nick)}(?!\w)", body, re.IGNORECASE):
            return True
    if NS_REFERENCE.encode() not in xml:
        return False
    uris = {f"xmpp:{user_jid}".casefold()}
    uris.update(f"xmpp:{room_jid}/{nick}".casefold() for nick in names)
    try:
        root = safexml.parse(xml)
    except ET.ParseError:
        return False
    return any(r.get("type") == "mention" and r.get("uri", "").casefold() in uris
               for r in root.iter(f"{{{NS_REFERENCE}}}reference"))


def wants(setting: Setting, is_mentioned: bool) -> bool:
    return setting is Setting.ALWAYS or (setting is Setting.ON_MENTION and is_mentioned)


K = TypeVar("K")
P = TypeVar("P")


@dataclass(slots=True)
class _Spell(Generic[P]):
    last_push: float
    held: int = 0  # messages since that push, not pushed yet
    latest: P | None = None  # the newest of them (the trailing push is about it)


class Coalescer(Generic[K, P]):
    """At most one push per key (user and room) per interval, unless mentioned.

    The first message after a quiet interval pushes at once (counting 1 plus any held);
    later ones within the interval are held and counted; when the interval ends, one push
    about the newest held message counts them all (due/1). A mention pushes at once,
    counting the held ones with it. Bounded: at most max_keys spells are kept (the oldest
    are forgotten, their held messages with them). Deadlines are kept in a heap: a tick
    costs the due ones, not every spell."""

    def __init__(self, interval_s: float, max_keys: int = 100_000) -> None:
        self.interval_s = interval_s
        self.max_keys = max_keys
        self._spells: dict[K, _Spell[P]] = {}
        self._heap: list[tuple[float, int, K]] = []
        self._seq = 0

    def __len__(self) -> int:
        return len(self._spells)

    def offer(self, key: K, now: float, urgent: bool) -> int:
        """A message that wants a push: how many messages the push now counts, or 0 if it
        is held (the caller then calls hold/2 with what to push later)."""
        spell = self._spells.get(key)
        if spell is None or urgent or now - spell.last_push >= self.interval_s:
            count = 1 + (spell.held if spell is not None else 0)
            self._spells.pop(key, None)  # re-inserted last: dict order is push order
            self._spells[key] = _Spell(now)
            self._bound()
            return count
        spell.held += 1
        if spell.held == 1:
            self._seq += 1
            heapq.heappush(self._heap, (spell.last_push + self.interval_s, self._seq, key))
        return 0

    def hold(self, key: K, payload: P) -> None:
        spell = self._spells.get(key)
        if spell is not None:
            spell.latest = payload

    def _valid(self, entry: tuple[float, int, K]) -> bool:
        spell = self._spells.get(entry[2])
        return spell is not None and spell.held > 0 \
            and spell.last_push + self.interval_s == entry[0]

    def next_deadline(self) -> float | None:
        heap = self._heap
        while heap and not self._valid(heap[0]):
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    def due(self, now: float) -> list[tuple[K, P, int]]:
        """The trailing pushes whose interval has ended: (key, newest payload, count)."""
        out: list[tuple[K, P, int]] = []
        heap = self._heap
        while heap and heap[0][0] <= now:
            entry = heapq.heappop(heap)
            if not self._valid(entry):
                continue
            key = entry[2]
            spell = self._spells[key]
            if spell.latest is not None:
                out.append((key, spell.latest, spell.held))
            self._spells[key] = _Spell(now)
        return out

    def _bound(self) -> None:
        while len(self._spells) > self.max_keys:
            del self._spells[next(iter(self._spells))]
