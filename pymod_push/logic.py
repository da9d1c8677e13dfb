"""Push logic an admin writes in Python: option ``logic`` names a module (importable, or a
path to a ``.py`` file) that may define any of these plain functions::

    def should_push(message: Message, recipient: Recipient, default: bool) -> bool
        # send a notification for this stanza to this registration? (default: ours)
    def summary(message: Message, recipient: Recipient,
                fields: Mapping[str, str]) -> Mapping[str, str]
        # the urn:xmpp:push:summary fields to send (default: ``fields``, already within
        # the user's options and the admin limits; what you return is sent as it is)
    def provider_data(device: Device, data: Mapping[str, str]) -> Mapping[str, str]
        # built-in app server: the data a provider's payload carries for this device
        # (APNs custom keys, FCM data, the Web Push JSON; alert text is made from it)

Any of them may be ``async def`` (to ask a service of the admin's): the notification then
waits for it, within the budget (option logic_budget), while other users' do not (see
Logic.decide, PushService.logic_call, and the provider edge for provider_data).
They receive read-only objects (frozen dataclasses, mappings that cannot be changed).
A function that raises, returns the wrong type or is slow (over the budget; three times
for a plain function) is contained: the error is logged, our default is used, and a
function that keeps failing is switched off until the module is reloaded
(``ejabberdctl push_reload_logic HOST``, which keeps the running module if the new one
does not import or fails a trial call) or restarted. Example: examples/push_logic.py;
try a module offline with ``pymod-push logic check FILE``.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import inspect
import logging
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType, ModuleType
from typing import Any

from pymod_push.core.ios_extensions import NONE as NO_EXTENSIONS
from pymod_push.core.ios_extensions import Extensions

log = logging.getLogger("pymod_push")

BUDGET_S = 0.05  # a push decision runs on the event path: 50 ms is already very slow
STRIKES = 3  # failures or slow calls after which a function is switched off


@dataclass(frozen=True, slots=True)
class Message:
    kind: str  # "message" or "presence" (a subscription request)
    type: str  # chat, normal, groupchat, headline; subscribe for presences
    sender: str  # the full JID it came from
    body: str  # "" when there is none
    encrypted: bool  # OMEMO / OpenPGP: body is only the plaintext fallback
    call: bool  # a Jingle Message Initiation proposal
    xml: str  # the whole stanza


@dataclass(frozen=True, slots=True)
class Recipient:
    user: str
    server: str
    resource: str  # the push-enabled session
    # What the client asked with its enable (Tigase's extensions: encrypt, priority,
    # muted, groupchat, ignore-unknown, jingle); all off for most clients. Its repr leaves
    # out the key.
    extensions: Extensions = NO_EXTENSIONS

    @property
    def jid(self) -> str:
        return f"{self.user}@{self.server}"


@dataclass(frozen=True, slots=True)
class Device:
    """A device of the built-in app server."""

    user: str  # bare JID
    provider: str  # apns | fcm | webpush | wns | ubuntu
    app_name: str
    device_id: str
    device_name: str


@dataclass(frozen=True, slots=True)
class LogicCase:
    """One registration a message may push to, as the admin's functions see it."""

    recipient: Recipient
    default: bool  # our decision
    fields: list[tuple[str, str]]  # the summary if it pushes (counts as they would be)


# An admin's async function that keeps missing the budget is said at most this often.
LATE_WARNING_INTERVAL_S = 60.0


class Logic:
    """Calls into the admin's module, contained; without one, every call is the default."""

    def __init__(self, module: ModuleType | None = None, budget_s: float = BUDGET_S) -> None:
        self.module = module
        self.budget_s = budget_s  # option logic_budget
        self._strikes: Counter[str] = Counter()
        self._late_said: dict[str, float] = {}

    @property
    def is_async(self) -> bool:
        """should_push or summary is an 'async def': notifications wait for them (decide)
        rather than being decided on the spot."""
        if self.module is None:  # asked for every notification: no inspection then
            return False
        return any(inspect.iscoroutinefunction(self._function(name))
                   for name in ("should_push", "summary"))

    @property
    def shapes_async(self) -> bool:
        """provider_data is an 'async def': the provider edge awaits it (provider_data_async)
        before a push's first attempt, within the budget."""
        return self.module is not None and \
            inspect.iscoroutinefunction(self._function("provider_data"))

    async def provider_data_async(self, device: Device, data: dict[str, str]) -> dict[str, str]:
        deadline = asyncio.get_running_loop().time() + self.budget_s
        (result,) = await self._gather("provider_data", Mapping, deadline,
                                       [(device, MappingProxyType(dict(data)))], [None])
        return data if result is None else {str(k): str(v) for k, v in result.items()}

    async def decide(self, message: Message, cases: Sequence[LogicCase]
                     ) -> list[tuple[bool, list[tuple[str, str]] | None]]:
        """For each case: does it push, and the summary (None: the fields as they are).
        should_push first, then summary for those that push, each for all cases at once;
        what has not answered within the budget is cancelled and gets the default."""
        deadline = asyncio.get_running_loop().time() + self.budget_s
        defaults = [case.default for case in cases]
        pushes = [bool(p) for p in await self._gather(
            "should_push", bool, deadline,
            [(message, case.recipient, case.default) for case in cases], defaults)]
        chosen = [i for i, push in enumerate(pushes) if push]
        summaries: list[list[tuple[str, str]] | None] = [None] * len(cases)
        results = await self._gather(
            "summary", Mapping, deadline,
            [(message, cases[i].recipient, MappingProxyType(dict(cases[i].fields)))
             for i in chosen], [None] * len(chosen))
        for i, result in zip(chosen, results, strict=True):
            if result is not None:
                summaries[i] = [(str(k), str(v)) for k, v in result.items()]
        return list(zip(pushes, summaries, strict=True))

    async def _gather(self, name: str, kind: type, deadline: float,
                      calls: list[tuple[Any, ...]], defaults: list[Any]) -> list[Any]:
        function = self._function(name)
        if function is None or not calls:
            return defaults

        async def one(args: tuple[Any, ...], default: Any) -> Any:
            try:
                result = function(*args)
                if inspect.isawaitable(result):
                    result = await result
            except Exception as exc:  # noqa: BLE001 - the admin's code: anything can happen
                return self._strike(name, default, f"raised {type(exc).__name__}: {exc}")
            if not isinstance(result, kind):
                return self._strike(name, default, f"returned {type(result).__name__}, "
                                                   f"not {kind.__name__}")
            return result

        loop = asyncio.get_running_loop()
        tasks = [loop.create_task(one(args, default))
                 for args, default in zip(calls, defaults, strict=True)]
        try:
            done, late = await asyncio.wait(tasks, timeout=max(deadline - loop.time(), 0))
        except asyncio.CancelledError:  # the process ends: theirs too
            for task in tasks:
                task.cancel()
            raise
        for task in late:
            task.cancel()
        if late:
            self._late(name, len(late))
        return [task.result() if task in done else default
                for task, default in zip(tasks, defaults, strict=True)]

    def _late(self, name: str, count: int) -> None:
        now = time.monotonic()
        if now - self._late_said.get(name, -1e9) >= LATE_WARNING_INTERVAL_S:
            self._late_said[name] = now
            log.warning("push logic %s.%s did not answer within %.0f ms (option logic_budget) "
                        "for %d notification(s): cancelled, the default used (said at most "
                        "once a minute)", getattr(self.module, "__name__", "?"), name,
                        self.budget_s * 1000, count)

    def has(self, name: str) -> bool:
        return self._function(name) is not None

    def should_push(self, message: Message, recipient: Recipient, default: bool) -> bool:
        return bool(self._call("should_push", bool, default, message, recipient, default))

    def summary(self, message: Message, recipient: Recipient,
                fields: list[tuple[str, str]]) -> list[tuple[str, str]]:
        if not self.has("summary"):
            return fields
        result = self._call("summary", Mapping, None, message, recipient,
                            MappingProxyType(dict(fields)))
        return fields if result is None else [(str(k), str(v)) for k, v in result.items()]

    def provider_data(self, device: Device, data: dict[str, str]) -> dict[str, str]:
        if not self.has("provider_data"):
            return data
        result = self._call("provider_data", Mapping, None, device, MappingProxyType(data))
        return data if result is None else {str(k): str(v) for k, v in result.items()}

    def _function(self, name: str) -> Callable[..., Any] | None:
        if self.module is None or self._strikes[name] >= STRIKES:
            return None
        function = getattr(self.module, name, None)
        return function if callable(function) else None

    def _call(self, name: str, kind: type, default: Any, *args: Any) -> Any:
        function = self._function(name)
        if function is None:
            return default
        started = time.perf_counter()
        try:
            result = function(*args)
        except Exception as exc:  # noqa: BLE001 - the admin's code: anything can happen
            return self._strike(name, default, f"raised {type(exc).__name__}: {exc}")
        elapsed = time.perf_counter() - started
        if not isinstance(result, kind):
            return self._strike(name, default, f"returned {type(result).__name__}, "
                                               f"not {kind.__name__}")
        if elapsed > self.budget_s:
            self._strike(name, result, f"took {elapsed * 1000:.0f} ms")
        return result

    def _strike(self, name: str, default: Any, why: str) -> Any:
        self._strikes[name] += 1
        off = self._strikes[name] >= STRIKES
        log.error("push logic %s.%s %s; %s", getattr(self.module, "__name__", "?"), name, why,
                  "switched off until the module is reloaded" if off else "default used")
        return default


class LogicError(Exception):
    """A module that cannot be used (see load_checked): the text says why."""


FUNCTIONS = ("should_push", "summary", "provider_data")


def import_admin_module(spec: str, fresh: bool, name: str = "pymod_push_logic") -> ModuleType:
    """The module by file path (named ``name``) or import name; fresh: a new module object
    even if it was imported before (a failed reload must not touch the one in use)."""
    if spec.endswith(".py"):
        module_spec = importlib.util.spec_from_file_location(name, spec)
    elif fresh:
        module_spec = importlib.util.find_spec(spec)
    else:
        return importlib.import_module(spec)
    if module_spec is None or module_spec.loader is None:
        raise ImportError(f"cannot load {spec}")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def load(spec: str | None) -> Logic:
    """The admin's module by import name or file path; a module that fails to load is
    logged and the defaults are used."""
    if not spec:
        return Logic()
    try:
        module = import_admin_module(spec, fresh=False)
    except Exception as exc:  # noqa: BLE001 - a broken module must not stop pushes
        log.error("push logic %s could not be loaded (%s: %s); the defaults are used",
                  spec, type(exc).__name__, exc)
        return Logic()
    functions = [n for n in FUNCTIONS if callable(getattr(module, n, None))]
    log.info("push logic %s loaded: %s", spec, ", ".join(functions) or "no functions")
    return Logic(module)


# What load_checked tries each function on.
_TRIAL_MESSAGE = Message("message", "chat", "romeo@example.net/orchard", "Hello", False, False,
                         "<message xmlns='jabber:client' type='chat' from='romeo@example.net"
                         "/orchard' id='trial'><body>Hello</body></message>")
_TRIAL_RECIPIENT = Recipient("juliet", "example.org", "phone")
_TRIAL_DEVICE = Device("juliet@example.org", "fcm", "app", "phone", "Juliet's phone")
_TRIAL_FIELDS = MappingProxyType({"message-count": "1", "last-message-body": "Hello"})


def load_checked(spec: str | None) -> Logic:
    """The module afresh, for a reload: LogicError unless it imports and each of its
    functions, called once on a sample, returns the right type within the budget."""
    if not spec:
        raise LogicError("no 'logic' module is configured")
    try:
        module = import_admin_module(spec, fresh=True)
    except BaseException as exc:  # noqa: BLE001 - SyntaxError, SystemExit, anything
        raise LogicError(f"it does not import ({type(exc).__name__}: {exc})") from exc
    trials: dict[str, tuple[type, tuple[Any, ...]]] = {
        "should_push": (bool, (_TRIAL_MESSAGE, _TRIAL_RECIPIENT, True)),
        "summary": (Mapping, (_TRIAL_MESSAGE, _TRIAL_RECIPIENT, _TRIAL_FIELDS)),
        "provider_data": (Mapping, (_TRIAL_DEVICE, _TRIAL_FIELDS)),
    }
    for name, (kind, args) in trials.items():
        function = getattr(module, name, None)
        if function is None:
            continue
        if not callable(function):
            raise LogicError(f"{name} is not a function")
        if inspect.iscoroutinefunction(function):
            continue  # not tried: it may wait for a service (the budget holds it)
        started = time.perf_counter()
        try:
            result = function(*args)
        except Exception as exc:  # noqa: BLE001 - the admin's code
            raise LogicError(f"{name} raised {type(exc).__name__}: {exc} on a sample "
                             "chat message") from exc
        if not isinstance(result, kind):
            raise LogicError(f"{name} returned {type(result).__name__}, not {kind.__name__}")
        elapsed = time.perf_counter() - started
        if elapsed > BUDGET_S:
            raise LogicError(f"{name} took {elapsed * 1000:.0f} ms on a sample chat message "
                             f"(the budget is {BUDGET_S * 1000:.0f} ms)")
    return Logic(module)
