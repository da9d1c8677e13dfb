"""The ledger of publishes: the outbox behind "one push per message, none lost".

Every notification for an app server is an outbox entry, stored with the event that
made it (committed before its publish leaves) and removed when its answer is final.
Each attempt is its own publish IQ with its own ref, derived from the entry's id, so an
answer that comes after a restart (replayed by the shim) is recognised: a delivered one
is not sent again. Failed attempts are retried (retry_delays), errors are counted per
registration (a registration that keeps failing is disabled: max_publish_errors), and
what an earlier process left unanswered is sent again at start.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import time
from collections import Counter

from pymod_push.core import ios_extensions, limits
from pymod_push.core.config import Config
from pymod_push.core.notify import PublishOutcome, classify_reply, count_error
from pymod_push.core.push_history import HISTORY, about
from pymod_push.core.xep0357 import publish_options_form, summary_form
from pymod_push.protocol import Action, Publish, PublishReply, SetPush
from pymod_push.records import OutboxEntry, Registration
from pymod_push.store import Store

log = logging.getLogger("pymod_push")

RegistrationKey = tuple[str, str, str, str]
# Publish refs are derived from the outbox entry (ref // REFS_PER_ENTRY is its id), so that
# an answer to a publish of an earlier process, replayed by the shim after a crash, is
# recognized and the notification not sent again.
REFS_PER_ENTRY = 64
# A publish to this process's own app server that could not be taken (the database did
# not answer its device read) goes again this much later.
OWN_RETRY_S = 1.0


class Ledger:
    def __init__(self, config: Config, store: Store) -> None:
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

    def new_id(self) -> int:
        """An id unique across restarts (outbox entries, logic work)."""
        return next(self._ids)

    def ids_after(self, used: int) -> None:
        """Ids from now on are above used (an id of an earlier process)."""
        self._ids = itertools.count(max(next(self._ids), used + 1))

    def next_due(self) -> float | None:
        return self._retries[0][0] if self._retries else None

    def due(self, now: float) -> list[Action]:
        """The retries that are due, sent again."""
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
                actions.append(self.send(publish, registration))
        return actions

    def retry_soon(self, ref: int, now: float) -> None:
        entry = self._in_flight.pop(ref, None)
        if entry is not None:
            entry.due = now + OWN_RETRY_S
            heapq.heappush(self._retries, (entry.due, entry.id, entry))

    def publish(self, registration: Registration, summary: list[tuple[str, str]],
                 now: float) -> Publish:
        """A new notification: in the outbox (committed with this batch) until answered."""
        summary = limits.bound_summary(summary, self.config.max_body_length)
        entry = OutboxEntry(next(self._ids), registration.key, summary, 0, now)
        self.store.add_outbox(entry, self.config.ejabberd_node)
        self.counters["published"] += 1
        if self.config.log_sensitive:  # the admin asked for it (option log_sensitive)
            log.debug("publishing to %s node %s: %s", registration.push_jid, registration.node,
                      summary)
        return self.send(entry, registration)

    def send(self, entry: OutboxEntry, registration: Registration) -> Publish:
        # One ref per attempt (each is its own IQ), derived from the entry's id.
        ref = entry.id * REFS_PER_ENTRY + min(entry.attempt, REFS_PER_ENTRY - 1)
        self._in_flight[ref] = entry
        self._recovered.pop(entry.id, None)
        HISTORY.sent(registration.key, entry.summary, time.time())  # push_diagnose
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

    def answer(self, reply: PublishReply, now: float) -> list[Action]:
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
        HISTORY.answered(publish.registration, "delivered" if outcome is PublishOutcome.DELIVERED
                         else f"{outcome.value}: " + (f"{reply.error_type} {reply.condition}"
                                                      if reply.outcome == "error"
                                                      else "no answer in time"), time.time())
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
            HISTORY.was_disabled(registration.key, f"{errors} error(s), the last: {why}", now)
            log.warning("push disabled for %s after %d error(s) from the app server (last: %s)",
                        where, errors, why, extra=about(registration.user, registration.server))
            return [] if self.store.for_session(registration.session) else [
                SetPush(registration.session, None)]
        if errors != registration.errors:
            self.store.set_errors(registration.key, errors, counted_at)
            self._erring.add(registration.key)
            if outcome is PublishOutcome.NOT_AN_APP_SERVER:
                log.warning("push to %s failed (%s: no app server there?): error %d of %d",
                            where, why, errors, limit,
                            extra=about(registration.user, registration.server))
            else:
                log.warning("push to %s failed (%s): error %d of %d (more within %d s count "
                            "once)", where, why, errors, limit,
                            self.config.publish_error_window_ms // 1000,
                            extra=about(registration.user, registration.server))
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
                        publish.attempt + 1, why,
                        extra=about(registration.user, registration.server))
        return []

