"""The port edge: {packet,4} frames on stdin/stdout, an asyncio loop, logging to ejabberd.

Frames are read in large chunks and split here (one read call for many
frames); the actions of one chunk go out as one frame, after the store has
committed what they announce.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import platform
import struct
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, BinaryIO

from pymod_push import __version__, etf, metrics
from pymod_push.appserver.server import Delivery
from pymod_push.core.push_history import UserLogHandler
from pymod_push.core.shim_facts import hello_facts
from pymod_push.port import admin_commands as admin
from pymod_push.port.commit import CommitPipeline, Item
from pymod_push.port.logic_workers import LogicWorkers
from pymod_push.port.runtime import Runtime, start
from pymod_push.protocol import (
    PROTOCOL_VERSION,
    Action,
    AdminCommand,
    AppServerIq,
    Batch,
    Event,
    Log,
    LogLevel,
    ProtocolError,
    PublishReply,
    Route,
    action_term,
    hello_reply,
    parse_batch,
    parse_counters,
    parse_event,
    parse_hello,
)
from pymod_push.records import DatabaseUnavailable
from pymod_push.service import diagnosis
from pymod_push.service.decisions import PURGE_INTERVAL_S, PushService
from pymod_push.service.logic_work import LogicWork
from pymod_push.store import Store

log = logging.getLogger("pymod_push")
MAX_FRAME = 64 * 1024 * 1024
# After the hello, timers (the re-sends of what an earlier process left unanswered) wait
# this long: the shim's replay of the batches that process missed comes first, and with
# it the answers to its publishes that arrived meanwhile (those are not sent again).
REPLAY_GRACE_S = 1.0
DEFERRED_POLL_S = 0.1  # how often a waiting command's answer is looked at (push_diagnose_test)
_LEVELS = {logging.DEBUG: "debug", logging.INFO: "info", logging.WARNING: "warning",
           logging.ERROR: "error", logging.CRITICAL: "critical"}


def frame(term: Any) -> bytes:
    payload = etf.encode(term)
    return struct.pack(">I", len(payload)) + payload


class FrameSplitter:
    """Turns a byte stream into {packet,4} payloads."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        self._buffer += data
        frames = []
        buffer = self._buffer
        pos = 0
        while len(buffer) - pos >= 4:
            (size,) = struct.unpack_from(">I", buffer, pos)
            if size > MAX_FRAME:
                raise ProtocolError(f"frame of {size} bytes is larger than {MAX_FRAME}")
            if len(buffer) - pos - 4 < size:
                break
            frames.append(bytes(buffer[pos + 4:pos + 4 + size]))
            pos += 4 + size
        del buffer[:pos]
        return frames


def python_level(ejabberd_level: object) -> int:
    """Follow ejabberd's loglevel: records it would drop are not even formatted here."""
    levels = {"none": logging.CRITICAL + 10, "emergency": logging.CRITICAL,
              "alert": logging.CRITICAL, "critical": logging.CRITICAL, "error": logging.ERROR,
              "warning": logging.WARNING, "notice": logging.INFO, "info": logging.INFO,
              "debug": logging.DEBUG}
    return levels.get(str(ejabberd_level), logging.INFO)


class PortLogHandler(logging.Handler):
    """Sends log records to ejabberd's log as {log, Level, Text} frames."""

    def __init__(self, write: Any) -> None:
        super().__init__()
        self._write = write

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = "pymod_push: " + self.format(record)
            level = _LEVELS.get(record.levelno, "info")
            self._write(frame(action_term(Log(level, text))))
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


def _raise(exc: BaseException) -> None:
    raise exc


class PortApp:
    """The port edge: frames in, their events handled in order by the push service, one
    group commit for many, then the actions, acknowledgement and provider pushes that the
    commit made true; events held while the database is away. What the hello starts is
    runtime.py's; async push logic is logic_workers.py's."""

    def __init__(self, write: Any) -> None:
        self._write = write
        self.runtime: Runtime | None = None  # what the hello starts (runtime.py)
        self.service: PushService | None = None
        self._store: Store | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_deadline: float | None = None  # what _timer is armed for
        self._metrics: asyncio.Server | None = None
        self._logic_workers: LogicWorkers | None = None
        self._timers_from = 0.0  # time.monotonic() before which no timer fires
        self._answers: list[PublishReply] = []  # in-process publishes' answers, not yet handled
        self.on_fatal: Callable[[BaseException], None] = _raise
        # Nothing said before it is on disk (commit.py).
        self.commits = CommitPipeline(self._flush, self._feed, lambda exc: self.on_fatal(exc))

    def on_frames(self, frames: list[bytes]) -> None:
        now = time.monotonic()
        if self.commits.held is not None:  # handled once the database is back
            self.commits.held.extend((now, frame) for frame in frames)
            return
        self._feed([(now, frame) for frame in frames])

    def _feed(self, items: Sequence[tuple[float, Item]]) -> None:
        handled: Batch | None = None  # the last batch of this chunk, acknowledged once
        # A publish to the built-in app server held longer than ejabberd waits for its
        # answer was answered with an error (its publisher tries again): not sent here.
        late = time.monotonic() - self.commits.reply_timeout_s
        for position, (arrived, item) in enumerate(items):
            if isinstance(item, PublishReply):  # a provider's answer to an in-process publish
                try:
                    results = self._handle_event(item)
                except DatabaseUnavailable as exc:
                    self.commits.read_failed(exc, list(items[position:]))
                    break
                self.commits.collect(results)
                continue
            if isinstance(item, tuple):
                batch, start = item
            else:
                try:
                    term = etf.decode(item)
                except etf.DecodeError as exc:
                    log.error("malformed frame from ejabberd ignored (%d bytes): %s",
                              len(item), exc)
                    continue
                if self.service is None:
                    self._hello(term)
                    continue
                counters = parse_counters(term)
                if counters is not None:  # not a batch: nothing to commit or acknowledge
                    assert self.runtime is not None
                    self.runtime.shim = counters
                    continue
                try:
                    batch, start = parse_batch(term), 0
                except ProtocolError as exc:
                    log.error("frame from ejabberd ignored: %s", exc)
                    continue
            if self.commits.already_handled(batch):
                handled = batch
                continue
            for index in range(start, len(batch.events)):
                try:
                    results = self._handle(batch.events[index], arrived < late)
                except DatabaseUnavailable as exc:
                    self.commits.read_failed(exc, [(arrived, (batch, index)),
                                             *items[position + 1:]])
                    break
                self.commits.collect(results)
            else:
                handled = batch
                continue
            break  # the database is away: the rest waits
        if handled is not None:  # committed with the effects of the batches
            self.commits.handled(handled)
        if handled is not None or self.commits.has_pending():
            self.commits.request()

    def _logic_done(self, results: Sequence[Action | Delivery | LogicWork]) -> None:
        """A notification the admin's async push logic decided (logic_workers.py)."""
        self.commits.collect(results)
        self.commits.request()

    def _hello(self, term: Any) -> None:
        hello = parse_hello(term)
        info = {"version": __version__, "python": platform.python_version(),
                "pid": str(os.getpid())}
        if hello.version != PROTOCOL_VERSION:
            log.error("protocol version mismatch: ejabberd's mod_push_py speaks %d, this "
                      "pymod_push %s speaks %d", hello.version, __version__, PROTOCOL_VERSION)
            self._write(frame(hello_reply(info)))
            raise SystemExit(3)
        self.commits.reply_timeout_s = int(hello.options.get("reply_timeout", 5000)) / 1000
        logging.getLogger().setLevel(python_level(hello.options.get("loglevel")))
        runtime = self.runtime = start(hello, self._device_gone, self._route_committed,
                                       self._answered_in_process, self._commit_writes)
        self.service, self._store = runtime.service, runtime.store
        self._logic_workers = LogicWorkers(runtime.service, self._logic_done,
                                           lambda: self.commits.held is not None,
                                           self.on_fatal)
        self.commits.attach(runtime.store, runtime.config.ejabberd_node, runtime.config.host,
                            runtime.last_batch, runtime.dispatcher.submit,
                            self._logic_workers.ask)
        self._write(frame(hello_reply(info, hello_facts(runtime.config))))
        self._write(frame([action_term(a) for a in [
            *self.service.initial_actions(), *self.service.groupchat.initial_actions(),
            *self.service.unified_push.initial_actions()]]))
        config = runtime.config
        log.info("ready for %s (pymod_push %s, database %s; at most %d pushed messages "
                 "remembered per pending session: mod_stream_mgmt's max_ack_queue)", hello.host,
                 __version__, "PostgreSQL" if config.db_url else config.db_file,
                 self.service.marks_kept)
        self._timers_from = time.monotonic() + REPLAY_GRACE_S
        self._arm_timer()  # notifications an earlier process left unanswered
        for user in self.service.users_waiting_for_logic():  # and those it left waiting
            self._logic_workers.ask(user)
        self._housekeeping()
        if config.metrics_listen:
            asyncio.get_running_loop().create_task(self._serve_metrics(config.metrics_listen))
        # What start-up made (modules, configuration, providers) lives as long as the
        # process: out of the collector's sight, a full collection under load takes 3 ms
        # of CPU instead of 14 (measured at 2,000 pushes/s), and the loop waits for it.
        gc.collect()
        gc.freeze()

    async def _serve_metrics(self, address: str) -> None:
        assert self.runtime is not None
        self._metrics = await metrics.serve_metrics(address, self.runtime.snapshot)

    def _route_committed(self, xml: str) -> None:
        """A stanza to route once what was written before it is committed (the dispatcher's
        answer to a publisher, after the push it deferred is queued)."""
        self.commits.after_commit(Route(xml))

    def _commit_writes(self) -> None:
        """Writes made outside an event (the dispatcher's provider queue) go with the next
        group commit."""
        self.commits.writes_made()

    def _answered_in_process(self, reply: PublishReply) -> None:
        """The provider's first answer to a publish taken in-process: for the publisher as
        the IQ path's iq_reply event would be, committed with what comes with it. The
        answers of one loop iteration (one read from the provider) are handled together."""
        self._answers.append(reply)
        if len(self._answers) == 1:
            asyncio.get_running_loop().call_soon(self._handle_answers)

    def _handle_answers(self) -> None:
        answers, self._answers = self._answers, []
        now = time.monotonic()
        try:
            if self.commits.held is not None:
                self.commits.held.extend((now, reply) for reply in answers)
            else:
                self._feed([(now, reply) for reply in answers])
        except BaseException as exc:  # noqa: BLE001 - ends the process, as in data_received
            self.on_fatal(exc)

    def _device_gone(self, node: str) -> None:
        if self._store is not None:
            self._store.remove_device(node)
            self._commit_writes()

    def _handle(self, term: Any, late: bool = False) -> Sequence[Action | Delivery | LogicWork]:
        assert self.service is not None
        try:
            event = parse_event(term)
        except ProtocolError as exc:
            log.error("event ignored: %s", exc)
            return []
        if late and isinstance(event, AppServerIq):
            self.commits.late_iqs += 1
            return []
        assert self.runtime is not None
        self.runtime.events[type(event).__name__] += 1
        try:
            return self._handle_event(event)
        except DatabaseUnavailable:
            self.runtime.events[type(event).__name__] -= 1
            raise

    def _handle_event(self, event: Event) -> Sequence[Action | Delivery | LogicWork]:
        assert self.service is not None
        mark = self.service.store.write_mark()
        try:
            if isinstance(event, LogLevel):
                logging.getLogger().setLevel(python_level(event.level))
                log.info("log level now %s, as ejabberd's", event.level)
                return []
            if isinstance(event, AdminCommand):
                assert self.runtime is not None
                now = time.time()  # test pushes and wakes to its own app server too
                actions = self.service.own_publishes(
                    admin.run(event, self.service, self.runtime.process_info(), now), now)
                if admin.DEFERRED:  # push_diagnose_test: answered once its pushes are
                    asyncio.get_running_loop().call_later(DEFERRED_POLL_S, self._answer_later)
                return actions
            if isinstance(event, AppServerIq) and diagnosis.is_command(event.xml):
                now = time.time()  # the user's own push check-up (ad-hoc push-diagnose)
                answer = diagnosis.adhoc(self.service, event.xml, now)
                if answer is not None:
                    return self.service.own_publishes(answer, now)
            return self.service.handle(event, time.time())
        except DatabaseUnavailable:
            self.service.store.undo_to(mark)  # handled again, whole, when it is back
            raise
        except Exception:
            log.exception("failed to handle a %s event", type(event).__name__)
            return []

    def _answer_later(self) -> None:
        """The commands' answers that waited (admin.DEFERRED), once they may go."""
        results = admin.due_results(time.monotonic())
        if results:
            self.commits.collect(results)
            self.commits.request()
        if admin.DEFERRED:
            asyncio.get_running_loop().call_later(DEFERRED_POLL_S, self._answer_later)

    def _housekeeping(self) -> None:
        """Now and every PURGE_INTERVAL_S: forget what cannot matter any more."""
        assert self.service is not None
        try:
            if self.commits.held is None:
                now = time.time()
                self.service.forget_old_marks(now)
                expired = self.service.expire_unified_push(now)
                self.service.store.commit()  # early for what is pending: harmless, never late
                if expired:  # the shim's UnifiedPush user set, after the commit
                    self.commits.collect(expired)
                    self.commits.request()
        except DatabaseUnavailable:
            pass  # the port's commits notice and retry
        except BaseException as exc:  # noqa: BLE001 - ends the process, as in data_received
            self.on_fatal(exc)
            return
        asyncio.get_running_loop().call_later(PURGE_INTERVAL_S, self._housekeeping)

    def _flush(self, actions: list[Action]) -> None:
        if actions:
            self._write(frame([action_term(a) for a in actions]))
        self._arm_timer()

    def _arm_timer(self) -> None:
        if self.service is None:
            return
        deadline = self.service.next_deadline()
        if self._timer is not None:
            if deadline == self._timer_deadline:
                return  # as armed (after most commits: a wake hours away)
            self._timer.cancel()
            self._timer = None
        self._timer_deadline = deadline
        if deadline is not None:  # wall-clock: due times are stored and outlive the process
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(max(0.0, deadline - time.time(),
                                              self._timers_from - time.monotonic()),
                                          self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        assert self.service is not None
        if self.commits.held is not None:
            return  # armed again after the next commit that goes through
        mark = self.service.store.write_mark()
        try:
            self.commits.collect(self.service.tick(time.time()))
            self.commits.request()
        except DatabaseUnavailable as exc:
            self.service.store.undo_to(mark)
            self.commits.database_away(exc, [])
            self.commits.request()
        except BaseException as exc:  # noqa: BLE001 - ends the process, as in data_received
            self.on_fatal(exc)

    async def aclose(self) -> None:
        if self._logic_workers is not None:
            self._logic_workers.cancel()
        self.commits.finish()  # what was handled is committed, and said
        if self._metrics is not None:
            self._metrics.close()
        if self.runtime is not None:
            await self.runtime.dispatcher.close()
        if self._store is not None:
            if self.commits.held is not None:  # not said: the next process redoes it
                self._store.rollback()
            try:
                self._store.close()
            except DatabaseUnavailable as exc:  # unacknowledged: the next process has them
                log.error("database unavailable at exit (%s): the events not acknowledged "
                          "are handled by the next process", exc)


class _StdinProtocol(asyncio.Protocol):
    def __init__(self, app: PortApp, done: asyncio.Future[None]) -> None:
        self._app = app
        self._done = done
        self._splitter = FrameSplitter()

    def data_received(self, data: bytes) -> None:
        try:
            self._app.on_frames(self._splitter.feed(data))
        except BaseException as exc:  # noqa: BLE001 - ends the process via run()
            if not self._done.done():
                self._done.set_exception(exc)

    def eof_received(self) -> bool:
        if not self._done.done():
            self._done.set_result(None)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._done.done():
            self._done.set_result(None)


async def serve_port(stdin: BinaryIO, out_fd: int) -> None:
    loop = asyncio.get_running_loop()

    def write(data: bytes) -> None:
        # Blocking writes keep frames whole and in order; ejabberd reads its
        # port continuously, so this only blocks if the VM itself is stuck.
        view = memoryview(data)
        while view:
            written = os.write(out_fd, view)
            view = view[written:]

    handler = PortLogHandler(write)
    logging.getLogger().addHandler(handler)
    logging.getLogger().addHandler(UserLogHandler())  # push_diagnose's lines per user
    logging.getLogger().setLevel(logging.INFO)
    app = PortApp(write)
    done: asyncio.Future[None] = loop.create_future()

    def fatal(exc: BaseException) -> None:
        if not done.done():
            done.set_exception(exc)
    app.on_fatal = fatal
    transport, _ = await loop.connect_read_pipe(lambda: _StdinProtocol(app, done), stdin)
    try:
        await done
    finally:
        transport.close()
        await app.aclose()
        logging.getLogger().removeHandler(handler)


# A thread that wakes (PostgreSQL's answer in store_pg's thread, the event loop after it,
# the end of a checkpoint) waits for the busy one to let go of the GIL up to the switch
# interval: 5 ms by default, twice per PostgreSQL commit. It costs nothing while a single
# thread runs (README, Clusters: the latencies measured with and without it).
GIL_SWITCH_INTERVAL_S = 0.0005


def main() -> int:
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    # Frames own the real stdout; anything else printed goes to stderr instead.
    out_fd = os.dup(sys.stdout.fileno())
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    os.set_blocking(out_fd, True)
    try:
        asyncio.run(serve_port(sys.stdin.buffer, out_fd))
    except SystemExit as exc:
        return int(exc.code or 0)
    except Exception as exc:  # noqa: BLE001 - last words go to ejabberd's log
        try:
            os.write(out_fd, frame(action_term(Log("critical", f"pymod_push "
                                                                 f"crashed: {exc!r}"))))
        except OSError:
            pass
        raise
    return 0
