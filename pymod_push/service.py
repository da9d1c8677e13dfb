"""The push service: events in, actions out.

No I/O of its own besides the store it is given; time comes in as arguments,
so tests drive it directly. The port loop (port.py) feeds it events, commits the
store and writes the returned actions back to ejabberd.
"""

from __future__ import annotations

import heapq
import itertools
import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from .appservice import AppServer, Delivery
from .core import options as push_options
from .core.config import Config
from .core.notify import (
    Counts,
    Outcome,
    Trigger,
    classify_reply,
    fingerprint,
    summary_fields,
    trigger_of,
    unwrap_carbon,
)
from .core.xep0357 import Disable, Enable, RequestError, parse_push_request, publish_iq
from .protocol import (
    Action,
    AppServerIq,
    Event,
    IqError,
    IqResult,
    Offline,
    PublishReply,
    PushIq,
    PushOptionsUpdate,
    RouteIq,
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
from .store import Registration, Store

log = logging.getLogger("pymod_push")

RegistrationKey = tuple[str, str, str, str]
SEEN_PER_REGISTRATION = 256


@dataclass(slots=True)
class Publish:
    """One notification on its way to an app server (kept for retries)."""

    registration: RegistrationKey
    summary: list[tuple[str, str]]
    attempt: int = 0


class PushService:
    def __init__(self, config: Config, store: Store) -> None:
        self.config = config
        self.store = store
        self._refs = itertools.count(1)
        self._in_flight: dict[int, Publish] = {}
        self._retries: list[tuple[float, int, Publish]] = []  # heap of (due, seq, publish)
        # Messages already pushed per registration, so that the same message
        # re-routed to offline storage or the archive does not push again.
        self._seen: dict[RegistrationKey, OrderedDict[bytes, None]] = {}
        self.app_server = AppServer(config, store)

    # ------------------------------------------------------------------ dispatch
    def handle(self, event: Event, now: float) -> Sequence[Action | Delivery]:
        match event:
            case AppServerIq(allowed, xml):
                return self.app_server.handle(allowed, xml)
            case StanzaToPending(session, stanza):
                return self._notify(self.store.for_session(session), stanza)
            case Offline(user, stanza):
                return self._notify(self.store.for_user(user), stanza)
            case SessionPending(session, queued):
                actions: list[Action] = []
                registrations = self.store.for_session(session)
                if registrations:
                    log.info("push session %s@%s/%s is pending", *session)
                for stanza in queued:
                    actions += self._notify(registrations, stanza)
                return actions
            case SessionResumed(session):
                self._reset(session)
                return []
            case SessionOpened(session):
                if not self._reset(session):
                    return []
                # Enabling is persistent (XEP-0357): a reconnecting device stays push-enabled.
                return [SetPush(session, self.config.resume_timeout_ms)]
            case UserRemoved(user):
                for registration in self.store.for_user(user):
                    self._seen.pop(registration.key, None)
                self.store.delete_user(user)
                self.store.set_user_options(user, None)
                return [PushOptionsUpdate(user, None)]
            case PushIq():
                return self._push_iq(event)
            case PublishReply():
                return self._publish_reply(event, now)
        raise TypeError(f"unhandled event {event!r}")

    # ------------------------------------------------------------ enable/disable
    def _push_iq(self, iq: PushIq) -> list[Action]:
        try:
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
        registration = Registration(*session, request.jid, request.node, publish_options)
        self.store.enable(registration)
        self._seen.pop(registration.key, None)
        log.info("push enabled for %s/%s at %s", session[0], session[2], request.jid)
        return [*actions, SetPush(session, self.config.resume_timeout_ms),
                IqResult(iq.ref, result)]

    def options_of(self, user: UserKey) -> push_options.PushOptions:
        """A user's push options (the server's defaults if never set), within the limits."""
        stored = self.store.user_options(user)
        if stored is None:
            return push_options.defaults(self.config)
        return push_options.within_limits(stored, self.config)

    def initial_actions(self) -> list[Action]:
        """What the shim must know after a (re)start: the options forms disco#info shows."""
        defaults = push_options.defaults(self.config)
        return [PushOptionsUpdate(None, defaults.fields()),
                *(PushOptionsUpdate(user, push_options.within_limits(o, self.config).fields())
                  for user, o in self.store.all_user_options())]

    def _disable(self, iq: PushIq, session: SessionKey, request: Disable) -> list[Action]:
        removed = self.store.disable(session[:2], request.jid, request.node)
        actions: list[Action] = []
        for registration in removed:
            self._seen.pop(registration.key, None)
        for affected in {r.session for r in removed} | {session}:
            if not self.store.for_session(affected):
                actions.append(SetPush(affected, None))
        log.info("push disabled for %s/%s at %s (%d registrations)", session[0], session[2],
                 request.jid, len(removed))
        return [*actions, IqResult(iq.ref)]

    # ------------------------------------------------------------- notifying
    def _notify(self, registrations: list[Registration], original: Stanza) -> list[Action]:
        stanza = unwrap_carbon(original) if registrations else None
        trigger = trigger_of(stanza, self.config) if stanza else None
        if stanza is None or trigger is None:
            return []
        mark = fingerprint(stanza)
        actions: list[Action] = []
        for registration in registrations:
            seen = self._seen.setdefault(registration.key, OrderedDict())
            if mark in seen:
                continue
            seen[mark] = None
            if len(seen) > SEEN_PER_REGISTRATION:
                seen.popitem(last=False)
            counts = Counts(registration.message_count, registration.subscription_count)
            if trigger is Trigger.SUBSCRIPTION:
                counts.subscriptions += 1
            else:
                counts.messages += 1
            registration.message_count = counts.messages
            registration.subscription_count = counts.subscriptions
            self.store.save_counts(registration)
            summary = summary_fields(self.options_of(registration.session[:2]), counts,
                                     trigger, stanza)
            actions.append(self._send(Publish(registration.key, summary), registration))
        return actions

    def _send(self, publish: Publish, registration: Registration) -> RouteIq:
        ref = next(self._refs)
        self._in_flight[ref] = publish
        xml = publish_iq(f"push-{ref}", self.config.host, registration.push_jid,
                         registration.node, publish.summary, registration.publish_options)
        return RouteIq(ref, xml, self.config.publish_timeout_ms)

    def _reset(self, session: SessionKey) -> bool:
        """Counts start again when the client is back; True if the session has push."""
        registrations = self.store.for_session(session)
        for registration in registrations:
            self._seen.pop(registration.key, None)
        if registrations:
            self.store.reset_counts(session)
        return bool(registrations)

    # --------------------------------------------------------- app server replies
    def _publish_reply(self, reply: PublishReply, now: float) -> list[Action]:
        publish = self._in_flight.pop(reply.ref, None)
        if publish is None:
            return []
        registration = self.store.get(publish.registration)
        if registration is None:  # disabled meanwhile
            return []
        outcome = classify_reply(reply.outcome, reply.error_type)
        where = f"{registration.user}/{registration.resource} at {registration.push_jid}"
        if outcome is Outcome.DELIVERED:
            if registration.errors:
                self.store.set_errors(registration.key, 0)
            return []
        if outcome is Outcome.TRANSIENT:
            delays = self.config.retry_delays_ms
            if publish.attempt < len(delays):
                due = now + delays[publish.attempt] / 1000
                publish.attempt += 1
                heapq.heappush(self._retries, (due, reply.ref, publish))
                log.info("push to %s not delivered (%s); retry %d in %d ms", where,
                         reply.condition or reply.outcome, publish.attempt,
                         delays[publish.attempt - 1])
            else:
                log.warning("push to %s not delivered after %d attempts; giving up", where,
                            publish.attempt + 1)
            return []
        errors = registration.errors + 1
        if reply.condition == "item-not-found":
            errors = self.config.max_publish_errors  # the app server has no such node (any more)
        if errors < self.config.max_publish_errors:
            self.store.set_errors(registration.key, errors)
            log.warning("app server rejected a push to %s (%s %s), %d of %d errors", where,
                        reply.error_type, reply.condition, errors, self.config.max_publish_errors)
            return []
        self.store.delete(registration.key)
        self._seen.pop(registration.key, None)
        log.warning("push disabled for %s after %d errors from the app server (last: %s %s)",
                    where, errors, reply.error_type, reply.condition)
        if self.store.for_session(registration.session):
            return []
        return [SetPush(registration.session, None)]

    # ------------------------------------------------------------------ timers
    def next_deadline(self) -> float | None:
        return self._retries[0][0] if self._retries else None

    def tick(self, now: float) -> list[Action]:
        """Send the retries that are due."""
        actions: list[Action] = []
        while self._retries and self._retries[0][0] <= now:
            _, _, publish = heapq.heappop(self._retries)
            registration = self.store.get(publish.registration)
            if registration is not None:
                actions.append(self._send(publish, registration))
        return actions

