"""ejabberdctl commands (registered by the shim, answered here): status, a user's push
registrations and devices, deleting one, test pushes, waking pending users, cleaning up,
reloading the admin's push logic, the push check-up (push_diagnose, push_diagnose_test).

Each command returns the text ejabberdctl prints and the actions it causes; the check-up
with test pushes answers later (:data:`DEFERRED`), once its pushes are answered.
"""

from __future__ import annotations

import logging
import os
import platform
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pymod_push import __version__, logic
from pymod_push.core import ios_extensions
from pymod_push.core.limits import ascii_number
from pymod_push.core.push_history import about
from pymod_push.delivery.dispatcher import GIVE_UP_S, MAX_WAITING_PER_DEVICE
from pymod_push.protocol import Action, AdminCommand, CommandResult
from pymod_push.python_provider import ProviderError
from pymod_push.records import Registration
from pymod_push.service import diagnosis
from pymod_push.service.decisions import PushService

log = logging.getLogger("pymod_push")


@dataclass
class ProcessInfo:
    """What the port edge knows about this process."""

    started: float = field(default_factory=time.time)
    events_handled: int = 0
    provider_counters: Counter[tuple[str, str]] = field(default_factory=Counter)


class CommandError(Exception):
    """A command that cannot be run as asked: its text is the answer."""


def run(command: AdminCommand, service: PushService, info: ProcessInfo,
        now: float) -> list[Action]:
    handlers = {"status": _status, "list": _list, "delete": _delete, "test": _test,
                "wake_all": _wake_all, "delete_old": _delete_old,
                "reload_logic": _reload_logic, "diagnose_domains": _diagnose_domains,
                "diagnose": _diagnose, "diagnose_test": _diagnose_test,
                "up_list": _up_list, "up_revoke": _up_revoke}
    handler = handlers.get(command.name)
    try:
        if handler is None:
            raise CommandError(f"unknown command {command.name!r}")
        text, actions = handler(service, info, command.args, now)
    except CommandError as error:
        text, actions = f"error: {error}", []
    except (ValueError, TypeError) as error:
        text, actions = f"error: bad arguments ({error})", []
    service.store.commit()
    if isinstance(text, Later):  # answered by due_results
        DEFERRED.append(Deferred(command.ref, time.monotonic() + text.wait_s, text.ready,
                                 text.text))
        return actions
    return [*actions, CommandResult(command.ref, text)]


@dataclass
class Later:
    """A command's answer that waits (at most wait_s) until ready() says it may go."""

    wait_s: float
    ready: Callable[[], bool]
    text: Callable[[], str]


@dataclass
class Deferred:
    ref: Any
    deadline: float  # monotonic
    ready: Callable[[], bool]
    text: Callable[[], str]


# Commands whose answers wait (push_diagnose_test): the port asks due_results until none is
# left (docs/diagnostics.md).
DEFERRED: list[Deferred] = []


def due_results(now: float) -> list[Action]:
    """The waiting answers that may go now (now: monotonic)."""
    results: list[Action] = []
    for deferred in list(DEFERRED):
        if now >= deferred.deadline or deferred.ready():
            DEFERRED.remove(deferred)
            results.append(CommandResult(deferred.ref, deferred.text()))
    return results


Result = tuple["str | Later", list[Action]]


def _status(service: PushService, info: ProcessInfo, args: tuple[str, ...],
            now: float) -> Result:
    totals = service.store.totals()
    uptime = int(now - info.started)
    lines = [
        f"pymod_push {__version__} (Python {platform.python_version()}, pid {os.getpid()}), "
        f"up {uptime // 3600} h {uptime % 3600 // 60} min",
        f"events handled: {info.events_handled}",
        f"push registrations: {totals['registrations']}, users with own options: "
        f"{totals['user_options']}, app-server devices: {totals['devices']}",
        f"notifications awaiting an app server's answer: {totals['outbox']}, "
        f"deferred by providers: {totals['provider_queue']} (at most "
        f"{MAX_WAITING_PER_DEVICE} per device), messages remembered as "
        f"pushed: {totals['pushed']}",
        "publishes to app servers: " + _counts(service.counters),
        f"publishes to this module's own app server taken in-process: {service.in_process}",
        *service.unified_push.status_lines(),
    ]
    providers = sorted({provider for provider, _ in info.provider_counters})
    for provider in providers:
        outcomes = Counter({outcome: n for (p, outcome), n in info.provider_counters.items()
                            if p == provider})
        devices_given_up = outcomes.pop("devices_given_up", 0)  # devices, not pushes
        lines.append(f"pushes via {provider}: {_counts(outcomes)}" + (
            f"; devices given up (their pushes failed for {GIVE_UP_S / 3600:g} h): "
            f"{devices_given_up}" if devices_given_up else ""))
    config = service.config
    near = service.store.accounts_near(_near(config.max_registrations),
                                       _near(config.max_devices))
    if near:
        lines.append(f"accounts near a limit (max_registrations {config.max_registrations}, "
                     f"max_devices {config.max_devices}): "
                     + ", ".join(f"{account} {regs} registration(s) {devices} device(s)"
                                 for account, regs, devices in near))
    return "\n".join(lines), []


NEAR_LIMIT = 0.8  # an account holding this much of a limit is shown


def _near(limit: int) -> int:
    return max(1, int(limit * NEAR_LIMIT))


def _counts(counter: Counter[str]) -> str:
    return ", ".join(f"{key} {value}" for key, value in sorted(counter.items())) or "none"


def _user(args: tuple[str, ...], index: int = 0) -> tuple[str, str]:
    if len(args) < index + 2 or not args[index] or not args[index + 1]:
        raise CommandError("give the user's name and host")
    return args[index].lower(), args[index + 1].lower()


def _extension_names(registration: Registration) -> str:
    """The Tigase extensions a registration's client asked for, by name (no key)."""
    names = ios_extensions.from_json(registration.extensions).names()
    return f", extensions: {' '.join(names)}" if names else ""


def _list(service: PushService, info: ProcessInfo, args: tuple[str, ...],
          now: float) -> Result:
    user = _user(args)
    lines = []
    for registration in service.store.for_user(user):
        enabled = time.gmtime(service.store.enabled_at(registration.key) or 0.0)
        lines.append(f"session {registration.resource}: {registration.push_jid} node "
                     f"{registration.node}, enabled {time.strftime('%Y-%m-%d %H:%M', enabled)} "
                     "UTC, "
                     f"{registration.message_count} message(s) since it went away, "
                     f"{registration.errors} error(s)" + _extension_names(registration))
    for device in service.store.devices_of(f"{user[0]}@{user[1]}"):
        lines.append(f"device {device.device_id!r} ({device.device_name or 'no name'}): "
                     f"{device.provider}/{device.app_name}, node {device.node}")
    if not lines:
        return f"no push registrations for {user[0]}@{user[1]}", []
    config = service.config
    held = service.store.registration_count(user)
    devices = service.store.device_count(f"{user[0]}@{user[1]}")
    near = held >= _near(config.max_registrations) or devices >= _near(config.max_devices)
    lines.append(f"limits: {held} of {config.max_registrations} push registrations "
                 f"(max_registrations), {devices} of {config.max_devices} app-server devices "
                 f"(max_devices){', near a limit' if near else ''}")
    return "\n".join(lines), []


def _delete(service: PushService, info: ProcessInfo, args: tuple[str, ...],
            now: float) -> Result:
    user = _user(args)
    if len(args) < 3 or not args[2]:
        raise CommandError("give the node to delete (see push_list)")
    node = args[2]
    removed = service.store.delete_node(user, node)
    devices = service.store.remove_devices(f"{user[0]}@{user[1]}", nodes=[node])
    log.info("ejabberdctl: deleted %d registration(s) and %d device(s) of %s@%s",
             len(removed), len(devices), *user)
    return (f"deleted {len(removed)} push registration(s) and {len(devices)} app-server "
            f"device(s)", service.forget(removed))


def _up_list(service: PushService, info: ProcessInfo, args: tuple[str, ...],
             now: float) -> Result:
    """push_up_list: a user's UnifiedPush endpoints, by the hash of their instance."""
    user = _user(args)
    lines = service.unified_push.listing(user)
    if not lines:
        return f"no UnifiedPush endpoints for {user[0]}@{user[1]}", []
    return "\n".join(lines), []


def _up_revoke(service: PushService, info: ProcessInfo, args: tuple[str, ...],
               now: float) -> Result:
    """push_up_revoke: one endpoint (its hash as push_up_list shows it) or all."""
    user = _user(args)
    if len(args) < 3 or not args[2]:
        raise CommandError("give the endpoint's id as push_up_list shows it, or all")
    count, actions = service.unified_push.revoke_by_admin(user, args[2])
    if not count:
        raise CommandError(f"no such UnifiedPush endpoint of {user[0]}@{user[1]}")
    log.info("ejabberdctl: revoked %d UnifiedPush endpoint(s) of %s@%s", count, *user)
    return f"revoked {count} UnifiedPush endpoint(s)", actions


def _test(service: PushService, info: ProcessInfo, args: tuple[str, ...],
          now: float) -> Result:
    user = _user(args)
    registrations = service.store.for_user(user)
    actions: list[Action] = [service.wake(r, now) for r in registrations]
    return f"sent {len(actions)} test push(es)", actions


def _wake_all(service: PushService, info: ProcessInfo, args: tuple[str, ...],
              now: float) -> Result:
    pending = service.store.pending_on(service.config.ejabberd_node)
    actions: list[Action] = [service.wake(r, now) for r in pending]
    log.info("ejabberdctl: woke %d pending push session(s)", len(actions))
    return f"woke {len(actions)} pending push session(s)", actions


def _delete_old(service: PushService, info: ProcessInfo, args: tuple[str, ...],
                now: float) -> Result:
    days = ascii_number(args[0], 9) if args else None
    if days is None:
        raise CommandError("give a number of days")
    removed = service.store.delete_older_than(now - days * 86400)
    log.info("ejabberdctl: deleted %d push registration(s) older than %s days",
             len(removed), args[0])
    return (f"deleted {len(removed)} push registration(s) older than {args[0]} days",
            service.forget(removed))


def _reload_logic(service: PushService, info: ProcessInfo, args: tuple[str, ...],
                  now: float) -> Result:
    """The 'logic' module and the Python providers' modules read again, all or none: if
    one does not import or fails its checks, the running ones stay (and it says why)."""
    spec = service.config.logic
    python = service.app_server.python_providers
    if not spec and not python.backends:
        raise CommandError("no 'logic' module and no python provider is configured")
    try:
        new = logic.load_checked(spec) if spec else None
        reloaded = python.reload()
    except (logic.LogicError, ProviderError) as error:
        what = f"push logic {spec}" if isinstance(error, logic.LogicError) else "push logic"
        log.error("%s not reloaded: %s; the running one stays", what, error)
        raise CommandError(f"{what} not reloaded: {error}; the running one stays") from error
    said = []
    if new is not None:
        service.use_logic(new)
        functions = ", ".join(n for n in logic.FUNCTIONS if new.has(n)) or "no functions"
        said.append(f"push logic {spec} reloaded: {functions}")
    if reloaded:
        said.append(f"python providers reloaded: {', '.join(reloaded)}")
    log.info("%s", "; ".join(said))
    return "; ".join(said), []


def _diagnose_domains(service: PushService, info: ProcessInfo, args: tuple[str, ...],
                      now: float) -> Result:
    """The app servers' domains of the user's registrations, one a line: the shim asks how
    each is reachable before it asks for the check-up."""
    return "\n".join(diagnosis.domains(service, _user(args))), []


def _diagnose(service: PushService, info: ProcessInfo, args: tuple[str, ...],
              now: float) -> Result:
    user = _user(args)
    routes = diagnosis.parse_routes(args[2:])
    return diagnosis.report(service, user, routes, now).text, []


def _diagnose_test(service: PushService, info: ProcessInfo, args: tuple[str, ...],
                   now: float) -> Result:
    """push_diagnose with a test push to each registration: answered once each test push is
    answered, or after diagnosis.TEST_WAIT_S."""
    user = _user(args)
    routes = diagnosis.parse_routes(args[2:])
    actions, answered = diagnosis.test_pushes(service, user, now)
    log.info("ejabberdctl: push check-up with %d test push(es) for %s@%s", len(actions), *user,
             extra=about(*user))

    def text() -> str:
        waited = "" if answered() else (f" (not all answered within "
                                        f"{diagnosis.TEST_WAIT_S:g} s)")
        return (f"sent {len(actions)} test push(es){waited}\n"
                + diagnosis.report(service, user, routes, time.time()).text)

    return Later(diagnosis.TEST_WAIT_S, answered, text), actions
