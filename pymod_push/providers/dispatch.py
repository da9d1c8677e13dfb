"""The provider edge: one long-lived HTTP/2 client per backend, sending deliveries."""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Callable

import httpx

from ..appservice import Delivery
from ..core.config import Backend, Config
from . import Outcome, Reply
from .apns import Apns

log = logging.getLogger("pymod_push")
RETRY_DELAYS = (1.0, 5.0, 30.0, 120.0)


def tls_context(backend: Backend, client_certificate: str | None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=backend.option("cafile"))
    if client_certificate:
        context.load_cert_chain(client_certificate)
    return context


class Dispatcher:
    def __init__(self, config: Config, device_gone: Callable[[str], None]) -> None:
        self._device_gone = device_gone
        self._providers: dict[int, Apns] = {}
        self._clients: dict[int, httpx.AsyncClient] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        for backend in config.backends:
            try:
                if backend.group == "apns":
                    provider = Apns(backend)
                else:
                    log.warning("backend %d (%s): this provider is not available yet",
                                backend.index, backend.type)
                    continue
                client = httpx.AsyncClient(http2=True, timeout=15,
                                           verify=tls_context(backend,
                                                              provider.client_certificate))
            except (OSError, ValueError, ssl.SSLError) as exc:
                log.error("backend %d (%s) cannot be used: %s", backend.index, backend.type, exc)
                continue
            self._providers[backend.index] = provider
            self._clients[backend.index] = client

    def submit(self, delivery: Delivery) -> None:
        task = asyncio.get_running_loop().create_task(self._send(delivery))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(self, delivery: Delivery) -> None:
        index = delivery.backend.index
        provider, client = self._providers.get(index), self._clients.get(index)
        device = delivery.device
        where = f"{device.user} device {device.device_id!r} via {delivery.backend.type}"
        if provider is None or client is None:
            log.warning("push for %s dropped: its backend is not available", where)
            return
        for attempt in range(len(RETRY_DELAYS) + 1):
            request = provider.request(delivery.device.token, delivery.device.node,
                                       delivery.summary, time.time())
            try:
                response = await client.request(request.method, request.url,
                                                headers=request.headers, content=request.body)
                reply = provider.reply(response.status_code, dict(response.headers),
                                       response.content)
            except httpx.HTTPError as exc:
                reply = Reply(Outcome.RETRY, type(exc).__name__)
            if reply.outcome is Outcome.DELIVERED:
                log.debug("push delivered to %s", where)
                return
            if reply.outcome is Outcome.UNREGISTERED:
                log.info("push provider says %s is gone (%s): registration removed", where,
                         reply.reason)
                self._device_gone(delivery.device.node)
                return
            if reply.outcome is Outcome.FAILED or attempt == len(RETRY_DELAYS):
                log.warning("push to %s failed: %s", where, reply.reason)
                return
            delay = reply.retry_after if reply.retry_after is not None else RETRY_DELAYS[attempt]
            log.info("push to %s deferred (%s), retrying in %.0f s", where, reply.reason, delay)
            await asyncio.sleep(delay)

    async def close(self) -> None:
        for client in self._clients.values():
            await client.aclose()
