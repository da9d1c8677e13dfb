"""UnifiedPush: ejabberd as the push server of Conversations' distributor (issue 33,
docs/unifiedpush.md in README's words). Registers, POSTs and their deliveries in, actions
out; what is valid is core/unifiedpush.py's, the state is the store's (up_endpoints,
up_kept): a push answered 201 is on disk before the answer leaves (the commit pipeline
says actions only after the commit), and goes to the device once.

States of a kept push: kept (waiting for its session), sent (an up_push in flight: its
answer comes as an iq_reply event, also after a restart of this process), queued (the
up_push timed out while its session was pending: it waits in the session's stream
management queue, delivered if that session resumes, else kept again)."""

from __future__ import annotations

import hmac
import logging
import secrets
from collections import Counter
from collections.abc import Callable
from typing import TypeAlias

from pymod_push.core import unifiedpush as up
from pymod_push.core.config import Config
from pymod_push.core.push_history import short_hash
from pymod_push.core.xmpp import RequestError
from pymod_push.protocol import (
    Action,
    HttpReply,
    IqError,
    IqResult,
    Publish,
    SessionKey,
    UpPost,
    UpPush,
    UpRegister,
    UpReply,
    UpUsers,
    UserKey,
)
from pymod_push.store import Store
from pymod_push.store.unifiedpush import KEPT, QUEUED, SENT, KeptPush, UpEndpoint

log = logging.getLogger("pymod_push")

UP_PUSH_TIMEOUT_MS = 30_000  # an up_push not answered by then: timeout (kept again)
ENDPOINT_GRACE_S = 86_400  # an expired endpoint (404 already) is deleted this much later
MAX_WOKEN_USERS = 100_000  # users remembered as woken, at most (beyond: the oldest go)
# Revocation: the client's answer when it knows no such application/instance
REVOKING = frozenset({"item-not-found", "feature-not-implemented"})
DROP_REASONS = ("overflow", "expired", "revoked", "topic")

# wake(user, now): the XEP-0357 wake publishes for the user's registrations ([] if none)
Wake: TypeAlias = Callable[[UserKey, float], list[Publish]]


class UnifiedPush:
    def __init__(self, config: Config, store: Store, wake: Wake,
                 random_bytes: Callable[[int], bytes] = secrets.token_bytes) -> None:
        self.config = config
        self.store = store
        self._wake = wake
        self._random = random_bytes
        self.enabled = config.unified_push_url is not None
        self._rate = up.EndpointRate(config.unified_push_rate, config.unified_push_burst)
        self._last_id = store.last_up_kept_id()
        # Users woken (XEP-0357) since their last resume/bind: one wake, not one per push.
        # In memory: a restart forgets them (one wake more at worst).
        self._woken: dict[UserKey, None] = {}
        self.posts: Counter[int] = Counter()  # answers by HTTP status
        self.deliveries = 0
        self.dropped: Counter[str] = Counter({reason: 0 for reason in DROP_REASONS})
        self.wakes = 0

    # ------------------------------------------------------------------ ids
    def _new_id(self, now: float) -> int:
        """Ids of kept pushes: unique, increasing (their order), microseconds of the time."""
        self._last_id = max(self._last_id + 1, int(now * 1_000_000))
        return self._last_id

    def initial_actions(self) -> list[Action]:
        """After each hello: the shim's set of UnifiedPush users, whole (none when the
        feature is off: no event about them is needed)."""
        return [UpUsers("reset", tuple(self.store.up_users()) if self.enabled else ())]

    # ------------------------------------------------------------------ register
    def register(self, event: UpRegister, now: float) -> list[Action]:
        session = event.sender
        try:
            if self.config.unified_push_url is None:
                raise RequestError("service-unavailable", "UnifiedPush is off on this host",
                                   "cancel")
            if not session[2]:
                raise RequestError("bad-request", "register from a client session")
            request = up.parse_register(event.xml)
            user = session[:2]
            expires = now + self.config.unified_push_expiration_ms / 1000
            endpoint = self.store.up_endpoint_for(user, request.application, request.instance)
            actions: list[Action] = []
            if endpoint is None:
                held = self.store.up_endpoint_count(user)
                limit = self.config.unified_push_max_endpoints
                if held >= limit:
                    raise RequestError("not-allowed", f"an account may hold at most {limit} "
                                       "UnifiedPush endpoints (option "
                                       "unified_push_max_endpoints)", "cancel")
                # the token names this host (the one that answers its POSTs), whoever asks
                endpoint = UpEndpoint(up.make_token(self.config.host, self._random(32)),
                                      *session,
                                      request.application, request.instance, expires, now)
                self.store.add_up_endpoint(endpoint)
                if held == 0:
                    actions.append(UpUsers("add", (user,)))
                log.info("UnifiedPush endpoint registered for %s@%s/%s (%d of the account)",
                         *session, held + 1)
            else:
                moved = endpoint.resource != session[2]
                if moved:  # what waited in the old session's queue is kept again
                    for push in self.store.up_kept_of(endpoint.token, QUEUED):
                        self.store.set_up_state(push.id, KEPT)
                self.store.renew_up_endpoint(endpoint.token, session[2], expires)
                endpoint.resource, endpoint.expires = session[2], expires
                log.info("UnifiedPush endpoint renewed for %s@%s/%s%s", *session,
                         " (moved from another resource)" if moved else "")
            url = up.endpoint_url(self.config.unified_push_url, endpoint.token)
            actions.append(IqResult(event.ref, up.registered_xml(url, expires)))
            # the client is here: what its endpoint kept goes now
            actions += self._send_kept(endpoint, now)
            return actions
        except RequestError as error:
            return [IqError(event.ref, error.error_type, error.condition, error.text)]

    # ------------------------------------------------------------------ POST
    def post(self, event: UpPost, now: float) -> list[Action]:
        """201 (kept durably, and sent at once) or 404/400/429; nothing at all if the
        request's deadline has passed (the shim answered 503 already)."""
        if now * 1000 >= event.deadline_ms:
            log.info("UnifiedPush POST past its deadline: not taken (the sender got 503)")
            return []
        endpoint = self._endpoint(event.token, now) if self.enabled else None
        if endpoint is None:
            return [self._reply(event, 404, (), b"no such endpoint\n")]
        if not event.body:  # the shim answers these itself; not trusted blindly
            return [self._reply(event, 400, (), b"empty body\n")]
        if len(event.body) > up.MAX_BODY_BYTES:
            return [self._reply(event, 413, (), b"body over 4096 bytes\n")]
        try:
            meta = up.parse_meta(event.ttl, event.urgency, event.topic)
        except up.BadPost as error:
            return [self._reply(event, 400, (), f"{error}\n".encode())]
        refused = self._rate.take(endpoint.token, now)
        if refused is not None:
            if refused.first:
                log.info("UnifiedPush POSTs over the rate for an endpoint of %s@%s",
                         endpoint.user, endpoint.server)
            return [self._reply(event, 429,
                                (("Retry-After", str(refused.retry_after_seconds)),),
                                b"too many requests\n")]
        ttl = up.kept_ttl(meta.ttl, self.config.unified_push_max_ttl_ms // 1000)
        held = self.store.up_held(endpoint.token)
        replaced, overflow = up.keep_plan(held, meta.topic, self.config.unified_push_max_kept)
        for push_id in (*replaced, *overflow):
            self.store.delete_up_kept(push_id)
        self.dropped["topic"] += len(replaced)
        self.dropped["overflow"] += len(overflow)
        # Older pushes still kept (the session was away): this one waits behind them, and
        # only the oldest goes now, as a probe; its result sends the rest, in order. So a
        # POST that comes between a bind and Conversations' presence overtakes nothing,
        # and one while the phone sleeps costs one up_push, not one per kept push.
        removed = {*replaced, *overflow}
        behind = any(h.state == KEPT and h.id not in removed for h in held)
        push = KeptPush(self._new_id(now), endpoint.token, meta.topic, event.body, now + ttl,
                        KEPT if behind else SENT)
        self.store.add_up_kept(push)
        url = up.endpoint_url(self.config.unified_push_url or "", endpoint.token)
        reply = self._reply(event, 201, (("TTL", str(ttl)), ("Location", f"{url}/m/{push.id}")),
                            b"")
        if behind:
            return [reply, *self._send_kept(endpoint, now, at_most=1)]
        return [reply, self._up_push(endpoint, push)]

    def _endpoint(self, token: str, now: float) -> UpEndpoint | None:
        """The endpoint of a token, unless unknown or expired."""
        if up.token_host(token) != self.config.host:
            return None
        endpoint = self.store.up_endpoint(token)
        if endpoint is None or not hmac.compare_digest(endpoint.token.encode(),
                                                       token.encode()):
            return None
        return endpoint if endpoint.expires > now else None

    def _reply(self, event: UpPost, status: int, headers: tuple[tuple[str, str], ...],
               body: bytes) -> HttpReply:
        self.posts[status] += 1
        return HttpReply(event.ref, status, headers, body)

    def _up_push(self, endpoint: UpEndpoint, push: KeptPush) -> UpPush:
        return UpPush(push.id, endpoint.session, endpoint.application, endpoint.instance,
                      push.payload, UP_PUSH_TIMEOUT_MS)

    # ------------------------------------------------------------------ outcomes
    def reply(self, event: UpReply, now: float) -> list[Action]:
        push = self.store.up_kept_get(event.id)
        if push is None:
            return []  # revoked or expired meanwhile, or answered already
        if event.outcome == "result":
            self.store.delete_up_kept(push.id)
            self.store.up_delivered(push.token, now)
            self.deliveries += 1
            # the client is there: what its endpoint still keeps goes now, in order
            endpoint = self.store.up_endpoint(push.token)
            return self._send_kept(endpoint, now) if endpoint is not None else []
        if event.outcome == "error" and event.condition in REVOKING:
            return self.revoke(push.token, f"the client answered {event.condition}")
        if event.outcome == "timeout_pending":
            self.store.set_up_state(push.id, QUEUED)  # resolved by the session's next event
            return []
        # offline, pending, timeout, other errors: kept for later (unless its time is over)
        if push.expires <= now:
            self.store.delete_up_kept(push.id)
            self.dropped["expired"] += 1
            return []
        self.store.set_up_state(push.id, KEPT)
        endpoint = self.store.up_endpoint(push.token)
        return self._wake_once(endpoint.user_key, now) if endpoint is not None else []

    def _wake_once(self, user: UserKey, now: float) -> list[Action]:
        """A kept push wakes the user's devices (XEP-0357) like a chat message, once until
        they are back."""
        if user in self._woken:
            return []
        publishes = self._wake(user, now)
        if not publishes:
            return []
        if len(self._woken) >= MAX_WOKEN_USERS:
            del self._woken[next(iter(self._woken))]
        self._woken[user] = None
        self.wakes += 1
        log.info("UnifiedPush push kept for %s@%s: waking %d device(s)", *user, len(publishes))
        return list(publishes)

    def revoke(self, token: str, why: str) -> list[Action]:
        """The endpoint and its kept pushes are gone: later POSTs get 404."""
        endpoint = self.store.up_endpoint(token)
        if endpoint is None:
            return []
        dropped = self.store.up_count_kept(token)
        self.store.delete_up_endpoint(token)
        self.dropped["revoked"] += dropped
        log.info("UnifiedPush endpoint of %s@%s/%s revoked (%s), %d kept push(es) dropped",
                 *endpoint.session, why, dropped)
        if self.store.up_endpoint_count(endpoint.user_key) == 0:
            return [UpUsers("remove", (endpoint.user_key,))]
        return []

    # ------------------------------------------------------------------ sessions
    def back(self, session: SessionKey, now: float, queued: str | None,
             send: bool) -> list[Action]:
        """A session of the user is back (its woken mark cleared). queued: what becomes of
        the pushes waiting in the queue of that full JID's session: "delivered" (it
        resumed: ejabberd sent them again), "kept" (a new bind: the old session bounced
        them), None (unknown yet: ejabberd opens a resumed session before it says it
        resumed). send: its endpoints' kept pushes go now (a resumption, a presence to
        the host)."""
        if not self.enabled:
            return []
        self._woken.pop(session[:2], None)
        if queued is None and not send:
            return []
        actions: list[Action] = []
        for endpoint in self.store.up_endpoints_at(session):
            if queued is not None:
                for push in self.store.up_kept_of(endpoint.token, QUEUED):
                    if queued == "delivered":
                        self.store.delete_up_kept(push.id)
                        self.deliveries += 1
                        self.store.up_delivered(endpoint.token, now)
                    else:
                        self.store.set_up_state(push.id, KEPT)
            if send:
                actions += self._send_kept(endpoint, now)
        return actions

    def _send_kept(self, endpoint: UpEndpoint, now: float,
                   at_most: int | None = None) -> list[Action]:
        """The endpoint's kept pushes (the oldest at_most of them), in order; those whose
        time is over are dropped."""
        actions: list[Action] = []
        for push in self.store.up_kept_of(endpoint.token, KEPT):
            if push.expires <= now:
                self.store.delete_up_kept(push.id)
                self.dropped["expired"] += 1
                continue
            if at_most is not None and len(actions) >= at_most:
                break
            self.store.set_up_state(push.id, SENT)
            actions.append(self._up_push(endpoint, push))
        return actions

    def ejabberd_started(self) -> None:
        """No session survived: what was in flight or in a session's queue is kept."""
        host = self.config.host
        count = self.store.up_states(SENT, KEPT, host) + self.store.up_states(QUEUED, KEPT, host)
        if count:
            log.info("ejabberd started: %d UnifiedPush push(es) kept for redelivery", count)

    def user_removed(self, user: UserKey) -> list[Action]:
        actions: list[Action] = []
        for endpoint in self.store.up_endpoints_of(user):
            actions += self.revoke(endpoint.token, "account removed")
        return actions

    # ------------------------------------------------------------------ housekeeping
    def expire(self, now: float) -> list[Action]:
        """Kept pushes whose time is over are dropped (those in flight or in a session's
        queue ENDPOINT_GRACE_S later: their answer is not coming); endpoints expired for
        longer than ENDPOINT_GRACE_S deleted (with what they kept)."""
        expired = self.store.up_kept_expired(now, now - ENDPOINT_GRACE_S)
        for push in expired:
            self.store.delete_up_kept(push.id)
        self.dropped["expired"] += len(expired)
        actions: list[Action] = []
        for endpoint in self.store.up_endpoints_expired(now - ENDPOINT_GRACE_S):
            dropped = self.store.up_count_kept(endpoint.token)
            self.store.delete_up_endpoint(endpoint.token)
            self.dropped["expired"] += dropped
            if self.store.up_endpoint_count(endpoint.user_key) == 0:
                actions.append(UpUsers("remove", (endpoint.user_key,)))
        return actions

    # ------------------------------------------------------------------ admin
    def listing(self, user: UserKey) -> list[str]:
        """ejabberdctl push_up_list: one line per endpoint, no token nor full value."""
        lines = []
        for endpoint in self.store.up_endpoints_of(user):
            last = (up.expiration(endpoint.last_delivery)
                    if endpoint.last_delivery is not None else "never")
            lines.append(f"{short_hash(endpoint.instance)} application "
                         f"{short_hash(endpoint.application)} resource "
                         f"{endpoint.resource} expires {up.expiration(endpoint.expires)} "
                         f"last delivery {last} kept "
                         f"{self.store.up_count_kept(endpoint.token)}")
        return lines

    def revoke_by_admin(self, user: UserKey, which: str) -> tuple[int, list[Action]]:
        """Revoke the user's endpoint whose instance hash is ``which`` (the id push_up_list
        shows first), those of an application (its hash), or all of them ("all"): how
        many, and the actions."""
        actions: list[Action] = []
        count = 0
        which = which.strip().lower()
        wanted = "#" + which.removeprefix("#")  # as listed, or without its "#"
        for endpoint in self.store.up_endpoints_of(user):
            if which == "all" or wanted in (short_hash(endpoint.instance),
                                            short_hash(endpoint.application)):
                actions += self.revoke(endpoint.token, "by the admin")
                count += 1
        return count, actions

    def status_lines(self) -> list[str]:
        if not self.enabled:
            return []
        endpoints, kept = self.store.up_totals()
        posts = ", ".join(f"{code} {n}" for code, n in sorted(self.posts.items())) or "none"
        dropped = ", ".join(f"{reason} {n}" for reason, n in sorted(self.dropped.items()))
        return [f"UnifiedPush endpoints: {endpoints}, pushes kept: {kept}, POSTs answered: "
                f"{posts}; delivered: {self.deliveries}, dropped: {dropped}, wakes: "
                f"{self.wakes}"]

