"""The push service: events in, actions out.

No I/O of its own besides the store it is given; time comes in as arguments,
so tests drive it directly. The port loop (port.py) feeds it events, commits the
store and writes the returned actions back to ejabberd.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import TypeAlias

from pymod_push.appserver.server import AppServer, Delivery, publish_error_reply
from pymod_push.core import calls, ios_extensions, limits
from pymod_push.core import user_options as push_options
from pymod_push.core.config import Config
from pymod_push.core.notify import (
    Counts,
    Trigger,
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
)
from pymod_push.core.xmpp import RequestError
from pymod_push.logic import Logic, LogicCase
from pymod_push.logic import Message as LogicMessage
from pymod_push.logic import Recipient as LogicRecipient
from pymod_push.protocol import (
    Action,
    AppServerIq,
    Bookmarks,
    EjabberdStarted,
    Event,
    IqError,
    IqResult,
    MucMessage,
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
    UpPost,
    UpPresence,
    UpRegister,
    UpReply,
    UserKey,
    UserRemoved,
)
from pymod_push.python_provider import PythonProviders
from pymod_push.records import DatabaseUnavailable, Registration
from pymod_push.service.calls import RingingCalls
from pymod_push.service.groupchat import GroupchatPushes
from pymod_push.service.ledger import Ledger
from pymod_push.service.logic_work import LogicCall, LogicQueue, LogicWork
from pymod_push.service.pushed import NOTHING, PushedTo
from pymod_push.service.unifiedpush import UnifiedPush
from pymod_push.store import Store

log = logging.getLogger("pymod_push")

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


# What handling an event gives: actions for ejabberd, deliveries for the providers, and
# notifications that wait for the admin's async push logic.
Result: TypeAlias = Action | Delivery | LogicWork


def _counted(registration: Registration, chosen: Trigger) -> Counts:
    """The registration's counts with this notification."""
    counts = Counts(registration.message_count, registration.subscription_count)
    if chosen is Trigger.SUBSCRIPTION:
        counts.subscriptions += 1
    else:
        counts.messages += 1
    return counts


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
        self.ledger = Ledger(config, store)
        self.counters = self.ledger.counters  # publishes by outcome (push_status)
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
        self._logic_queue = LogicQueue(store, config.ejabberd_node, self.ledger)
        self._pacer = DomainPacer(config.publish_rate,  # publishes per remote domain
                                  (config.host, *(b.pubsub_host for b in config.backends)))
        # The built-in app server's pubsub hosts, which ejabberd routes to this very process
        # (not the host itself: the shim routes no IQ to that): a publish to one of them is
        # taken in-process (own_publishes), with the IQ path's checks and answers, instead
        # of going out to ejabberd and coming back as an app_server_iq event.
        self._own_pubsub = frozenset(b.pubsub_host for b in config.backends
                                     if b.pubsub_host != config.host)
        self.in_process = 0  # publishes taken so (push_status, metrics)
        # Calls ringing: which devices each call's urgent push reached (service/calls.py)
        self.ringing = RingingCalls()
        # Absent room members (service/groupchat.py): coalescing, bookmarks' settings
        self.groupchat = GroupchatPushes(
            config, store, self.options_of,
            lambda r, read_with, stanza, chosen, mark, options, now, summary:
            self._push_once(r, read_with, stanza, chosen, mark, options, now, None, summary))
        # UnifiedPush endpoints and their kept pushes (service/unifiedpush.py); a kept push
        # wakes the user's XEP-0357 devices through this service's publishes
        self.unified_push = UnifiedPush(config, store, self._unified_push_wake)

    def use_logic(self, logic: Logic) -> None:
        """The admin's push logic from now on (push_reload_logic)."""
        logic.budget_s = self.config.logic_budget_ms / 1000
        self.logic = self.app_server.logic = logic

    # ------------------------------------------------------------------ dispatch
    def handle(self, event: Event, now: float) -> Sequence[Action | Delivery | LogicWork]:
        if type(event) is PublishReply:  # its actions are never publishes: nothing to pace
            return self.ledger.answer(event, now)
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
                answered: list[Result] = [*self.ledger.answer(reply, now)]
                self.in_process += 1
                return answered
        except DatabaseUnavailable:
            # Not taken: what the event changed stays, and this publish goes again (a
            # retry, not counted) once the database answers; its outbox entry is committed
            # with the event.
            self.ledger.retry_soon(publish.ref, now)
            return []
        self.in_process += 1
        return [delivery]

    def _handle(self, event: Event, now: float) -> Sequence[Action | Delivery | LogicWork]:
        match event:  # the two of every push first
            case StanzaToPending(session, stanza):
                registrations, stored = self.store.for_session_with_options(session)
                return self._notify(registrations, stanza, now, self._within_limits(stored),
                                    session)
            case PublishReply():
                return self.ledger.answer(event, now)
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
                # also sent for UnifiedPush users who are not push-enabled
                return self.unified_push.back(session, now, queued="delivered", send=True)
            case SessionOpened(session):  # also a resumption's first event (then resumed)
                resolved = self.unified_push.back(session, now, queued=None, send=False)
                registrations = self._reset(session)
                if not registrations:
                    return resolved
                self.store.bind_node(session, self.config.ejabberd_node, None)
                # Enabling is persistent (XEP-0357): a reconnecting device stays push-enabled.
                return [*resolved, self._push_on(session, registrations)]
            case UpReply():
                return self.unified_push.reply(event, now)
            case UpPost():
                return self.unified_push.post(event, now)
            case UpPresence(session):
                return self.unified_push.back(session, now, queued="kept", send=True)
            case UpRegister():
                return self.unified_push.register(event, now)
            case UserRemoved(user):
                for registration in self.store.for_user(user):
                    self._pushed.pop(registration.session, None)
                self.store.delete_user(user)
                self.store.set_user_options(user, None)
                return [PushOptionsUpdate(user, None), *self.unified_push.user_removed(user)]
            case MucMessage():
                return self.groupchat.handle(event, now)
            case Bookmarks():
                self.groupchat.bookmarks_event(event)
                return []
            case PushIq():
                return self._push_iq(event)
            case EjabberdStarted():
                self._wake_after_boot(now)
                self.unified_push.ejabberd_started()
                return []
        raise TypeError(f"unhandled event {event!r}")

    # ------------------------------------------------------------ enable/disable
    def _push_iq(self, iq: PushIq) -> list[Action]:
        try:  # push_iq_rate: the shim counted this IQ and answered those over the rate
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
        return [*actions, self._push_on(session, self.store.for_session(session)),
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
        if registrations and calls.NS_JMI.encode() in original.xml:
            end = calls.call_end(original, registrations[0].session[:2])
            if end is not None:  # never an ordinary push: a stop push where it rang
                return list(self._stop_ringing(registrations[0].session[:2], end, now))
        stanza = unwrap_carbon(original, registrations[0].session[:2]) if registrations else None
        trigger = self._trigger(stanza, now) if stanza else None
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
                if chosen is Trigger.CALL:
                    self._rang(registration, stanza, now)
        return actions

    # ------------------------------------------------------------------- calls
    def _trigger(self, stanza: Stanza, now: float) -> Trigger | None:
        """trigger_of, and a call proposal older than the ring window a missed call."""
        trigger = trigger_of(stanza, self.config)
        if trigger is Trigger.CALL and calls.is_stale(stanza.xml, now,
                                                      self.config.call_ring_window_ms / 1000):
            return Trigger.MISSED_CALL
        return trigger

    def _rang(self, registration: Registration, stanza: Stanza, now: float) -> None:
        """A call's urgent push went to registration: its end stops it (_stop_ringing)."""
        sid = ios_extensions.call_media(stanza.xml)[0]
        until = calls.sent_at(stanza.xml, now) + self.config.call_ring_window_ms / 1000
        self.ringing.rang(registration.user_key, sid, calls.bare(stanza.sender),
                          registration.key, until, now)

    def _stop_ringing(self, user: UserKey, end: calls.CallEnd, now: float) -> list[Publish]:
        """One push to each device the call rang on (within its window), never VoIP nor
        urgent: its summary says the call ended (core/calls.end_fields)."""
        devices = self.ringing.ended(user, end, now)
        if not devices:
            return []
        current = {r.key: r for r in self.store.for_user(user)}
        publishes = [self.ledger.publish(current[key], calls.end_fields(end), now)
                     for key in sorted(devices) if key in current]
        log.info("call of %s@%s ended (%s): %d stop push(es)", *user, end.reason,
                 len(publishes))
        return publishes

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
        return self.ledger.publish(registration, summary, now)

    # ------------------------------------------------------- async push logic
    # Each user's notifications wait for the admin's async functions one after the
    # other (never reordered), other users' do not wait for them. The event is
    # acknowledged with the waiting notification's row (hook_queue): a crash meanwhile
    # loses nothing, the next process finishes it.
    def _wait_for_logic(self, registrations: list[Registration], original: Stanza,
                        mark: bytes, target: SessionKey) -> list[Action | LogicWork]:
        if all(pushed_mark(r.key, mark) in self._pushed.get(r.session, NOTHING)
               for r in registrations):
            return []  # came back (offline, archived): pushed already
        work = self._logic_queue.add(target, original)
        return [work] if self._logic_queue.first(target[:2]) is work else []  # else it runs

    def waiting_for_logic(self, user: UserKey) -> LogicWork | None:
        """The user's next notification waiting for the admin's async functions."""
        return self._logic_queue.first(user)

    def users_waiting_for_logic(self) -> list[UserKey]:
        return self._logic_queue.users()

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
        self._logic_queue.done(work)  # after the read, which may fail
        stanza = unwrap_carbon(work.stanza, work.target[:2])
        if stanza is None or call.options is None:
            return []
        trigger = self._trigger(stanza, now)
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
                if trigger is Trigger.CALL:
                    self._rang(registration, stanza, now)
        return self._own(self._pacer.pace(actions, now), now)

    def _own(self, actions: Sequence[Action], now: float) -> list[Action | Delivery]:
        return [r for r in self.own_publishes(actions, now) if not isinstance(r, LogicWork)]

    @staticmethod
    def _logic_view(stanza: Stanza, trigger: Trigger | None) -> LogicMessage:
        return LogicMessage(stanza.kind, stanza.type, stanza.sender, stanza.body,
                            is_encrypted(stanza), trigger is Trigger.CALL,
                            stanza.xml.decode("utf-8", "replace"))

    def _reset(self, session: SessionKey) -> list[Registration]:
        """Counts start again when the client is back; the session's registrations."""
        registrations = self.store.for_session(session)
        if registrations:
            self.store.reset_counts(session)
        self._pushed.pop(session, None)  # its log rows are no longer read (pending_since)
        return registrations

    def _push_on(self, session: SessionKey, registrations: list[Registration]) -> SetPush:
        """The session push-enabled; the shim attaches the sender's roster item (a lookup
        in ejabberd per stanza) only if a registration reads it: Tigase's ignore-unknown."""
        roster = any(_extensions(r).ignore_unknown for r in registrations if r.extensions)
        return SetPush(session, self.config.resume_timeout_ms, roster)

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

    def _unified_push_wake(self, user: UserKey, now: float) -> list[Publish]:
        """A UnifiedPush push was kept: each of the user's XEP-0357 registrations gets a
        wake counted as a message (as a chat message would; nothing about the push)."""
        publishes = []
        for registration in self.store.for_user(user):
            registration.message_count += 1
            self.store.save_counts(registration)
            publishes.append(self.wake(registration, now))
        return publishes

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
        return self.ledger.publish(registration, fields, now)

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

    def expire_unified_push(self, now: float) -> list[Action]:
        """UnifiedPush pushes and endpoints whose time is over (with forget_old_marks)."""
        return self.unified_push.expire(now)

    def next_deadline(self) -> float | None:
        deadlines = [d for d in (self.ledger.next_due(), self.groupchat.next_deadline(),
                                 self._next_scheduled_wake, self._pacer.next_deadline())
                     if d is not None]
        return min(deadlines, default=None)

    def tick(self, now: float) -> list[Action | Delivery]:
        """Send the retries and wakes that are due, and what the pacer held back."""
        actions: list[Action] = [*self.ledger.due(now), *self.groupchat.due(now)]
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
