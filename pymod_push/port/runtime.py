"""Start-up wiring: from the hello's options to a running service, in this order: the
configuration, the store, the admin's push logic and the push service, the provider edge
(which goes on with what an earlier process left queued). Also what the process reports
about itself: Prometheus metrics and ejabberdctl push_status's counters."""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from pymod_push import __version__, logic, metrics
from pymod_push.core.config import Config
from pymod_push.delivery.dispatcher import Dispatcher
from pymod_push.port import admin_commands as admin
from pymod_push.protocol import Hello, PublishReply, ShimCounters
from pymod_push.records import DatabaseUnavailable
from pymod_push.service.decisions import DEFAULT_MAX_ACK_QUEUE, PushService
from pymod_push.store import Store, open_store

log = logging.getLogger("pymod_push")


@dataclass
class Runtime:
    config: Config
    store: Store
    service: PushService
    dispatcher: Dispatcher
    last_batch: tuple[int, int] | None  # (epoch, seq) the last process committed
    started: float = field(default_factory=time.time)
    events: Counter[str] = field(default_factory=Counter)  # handled, by kind
    shim: ShimCounters | None = None  # the shim's last counters frame (metrics)

    def process_info(self) -> admin.ProcessInfo:
        return admin.ProcessInfo(self.started, self.events.total(), self.dispatcher.counters)

    def snapshot(self) -> metrics.Snapshot:
        try:
            totals = self.store.totals()
        except DatabaseUnavailable:
            totals = {}  # the database is away: its gauges read 0 meanwhile
        pubsub_hosts = sorted({b.pubsub_host for b in self.config.backends})
        try:
            without_device = self.store.registrations_without_device(pubsub_hosts) \
                if pubsub_hosts else None
        except DatabaseUnavailable:
            without_device = None
        shim = self.shim
        return metrics.Snapshot(
            self.config.host, self.events, self.service.counters, self.dispatcher.counters,
            dict(self.dispatcher.latency), totals, self.service.in_process, self.store.commits,
            __version__, None if shim is None else
            {"restarts": shim.restarts, "held": shim.held, "dropped": shim.dropped},
            self._certificates(), without_device, self._unified_push())

    def _unified_push(self) -> metrics.UnifiedPushCounts | None:
        up = self.service.unified_push
        if not up.enabled:
            return None
        return metrics.UnifiedPushCounts(dict(up.posts), up.deliveries, dict(up.dropped))

    def _certificates(self) -> dict[tuple[str, str], float]:
        """APNs backends with certificate auth (a certfile, no key_file): their notAfter.
        Token auth's .p8 keys do not expire."""
        found = {}
        for backend in self.config.backends:
            certfile = backend.option("certfile")
            if backend.type == "apns" and certfile and not backend.option("key_file"):
                not_after = metrics.certificate_not_after(certfile)
                if not_after is not None:
                    found[(backend.app_name, backend.pubsub_host)] = not_after
        return found


def start(hello: Hello, device_gone: Callable[[str], None], route: Callable[[str], None],
          answered: Callable[[PublishReply], None], commit: Callable[[], None]) -> Runtime:
    """The callbacks are the port's: a device a provider says is gone, a stanza to route
    once what was written before it is committed, the provider's first answer to a publish
    taken in-process, and its group commit (for the dispatcher's writes)."""
    config = Config.from_options(hello.host, hello.options)
    store = open_store(config.db_file, config.db_url)
    service = PushService(config, store, logic.load(config.logic),
                          max_ack_queue(hello.options.get("max_ack_queue")))
    dispatcher = Dispatcher(config, store, device_gone, route, answered,
                            service.app_server.python_providers, commit)
    dispatcher.logic = lambda: service.logic  # push_reload_logic may replace it
    dispatcher.resume(service.app_server.queued_deliveries())
    return Runtime(config, store, service, dispatcher,
                   store.last_batch(config.ejabberd_node, config.host))


def max_ack_queue(value: object) -> int:
    """ejabberd's mod_stream_mgmt max_ack_queue as the hello tells it (the shim sends its
    default for infinity or without the module; an older shim sends nothing)."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    return DEFAULT_MAX_ACK_QUEUE
