"""Notifications that wait for the admin's async push logic (PushService.logic_call): one
task per user asks the logic for that user's queued notifications one after the other, so
that they stay in order while other users' never wait for them."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence

from pymod_push.appserver.server import Delivery
from pymod_push.protocol import Action, UserKey
from pymod_push.records import DatabaseUnavailable
from pymod_push.service.decisions import PushService
from pymod_push.service.logic_work import LogicWork

# While the database is away, a worker looks again this often.
AWAY_RETRY_S = 2.0

Results = Sequence[Action | Delivery | LogicWork]


class LogicWorkers:
    def __init__(self, service: PushService, done: Callable[[Results], None],
                 database_away: Callable[[], bool],
                 on_fatal: Callable[[BaseException], None]) -> None:
        self._service = service
        self._done = done  # what a finished notification produced, for the next commit
        self._database_away = database_away
        self._on_fatal = on_fatal
        self._workers: dict[UserKey, asyncio.Task[None]] = {}

    def ask(self, user: UserKey) -> None:
        """The user's waiting notifications get a worker, if they have none yet."""
        if user not in self._workers:
            self._workers[user] = asyncio.get_running_loop().create_task(self._work(user))

    def cancel(self) -> None:
        """At exit: the queued rows stay for the next process."""
        for worker in list(self._workers.values()):
            worker.cancel()

    async def _work(self, user: UserKey) -> None:
        service = self._service
        try:
            while (work := service.waiting_for_logic(user)) is not None:
                if self._database_away():  # after it is back
                    await asyncio.sleep(AWAY_RETRY_S)
                    continue
                try:
                    call = service.logic_call(work)
                except DatabaseUnavailable:
                    await asyncio.sleep(AWAY_RETRY_S)
                    continue
                answers = (await service.logic.decide(call.message, call.cases)
                           if call.message is not None else [])
                if len(answers) != len(call.cases):
                    answers = [(False, None)] * len(call.cases)
                mark = service.store.write_mark()
                try:
                    results = service.finish_logic(call, answers, time.time())
                except DatabaseUnavailable:
                    service.store.undo_to(mark)
                    await asyncio.sleep(AWAY_RETRY_S)  # asked again (the same answers, mostly)
                    continue
                self._done(results)
        except BaseException as exc:  # noqa: BLE001 - ends the process, as in data_received
            if not isinstance(exc, asyncio.CancelledError):
                self._on_fatal(exc)
            raise
        finally:
            self._workers.pop(user, None)
