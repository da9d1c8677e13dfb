"""Notifications waiting for the admin's async push logic.

Each user's wait one after the other (never reordered); other users' do not wait for
them. The event is acknowledged with the waiting notification's row (the store's logic
work): a crash meanwhile loses nothing, the next process finishes it.
"""

from __future__ import annotations

import collections
import json
from dataclasses import dataclass

from pymod_push.core.user_options import PushOptions
from pymod_push.logic import LogicCase
from pymod_push.logic import Message as LogicMessage
from pymod_push.protocol import SessionKey, Stanza, UserKey
from pymod_push.records import Registration
from pymod_push.service.ledger import Ledger
from pymod_push.store import Store


@dataclass(slots=True)
class LogicWork:
    """A notification waiting for the admin's async push logic: the port asks the logic
    (PushService.logic_call, Logic.decide) and hands the answers to finish_logic."""

    id: int
    target: SessionKey  # the event's session; resource "": any of the user's (offline)
    stanza: Stanza


@dataclass(slots=True)
class LogicCall:
    work: LogicWork
    message: LogicMessage | None  # None: nothing to ask (a carbon of one's own message)
    registrations: list[Registration]
    cases: list[LogicCase]  # one per registration
    options: PushOptions | None


def stanza_json(stanza: Stanza) -> str:
    return json.dumps([stanza.kind, stanza.sender, stanza.id, stanza.type, stanza.body,
                       stanza.xml.decode("utf-8", "replace"), stanza.nick, stanza.known])


def stanza_from_json(text: str) -> Stanza:
    kind, sender, stanza_id, kind_type, body, xml, nick, *known = json.loads(text)
    return Stanza(kind, sender, stanza_id, kind_type, body, xml.encode(), nick,
                  known[0] if known else None)



class LogicQueue:
    """Per user, the notifications waiting for the admin's async functions, in order."""

    def __init__(self, store: Store, ejabberd_node: str, ledger: Ledger) -> None:
        self._store = store
        self._node = ejabberd_node
        self._ledger = ledger
        self._queues: dict[UserKey, collections.deque[LogicWork]] = {}
        for work_id, target, stanza in store.logic_work(ejabberd_node):  # of an earlier process
            self._queues.setdefault(target[:2], collections.deque()).append(
                LogicWork(work_id, target, stanza_from_json(stanza)))
            ledger.ids_after(work_id)

    def add(self, target: SessionKey, stanza: Stanza) -> LogicWork:
        work = LogicWork(self._ledger.new_id(), target, stanza)
        self._store.add_logic_work(work.id, target, stanza_json(stanza), self._node)
        self._queues.setdefault(target[:2], collections.deque()).append(work)
        return work

    def first(self, user: UserKey) -> LogicWork | None:
        """The user's next notification waiting."""
        queue = self._queues.get(user)
        return queue[0] if queue else None

    def users(self) -> list[UserKey]:
        return [user for user, queue in self._queues.items() if queue]

    def done(self, work: LogicWork) -> None:
        queue = self._queues.get(work.target[:2])
        if queue and queue[0] is work:
            queue.popleft()
        self._store.remove_logic_work(work.id)
