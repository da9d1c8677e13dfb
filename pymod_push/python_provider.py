"""Push providers written in Python: a backend ``type: python`` whose ``module`` (import
name or path to a ``.py`` file) delivers notifications itself (a webhook, ntfy, Gotify, an
SMS gateway). The module defines::

    FIELDS = {"topic": "ntfy topic"}     # what devices register (var: label); optional
    OPTIONAL_FIELDS = ("priority",)      # declared fields a device may leave empty
    def check_registration(fields: dict[str, str]) -> dict[str, str]   # optional: raise
        # ValueError("why") to refuse a registration (bad-request with that text)
    async def send(device: PushDevice, notification: Notification[, options]) -> Result

``send`` returns :class:`Delivered` (or None), :class:`RetryLater` (optionally after N
seconds), :class:`Gone` (the device is unregistered) or :class:`Refused` (this push is
wrong; not retried). An exception, or no answer within the backend's ``timeout`` (seconds,
default 30), is a retry. With a third parameter, ``send`` also gets the backend's own
options from ejabberd.yml (everything besides type, module, name and the hosts).

Devices register with the ad-hoc command ``register-push-NAME`` (NAME: the backend's
``name``, by default the module's); the built-in app server gives them the node and secret
that their client then enables, as for the shipped providers. Retries with backoff, the
provider queue (nothing lost across restarts), metrics and logs are the shipped providers'
(providers/dispatch.py); registration fields and exception texts are never logged, as they
may hold secrets (unless the admin set ``log_sensitive``). Example:
examples/webhook_provider.py.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType, ModuleType
from typing import Any

from pymod_push.core.config import Backend
from pymod_push.core.xmpp import RequestError
from pymod_push.logic import import_admin_module
from pymod_push.providers import DeliveryOutcome, Reply, notification_text

log = logging.getLogger("pymod_push")

DEFAULT_TIMEOUT_S = 30.0
MAX_FIELDS = 16
# Fields every registration form has already (see core.appserver.parse_registration).
RESERVED_FIELDS = ("device-id", "device-name", "application-name")
_FIELD_NAME = re.compile(r"[a-z][a-z0-9_-]{0,63}")


# ---------------------------------------------------------------- what send returns

@dataclass(frozen=True, slots=True)
class Delivered:
    pass


@dataclass(frozen=True, slots=True)
class RetryLater:
    after: float | None = None  # seconds; None: the usual backoff
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Gone:
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Refused:
    reason: str = ""


Result = Delivered | RetryLater | Gone | Refused | None


# ---------------------------------------------------------------- what send gets

@dataclass(frozen=True, slots=True)
class PushDevice:
    user: str  # bare JID
    device_id: str
    device_name: str
    app_name: str
    node: str
    fields: Mapping[str, str]  # the declared registration fields, as registered


@dataclass(frozen=True, slots=True)
class Notification:
    summary: Mapping[str, str]  # what the XMPP server sent (urn:xmpp:push:summary)
    urgent: bool  # a call, or what the server marked high priority
    title: str  # the sender, or "" (what the shipped providers show)
    text: str  # the message, "New message", "3 new messages" or ""


class ProviderError(Exception):
    """A provider module that cannot be used: the text says why."""


class PythonProvider:
    """One backend's module, checked: what its devices register and how it delivers."""

    def __init__(self, backend: Backend, module: ModuleType) -> None:
        self.name = backend.group
        self.spec = str(backend.options["module"])
        self.options = MappingProxyType({k: v for k, v in backend.options.items()
                                         if k not in ("module", "name", "timeout")})
        try:
            self.timeout_s = float(backend.options.get("timeout", DEFAULT_TIMEOUT_S))
        except ValueError:
            raise ProviderError("its option 'timeout' is not a number of seconds") from None
        declared = getattr(module, "FIELDS", {})
        if isinstance(declared, (list, tuple)):
            declared = {name: name for name in declared}
        if not isinstance(declared, Mapping) or len(declared) > MAX_FIELDS:
            raise ProviderError(f"FIELDS must be a mapping of at most {MAX_FIELDS} names")
        for name in declared:
            if (not isinstance(name, str) or not _FIELD_NAME.fullmatch(name)
                    or name in RESERVED_FIELDS):
                raise ProviderError(f"FIELDS has an unusable name {name!r} (lower case, "
                                    "digits, '-', '_'; not device-id, device-name)")
        self.fields: dict[str, str] = {name: str(label) for name, label in declared.items()}
        self.optional = frozenset(getattr(module, "OPTIONAL_FIELDS", ()))
        send = getattr(module, "send", None)
        if not inspect.iscoroutinefunction(send):
            raise ProviderError("it has no 'async def send(device, notification)'")
        positional = [p for p in inspect.signature(send).parameters.values()
                      if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        if len(positional) not in (2, 3):
            raise ProviderError("send takes (device, notification) or (device, notification, "
                                "options)")
        self._send: Callable[..., Awaitable[Any]] = send
        self._with_options = len(positional) == 3
        check = getattr(module, "check_registration", None)
        if check is not None and not callable(check):
            raise ProviderError("check_registration is not a function")
        self._check: Callable[[dict[str, str]], Any] | None = check
        self.module = module

    def registration(self, given: Mapping[str, str]) -> dict[str, str]:
        """The declared fields of a registration form; RequestError if it is refused."""
        fields = {name: given.get(name, "") for name in self.fields}
        missing = [n for n, v in fields.items() if not v and n not in self.optional]
        if missing:
            raise RequestError("bad-request", f"field '{missing[0]}' is required")
        if self._check is None:
            return fields
        try:
            checked = self._check(dict(fields))
        except ValueError as exc:
            raise RequestError("bad-request", str(exc) or "the registration was refused") \
                from None
        except Exception as exc:  # noqa: BLE001 - the admin's code
            log.error("python provider %s: check_registration raised %s", self.name,
                      type(exc).__name__)
            raise RequestError("internal-server-error", "the registration could not be "
                               "checked", "wait") from None
        if checked is None:
            return fields
        if not isinstance(checked, Mapping):
            log.error("python provider %s: check_registration returned %s, not a mapping",
                      self.name, type(checked).__name__)
            raise RequestError("internal-server-error", "the registration could not be "
                               "checked", "wait")
        return {name: str(checked.get(name, "")) for name in self.fields}

    async def deliver(self, device: PushDevice, summary: Mapping[str, str], urgent: bool,
                      log_sensitive: bool = False) -> Reply:
        title, text = notification_text(dict(summary))
        notification = Notification(MappingProxyType(dict(summary)), urgent, title, text)
        args = (device, notification, self.options) if self._with_options else (
            device, notification)
        try:
            result = await asyncio.wait_for(self._send(*args), self.timeout_s)
        except TimeoutError:
            return Reply(DeliveryOutcome.RETRY, f"no answer within {self.timeout_s:g} s")
        except Exception as exc:  # noqa: BLE001 - the admin's code; its text may hold secrets
            reason = f"{type(exc).__name__}: {exc}" if log_sensitive else type(exc).__name__
            return Reply(DeliveryOutcome.RETRY, f"send raised {reason}")
        return reply_of(result)


def reply_of(result: object) -> Reply:
    """What a provider's answer means to the dispatcher."""
    if result is None or isinstance(result, Delivered):
        return Reply(DeliveryOutcome.DELIVERED)
    if isinstance(result, RetryLater):
        # 1 s at least: a provider asking for 0 would otherwise be tried again at once,
        # over and over, for as long as the push may wait (dispatch.GIVE_UP_S)
        after = None if result.after is None else max(1.0, min(float(result.after), 600.0))
        return Reply(DeliveryOutcome.RETRY, result.reason or "retry later", after)
    if isinstance(result, Gone):
        return Reply(DeliveryOutcome.UNREGISTERED, result.reason or "gone")
    if isinstance(result, Refused):
        return Reply(DeliveryOutcome.FAILED, result.reason or "refused")
    return Reply(DeliveryOutcome.FAILED, f"send returned {type(result).__name__}, not a result")


def load_provider(backend: Backend) -> PythonProvider:
    """The backend's module, imported afresh (a failed reload leaves the running one)."""
    spec = str(backend.options.get("module", ""))
    try:
        module = import_admin_module(spec, fresh=True, name=f"pymod_push_provider_{backend.index}")
    except BaseException as exc:  # noqa: BLE001 - SyntaxError, SystemExit, anything
        raise ProviderError(f"it does not import ({type(exc).__name__}: {exc})") from exc
    return PythonProvider(backend, module)


class PythonProviders:
    """The loaded provider modules by backend index, shared by the app server (what
    devices register) and the provider edge (delivering); replaced whole on reload."""

    def __init__(self, backends: tuple[Backend, ...] = ()) -> None:
        self.backends = tuple(b for b in backends if b.type == "python")
        self._loaded: dict[int, PythonProvider] = {}
        for backend in self.backends:
            try:
                self._loaded[backend.index] = load_provider(backend)
            except ProviderError as error:
                log.error("python provider %s (%s) cannot be used: %s", backend.group,
                          backend.options.get("module"), error)
            else:
                log.info("python provider %s loaded from %s", backend.group,
                         backend.options.get("module"))

    def get(self, index: int) -> PythonProvider | None:
        return self._loaded.get(index)

    def reload(self) -> list[str]:
        """Every module afresh, all or none: ProviderError (naming the provider) if one
        does not load. The names of those reloaded."""
        loaded = {}
        for backend in self.backends:
            try:
                loaded[backend.index] = load_provider(backend)
            except ProviderError as error:
                raise ProviderError(f"python provider {backend.group}: {error}") from error
        self._loaded = loaded
        return [backend.group for backend in self.backends]


def device_fields(extra: str) -> dict[str, str]:
    """A device's stored registration fields (store.Device.extra)."""
    value = json.loads(extra) if extra else {}
    return {str(k): str(v) for k, v in value.items()} if isinstance(value, dict) else {}
