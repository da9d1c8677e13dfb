"""The commit pipeline: nothing is said before it is on disk.

What handling events produced (actions for ejabberd, pushes for the providers, the
acknowledgement of the last batch) waits here for one group commit, then goes out in
that order: the shim forgets a batch only once its effects are committed, and a
provider is asked only once its publish was recorded. While the database is away
(PostgreSQL), frames are held, unacknowledged, and handled in order once a commit goes
through again. With the ledger (service/ledger.py) and the store's tables
(store/ledger.py), this is "nothing lost, nothing twice"; docs/reliability.md tells the
whole story.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence

from pymod_push.appserver.server import Delivery
from pymod_push.protocol import Ack, Action, Batch, PublishReply
from pymod_push.records import DatabaseUnavailable
from pymod_push.service.logic_work import LogicWork
from pymod_push.store import Store

log = logging.getLogger("pymod_push")
# Commits (and so acknowledgements and publishes) at most this often: at 8,000 messages/s
# a commit per frame was the Python process's largest cost (every commit writes its pages
# to the WAL), while this delays a push by 2 ms at most.
GROUP_COMMIT_S = 0.002
# While the database (PostgreSQL) is away, the commit is tried again this often, doubling.
RETRY_FIRST_S, RETRY_MAX_S = 0.05, 2.0
# What the port handles in order: frames, a batch from one of its events on (held while
# the database is away), and providers' answers to publishes taken in-process.
Item = bytes | tuple[Batch, int] | PublishReply


class CommitPipeline:
    """Results in, one group commit, then what it made true out (see the module).

    say: writes actions to ejabberd; submit: gives a delivery to the providers; replay:
    handles items held while the database was away; ask_logic: starts the user's async
    logic worker; fatal: ends the process (an error nothing here can recover from)."""

    def __init__(self, say: Callable[[list[Action]], None],
                 replay: Callable[[list[tuple[float, Item]]], None],
                 fatal: Callable[[BaseException], None]) -> None:
        self._say_actions = say
        self._replay = replay
        self._fatal = fatal
        self._store: Store | None = None
        self._submit: Callable[[Delivery], None] | None = None
        self._ask_logic: Callable[[tuple[str, str]], None] | None = None
        self._node_host = ("", "")  # (ejabberd node, host): whose last batch is stored
        self.last_batch: tuple[int, int] | None = None  # (epoch, seq) handled last
        self._last_batch_unsaved = False  # written once per commit, not once per frame
        # What the next commit makes known: actions, app-server pushes, the acknowledgement.
        self._pending_actions: list[Action] = []
        self._pending_deliveries: list[Delivery] = []
        self._pending_ack: int | None = None
        self._unsaved_writes = False  # the dispatcher wrote since the last commit started
        self._commit_handle: asyncio.TimerHandle | None = None
        # PostgreSQL: what the commit under way makes known once it is through (actions,
        # deliveries, acknowledgement), None when no commit is under way.
        self._committing: tuple[list[Action], list[Delivery], int | None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # for the database's thread
        self._last_commit = 0.0
        # While the database is away: what is to be handled once it is back, in order
        # (frames, or a batch from one of its events on), with when it came. None: the
        # database is there.
        self.held: list[tuple[float, Item]] | None = None
        self._away_since = 0.0
        self._retry_s = RETRY_FIRST_S
        self.reply_timeout_s = 5.0  # ejabberd's, for IQs to this process (hello)
        self.late_iqs = 0  # publishes to the built-in app server answered by ejabberd

    def attach(self, store: Store, ejabberd_node: str, host: str,
               last_batch: tuple[int, int] | None, submit: Callable[[Delivery], None],
               ask_logic: Callable[[tuple[str, str]], None]) -> None:
        """The store and the dispatcher the hello started."""
        self._store, self._submit, self._ask_logic = store, submit, ask_logic
        self._node_host = (ejabberd_node, host)
        self.last_batch = last_batch

    # ------------------------------------------------------------------ results in
    def already_handled(self, batch: Batch) -> bool:
        """A batch the shim sends again after a crash whose effects were committed."""
        if self.last_batch is None:
            return False
        epoch, seq = self.last_batch
        return batch.epoch == epoch and batch.seq <= seq

    def handled(self, batch: Batch) -> None:
        """batch is handled: acknowledged once what it did is committed."""
        if not self.already_handled(batch):
            self.last_batch = (batch.epoch, batch.seq)
            self._last_batch_unsaved = True
        self._pending_ack = batch.seq

    def has_pending(self) -> bool:
        return bool(self._pending_actions or self._pending_deliveries)

    def collect(self, results: Sequence[Action | Delivery | LogicWork]) -> None:
        """What handling an event produced: actions and app-server pushes wait for the next
        commit; a notification waiting for async push logic gets its user's worker."""
        for result in results:
            if isinstance(result, Delivery):
                self._pending_deliveries.append(result)
            elif isinstance(result, LogicWork):
                assert self._ask_logic is not None
                self._ask_logic(result.target[:2])
            else:
                self._pending_actions.append(result)

    def after_commit(self, action: Action) -> None:
        """An action to say once what was written before it is committed."""
        self._pending_actions.append(action)
        self.request()

    def writes_made(self) -> None:
        """Writes made outside an event (the dispatcher's provider queue) go with the next
        group commit."""
        self._unsaved_writes = True
        self.request()

    def database_away(self, exc: BaseException, rest: list[tuple[float, Item]]) -> None:
        """Said once: events wait (here and in ejabberd, unacknowledged) until a commit
        goes through again."""
        if self.held is None:
            self.held = []
            self._away_since = time.monotonic()
            self.late_iqs = 0
            log.error("database unavailable (%s): events are held, unacknowledged, and "
                      "nothing is pushed until it is back; trying again every %.0f s at most",
                      exc, RETRY_MAX_S)
        self.held[:0] = rest

    def read_failed(self, exc: BaseException, rest: list[tuple[float, Item]]) -> None:
        """Handling an event found the database away in a read (no commit failed, so none
        would be tried again): held as database_away holds, and a commit tried again
        with the usual backoff, writing the last batch handled so that it reaches the
        database and finds out whether it is back (the held events are handled then)."""
        self.database_away(exc, rest)
        if self.last_batch is not None:
            self._last_batch_unsaved = True
        if self._commit_handle is None and self._committing is None:
            self._commit_failed(DatabaseUnavailable(str(exc)))

    # ------------------------------------------------------------------ the commit
    def request(self) -> None:
        """Commit, then write the actions and the acknowledgement: at once if the last
        commit was a while ago, else GROUP_COMMIT_S after it, with whatever came
        meanwhile. Under load one commit (a WAL write) serves many frames."""
        if self._commit_handle is not None:
            return
        wait = self._last_commit + GROUP_COMMIT_S - time.monotonic()
        if wait <= 0:
            self.commit()
        else:
            self._commit_handle = asyncio.get_running_loop().call_later(wait, self._commit_later)

    def _commit_later(self) -> None:
        try:
            self.commit()
        except BaseException as exc:  # noqa: BLE001 - ends the process, as in data_received
            self._fatal(exc)

    def commit(self) -> None:
        if self._commit_handle is not None:
            self._commit_handle.cancel()
            self._commit_handle = None
        if self._committing is not None:
            return  # one at a time: _committed asks for the next
        said = (self._pending_actions, self._pending_deliveries, self._pending_ack)
        self._unsaved_writes = False  # in this commit
        if self._store is not None:
            self._loop = asyncio.get_running_loop()
            try:
                if self._last_batch_unsaved and self.last_batch is not None:
                    self._store.set_last_batch(*self._node_host, *self.last_batch)
                    self._last_batch_unsaved = False  # in this commit's writes
                started = self._store.start_commit(self._commit_done_soon)
                if started is None:
                    self._store.commit()
            except DatabaseUnavailable as exc:  # nothing is said before it is committed
                self._commit_failed(exc)
                return
            if started:  # the next events are handled meanwhile (see PgConnection)
                self._committing = said
                self._pending_actions, self._pending_deliveries = [], []
                self._pending_ack = None
                return
        self._pending_actions, self._pending_deliveries, self._pending_ack = [], [], None
        self._say(*said)

    def _commit_done_soon(self) -> None:
        """Called in the database's thread when the commit's answer is there."""
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._committed)

    def _committed(self) -> None:
        said, self._committing = self._committing, None
        if said is None:
            return
        assert self._store is not None
        try:
            self._store.land()
        except DatabaseUnavailable as exc:  # said with the next commit that goes through
            actions, deliveries, ack = said
            self._pending_actions[:0] = actions
            self._pending_deliveries[:0] = deliveries
            if self._pending_ack is None:
                self._pending_ack = ack
            self._commit_failed(exc)
            return
        except BaseException as exc:  # noqa: BLE001 - ends the process, as in data_received
            self._fatal(exc)
            return
        self._say(*said)
        if self._pending_actions or self._pending_deliveries or self._pending_ack is not None \
                or self._unsaved_writes:
            self.request()  # what was handled or written meanwhile

    def _commit_failed(self, exc: DatabaseUnavailable) -> None:
        self.database_away(exc, [])
        self._commit_handle = asyncio.get_running_loop().call_later(self._retry_s,
                                                                    self._commit_later)
        self._retry_s = min(self._retry_s * 2, RETRY_MAX_S)

    def _say(self, actions: list[Action], deliveries: list[Delivery], ack: int | None) -> None:
        """What a commit made true goes out: actions, the acknowledgement, app-server
        pushes; and what waited for the database is handled."""
        if self.held is not None and time.monotonic() - self._away_since > self.reply_timeout_s:
            # Their publishes were answered with an error meanwhile: the publishers retry.
            self.late_iqs += sum(1 for d in deliveries if d.publish is not None)
            deliveries = [d for d in deliveries if d.publish is None]
        if ack is not None:
            actions.append(Ack(ack))  # the shim forgets every batch up to it
        self._say_actions(actions)
        self._last_commit = time.monotonic()
        for delivery in deliveries:  # after the commit: the publish was answered first
            assert self._submit is not None
            self._submit(delivery)
        if self.held is not None:
            held, self.held = self.held, None
            self._retry_s = RETRY_FIRST_S
            self._replay(held)
            log.warning("database back after %.1f s: %d held frame(s) handled%s",
                        time.monotonic() - self._away_since, len(held),
                        f"; {self.late_iqs} publish(es) to the built-in app server not "
                        "sent: ejabberd answered them with an error meanwhile, their "
                        "publishers try again" if self.late_iqs else "")

    def finish(self) -> None:
        """At exit: what was handled is committed and said, as far as the database lets."""
        try:
            for _ in range(4):  # the commit under way, then what was handled meanwhile
                if self.held is not None:
                    break
                if self._committing is not None:
                    self._committed()  # waits for its answer
                elif self._commit_handle is not None:
                    self.commit()
                else:
                    break
        except OSError:
            pass  # ejabberd closed the port: the commit is what matters
        self._committing = None  # not said, not acknowledged: the next process redoes it

    @property
    def committing(self) -> bool:
        """A commit (PostgreSQL's) is under way."""
        return self._committing is not None
