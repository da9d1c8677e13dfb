"""The provider edge: one long-lived HTTP/2 client per backend, sending deliveries.

What a provider defers waits in the store's provider queue, bounded per device: at most
MAX_WAITING_PER_DEVICE pushes, newer ones superseding the oldest (the newest carries the
newest counts; what is superseded is counted). What cannot succeed by retrying (a URL that
is no https URL, keys no request can be made with, a destination the policy refuses, a
4xx other than 429) fails at once. A device whose pushes only fail, GIVE_UP_S long while
its provider delivers others, is given up: its registration goes as if the provider had
said it is gone."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import itertools
import logging
import random
import ssl
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Coroutine
from types import MappingProxyType
from typing import Any
from urllib.parse import urlsplit

from pymod_push.appserver.server import Delivery, publish_answer, publish_reply
from pymod_push.core.config import Backend, Config
from pymod_push.core.destination import USER_URL_GROUPS, DestinationDenied
from pymod_push.core.limits import ascii_number, peer_text
from pymod_push.core.push_history import HISTORY, about
from pymod_push.delivery.http2 import (
    Http2Client,
    HttpError,
    NotProcessed,
    Response,
    UserDestinations,
)
from pymod_push.logic import Device as LogicDevice
from pymod_push.logic import Logic
from pymod_push.metrics import Histogram
from pymod_push.protocol import PublishReply
from pymod_push.providers import DeliveryOutcome, HttpRequest, Provider, Reply, common_reply
from pymod_push.providers.apns import Apns
from pymod_push.providers.fcm import Fcm
from pymod_push.providers.ubuntu import UbuntuPush
from pymod_push.providers.webpush import WebPush
from pymod_push.providers.wns import Wns
from pymod_push.python_provider import PushDevice, PythonProviders, device_fields
from pymod_push.records import QueuedPush
from pymod_push.store import Store

log = logging.getLogger("pymod_push")
RETRY_DELAYS = (1.0, 5.0, 30.0, 120.0, 300.0)  # the last one repeats
# A device's pushes waiting at its provider (retried), at most: more would each cost a
# row and a task (a device answering 503 to a publish a second, for hours), and the
# newest carries the newest counts anyway.
MAX_WAITING_PER_DEVICE = 5
# A push is given up when it waited this long; a device whose pushes have failed this
# long without a delivery, while its provider delivered others (so that a provider's
# outage, or this server's network being down, removes nobody), is given up.
GIVE_UP_S = 6 * 3600.0
# Devices whose pushes fail for good (a 4xx, a refused destination) remembered with since
# when, for giving them up (see _fails_for_good): the oldest forgotten beyond this many.
MAX_FAILING_DEVICES = 65_536
# Failed publishes a device needs besides GIVE_UP_S of failing before it is given up: one
# odd refusal (a 413 for a long body) of a device that is seldom pushed is not enough.
GIVE_UP_AFTER_FAILURES = 3
MAX_RETRY_AFTER = 600.0
MIN_RETRY_AFTER = 1.0  # a provider's Retry-After: 0 must not make a busy loop
# Per Python provider: sends at once. An HTTP/2 backend has the limit its server sets
# (SETTINGS_MAX_CONCURRENT_STREAMS: APNs says 1,000), kept by its connection.
MAX_IN_FLIGHT = 100
PROVIDERS: dict[str, Callable[[Backend], Provider]] = {
    "apns": Apns, "fcm": Fcm, "webpush": WebPush, "wns": Wns, "ubuntu": UbuntuPush}


def backoff(attempt: int) -> float:
    """The delay before another attempt when the provider did not say: exponential,
    with jitter."""
    return RETRY_DELAYS[min(attempt, len(RETRY_DELAYS) - 1)] * random.uniform(0.8, 1.2)


def retry_delay(reply: Reply, headers: dict[str, str], attempt: int) -> float:
    """The backoff, or what the provider asked for: its reader's retry_after, or a
    Retry-After of ASCII digits, bounded (MIN_RETRY_AFTER to MAX_RETRY_AFTER). Any other
    Retry-After (an HTTP date, '\u00b2', '-1', 20 digits) gets the backoff."""
    if reply.retry_after is not None and 0.0 <= reply.retry_after <= MAX_RETRY_AFTER:
        return reply.retry_after
    seconds = ascii_number(headers.get("retry-after", ""))
    if seconds is not None:
        return min(max(float(seconds), MIN_RETRY_AFTER), MAX_RETRY_AFTER)
    return backoff(attempt)


def tls_context(backend: Backend, client_certificate: str | None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=backend.option("cafile"))
    if client_certificate:
        context.load_cert_chain(client_certificate)
    return context


def status_class(status: int) -> str:
    """What log lines are quieted by (with the provider and the outcome): the class of
    the provider's HTTP status, never its text."""
    return f"{status // 100}xx" if status else "no answer"


def sendable(url: str) -> bool:
    """Whether the URL is one the HTTP/2 client can send to (https, a host, a port)."""
    try:
        parts = urlsplit(url)
        return parts.scheme == "https" and bool(parts.hostname) and (parts.port or 0) >= 0
    except ValueError:  # a port out of range, a bad IPv6 literal
        return False


class Quieted:
    """Lines that would come with every push of a spell (a provider deferring or refusing
    all of them, a backend that cannot be used): each kind is logged at most once per
    window_s, and that line says how many like it were left out since the last one."""

    MAX_KINDS = 1000  # kinds are few (provider, outcome, status class): bounded anyway

    def __init__(self, window_s: float = 60.0) -> None:
        self._window_s = window_s
        self._kinds: dict[tuple[str, ...], tuple[float, int]] = {}  # -> (logged at, left out)

    def left_out(self, kind: tuple[str, ...], now: float) -> int | None:
        """None: leave this line out (it is counted); else log it: how many were left out
        since the last one."""
        last = self._kinds.get(kind)
        if last is not None and 0 <= now - last[0] < self._window_s:
            self._kinds[kind] = (last[0], last[1] + 1)
            return None
        if last is None and len(self._kinds) >= self.MAX_KINDS:
            self._kinds.clear()
        self._kinds[kind] = (now, 0)
        return last[1] if last is not None else 0


@dataclasses.dataclass(slots=True)
class _Waiting:
    """A device's pushes waiting at its provider, and since when its pushes fail."""

    failing_since: float
    delivered_before: int  # its provider's deliveries then (see Dispatcher._hopeless)
    # queued push id -> the task retrying it (None until it is made), oldest first
    pushes: dict[int, asyncio.Task[None] | None] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(slots=True)
class _Failing:
    """Since when a device's pushes fail for good, and its provider's deliveries then."""

    since: float
    delivered_before: int
    failures: int = 1


class Dispatcher:
    """Sends deliveries; what a provider defers is kept in the store's provider queue
    (committed before the publish is answered), MAX_WAITING_PER_DEVICE per device at most,
    retried until delivered or GIVE_UP_S old, and picked up again by the next process
    after a crash (:meth:`resume`)."""

    def __init__(self, config: Config, store: Store, device_gone: Callable[[str], None],
                 route: Callable[[str], None],
                 answer: Callable[[PublishReply], None] | None = None,
                 python_providers: PythonProviders | None = None,
                 commit: Callable[[], None] | None = None) -> None:
        self._store = store
        # How what is written here (the provider queue) gets committed: the port passes its
        # group commit, which also says what waits for it (route: answers to publishers);
        # alone (tests, benchmarks) at once. During a provider outage every push is
        # deferred: a commit of its own for each would take a round trip per push with
        # PostgreSQL, on the event loop.
        self._commit = commit or store.commit
        self._quieted = Quieted()
        self._node = config.ejabberd_node
        self._log_sensitive = config.log_sensitive
        self._ids = itertools.count(time.time_ns() // 1000)
        self._device_gone = device_gone
        self._route = route
        # Where the answers to publishes taken in-process go (Delivery.ref): to the
        # publisher, as ejabberd would bring them.
        self._answer = answer
        # The admin's push logic, when its provider_data is an 'async def' (it is awaited
        # here, before the first attempt, rather than in the app server): set by the port.
        self.logic: Callable[[], Logic] | None = None
        self._providers: dict[int, Provider] = {}
        self._clients: dict[int, Http2Client] = {}
        self._in_flight: dict[int, asyncio.Semaphore] = {}  # Python providers
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False  # see close
        # Providers written in Python (backends of type python), reloadable
        self._python = python_providers or PythonProviders()
        # (provider, outcome) -> pushes; outcomes: delivered, unregistered, failed,
        # given_up (waited GIVE_UP_S, or its device given up), dropped (backend unusable),
        # superseded (a newer one of its device waits instead), retried (attempts); and
        # devices_given_up: devices (see _hopeless)
        self.counters: Counter[tuple[str, str]] = Counter()
        self._waiting: dict[str, _Waiting] = {}  # device node -> its pushes waiting
        self._failing: dict[str, _Failing] = {}  # device node -> its pushes failing for good
        self.latency: defaultdict[str, Histogram] = defaultdict(Histogram)  # per provider
        for backend in config.backends:
            # Each configured provider's histogram is served from the start, at 0: a rate
            # needs a sample before the first push (and after each restart of Python).
            self.latency[backend.group]  # noqa: B018 - defaultdict: creates it
            if backend.type == "python":
                self._in_flight[backend.index] = asyncio.Semaphore(MAX_IN_FLIGHT)
                continue
            try:
                provider = PROVIDERS[backend.group](backend)
                # Web Push and WNS go where users say: checked, and their connections bounded
                client = Http2Client(
                    tls_context(backend, provider.client_certificate),
                    destinations=UserDestinations(config.endpoint_allow_ips)
                    if backend.group in USER_URL_GROUPS else None)
            except (OSError, ValueError, ssl.SSLError) as exc:
                log.error("backend %d (%s) cannot be used: %s", backend.index, backend.type, exc)
                continue
            self._providers[backend.index] = provider
            self._clients[backend.index] = client

    def submit(self, delivery: Delivery, queued: QueuedPush | None = None) -> None:
        if self._closed:  # still in the outbox or the provider queue: the next process's
            return
        HISTORY.device_sent(delivery.device.node, delivery.summary.items(), time.time())
        if queued is None and self._sent_at_once(delivery):
            return
        task = self._spawn(self._send(delivery, queued))
        if queued is not None:  # an earlier process's (resume)
            self._wait(delivery, queued, task)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)  # kept until done (the loop holds tasks weakly)
        task.add_done_callback(self._tasks.discard)
        return task

    def resume(self, deliveries: list[tuple[QueuedPush, Delivery]]) -> None:
        """Go on with what an earlier process had queued (in the order it was queued: of a
        device's, the newest are kept within the bound); what is queued from now on is
        newer than all of it."""
        if deliveries:
            newest = max(queued.id for queued, _ in deliveries)
            self._ids = itertools.count(max(next(self._ids), newest + 1))
        for queued, delivery in deliveries:
            self.submit(delivery, queued)
        if deliveries:
            self._commit()  # what the bound removed
            log.info("%d push(es) deferred by providers before the restart are queued again",
                     len(deliveries))

    def _sent_at_once(self, delivery: Delivery) -> bool:
        """The usual first attempt, without a task of its own: on an open HTTP/2
        connection (on a stream free now, or queued until one is), the provider's token
        ready, no async push logic to await. Its answer comes to _answered_at_once.
        False: the task's way (_send) it is."""
        index = delivery.backend.index
        provider = self._providers.get(index)
        if provider is None or (self.logic is not None and self.logic().shapes_async) \
                or not self._clients[index].connected():  # not made twice on connecting
            return False
        try:
            now = time.time()
            if provider.auth_request(now) is None:
                request = provider.request(delivery.device, delivery.summary, now,
                                           urgent=delivery.urgent)
                sent = self._clients[index].request_now(
                    request.method, request.url, request.headers, request.body,
                    functools.partial(self._answered_at_once, delivery, provider,
                                      time.perf_counter()))
            else:
                sent = False  # an OAuth token first
        except Exception:  # noqa: BLE001 - the task's attempt says why
            sent = False
        if sent and self._log_sensitive:  # the admin asked for it (option log_sensitive)
            log.debug("%s %s %s", request.method, request.url, request.body[:2000])
        return sent

    def _answered_at_once(self, delivery: Delivery, provider: Provider, started: float,
                          answer: Response | HttpError) -> None:
        if self._closed:  # the connection's end at close: as if the process had died
            return
        if isinstance(answer, NotProcessed):  # refused before any processing: again
            self._spawn(self._send(delivery, None))
            return
        self.latency[delivery.backend.group].observe(time.perf_counter() - started)
        if isinstance(answer, HttpError):
            reply, headers, status = failure_reply(answer, None), {}, 0
        else:
            reply, headers, status = read_reply(provider, answer), answer.headers, \
                answer.status_code
        queued = self._first_answered(delivery, reply, status, None)
        if queued is not None:
            task = self._spawn(self._retries(delivery, queued, reply, headers, status))
            waiting = self._waiting.get(delivery.device.node)
            if waiting is not None and queued.id in waiting.pushes:
                waiting.pushes[queued.id] = task

    async def _send(self, delivery: Delivery, queued: QueuedPush | None) -> None:
        if delivery.backend.index not in self._providers \
                and delivery.backend.index not in self._in_flight:
            self.counters[(delivery.backend.group, "dropped")] += 1
            self._log_quietly(logging.WARNING, ("dropped", str(delivery.backend.index)),
                              "push for %s dropped: its backend is not available",
                              _where(delivery))
            if queued is None:
                self._answer_publish(delivery, DeliveryOutcome.FAILED)
            else:  # its row is kept for a process that has the backend
                self._forget(delivery.device.node, queued.id)
            return
        if queued is not None:
            await asyncio.sleep(max(0.0, queued.due - time.time()))
            reply, headers, status = await self._timed_attempt(delivery)
        else:
            if self.logic is not None and (logic := self.logic()).shapes_async:
                device = delivery.device
                delivery = dataclasses.replace(delivery, summary=await logic.provider_data_async(
                    LogicDevice(device.user, device.provider, device.app_name,
                                device.device_id, device.device_name), delivery.summary))
            reply, headers, status = await self._timed_attempt(delivery)
            queued = self._first_answered(delivery, reply, status, asyncio.current_task())
            if queued is None:
                return
        await self._retries(delivery, queued, reply, headers, status)

    async def _timed_attempt(self, delivery: Delivery) -> tuple[Reply, dict[str, str], int]:
        """One attempt (see _attempt); what it raises unexpectedly makes it one to retry."""
        slots = self._in_flight.get(delivery.backend.index, _NO_LIMIT)
        async with slots:
            started = time.perf_counter()
            try:
                answer = await self._attempt(delivery)
            except Exception as exc:  # noqa: BLE001 - never a push stuck (see _retries)
                self._unexpected(delivery, exc, "sending it")
                answer = Reply(DeliveryOutcome.RETRY, type(exc).__name__), {}, 0
            self.latency[delivery.backend.group].observe(time.perf_counter() - started)
        return answer

    def _first_answered(self, delivery: Delivery, reply: Reply, status: int,
                        task: asyncio.Task[None] | None) -> QueuedPush | None:
        """The first attempt's answer: the publish is answered; a push the provider
        deferred is queued (and returned, for its retries in task; None: not made yet),
        any other is finished. A deferred push of a device to give up ends it."""
        queued = None
        outcome = reply.outcome
        HISTORY.device_answered(delivery.device.node, _answer_text(reply, status), time.time())
        if outcome is DeliveryOutcome.RETRY:
            now, node = time.time(), delivery.device.node
            waiting = self._waiting.get(node)
            if waiting is not None and self._hopeless(delivery, waiting.failing_since,
                                                      waiting.delivered_before):
                self._give_up_device(delivery, reply, status, waiting.failing_since)
                self.counters[(delivery.backend.group, "given_up")] += 1  # this one
                outcome = DeliveryOutcome.UNREGISTERED  # the publisher disables the registration
            else:
                queued = QueuedPush(next(self._ids), node, delivery.summary, 0, now, now,
                                    now if waiting is None else waiting.failing_since)
                self._store.queue_push(queued, self._node)
                self._wait(delivery, queued, task)
            self._commit()  # kept before the publisher hears it is queued
        elif outcome is DeliveryOutcome.FAILED and self._fails_for_good(delivery, reply, status):
            outcome = DeliveryOutcome.UNREGISTERED  # the publisher disables the registration
        # The answer goes after that commit: in-process, in the port's transaction (the
        # publisher's side of it with it); to another server, routed once committed.
        self._answer_publish(delivery, outcome)
        if reply.outcome is not DeliveryOutcome.RETRY:
            self._finish(delivery, reply, None, status)
        return queued

    def _wait(self, delivery: Delivery, queued: QueuedPush,
              task: asyncio.Task[None] | None) -> None:
        """The queued push waits with its device's others; beyond MAX_WAITING_PER_DEVICE
        the oldest are superseded (the newest carries the newest counts): their retries
        stop, their rows go, they are counted."""
        node, group = delivery.device.node, delivery.backend.group
        waiting = self._waiting.get(node)
        if waiting is None:
            waiting = self._waiting[node] = _Waiting(queued.failing_since,
                                                     self.counters[(group, "delivered")])
        elif queued.failing_since < waiting.failing_since:  # an earlier process's rows
            waiting.failing_since = queued.failing_since
        waiting.pushes[queued.id] = task
        if len(waiting.pushes) > MAX_WAITING_PER_DEVICE:
            while len(waiting.pushes) > MAX_WAITING_PER_DEVICE:
                superseded = waiting.pushes.pop(min(waiting.pushes))
                if superseded is not None:
                    superseded.cancel()
                self.counters[(group, "superseded")] += 1
            self._store.keep_newest_queued(node, self._node, MAX_WAITING_PER_DEVICE)

    def _forget(self, node: str, push_id: int) -> None:
        """The push waits no more (its row is the caller's)."""
        waiting = self._waiting.get(node)
        if waiting is not None:
            waiting.pushes.pop(push_id, None)
            if not waiting.pushes:
                del self._waiting[node]

    def _drop_waiting(self, node: str) -> int:
        """The device's waiting pushes end, rows and retries (but the caller's own); how
        many they were."""
        waiting = self._waiting.pop(node, None)
        if waiting is None:
            return 0
        current = asyncio.current_task()
        for task in waiting.pushes.values():
            if task is not None and task is not current:
                task.cancel()
        self._store.keep_newest_queued(node, self._node, 0)
        self._commit()
        return len(waiting.pushes)

    def _hopeless(self, delivery: Delivery, failing_since: float,
                  delivered_before: int) -> bool:
        """The device's pushes have failed GIVE_UP_S long, while its provider delivered
        others (not its outage, nor this server's network or configuration)."""
        group = delivery.backend.group
        return time.time() - failing_since >= GIVE_UP_S \
            and self.counters[(group, "delivered")] > delivered_before

    def _fails_for_good(self, delivery: Delivery, reply: Reply, status: int) -> bool:
        """A push of the device failed for good (a 4xx, a refused destination, keys no
        request can be made with): since when its pushes fail is noted, and a device failing
        GIVE_UP_S long (and GIVE_UP_AFTER_FAILURES times) while its provider delivered others
        is given up (True): one attempt per publish is all it costs meanwhile."""
        node, group = delivery.device.node, delivery.backend.group
        failing = self._failing.get(node)
        if failing is None:
            if len(self._failing) >= MAX_FAILING_DEVICES:
                del self._failing[next(iter(self._failing))]
            self._failing[node] = _Failing(time.time(), self.counters[(group, "delivered")])
            return False
        failing.failures += 1
        if failing.failures < GIVE_UP_AFTER_FAILURES \
                or not self._hopeless(delivery, failing.since, failing.delivered_before):
            return False
        del self._failing[node]
        self._give_up_device(delivery, reply, status, failing.since)
        return True

    def _give_up_device(self, delivery: Delivery, reply: Reply, status: int,
                        failing_since: float) -> None:
        """Its waiting pushes end (given up, counted), its registration goes as if the
        provider had said it is gone: the publishing server hears item-not-found next and
        disables it."""
        group, node = delivery.backend.group, delivery.device.node
        failing_for = time.time() - failing_since
        self.counters[(group, "given_up")] += self._drop_waiting(node)
        self.counters[(group, "devices_given_up")] += 1
        self._log_quietly(logging.WARNING, (group, "device given up", status_class(status)),
                          "%s given up: no push delivered to it for %.1f h while %s delivered "
                          "others (last: %s); its registration is removed", _where(delivery),
                          failing_for / 3600, group, peer_text(reply.reason))
        self._device_gone(node)

    async def _retries(self, delivery: Delivery, queued: QueuedPush, reply: Reply,
                       headers: dict[str, str], status: int) -> None:
        """A queued push, reply the answer to its last attempt: tried again until
        delivered, refused, GIVE_UP_S old, superseded or its device given up. Nothing
        else ends it (a push stuck until a restart): what raises is logged (quietly) and
        the push tried again after the backoff."""
        group, node = delivery.backend.group, delivery.device.node
        while reply.outcome is DeliveryOutcome.RETRY:
            try:
                waiting = self._waiting.get(node)
                if waiting is None or queued.id not in waiting.pushes:
                    return  # dropped meanwhile, its row with it
                if self._hopeless(delivery, waiting.failing_since, waiting.delivered_before):
                    self._give_up_device(delivery, reply, status, waiting.failing_since)
                    return
                if time.time() - queued.created > GIVE_UP_S:
                    break
                self.counters[(group, "retried")] += 1
                delay = retry_delay(reply, headers, queued.attempt)
                queued.attempt += 1
                queued.due = time.time() + delay
                self._store.update_queued_push(queued)
                self._commit()
                self._log_quietly(logging.INFO, (group, "deferred", status_class(status)),
                                  "push to %s deferred (%s), retrying in %.0f s",
                                  _where(delivery), peer_text(reply.reason), delay)
            except Exception as exc:  # noqa: BLE001 - see the docstring
                self._unexpected(delivery, exc, "deferring it")
                delay = backoff(queued.attempt)
            await asyncio.sleep(delay)
            reply, headers, status = await self._timed_attempt(delivery)
        try:
            self._finish(delivery, reply, queued, status)
        except Exception as exc:  # noqa: BLE001 - its row stays for the next process
            self._unexpected(delivery, exc, "finishing it")

    def _unexpected(self, delivery: Delivery, exc: Exception, doing: str) -> None:
        """A bug, or what nobody foresaw, on a push's way: logged (by kind, quietly) and
        the push goes on."""
        self._log_quietly(logging.ERROR, (delivery.backend.group, "unexpected",
                                          type(exc).__name__),
                          "push to %s: %s while %s", _where(delivery), type(exc).__name__,
                          doing)

    async def _attempt(self, delivery: Delivery) -> tuple[Reply, dict[str, str], int]:
        """One try at the provider: its answer, the response's headers (Retry-After) and
        its HTTP status (0: none)."""
        index, device = delivery.backend.index, delivery.device
        if delivery.backend.type == "python":
            python = self._python.get(index)
            if python is None:  # its module failed to load: kept until a reload fixes it
                return Reply(DeliveryOutcome.RETRY, "its module is not loaded"), {}, 0
            seen = PushDevice(device.user, device.device_id, device.device_name,
                              device.app_name, device.node,
                              MappingProxyType(device_fields(device.extra)))
            return await python.deliver(seen, delivery.summary, delivery.urgent,
                                        self._log_sensitive), {}, 0
        provider, client = self._providers[index], self._clients[index]
        try:
            auth = provider.auth_request(time.time())
            if auth is not None:  # an OAuth token first: the backend's, not the device's
                await self._authorize(provider, client, auth)
        except HttpError as exc:
            return failure_reply(exc, None), {}, 0
        except (ValueError, KeyError) as exc:  # the token endpoint's answer: again later
            return Reply(DeliveryOutcome.RETRY, type(exc).__name__), {}, 0
        try:
            request = provider.request(device, delivery.summary, time.time(),
                                       urgent=delivery.urgent)
        except (ValueError, KeyError, TypeError) as exc:  # what the device registered
            return Reply(DeliveryOutcome.FAILED, "no request can be made for this device "
                         f"({type(exc).__name__}: its keys or token)"), {}, 0
        except DestinationDenied as exc:  # its URL, refused before anything is sent (WNS)
            return failure_reply(exc, None), {}, 0
        if self._log_sensitive:  # the admin asked for it (option log_sensitive)
            log.debug("%s %s %s", request.method, request.url, request.body[:2000])
        try:
            response = await _send(client, request)
        except HttpError as exc:
            return failure_reply(exc, request.url), {}, 0
        return read_reply(provider, response), response.headers, response.status_code

    def _answer_publish(self, delivery: Delivery, outcome: DeliveryOutcome) -> None:
        if delivery.ref is not None:
            if self._answer is not None:
                self._answer(publish_reply(delivery.ref, outcome))
        elif delivery.publish is not None:
            self._route(publish_answer(delivery, outcome))

    def _finish(self, delivery: Delivery, reply: Reply, queued: QueuedPush | None,
                status: int) -> None:
        group, where, node = delivery.backend.group, _where(delivery), delivery.device.node
        if queued is not None:
            self._store.remove_queued_push(queued.id)
            self._forget(node, queued.id)
            self._commit()
            HISTORY.device_answered(node, _answer_text(reply, status), time.time())
        if reply.outcome is DeliveryOutcome.DELIVERED:
            self.counters[(group, "delivered")] += 1
            if self._failing:
                self._failing.pop(node, None)
            waiting = self._waiting.get(node)
            if waiting is not None:  # the device works: its others fail from now, if they do
                waiting.failing_since = time.time()
                waiting.delivered_before = self.counters[(group, "delivered")]
                self._store.restart_failing(node, self._node, waiting.failing_since)
                self._commit()
            log.debug("push delivered to %s", where)
        elif reply.outcome is DeliveryOutcome.UNREGISTERED:
            self.counters[(group, "unregistered")] += 1 + self._drop_waiting(node)
            self._failing.pop(node, None)
            log.info("push provider says %s is gone (%s): registration removed", where,
                     peer_text(reply.reason), extra=about(delivery.device.user))
            self._device_gone(node)
        else:
            outcome = "failed" if reply.outcome is DeliveryOutcome.FAILED else "given_up"
            self.counters[(group, outcome)] += 1
            self._log_quietly(logging.WARNING, (group, outcome, status_class(status)),
                              "push to %s %s: %s", where, outcome.replace("_", " "),
                              peer_text(reply.reason))
            HISTORY.note(delivery.device.user, "warning", f"push to {where} "
                         f"{outcome.replace('_', ' ')}: {peer_text(reply.reason)}", time.time())

    def _log_quietly(self, level: int, kind: tuple[str, ...], message: str,
                     *args: object) -> None:
        """A line that comes with every push of a spell: at most once a minute per kind
        (see Quieted), with how many like it were left out."""
        left_out = self._quieted.left_out(kind, time.monotonic())
        if left_out is not None:
            suffix = f" ({left_out} more like it since the last such line)" if left_out else ""
            log.log(level, message + suffix, *args)

    @staticmethod
    async def _authorize(provider: Provider, client: Http2Client, request: HttpRequest) -> None:
        """Fetch the OAuth token the provider needs (request: its auth_request)."""
        response = await _send(client, request)
        provider.auth_reply(response.status_code, response.content, time.time())

    async def close(self) -> None:
        """Stop as a crash would, but quietly: nothing is written or answered from now on
        (the store closes next). A push in flight is still in the outbox (the next process
        publishes it again, as after a crash) or in the provider queue (the next process
        resumes it); a retry waiting is cancelled, its queue entry kept."""
        self._closed = True
        for task in self._tasks:  # before the connections fail what the tasks await
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for client in self._clients.values():
            await client.aclose()  # first attempts hear of it at once (_answered_at_once)


class _where:  # noqa: N801 - used as a function: the text, made only if logged
    __slots__ = ("delivery",)

    def __init__(self, delivery: Delivery) -> None:
        self.delivery = delivery

    def __str__(self) -> str:
        device = self.delivery.device
        return (f"{device.user} device {peer_text(device.device_id)!r} via "
                f"{self.delivery.backend.group}")


_NO_LIMIT = contextlib.nullcontext()  # async too: an HTTP/2 backend's connection limits it


def _answer_text(reply: Reply, status: int) -> str:
    """A provider's answer as push_diagnose shows it (its reason is the provider's text)."""
    said = reply.outcome.value.replace("_", " ")
    return said + (f" (HTTP {status})" if status else "") + (
        f": {peer_text(reply.reason)}" if reply.reason and reply.outcome is not
        DeliveryOutcome.DELIVERED else "")


def read_reply(provider: Provider, response: Response) -> Reply:
    """What the provider's answer means; an answer its reader did not expect (a body of
    another shape) by its status alone."""
    try:
        return provider.reply(response.status_code, response.headers, response.content)
    except Exception:  # noqa: BLE001 - the peer's text: never a push stuck on it
        return common_reply(response.status_code)


def failure_reply(exc: HttpError | DestinationDenied, url: str | None) -> Reply:
    """No answer from the provider: for good when no retry can change that (the
    destination policy refuses it, the URL is none to send to), else to be tried again."""
    if isinstance(exc, DestinationDenied):
        return Reply(DeliveryOutcome.FAILED, f"destination refused: {exc}")
    if url is not None and not sendable(url):
        return Reply(DeliveryOutcome.FAILED, "not an https URL")
    return Reply(DeliveryOutcome.RETRY, type(exc).__name__)


async def _send(client: Http2Client, request: HttpRequest) -> Response:
    return await client.request(request.method, request.url, request.headers, request.body)
