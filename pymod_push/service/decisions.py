"""The push service: events in, actions out.

No I/O of its own besides the store it is given; time comes in as arguments,
so tests drive it directly. The port loop (port.py) feeds it events, commits the
store and writes the returned actions back to ejabberd.
"""

from __future__ import annotations

import collections
import heapq
import itertools
import json
import logging
import os
import struct
import time
from array import array
from bisect import bisect_left
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TypeAlias

from pymod_push.appserver.server import AppServer, Delivery, publish_error_reply
from pymod_push.core import ios_extensions, limits
from pymod_push.core import user_options as push_options
from pymod_push.core.config import Config
from pymod_push.core.notify import (
    Counts,
    PublishOutcome,
    Trigger,
    classify_reply,
    count_error,
    extension_event,
    fingerprint,
    groupchat_candidate,
    is_encrypted,
    pushed_mark,
    summary_fields,
    trigger_of,
    unwrap_carbon,
    wake_fields,
)
from pymod_push.core.pacing import DomainPacer
from pymod_push.core.xep0357 import (
    Disable,
    Enable,
    parse_push_request,
    publish_options_form,
    summary_form,
)
from pymod_push.core.xmpp import RequestError
from pymod_push.logic import Logic, LogicCase
from pymod_push.logic import Message as LogicMessage
from pymod_push.logic import Recipient as LogicRecipient
from pymod_push.protocol import (
    Action,
    AppServerIq,
    EjabberdStarted,
    Event,
    IqError,
    IqResult,
    Offline,
    Publish,
    PublishReply,
    PushIq,
    PushOptionsUpdate,
    SessionKey,
    SessionOpened,
    SessionPending,
    SessionResumed,
    SetPush,
    Stanza,
    StanzaToPending,
    UserKey,
    UserRemoved,
)
from pymod_push.python_provider import PythonProviders
from pymod_push.records import DatabaseUnavailable, OutboxEntry, Registration
from pymod_push.store import Store

log = logging.getLogger("pymod_push")

RegistrationKey = tuple[str, str, str, str]
# A message pushed to a pending session comes back (offline, archived) when the session
# ends: at the latest when its resume timeout runs out, counted from when it went pending
# (before its first push), its unacknowledged messages re-routed at once. Its marks are
# kept that long and this much more (for a Python process behind with its events).
PUSHED_RETENTION_MARGIN_S = 600
# ejabberd's mod_stream_mgmt max_ack_queue when the shim does not tell (its default): a
# session holds at most that many unacknowledged stanzas (ejabberd ends it beyond), so
# no more pushed messages of it can come back.
DEFAULT_MAX_ACK_QUEUE = 5000
PURGE_INTERVAL_S = 600
# Publish refs are derived from the outbox entry (ref // REFS_PER_ENTRY is its id), so that
# an answer to a publish of an earlier process, replayed by the shim after a crash, is
# recognized and the notification not sent again.
REFS_PER_ENTRY = 64
# A publish to this process's own app server that could not be taken (the database did
# not answer its device read) goes again this much later.
OWN_RETRY_S = 1.0


# Up to this many marks a session's are scanned (fastest for few), beyond found by bisection.
SCANNED_MARKS = 256
_PACKED = struct.Struct("q")  # a mark as scanned: native, as array("q") holds it


@dataclass(slots=True)
class PushedTo:
    """The marks (pushed_mark) of what a session was pushed since it went pending, at most
    keep of them, the oldest forgotten first. Up to SCANNED_MARKS, packed (8 bytes a mark)
    and scanned; beyond, 12 bytes a mark, found by bisection (a scan took 15 us a push at
    5,000 marks; a set of ints costs about 100 bytes a mark)."""

    # when it went pending (else its first push): the session ends within its resume
    # timeout of that, and what it held is re-routed then
    since: float
    # the marks packed, oldest first, while scanned (None once beyond SCANNED_MARKS)
    scanned: bytearray | None = field(default_factory=bytearray)
    # then the marks in the order pushed; once full, a ring whose oldest is at oldest
    ring: array[int] = field(default_factory=lambda: array("q"))
    oldest: int = 0
    # and the positions in ring, ordered by the mark there
    by_mark: array[int] = field(default_factory=lambda: array("i"))

    def __len__(self) -> int:
        scanned = self.scanned
        return len(self.ring) if scanned is None else len(scanned) // _PACKED.size

    def __contains__(self, mark: int) -> bool:
        if self.scanned is not None:
            return _scan(self.scanned, _PACKED.pack(mark))
        ring, by_mark = self.ring, self.by_mark
        at = bisect_left(by_mark, mark, key=ring.__getitem__)
        return at < len(by_mark) and ring[by_mark[at]] == mark

    def remember(self, mark: int, keep: int) -> bool:
        """Remember mark (False if it is already), forgetting the oldest beyond keep
        (at least 1)."""
        scanned = self.scanned
        if scanned is not None:
            packed = _PACKED.pack(mark)
            if _scan(scanned, packed):
                return False
            scanned += packed
            if len(scanned) > keep * _PACKED.size:
                del scanned[:len(scanned) - keep * _PACKED.size]
            elif len(scanned) > SCANNED_MARKS * _PACKED.size:
                self._index()
            return True
        ring, by_mark = self.ring, self.by_mark
        at = bisect_left(by_mark, mark, key=ring.__getitem__)
        if at < len(by_mark) and ring[by_mark[at]] == mark:
            return False
        if len(ring) != keep and (self.oldest or len(ring) > keep):  # keep changed
            ring, by_mark = self._keep_newest(min(len(ring), keep))
            at = bisect_left(by_mark, mark, key=ring.__getitem__)
        if len(ring) < keep:
            by_mark.insert(at, len(ring))
            ring.append(mark)
            return True
        # full: mark takes the oldest's place (at counted the oldest's mark among those)
        oldest = self.oldest
        gone = bisect_left(by_mark, ring[oldest], key=ring.__getitem__)
        del by_mark[gone]
        by_mark.insert(at - 1 if gone < at else at, oldest)
        ring[oldest] = mark
        self.oldest = oldest + 1 if oldest + 1 < keep else 0
        return True

    def _index(self) -> None:
        """From scanned marks to the ring and its order by mark."""
        assert self.scanned is not None
        self.ring.frombytes(self.scanned)
        self.scanned = None
        self._keep_newest(len(self.ring))

    def _keep_newest(self, count: int) -> tuple[array[int], array[int]]:
        """Only the newest count marks, oldest first from position 0 (rare: when the
        bound changes with the session's registrations)."""
        marks = self.ring[self.oldest:] + self.ring[:self.oldest]
        self.ring = ring = marks[len(marks) - count:]
        self.oldest = 0
        self.by_mark = array("i", sorted(range(count), key=ring.__getitem__))
        return ring, self.by_mark


def _scan(marks: bytearray, mark: bytes) -> bool:
    at = marks.find(mark)
    while at > 0 and at % _PACKED.size:  # found astride two marks: not this one
        at = marks.find(mark, at + 1)
    return at >= 0


_NOTHING = PushedTo(0.0)  # of a session pushed nothing yet (never changed)


@dataclass(slots=True)
class LogicWork:
    """A notification waiting for the admin's async push logic: the port asks the logic
    (PushService.logic_call, Logic.decide) and hands the answers to finish_logic."""

    id: int
    target: SessionKey  # the event's session; resource "": any of the user's (offline)
    stanza: Stanza


# What handling an event gives: actions for ejabberd, deliveries for the providers, and
# notifications that wait for the admin's async push logic.
Result: TypeAlias = Action | Delivery | LogicWork


@dataclass(slots=True)
class LogicCall:
    work: LogicWork
    message: LogicMessage | None  # None: nothing to ask (a carbon of one's own message)
    registrations: list[Registration]
    cases: list[LogicCase]  # one per registration
    options: push_options.PushOptions | None


def _counted(registration: Registration, chosen: Trigger) -> Counts:
    """The registration's counts with this notification."""
    counts = Counts(registration.message_count, registration.subscription_count)
    if chosen is Trigger.SUBSCRIPTION:
        counts.subscriptions += 1
    else:
        counts.messages += 1
    return counts


def _stanza_json(stanza: Stanza) -> str:
    return json.dumps([stanza.kind, stanza.sender, stanza.id, stanza.type, stanza.body,
                       stanza.xml.decode("utf-8", "replace"), stanza.nick, stanza.known])


def _stanza_from_json(text: str) -> Stanza:
    kind, sender, stanza_id, kind_type, body, xml, nick, *known = json.loads(text)
    return Stanza(kind, sender, stanza_id, kind_type, body, xml.encode(), nick,
                  known[0] if known else None)


def _recipient(registration: Registration) -> LogicRecipient:
    return LogicRecipient(*registration.session, _extensions(registration))


def _extensions(registration: Registration) -> ios_extensions.Extensions:
    """The registration's extensions, parsed once and kept with it."""
    parsed = registration.parsed_extensions
    if parsed is None:
        parsed = registration.parsed_extensions = ios_extensions.from_json(
            registration.extensions)
    return parsed


class PushService:
    def __init__(self, config: Config, store: Store, logic: Logic | None = None,
                 max_ack_queue: int = DEFAULT_MAX_ACK_QUEUE) -> None:
        """max_ack_queue: ejabberd's (mod_stream_mgmt), which the hello tells."""
        self.config = config
        self.store = store
        # Outbox ids and publish refs: unique across restarts, so that a late answer to a
        # publish of an earlier process is not taken for one of ours.
        outbox = store.outbox(config.ejabberd_node)
        for entry in outbox:  # the earlier process's attempt: the next one is another IQ
            entry.attempt += 1
        first_id = max([time.time_ns() // 1000, *(e.id + 1 for e in outbox)])
        self._ids = itertools.count(first_id)
        self._in_flight: dict[int, OutboxEntry] = {}
        # Registrations with publish errors counted: a success resets their count.
        self._erring: set[RegistrationKey] = set()
        # Due publishes: new ones, retries, and what an earlier process left unanswered.
        self._retries: list[tuple[float, int, OutboxEntry]] = [(e.due, e.id, e) for e in outbox]
        heapq.heapify(self._retries)
        # Those left unanswered by an earlier process, until sent again or answered (their
        # answer may come late, replayed by the shim: then they are not sent again).
        self._recovered: dict[int, OutboxEntry] = {e.id: e for e in outbox}
        self._answered_late: set[int] = set()
        if outbox:
            log.info("%d notification(s) not answered before the restart will be sent again",
                     len(outbox))
        # Publishes to app servers by outcome, for ejabberdctl push_status.
        self.counters: Counter[str] = Counter()
        self._next_scheduled_wake = store.next_wake(config.ejabberd_node)
        # What was pushed to each session since it went pending: a message that comes back
        # (offline, archived, re-routed to another session) is not pushed again. Logged in
        # the store with ids in time order (microseconds), read back after a restart. At
        # most max_ack_queue messages per session (per registration of it): no more of
        # them can come back.
        self._pushed: dict[SessionKey, PushedTo] = {}
        self.marks_kept = max(1, max_ack_queue)  # messages per session and registration
        self._last_pushed_id = store.last_pushed_id()
        started = time.time()  # later than their first push: kept a little longer, never less
        registrations = Counter(r.session for r in store.pending_on(config.ejabberd_node))
        for session, mark in store.pushed_to_pending(config.ejabberd_node):
            pushed = self._pushed.get(session)
            if pushed is None:
                pushed = self._pushed[session] = PushedTo(started)
            pushed.remember(mark, self.marks_kept * max(1, registrations[session]))
        self.logic = logic or Logic()
        self.logic.budget_s = config.logic_budget_ms / 1000
        self.app_server = AppServer(config, store, logic=self.logic,
                                    python_providers=PythonProviders(config.backends))
        # Notifications waiting for the admin's async push logic, per user, in order.
        self._logic_queues: dict[UserKey, collections.deque[LogicWork]] = {}
        for work_id, target, stanza in store.logic_work(config.ejabberd_node):
            self._logic_queues.setdefault(target[:2], collections.deque()).append(
                LogicWork(work_id, target, _stanza_from_json(stanza)))
            self._ids = itertools.count(max(next(self._ids), work_id + 1))
        self._iq_limit = limits.account_rate_limiter(config.push_iq_rate)
        self._pacer = DomainPacer(config.publish_rate,  # publishes per remote domain
                                  (config.host, *(b.pubsub_host for b in config.backends)))
        # The built-in app server's pubsub hosts, which ejabberd routes to this very process
        # (not the host itself: the shim routes no IQ to that): a publish to one of them is
        # taken in-process (own_publishes), with the IQ path's checks and answers, instead
        # of going out to ejabberd and coming back as an app_server_iq event.
        self._own_pubsub = frozenset(b.pubsub_host for b in config.backends
                                     if b.pubsub_host != config.host)
        self.in_process = 0  # publishes taken so (push_status, metrics)

    def use_logic(self, logic: Logic) -> None:
        """The admin's push logic from now on (push_reload_logic)."""
        logic.budget_s = self.config.logic_budget_ms / 1000
        self.logic = self.app_server.logic = logic

    # ------------------------------------------------------------------ dispatch
    def handle(self, event: Event, now: float) -> Sequence[Action | Delivery | LogicWork]:
        if type(event) is PublishReply:  # its actions are never publishes: nothing to pace
            return self._publish_reply(event, now)
        return self.own_publishes(self._pacer.pace(self._handle(event, now), now), now)

    def own_publishes(self, actions: Sequence[Result], now: float) -> list[Result]:
        """Publishes to this process's own app server become its deliveries, or, refused,
        are answered at once: what the IQ path would do, without the round trip."""
        own = self._own_pubsub
        out: list[Result] = []
        for action in actions:
            if own and type(action) is Publish and action.to.partition("/")[0] in own:
                out += self._take_own(action, now)
            else:
                out.append(action)
        return out

    def _take_own(self, publish: Publish, now: float) -> list[Result]:
        domain = publish.to.partition("/")[0]
        try:
            try:
                delivery = self.app_server.publish_direct(
                    publish.ref, domain, publish.node, publish.fields, publish.publish_options,
                    publish.elements)
            except RequestError as error:
                reply = publish_error_reply(publish.ref, error)
                answered: list[Result] = [*self._publish_reply(reply, now)]
                self.in_process += 1
                return answered
        except DatabaseUnavailable:
            # Not taken: what the event changed stays, and this publish goes again (a
            # retry, not counted) once the database answers; its outbox entry is committed
            # with the event.
            self._retry_soon(publish.ref, now)
            return []
        self.in_process += 1
        return [delivery]

    def _retry_soon(self, ref: int, now: float) -> None:
        entry = self._in_flight.pop(ref, None)
        if entry is not None:
            entry.due = now + OWN_RETRY_S
            heapq.heappush(self._retries, (entry.due, entry.id, entry))

    def _handle(self, event: Event, now: float) -> Sequence[Action | Delivery | LogicWork]:
        match event:  # the two of every push first
            case StanzaToPending(session, stanza):
                registrations, stored = self.store.for_session_with_options(session)
                return self._notify(registrations, stanza, now, self._within_limits(stored),
                                    session)
            case PublishReply():
                return self._publish_reply(event, now)
            case AppServerIq(allowed, xml):
                return self.app_server.handle(allowed, xml)
            case Offline(user, stanza):
                return self._notify(self.store.for_user(user), stanza, now,
                                    target=(*user, ""))
            case SessionPending(session, queued):
                actions: list[Action | LogicWork] = []
                registrations, stored = self.store.for_session_with_options(session)
                if registrations:
                    log.info("push session %s@%s/%s is pending", *session)
                    self._schedule_wake(session, now)
                    # its marks are forgotten soon after this spell's resume timeout ends
                    self._pushed.setdefault(session, PushedTo(now)).since = now
                options = self._within_limits(stored)
                for stanza in queued:
                    actions += self._notify(registrations, stanza, now, options, session)
                return actions
            case SessionResumed(session):
                if self._reset(session):
                    self.store.bind_node(session, self.config.ejabberd_node, None)
                return []
            case SessionOpened(session):
                if not self._reset(session):
                    return []
                self.store.bind_node(session, self.config.ejabberd_node, None)
                # Enabling is persistent (XEP-0357): a reconnecting device stays push-enabled.
                return [SetPush(session, self.config.resume_timeout_ms)]
            case UserRemoved(user):
                for registration in self.store.for_user(user):
                    self._pushed.pop(registration.session, None)
                self.store.delete_user(user)
                self.store.set_user_options(user, None)
                return [PushOptionsUpdate(user, None)]
            case PushIq():
                return self._push_iq(event, now)
            case EjabberdStarted():
                self._wake_after_boot(now)
                return []
        raise TypeError(f"unhandled event {event!r}")

    # ------------------------------------------------------------ enable/disable
    def _push_iq(self, iq: PushIq, now: float) -> list[Action]:
        try:
            limits.check_rate(self._iq_limit, iq.sender[:2], now, "push IQs")
            if not iq.sender[2]:
                raise RequestError("not-allowed", "push is enabled from a client session",
                                   "cancel")
            if iq.type != "set":
                raise RequestError("not-allowed", "push is configured with IQs of type 'set'",
                                   "cancel")
            session = iq.sender
            if iq.to[:2] != session[:2]:
                raise RequestError("forbidden", "push can only be configured for your own "
                                   "account", "auth")
            request = parse_push_request(iq.xml)
            if isinstance(request, Enable):
                return self._enable(iq, session, request)
            return self._disable(iq, session, request)
        except RequestError as error:  # raised before anything is stored
            return [IqError(iq.ref, error.error_type, error.condition, error.text)]

    def _enable(self, iq: PushIq, session: SessionKey, request: Enable) -> list[Action]:
        user = session[:2]
        actions: list[Action] = []
        result = None
        if request.push_options is not None:
            requested = push_options.parse_request(request.push_options)  # may refuse
            others = any(r.resource != session[2] for r in self.store.for_user(user))
            accepted = push_options.accept(self.options_of(user), requested, others,
                                           self.config)
            self.store.set_user_options(user, accepted)
            actions.append(PushOptionsUpdate(user, accepted.fields()))
            result = accepted.form_xml()
        publish_options = request.publish_options.to_xml() if request.publish_options else None
        extensions = request.extensions.to_json() \
            if request.extensions and self.config.ios_extensions else ""
        registration = Registration(*session, request.jid, request.node, publish_options,
                                    extensions=extensions)
        if self.store.get(registration.key) is None:  # re-enabling does not count
            limits.check_count(self.store.registration_count(user),
                               self.config.max_registrations, "push registrations",
                               "max_registrations")
        # Only this registration is written (bound to this node, not pending): the
        # session's others were bound when it opened, so an enable costs the same
        # however many the account holds.
        self.store.enable(registration, self.config.ejabberd_node)
        names = ios_extensions.from_json(extensions).names() if extensions else []
        log.info("push enabled for %s/%s at %s%s", session[0], session[2], request.jid,
                 f" (extensions: {' '.join(names)})" if names else "")
        return [*actions, SetPush(session, self.config.resume_timeout_ms),
                IqResult(iq.ref, result)]

    def options_of(self, user: UserKey) -> push_options.PushOptions:
        """A user's push options (the server's defaults if never set), within the limits."""
        return self._within_limits(self.store.user_options(user))

    def _within_limits(self, stored: push_options.PushOptions | None
                       ) -> push_options.PushOptions:
        if stored is None:
            return push_options.defaults(self.config)
        return push_options.within_limits(stored, self.config)

    def initial_actions(self) -> list[Action]:
        """What the shim must know after a (re)start: the options forms disco#info shows."""
        defaults = push_options.defaults(self.config)
        return [PushOptionsUpdate(None, defaults.fields()),
                *(PushOptionsUpdate(user, push_options.within_limits(o, self.config).fields())
                  for user, o in self.store.all_user_options())]

    def forget(self, removed: list[Registration]) -> list[Action]:
        """Registrations an admin deleted: a session left with none is no longer a push one."""
        actions: list[Action] = []
        for session in {r.session for r in removed}:
            if not self.store.for_session(session):
                actions.append(SetPush(session, None))
        return actions

    def _disable(self, iq: PushIq, session: SessionKey, request: Disable) -> list[Action]:
        removed = self.store.disable(session[:2], request.jid, request.node)
        actions: list[Action] = []
        for affected in {r.session for r in removed} | {session}:
            if not self.store.for_session(affected):
                actions.append(SetPush(affected, None))
        log.info("push disabled for %s/%s at %s (%d registrations)", session[0], session[2],
                 request.jid, len(removed))
        return [*actions, IqResult(iq.ref)]

    # ------------------------------------------------------------- notifying
    def _notify(self, registrations: list[Registration], original: Stanza, now: float,
                options: push_options.PushOptions | None = None,
                target: SessionKey | None = None) -> list[Action | LogicWork]:
        """Publish the stanza to each registration (all of one user) that it concerns;
        the user's options are read here unless the caller has them. With async push
        logic, the decision waits for it instead (a LogicWork for the port, see
        logic_call); target is then what the event was for (resource "": any session)."""
        stanza = unwrap_carbon(original, registrations[0].session[:2]) if registrations else None
        trigger = trigger_of(stanza, self.config) if stanza else None
        if stanza is None or (trigger is None and not self.logic.has("should_push")
                              and not (stanza.type == "groupchat"
                                       and any(r.extensions for r in registrations))):
            return []
        mark = fingerprint(stanza)
        if self.logic.is_async:
            return self._wait_for_logic(registrations, original, mark,
                                        target or (*registrations[0].session[:2], ""))
        message = self._logic_view(stanza, trigger) if self.logic.module else None
        if options is None:  # read before anything changes (a read may fail: handled again)
            options = self.options_of(registrations[0].session[:2])
        actions: list[Action | LogicWork] = []
        for registration in registrations:
            chosen = self._filtered(registration, stanza, trigger)
            if message is not None:
                if not self.logic.should_push(message, _recipient(registration),
                                              chosen is not None):
                    continue
                chosen = chosen or trigger or Trigger.MESSAGE
            if chosen is None:
                continue
            publish = self._push_once(registration, registrations, stanza, chosen, mark,
                                      options, now, message)
            if publish is not None:
                actions.append(publish)
        return actions

    def _filtered(self, registration: Registration, stanza: Stanza,
                  trigger: Trigger | None) -> Trigger | None:
        """The trigger for this registration, after the filters its client asked for
        (Tigase's muted, groupchat and ignore-unknown): a client's group chat rules
        decide on group chat messages instead of option notify_groupchat (unless it
        is never)."""
        if not registration.extensions:
            return trigger
        extensions = _extensions(registration)
        if extensions.groupchat is not None and stanza.kind == "message" \
                and stanza.type == "groupchat" and trigger is not Trigger.CALL:
            trigger = Trigger.MESSAGE if groupchat_candidate(stanza, self.config) else None
        if trigger is None:
            return None
        event = extension_event(stanza, trigger is Trigger.CALL)
        user_jid = f"{registration.user}@{registration.server}"
        return trigger if ios_extensions.allowed(extensions, event, user_jid) else None

    @staticmethod
    def _encrypted(registration: Registration) -> bool:
        return bool(registration.extensions) and \
            _extensions(registration).encrypt is not None

    def _extended(self, registration: Registration, summary: list[tuple[str, str]],
                  stanza: Stanza, chosen: Trigger, counts: Counts) -> list[tuple[str, str]]:
        """The notification with the elements the registration's client asked for: with
        <encrypt/>, the payload encrypted with its key instead of the summary form (which
        would show in clear what only the device should read); <priority/>; <jingle/>
        for a call. The sender and body are in the encrypted payload unless the admin's
        allow_senders / allow_message_bodies withhold them."""
        extensions = _extensions(registration)
        event = extension_event(stanza, chosen is Trigger.CALL)
        voip = chosen is Trigger.CALL
        elements: list[str] = []
        if extensions.encrypt is not None:
            data = ios_extensions.payload(event, counts.messages, self.config.allow_senders,
                                          self.config.allow_message_bodies)
            plaintext = ios_extensions.fit_payload(data, extensions.encrypt.max_size, voip)
            elements.append(ios_extensions.encrypt(
                extensions.encrypt.key, os.urandom(ios_extensions.IV_BYTES), plaintext, voip))
            summary = []
        if extensions.priority:
            elements.append(ios_extensions.priority_element(ios_extensions.is_important(event)))
        if extensions.jingle and voip:
            elements.append(ios_extensions.jingle_element(*ios_extensions.call_media(stanza.xml)))
        return [*summary, *ios_extensions.element_pairs(elements)]

    def _push_once(self, registration: Registration, read_with: Iterable[Registration],
                   stanza: Stanza, chosen: Trigger, mark: bytes,
                   options: push_options.PushOptions, now: float,
                   message: LogicMessage | None,
                   summary: list[tuple[str, str]] | None = None) -> Publish | None:
        """The publish for one registration, unless this message went to it already;
        read_with: the registrations read with it (all of its session's, which the bound on
        its marks counts: no read of them per push); summary: the admin's async summary,
        already made (else made here)."""
        # Once per message and registration, whichever way the message comes (to the
        # pending session, again as offline or archived), across restarts.
        session = registration.session
        pushed = self._pushed.get(session)
        if pushed is None:
            pushed = self._pushed[session] = PushedTo(now)
        keep = self.marks_kept
        if len(pushed) >= keep:  # a long pending session: as many per registration of it
            keep *= max(1, sum(r.session == session for r in read_with))
        this = pushed_mark(registration.key, mark)
        if not pushed.remember(this, keep):
            return None
        self.store.add_pushed(self._pushed_id(now), session, this)
        counts = _counted(registration, chosen)
        registration.message_count = counts.messages
        registration.subscription_count = counts.subscriptions
        self.store.save_counts(registration)
        if summary is None:
            summary = summary_fields(options, counts, chosen, stanza)
            if message is not None and not self._encrypted(registration):
                summary = self.logic.summary(message, _recipient(registration), summary)
        if registration.extensions:
            summary = self._extended(registration, summary, stanza, chosen, counts)
        return self._publish(registration, summary, now)

    # ------------------------------------------------------- async push logic
    # Each user's notifications wait for the admin's async functions one after the
    # other (never reordered), other users' do not wait for them. The event is
    # acknowledged with the waiting notification's row (hook_queue): a crash meanwhile
    # loses nothing, the next process finishes it.
    def _wait_for_logic(self, registrations: list[Registration], original: Stanza,
                        mark: bytes, target: SessionKey) -> list[Action | LogicWork]:
        if all(pushed_mark(r.key, mark) in self._pushed.get(r.session, _NOTHING)
               for r in registrations):
            return []  # came back (offline, archived): pushed already
        work = LogicWork(next(self._ids), target, original)
        self.store.add_logic_work(work.id, target, _stanza_json(original),
                                 self.config.ejabberd_node)
        queue = self._logic_queues.setdefault(target[:2], collections.deque())
        queue.append(work)
        return [work] if len(queue) == 1 else []  # else the user's worker runs already

    def waiting_for_logic(self, user: UserKey) -> LogicWork | None:
        """The user's next notification waiting for the admin's async functions."""
        queue = self._logic_queues.get(user)
        return queue[0] if queue else None

    def users_waiting_for_logic(self) -> list[UserKey]:
        return [user for user, queue in self._logic_queues.items() if queue]

    def logic_call(self, work: LogicWork) -> LogicCall:
        """What the admin's functions are asked about work (as it stands now)."""
        stanza = unwrap_carbon(work.stanza, work.target[:2])
        trigger = trigger_of(stanza, self.config) if stanza else None
        if work.target[2]:
            registrations, stored = self.store.for_session_with_options(work.target)
            options = self._within_limits(stored)
        else:
            registrations = self.store.for_user(work.target[:2])
            options = self.options_of(work.target[:2])
        if stanza is None:
            registrations = []
        cases = []
        for registration in registrations:
            chosen = trigger or Trigger.MESSAGE
            fields = summary_fields(options, _counted(registration, chosen), chosen,
                                    stanza) if stanza else []
            default = stanza is not None and self._filtered(registration, stanza,
                                                            trigger) is not None
            cases.append(LogicCase(_recipient(registration), default, fields))
        message = self._logic_view(stanza, trigger) if stanza else None
        return LogicCall(work, message, registrations, cases, options)

    def finish_logic(self, call: LogicCall,
                     answers: Sequence[tuple[bool, list[tuple[str, str]] | None]],
                     now: float) -> list[Action | Delivery]:
        """The admin's answers for call (or the defaults): the publishes they make (those
        to its own app server taken in-process)."""
        work = call.work
        current = {r.key: r for r in (self.store.for_session(work.target) if work.target[2]
                                      else self.store.for_user(work.target[:2]))}
        queue = self._logic_queues.get(work.target[:2])  # after the read, which may fail
        if queue and queue[0] is work:
            queue.popleft()
        self.store.remove_logic_work(work.id)
        stanza = unwrap_carbon(work.stanza, work.target[:2])
        if stanza is None or call.options is None:
            return []
        trigger = trigger_of(stanza, self.config)
        actions: list[Action] = []
        mark = fingerprint(stanza)
        for asked, (push, summary) in zip(call.registrations, answers, strict=True):
            registration = current.get(asked.key)  # disabled meanwhile: gone
            if not push or registration is None:
                continue
            publish = self._push_once(registration, current.values(), stanza,
                                      trigger or Trigger.MESSAGE, mark, call.options, now,
                                      None, summary)
            if publish is not None:
                actions.append(publish)
        return self._own(self._pacer.pace(actions, now), now)

    def _own(self, actions: Sequence[Action], now: float) -> list[Action | Delivery]:
        return [r for r in self.own_publishes(actions, now) if not isinstance(r, LogicWork)]

    @staticmethod
    def _logic_view(stanza: Stanza, trigger: Trigger | None) -> LogicMessage:
        return LogicMessage(stanza.kind, stanza.type, stanza.sender, stanza.body,
                            is_encrypted(stanza), trigger is Trigger.CALL,
                            stanza.xml.decode("utf-8", "replace"))

    def _publish(self, registration: Registration, summary: list[tuple[str, str]],
                 now: float) -> Publish:
        """A new notification: in the outbox (committed with this batch) until answered."""
        summary = limits.bound_summary(summary, self.config.max_body_length)
        entry = OutboxEntry(next(self._ids), registration.key, summary, 0, now)
        self.store.add_outbox(entry, self.config.ejabberd_node)
        self.counters["published"] += 1
        if self.config.log_sensitive:  # the admin asked for it (option log_sensitive)
            log.debug("publishing to %s node %s: %s", registration.push_jid, registration.node,
                      summary)
        return self._send(entry, registration)

    def _send(self, entry: OutboxEntry, registration: Registration) -> Publish:
        # One ref per attempt (each is its own IQ), derived from the entry's id.
        ref = entry.id * REFS_PER_ENTRY + min(entry.attempt, REFS_PER_ENTRY - 1)
        self._in_flight[ref] = entry
        self._recovered.pop(entry.id, None)
        if registration.errors:
            self._erring.add(registration.key)
        options = registration.publish_form
        if options is None and registration.publish_options:  # the registration's first
            options = registration.publish_form = publish_options_form(
                registration.publish_options)
        fields, elements = ios_extensions.split(entry.summary)
        return Publish(ref, registration.push_jid, registration.node,
                       summary_form(fields) if fields or not elements else (),
                       options, self.config.publish_timeout_ms, tuple(elements))

    def _reset(self, session: SessionKey) -> bool:
        """Counts start again when the client is back; True if the session has push."""
        registrations = self.store.for_session(session)
        if registrations:
            self.store.reset_counts(session)
        self._pushed.pop(session, None)  # its log rows are no longer read (pending_since)
        return bool(registrations)

    # --------------------------------------------------------- app server replies
    def _publish_reply(self, reply: PublishReply, now: float) -> list[Action]:
        publish = self._in_flight.get(reply.ref)
        outcome = classify_reply(reply.outcome, reply.error_type, reply.condition)
        if publish is None:
            recovered = self._recovered.pop(reply.ref // REFS_PER_ENTRY, None)
            if recovered is not None and outcome is PublishOutcome.DELIVERED:
                # Delivered before the crash, answered after it: not to be sent again.
                self.store.remove_outbox(recovered.id)
                self._answered_late.add(recovered.id)
                self.counters[outcome.value] += 1
            return []
        # Read before anything changes: a read may fail (database away), and the reply is
        # then handled again.
        registration = None if outcome is PublishOutcome.DELIVERED else self.store.get(
            publish.registration)
        del self._in_flight[reply.ref]
        if outcome is PublishOutcome.DELIVERED:  # the common case: two writes, nothing to read
            self.store.remove_outbox(publish.id)
            if publish.registration in self._erring:
                self._erring.discard(publish.registration)
                self.store.clear_errors(publish.registration)
            self.counters[outcome.value] += 1
            return []
        if registration is None:  # disabled meanwhile
            self.store.remove_outbox(publish.id)
            return []
        self.counters[outcome.value] += 1
        where = f"{registration.user}/{registration.resource} at {registration.push_jid}"
        why = f"{reply.error_type} {reply.condition}" if reply.outcome == "error" else "no answer"
        limit = self.config.max_publish_errors
        counted_at: float | None
        if outcome is PublishOutcome.GONE:  # the app server has no such node (any more)
            errors, counted_at = limit, now
        else:
            errors, counted_at = count_error(outcome, registration.errors,
                                             registration.last_error_at, now,
                                             self.config.publish_error_window_ms / 1000)
        if errors >= limit:
            self.store.remove_outbox(publish.id)
            for _, _, waiting in self._retries:  # its retries: gone with it (tick skips them)
                if waiting.registration == registration.key:
                    self.store.remove_outbox(waiting.id)
            self.store.delete(registration.key)
            self._erring.discard(registration.key)
            log.warning("push disabled for %s after %d error(s) from the app server (last: %s)",
                        where, errors, why)
            return [] if self.store.for_session(registration.session) else [
                SetPush(registration.session, None)]
        if errors != registration.errors:
            self.store.set_errors(registration.key, errors, counted_at)
            self._erring.add(registration.key)
            if outcome is PublishOutcome.NOT_AN_APP_SERVER:
                log.warning("push to %s failed (%s: no app server there?): error %d of %d",
                            where, why, errors, limit)
            else:
                log.warning("push to %s failed (%s): error %d of %d (more within %d s count "
                            "once)", where, why, errors, limit,
                            self.config.publish_error_window_ms // 1000)
        delays = self.config.retry_delays_ms
        if publish.attempt < len(delays):
            publish.due = now + delays[publish.attempt] / 1000
            publish.attempt += 1
            self.store.update_outbox(publish)
            heapq.heappush(self._retries, (publish.due, publish.id, publish))
            log.debug("push to %s not delivered (%s); retry %d in %d ms", where, why,
                      publish.attempt, delays[publish.attempt - 1])
        else:
            self.store.remove_outbox(publish.id)
            self.counters["given_up"] += 1
            log.warning("push to %s not delivered after %d attempts (%s); giving up", where,
                        publish.attempt + 1, why)
        return []

    # ------------------------------------------------------------------ wakes
    def _schedule_wake(self, session: SessionKey, now: float) -> None:
        """Wake a pending device once before its resume timeout runs out, so that it
        reconnects instead of losing its session."""
        timeout, early = self.config.resume_timeout_ms, self.config.wake_before_timeout_ms
        due = now + (timeout - early) / 1000 if 0 < early < timeout else None
        self.store.bind_node(session, self.config.ejabberd_node, due,
                             pending_since=self._pushed_id(now))
        if due is not None and (self._next_scheduled_wake is None
                                or due < self._next_scheduled_wake):
            self._next_scheduled_wake = due

    def _wake_after_boot(self, now: float) -> None:
        """ejabberd restarted: every session it had is gone, pending ones included, so
        the devices of this node's push users are woken to connect again. The wakes are
        marked in the database and sent wake_rate a second (tick): memory stays flat
        however many there are, and a crash does not lose them."""
        wake_at = now if self.config.wake_on_start else None
        count = self.store.sessions_gone(self.config.ejabberd_node, wake_at)
        self._next_scheduled_wake = wake_at if count else None
        if wake_at is not None:
            log.info("ejabberd started: waking %d push registration(s), %d per second",
                     count, self.config.wake_rate)

    def wake(self, registration: Registration, now: float) -> Publish:
        """A push that only makes the device connect (ejabberdctl push_test too)."""
        self.counters["woken"] += 1
        return self._wake(registration, now)

    def _wake(self, registration: Registration, now: float) -> Publish:
        options = self.options_of(registration.session[:2])
        counts = Counts(registration.message_count, registration.subscription_count)
        fields = wake_fields(options, counts)
        if _extensions(registration).priority:
            fields += ios_extensions.element_pairs([ios_extensions.priority_element(False)])
        return self._publish(registration, fields, now)

    # ------------------------------------------------------------------ timers
    def _pushed_id(self, now: float) -> int:
        """Ids of the pushed log: unique, increasing, and microseconds of the time."""
        self._last_pushed_id = max(self._last_pushed_id + 1, int(now * 1_000_000))
        return self._last_pushed_id

    def forget_old_marks(self, now: float) -> int:
        """Marks of pushed messages that cannot come back any more (every PURGE_INTERVAL_S):
        the session's resume timeout, from when it went pending (or its first push), has
        ended by then, and what it held was re-routed. How many log rows were deleted."""
        cutoff = now - self.config.resume_timeout_ms / 1000 - PUSHED_RETENTION_MARGIN_S
        for session in [s for s, pushed in self._pushed.items() if pushed.since < cutoff]:
            del self._pushed[session]
        return self.store.purge_pushed(int(cutoff * 1_000_000))

    def next_deadline(self) -> float | None:
        deadlines = [d for d in (self._retries[0][0] if self._retries else None,
                                 self._next_scheduled_wake, self._pacer.next_deadline())
                     if d is not None]
        return min(deadlines, default=None)

    def tick(self, now: float) -> list[Action | Delivery]:
        """Send the retries and wakes that are due, and what the pacer held back."""
        actions: list[Action] = []
        while self._retries and self._retries[0][0] <= now:
            registration = self.store.get(self._retries[0][2].registration)  # may fail
            _, _, publish = heapq.heappop(self._retries)
            if publish.id in self._answered_late:
                self._answered_late.discard(publish.id)
                continue
            if registration is None:
                self.store.remove_outbox(publish.id)
            else:
                actions.append(self._send(publish, registration))
        if self._next_scheduled_wake is not None and self._next_scheduled_wake <= now:
            rate = self.config.wake_rate  # at most this many a second
            due = self.store.due_wakes(self.config.ejabberd_node, now, rate)
            for registration in due:
                self.store.clear_wake(registration.key)
                log.debug("waking %s/%s", registration.user, registration.resource)
                actions.append(self._wake(registration, now))
            self._next_scheduled_wake = (now + 1.0 if len(due) == rate
                                         else self.store.next_wake(self.config.ejabberd_node))
        return [*self._pacer.due(now), *self._own(self._pacer.pace(actions, now), now)]
