"""The push check-up: what happened to a user's pushes, in plain words, for the admin
(ejabberdctl push_diagnose, push_diagnose_test) and for users themselves (the ad-hoc
command push-diagnose at their own server).

Durable facts come from the store (registrations, since when, error counts, devices, the
user's options); the last push of each registration and device, recently disabled
registrations and the user's newest log lines from this process's memory
(core/push_history.py). Never shown: a node (a short hash instead), a device's token or
secret, a Tigase encryption key, a message's body or sender.
"""

from __future__ import annotations

import logging
import math
import time
import xml.etree.ElementTree as ET
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from xml.sax.saxutils import escape

from pymod_push.appserver import requests as app
from pymod_push.core import ios_extensions
from pymod_push.core.limits import peer_text
from pymod_push.core.push_history import HISTORY, LastPush, about, short_hash
from pymod_push.core.shim_facts import DIAGNOSE_COMMAND, DIAGNOSE_NAME
from pymod_push.core.user_options import FIELD_NAMES
from pymod_push.core.xep0357 import NS_DATA
from pymod_push.core.xmpp import RequestError
from pymod_push.protocol import Action, Route, UserKey
from pymod_push.records import RegisteredDevice, Registration
from pymod_push.service.decisions import PushService

log = logging.getLogger("pymod_push")

TEST_WAIT_S = 10.0  # how long push_diagnose_test waits for the answers to its test pushes
MAX_TESTERS = 10_000  # users whose last test push time is kept (oldest forgotten)


def when(moment: float | None) -> str:
    if moment is None:
        return "unknown"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(moment))


def app_server_domain(registration: Registration) -> str:
    return registration.push_jid.partition("/")[0].rpartition("@")[2]


def domains(service: PushService, user: UserKey) -> list[str]:
    """The app servers' domains of a user's registrations (the shim says if each is
    reachable: mod_push_py_actions:route_states/2)."""
    return sorted({app_server_domain(r) for r in service.store.for_user(user)})


def _last(last: LastPush | None, started: float) -> str:
    if last is None:
        return f"no push since this process started ({when(started)})"
    said = f"{when(last.sent_at)}{' (a test push)' if last.test else ''}, sent {last.what}"
    if not last.answer:
        return said + "; no answer yet"
    return said + f"; answer: {last.answer} after {last.latency_ms} ms"


def _extensions(registration: Registration) -> str:
    extensions = ios_extensions.from_json(registration.extensions)
    if not extensions:
        return "no Tigase push extensions (filters)"
    said = []
    for name in extensions.names():
        if name == "muted":
            said.append(f"muted ({len(extensions.muted)} chat(s) muted)")
        elif name == "groupchat" and extensions.groupchat is not None:
            rules = [rule.allow for rule in extensions.groupchat]
            said.append(f"groupchat ({len(rules)} room rule(s): "
                        f"{', '.join(sorted(set(rules))) or 'none'})")
        elif name == "encrypt":
            said.append("encrypt (payload encrypted with the client's key)")
        else:
            said.append(name)
    return "Tigase push extensions (filters): " + ", ".join(said)


def _device(device: RegisteredDevice) -> str:
    return (f"{device.provider} (app {peer_text(device.app_name, 60)!r}), device "
            f"{peer_text(device.device_name or device.device_id, 60)!r}, node "
            f"{short_hash(device.node)}")


@dataclass
class Report:
    lines: list[str]

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


def report(service: PushService, user: UserKey, routes: dict[str, str] | None,
           now: float, admin: bool = True) -> Report:
    """The check-up of one user. routes: each app server domain's reachability, as the shim
    said (None: not asked, the ad-hoc command); admin: the log lines are shown too."""
    config, store = service.config, service.store
    jid = f"{user[0]}@{user[1]}"
    registrations = store.for_user(user)
    devices = {d.node: d for d in store.devices_of(jid)}
    own = {b.pubsub_host for b in config.backends}
    options = service.options_of(user)
    stored = store.user_options(user)
    lines = [f"push check-up of {jid} at {when(now)}: {len(registrations)} push "
             f"registration(s), {len(devices)} device(s) at this server's app server",
             "push options (" + ("set by the user" if stored is not None else
                                 "the server's defaults") + "): "
             + ", ".join(f"{var} {'on' if getattr(options, attribute) else 'off'}"
                         for var, attribute in FIELD_NAMES.items())]
    limit = config.max_publish_errors
    for number, registration in enumerate(registrations, 1):
        domain = app_server_domain(registration)
        device = devices.pop(registration.node, None) if domain in own else None
        if device is not None:
            where = f"this server's app server ({domain}): {_device(device)}"
        elif domain in own:
            where = f"this server's app server ({domain}), no device with that node any more"
        else:
            where = f"app server {peer_text(registration.push_jid, 100)}"
        lines.append(f"registration {number}, session {peer_text(registration.resource, 60)!r}:"
                     f" {where}")
        lines.append(f"  node {short_hash(registration.node)}, enabled "
                     f"{when(store.enabled_at(registration.key))}")
        if routes is not None and domain not in own:
            lines.append(f"  reachable from here: {routes.get(domain, 'not asked')}")
        lines.append("  last push: " + _last(HISTORY.registrations.get(registration.key),
                                             HISTORY.started))
        if device is not None:
            lines.append("  last push to the device's provider: "
                         + _last(HISTORY.devices.get(device.node), HISTORY.started))
        left = max(0, limit - registration.errors)
        lines.append(f"  errors: {registration.errors} of {limit} (max_publish_errors): "
                     + (f"disabled after {left} more" if registration.errors
                        else f"healthy, disabled only after {limit} errors")
                     + (f", the last counted {when(registration.last_error_at)}"
                        if registration.last_error_at else "")
                     + f"; failures within {config.publish_error_window_ms // 1000} s "
                       "count once")
        lines.append(f"  {_extensions(registration)}; "
                     f"{registration.message_count} message(s) since the session went away")
    for device in devices.values():
        lines.append(f"device without a push registration: {_device(device)}")
        lines.append("  last push: " + _last(HISTORY.devices.get(device.node), HISTORY.started))
    for disabled in HISTORY.disabled.get(jid, ()):
        lines.append(f"disabled {when(disabled.at)}: the registration at "
                     f"{peer_text(disabled.app_server, 100)} node {disabled.node_hash} after "
                     f"{disabled.why}")
    if not registrations and not devices:
        lines.append("no push registrations: the client has not enabled push (XEP-0357) "
                     "since it last connected, or its registrations were disabled")
    if admin:
        logged = HISTORY.logs.get(jid, ())
        lines.append(f"newest log lines about {jid}:" if logged else
                     f"no log lines about {jid} since this process started")
        lines += [f"  {when(at)} {level}: {text}" for at, level, text in logged]
    return Report(lines)


def test_pushes(service: PushService, user: UserKey, now: float
                ) -> tuple[list[Action], Callable[[], bool]]:
    """A test push to each registration of the user (as push_test), marked as tests; and
    whether each has been answered since."""
    registrations = service.store.for_user(user)
    actions: list[Action] = []
    keys = []
    for registration in registrations:
        HISTORY.testing(registration.key)
        actions.append(service.wake(registration, now))
        keys.append(registration.key)

    def answered() -> bool:
        return all((last := HISTORY.registrations.get(key)) is not None and last.answer
                   for key in keys)

    return actions, answered


def parse_routes(args: Iterable[str]) -> dict[str, str]:
    """The shim's "domain<TAB>state" arguments."""
    routes = {}
    for arg in args:
        domain, _, state = arg.partition("\t")
        if domain:
            routes[domain] = peer_text(state, 120)
    return routes


# ---------------------------------------------------------------------- the ad-hoc command

_last_test: OrderedDict[UserKey, float] = OrderedDict()  # monotonic


def is_command(xml: bytes) -> bool:
    """Cheap: whether an IQ for the app server may be the check-up (parsed in adhoc)."""
    return DIAGNOSE_COMMAND.encode() in xml


def adhoc(service: PushService, xml: bytes, now: float,
          monotonic: Callable[[], float] = time.monotonic) -> Sequence[Action] | None:
    """The ad-hoc command push-diagnose of a user of this host at the host itself: their own
    check-up; on request (the form's "test" field) a test push to each registration, one per
    diagnose_test_interval. None: not that command (the app server's)."""
    try:
        iq = app.parse_iq(xml)
    except ET.ParseError:
        return None
    host = service.config.host
    payload = iq.payload
    if (iq.type != "set" or payload is None or payload.tag != f"{{{app.NS_COMMANDS}}}command"
            or payload.get("node") != DIAGNOSE_COMMAND or iq.to != host):
        return None
    user_part, _, server = iq.sender_bare.rpartition("@")
    if server != host or not user_part:  # the shim takes only its own users' (local) IQs
        return [Route(app.error_iq(iq, "cancel", "forbidden",
                                   "the check-up is for this server's own users"))]
    user = (user_part, server)
    try:
        command = app.parse_command(iq)
    except RequestError as error:
        return [Route(app.error_iq(iq, error.error_type, error.condition, error.text))]
    if command.action == "cancel":
        return [Route(app.command_reply(iq, command, "canceled"))]
    lines = report(service, user, None, now, admin=False).lines
    if command.fields is None:  # the first step: the check-up, and the test push offered
        form = (f"<x xmlns='{NS_DATA}' type='form'><title>{escape(DIAGNOSE_NAME)}</title>"
                f"{_fixed(lines)}"
                "<field var='test' type='boolean' label='Send a test push to each of my "
                "registrations'><value>0</value></field></x>")
        return [Route(app.command_reply(iq, command, "executing",
                                        "<actions execute='complete'><complete/></actions>"
                                        + form))]
    if app.form_value(command.fields, "test") not in ("1", "true"):
        return [Route(app.command_reply(iq, command, "completed", _result(lines)))]
    interval = service.config.diagnose_test_interval_ms / 1000
    waited = monotonic() - _last_test.get(user, float("-inf"))
    if waited < interval:
        note = (f"A test push can be sent once every {interval:g} s: try again in "
                f"{max(1, math.ceil(interval - waited))} s.")
        return [Route(app.command_reply(iq, command, "completed",
                                        f"<note type='warn'>{escape(note)}</note>"
                                        + _result(lines)))]
    _last_test[user] = monotonic()
    _last_test.move_to_end(user)
    while len(_last_test) > MAX_TESTERS:
        _last_test.popitem(last=False)
    actions, _ = test_pushes(service, user, now)
    log.info("push check-up: %d test push(es) for %s@%s (ad-hoc command)", len(actions), *user,
             extra=about(*user))
    note = (f"Sent {len(actions)} test push(es): run the check-up again in a few seconds to "
            "see the answers.")
    return [*actions, Route(app.command_reply(iq, command, "completed",
                                              f"<note type='info'>{escape(note)}</note>"
                                              + _result(lines)))]


def _fixed(lines: list[str]) -> str:
    return "".join(f"<field type='fixed'><value>{escape(line)}</value></field>"
                   for line in lines)


def _result(lines: list[str]) -> str:
    return (f"<x xmlns='{NS_DATA}' type='result'><title>{escape(DIAGNOSE_NAME)}</title>"
            f"{_fixed(lines)}</x>")
