"""The provider edge: one long-lived HTTP/2 client per backend, sending deliveries."""

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

from ..appservice import Delivery, publish_answer, publish_reply
from ..core.config import Backend, Config
from ..core.destination import USER_URL_GROUPS
from ..logic import Device as LogicDevice
from ..logic import Logic
from ..metrics import Histogram
from ..protocol import PublishReply
from ..python_provider import PushDevice, PythonProviders, device_fields
from ..store import QueuedPush, Store
from . import HttpRequest, Outcome, Provider, Reply
from .apns import Apns
from .fcm import Fcm
from .http2 import Http2Client, HttpError, NotProcessed, Response, UserDestinations
from .ubuntu import UbuntuPush
from .webpush import WebPush
from .wns import Wns

log = logging.getLogger("pymod_push")
RETRY_DELAYS = (1.0, 5.0, 30.0, 120.0, 300.0)  # the last one repeats
MAX_AGE = 24 * 3600.0  # then the push is given up (and logged): as long as APNs keeps one
MAX_RETRY_AFTER = 600.0
# Per Python provider: sends at once. An HTTP/2 backend has the limit its server sets
# (SETTINGS_MAX_CONCURRENT_STREAMS: APNs says 1,000), kept by its connection.
MAX_IN_FLIGHT = 100
PROVIDERS: dict[str, Callable[[Backend], Provider]] = {
    "apns": Apns, "fcm": Fcm, "webpush": WebPush, "wns": Wns, "ubuntu": UbuntuPush}


def retry_delay(reply: Reply, headers: dict[str, str], attempt: int) -> float:
    """Exponential backoff with jitter; a provider's Retry-After wins (bounded)."""
    if reply.retry_after is not None:
        return reply.retry_after
    retry_after = headers.get("retry-after", "")
    if retry_after.isdigit():
        return min(float(retry_after), MAX_RETRY_AFTER)
    return RETRY_DELAYS[min(attempt, len(RETRY_DELAYS) - 1)] * random.uniform(0.8, 1.2)


def tls_context(backend: Backend, client_certificate: str | None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=backend.option("cafile"))
    if client_certificate:
        context.load_cert_chain(client_certificate)
    return context


class Quieted:
    """Lines that would come with every push of a spell (a provider deferring or refusing
    all of them, a backend that cannot be used): each kind is logged at most once per
    window_s, and that line says how many like it were left out since the last one."""

    MAX_KINDS = 1000  # kinds hold a provider's reason: bounded whatever it sends

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


class Dispatcher:
    """Sends deliveries; what a provider defers is kept in the store's provider queue
    (committed before the publish is answered), retried until delivered or MAX_AGE old,
    and picked up again by the next process after a crash (:meth:`resume`)."""

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
        # given_up (retries used up), dropped (backend unusable), retried (attempts)
        self.counters: Counter[tuple[str, str]] = Counter()
        self.latency: defaultdict[str, Histogram] = defaultdict(Histogram)  # per provider
        for backend in config.backends:
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
        if queued is None and self._sent_at_once(delivery):
            return
        self._spawn(self._send(delivery, queued))

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)  # kept until done (the loop holds tasks weakly)
        task.add_done_callback(self._tasks.discard)

    def resume(self, deliveries: list[tuple[QueuedPush, Delivery]]) -> None:
        """Go on with what an earlier process had queued."""
        for queued, delivery in deliveries:
            self.submit(delivery, queued)
        if deliveries:
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
        except (HttpError, ValueError, KeyError):
            sent = False  # the task's attempt says why
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
            reply, headers = Reply(Outcome.RETRY, type(answer).__name__), {}
        else:
            reply = provider.reply(answer.status_code, answer.headers, answer.content)
            headers = answer.headers
        queued = self._first_answered(delivery, reply)
        if queued is not None:
            self._spawn(self._retries(delivery, queued, reply, headers))

    async def _send(self, delivery: Delivery, queued: QueuedPush | None) -> None:
        if delivery.backend.index not in self._providers \
                and delivery.backend.index not in self._in_flight:
            self.counters[(delivery.backend.group, "dropped")] += 1
            self._log_quietly(logging.WARNING, ("dropped", str(delivery.backend.index)),
                              "push for %s dropped: its backend is not available",
                              _where(delivery))
            if queued is None:
                self._answer_publish(delivery, Outcome.FAILED)
            return
        if queued is not None:
            await asyncio.sleep(max(0.0, queued.due - time.time()))
            reply, headers = await self._timed_attempt(delivery)
        else:
            if self.logic is not None and (logic := self.logic()).shapes_async:
                device = delivery.device
                delivery = dataclasses.replace(delivery, summary=await logic.provider_data_async(
                    LogicDevice(device.user, device.provider, device.app_name,
                                device.device_id, device.device_name), delivery.summary))
            reply, headers = await self._timed_attempt(delivery)
            queued = self._first_answered(delivery, reply)
            if queued is None:
                return
        await self._retries(delivery, queued, reply, headers)

    async def _timed_attempt(self, delivery: Delivery) -> tuple[Reply, dict[str, str]]:
        slots = self._in_flight.get(delivery.backend.index, _NO_LIMIT)
        async with slots:
            started = time.perf_counter()
            reply, headers = await self._attempt(delivery)
            self.latency[delivery.backend.group].observe(time.perf_counter() - started)
        return reply, headers

    def _first_answered(self, delivery: Delivery, reply: Reply) -> QueuedPush | None:
        """The first attempt's answer: the publish is answered; a push the provider
        deferred is queued (and returned, for its retries), any other is finished."""
        queued = None
        if reply.outcome is Outcome.RETRY:
            now = time.time()
            queued = QueuedPush(next(self._ids), delivery.device.node, delivery.summary, 0,
                                now, now)
            self._store.queue_push(queued, self._node)
            self._commit()  # kept before the publisher hears it is queued
        # The answer goes after that commit: in-process, in the port's transaction (the
        # publisher's side of it with it); to another server, routed once committed.
        self._answer_publish(delivery, reply.outcome)
        if queued is None:
            self._finish(delivery, reply, None)
        return queued

    async def _retries(self, delivery: Delivery, queued: QueuedPush, reply: Reply,
                       headers: dict[str, str]) -> None:
        """A queued push, reply the answer to its last attempt: tried again until
        delivered, refused or MAX_AGE old."""
        group = delivery.backend.group
        while reply.outcome is Outcome.RETRY and time.time() - queued.created <= MAX_AGE:
            self.counters[(group, "retried")] += 1
            delay = retry_delay(reply, headers, queued.attempt)
            queued.attempt += 1
            queued.due = time.time() + delay
            self._store.update_queued_push(queued)
            self._commit()
            self._log_quietly(logging.INFO, (group, "deferred", reply.reason),
                              "push to %s deferred (%s), retrying in %.0f s", _where(delivery),
                              reply.reason, delay)
            await asyncio.sleep(delay)
            reply, headers = await self._timed_attempt(delivery)
        self._finish(delivery, reply, queued)

    async def _attempt(self, delivery: Delivery) -> tuple[Reply, dict[str, str]]:
        """One try at the provider: its answer, and the response's headers (Retry-After)."""
        index, device = delivery.backend.index, delivery.device
        if delivery.backend.type == "python":
            python = self._python.get(index)
            if python is None:  # its module failed to load: kept until a reload fixes it
                return Reply(Outcome.RETRY, "its module is not loaded"), {}
            seen = PushDevice(device.user, device.device_id, device.device_name,
                              device.app_name, device.node,
                              MappingProxyType(device_fields(device.extra)))
            return await python.deliver(seen, delivery.summary, delivery.urgent,
                                        self._log_sensitive), {}
        provider, client = self._providers[index], self._clients[index]
        try:
            auth = provider.auth_request(time.time())
            if auth is not None:  # an OAuth token first
                await self._authorize(provider, client, auth)
            request = provider.request(device, delivery.summary, time.time(),
                                       urgent=delivery.urgent)
            if self._log_sensitive:  # the admin asked for it (option log_sensitive)
                log.debug("%s %s %s", request.method, request.url, request.body[:2000])
            response = await _send(client, request)
        except (HttpError, ValueError, KeyError) as exc:
            return Reply(Outcome.RETRY, type(exc).__name__), {}
        return provider.reply(response.status_code, response.headers,
                              response.content), response.headers

    def _answer_publish(self, delivery: Delivery, outcome: Outcome) -> None:
        if delivery.ref is not None:
            if self._answer is not None:
                self._answer(publish_reply(delivery.ref, outcome))
        elif delivery.publish is not None:
            self._route(publish_answer(delivery, outcome))

    def _finish(self, delivery: Delivery, reply: Reply, queued: QueuedPush | None) -> None:
        group, where = delivery.backend.group, _where(delivery)
        if queued is not None:
            self._store.remove_queued_push(queued.id)
            self._commit()
        if reply.outcome is Outcome.DELIVERED:
            self.counters[(group, "delivered")] += 1
            log.debug("push delivered to %s", where)
        elif reply.outcome is Outcome.UNREGISTERED:
            self.counters[(group, "unregistered")] += 1
            log.info("push provider says %s is gone (%s): registration removed", where,
                     reply.reason)
            self._device_gone(delivery.device.node)
        else:
            outcome = "failed" if reply.outcome is Outcome.FAILED else "given_up"
            self.counters[(group, outcome)] += 1
            self._log_quietly(logging.WARNING, (group, outcome, reply.reason),
                              "push to %s %s: %s", where, outcome.replace("_", " "),
                              reply.reason)

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
        return f"{device.user} device {device.device_id!r} via {self.delivery.backend.group}"


_NO_LIMIT = contextlib.nullcontext()  # async too: an HTTP/2 backend's connection limits it


async def _send(client: Http2Client, request: HttpRequest) -> Response:
    return await client.request(request.method, request.url, request.headers, request.body)
