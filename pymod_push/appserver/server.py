"""The built-in app server: registrations by ad-hoc command, publishes to device pushes.

Like service.py: events in, actions out, over the store; providers are reached
through :class:`Delivery` items that the port loop hands to providers/.
"""

from __future__ import annotations

import json
import logging
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass

from pymod_push.appserver import requests as app
from pymod_push.core import limits, safexml
from pymod_push.core.config import Backend, Config
from pymod_push.core.ratelimit import RateLimiter
from pymod_push.core.shim_facts import LIST_COMMAND, UNREGISTER_COMMAND
from pymod_push.core.xep0357 import NS_PUBSUB
from pymod_push.core.xmpp import RequestError
from pymod_push.logic import Device as LogicDevice
from pymod_push.logic import Logic
from pymod_push.protocol import FormFields, PublishReply, Route
from pymod_push.providers import DeliveryOutcome
from pymod_push.python_provider import PythonProviders
from pymod_push.records import QueuedPush, RegisteredDevice
from pymod_push.store import Store

log = logging.getLogger("pymod_push")

# Publishes per node (one node is one device), counted only once the secret matched so
# that nobody without it can spend a device's budget. A burst of 20 lets a server catch
# up (a backlog of messages, a busy group chat) unhindered; then 1 a second, which is
# more than a device needs to wake up and show something, and below what providers
# tolerate per device (FCM: 240 a minute; APNs throttles devices that get too many).
# Beyond that the publishing server gets a wait error and retries later.
PUBLISH_BURST = 20
PUBLISH_REFILL_PER_SECOND = 1.0


@dataclass(slots=True)  # per push: not frozen (see protocol.Stanza)
class Delivery:
    """A notification for one device, to be sent by its backend's provider client.

    The publish IQ that caused it is answered once the provider has answered the
    first attempt (see :func:`publish_answer`), so that a device the provider says
    is gone is disabled by the publishing server too.
    """

    backend: Backend
    device: RegisteredDevice
    summary: dict[str, str]
    # The publish IQ to answer; None: taken in-process (ref) or sent again after a restart
    # (the publish was answered).
    publish: app.Iq | None
    ref: int | None = None  # a publish of this process taken in-process: its ref

    @property
    def urgent(self) -> bool:
        """The XMPP server marks calls (and only what must wake the user now) urgent."""
        return self.summary.get("last-message-priority") == "high"


# The answer to a publish from the provider's first answer: (error type, condition, text),
# or None for a result (delivered, or queued for another attempt).
_ANSWERS: dict[DeliveryOutcome, tuple[str, str, str]] = {
    DeliveryOutcome.UNREGISTERED: ("cancel", "item-not-found",
                           "the push provider no longer knows this device"),
    DeliveryOutcome.FAILED: ("wait", "internal-server-error",
                     "the push provider refused the notification"),
}


def publish_answer(delivery: Delivery, outcome: DeliveryOutcome, reason: str = "") -> str:
    """The answer to the publish IQ, from the provider's first answer."""
    iq = delivery.publish
    assert iq is not None
    error = _ANSWERS.get(outcome)
    if error is not None:
        return app.error_iq(iq, *error)
    return app.result_reply(iq)


def publish_reply(ref: int, outcome: DeliveryOutcome) -> PublishReply:
    """The same answer, as the publisher hears it (an ``iq_reply`` event), for a publish
    taken in-process."""
    error = _ANSWERS.get(outcome)
    if error is not None:
        return PublishReply(ref, "error", error[0], error[1])
    return PublishReply(ref, "result")


def publish_error_reply(ref: int, error: RequestError) -> PublishReply:
    """A refused publish taken in-process, as the publisher hears the IQ path's error."""
    return PublishReply(ref, "error", error.error_type, error.condition)


class AppServer:
    def __init__(self, config: Config, store: Store,
                 clock: Callable[[], float] = time.monotonic,
                 logic: Logic | None = None,
                 python_providers: PythonProviders | None = None) -> None:
        self.config = config
        self.store = store
        self.logic = logic or Logic()
        # Providers written in Python: what their devices register (see _command).
        self.python_providers = python_providers or PythonProviders()
        # For the rate limit only; monotonic, so that a step of the wall clock neither
        # refills nor freezes budgets. Tests pass their own.
        self._clock = clock
        self._publish_limit = RateLimiter(PUBLISH_BURST, PUBLISH_REFILL_PER_SECOND)
        self._backends: dict[tuple[str, str, str], Backend] = {}  # see _backend_of
        for backend in reversed(config.backends):  # the first configured wins
            self._backends[(backend.group, backend.app_name, backend.pubsub_host)] = backend

    def handle(self, allowed: bool, xml: bytes) -> list[Route | Delivery]:
        try:
            iq = app.parse_iq(xml)
        except ET.ParseError as exc:
            # Answered at once from its start tag (silence would make the sender retry
            # for minutes); only without its addressing is there no one to answer.
            head = app.parse_iq_head(xml)
            if head is None:
                log.warning("app server: an IQ that is not plain XML was ignored "
                            "(%d bytes): %s", len(xml), exc)
                return []
            if head.type not in ("get", "set"):
                return []
            if len(xml) > safexml.MAX_XML_BYTES:
                return [Route(app.error_iq(head, "modify", "not-acceptable",
                                              f"the IQ is larger than {safexml.MAX_XML_BYTES} "
                                              "bytes"))]
            return [Route(app.error_iq(head, "modify", "bad-request",
                                          "the IQ is not plain XML"))]
        if iq.type not in ("get", "set"):
            return []  # results and errors need no answer
        domain = iq.to.split("/", 1)[0]
        pubsub = [b for b in self.config.backends if b.pubsub_host == domain]
        register = [b for b in self.config.backends if b.register_host == domain]
        try:
            return self._dispatch(iq, allowed, domain, pubsub, register)
        except RequestError as error:
            return [Route(app.error_iq(iq, error.error_type, error.condition, error.text))]

    def _dispatch(self, iq: app.Iq, allowed: bool, domain: str, pubsub: list[Backend],
                  register: list[Backend]) -> list[Route | Delivery]:
        payload = iq.payload.tag if iq.payload is not None else ""
        if iq.type == "get" and payload == f"{{{app.NS_DISCO_INFO}}}query":
            return [Route(app.disco_info(iq, register or pubsub, pubsub=bool(pubsub),
                                         register=bool(register)))]
        if iq.type == "get" and payload == f"{{{app.NS_DISCO_ITEMS}}}query":
            return [Route(app.disco_items(iq, domain, register))]
        if iq.type == "set" and payload == f"{{{app.NS_COMMANDS}}}command" and register:
            if not allowed:
                raise RequestError("forbidden", "you may not use this push app server", "auth")
            # push_iq_rate: the shim counted this command and answered those over the rate.
            return [Route(self._command(iq, app.parse_command(iq), register))]
        if iq.type == "set" and payload == f"{{{NS_PUBSUB}}}pubsub" and pubsub:
            return self._publish(iq, domain)
        raise RequestError("service-unavailable", "", "cancel")

    # ------------------------------------------------------------------ commands
    def _command(self, iq: app.Iq, command: app.Command, backends: list[Backend]) -> str:
        if command.action == "cancel":
            return app.command_reply(iq, command, "canceled")
        user = iq.sender_bare
        if command.node == LIST_COMMAND:
            rows = [(d.device_name, d.node) for d in self.store.devices_of(user)]
            return app.command_reply(iq, command, "completed", app.registrations_form(rows))
        if command.node == UNREGISTER_COMMAND:
            fields = command.fields or {}
            nodes = [n for n in fields.get("nodes", ()) if n]
            if nodes:
                removed = self.store.remove_devices(user, nodes=nodes)
            else:
                device_id = (fields.get("device-id") or ("",))[0] or iq.sender_resource
                removed = self.store.remove_devices(user, device_id=device_id)
            log.info("app server: %s unregistered %d device(s)", user, len(removed))
            form = app.result_form([("nodes", removed, "list-multi")])
            return app.command_reply(iq, command, "completed", form)
        group = app.command_group(command.node, backends)
        candidates = [b for b in backends if b.group == group]
        if group is None or not candidates:
            raise RequestError("item-not-found", f"no command {command.node!r} here", "cancel")
        wanted = app.form_value(command.fields or {}, "application-name")
        backend = next((b for b in candidates if b.app_name == wanted), candidates[0])
        python = None
        if backend.type == "python":
            python = self.python_providers.get(backend.index)
            if python is None:
                raise RequestError("service-unavailable", "this push provider cannot be used "
                                   "now (see the server's log)", "wait")
        if command.fields is None:  # a generic client asks for the form first
            return app.command_reply(iq, command, "executing", app.registration_form(
                group, python.fields if python is not None else None))
        request = app.parse_registration(command, iq, backend,
                                         python.fields if python is not None else (),
                                         self.config.endpoint_allow_ips)
        extra = ""
        if python is not None:  # the module checks what was registered
            extra = json.dumps(python.registration(dict(request.extra)), sort_keys=True)
        again = any(d.device_id == request.device_id and d.provider == backend.group
                    and d.app_name == backend.app_name for d in self.store.devices_of(user))
        if not again:  # registering a device again replaces it: that does not count
            limits.check_count(self.store.device_count(user), self.config.max_devices,
                               "devices at this app server", "max_devices")
        device = RegisteredDevice(app.new_node(), app.new_secret(), user, request.device_id,
                        request.device_name, backend.group, backend.app_name,
                        backend.pubsub_host, request.token, request.application_id,
                        request.p256dh, request.auth, request.voip_token, extra)
        self.store.add_device(device)
        log.info("app server: %s registered device %r at %s (%s)", user, device.device_id,
                 backend.group, backend.app_name)
        form = app.result_form([("jid", [backend.pubsub_host], "jid-single"),
                                ("node", [device.node], None), ("secret", [device.secret], None)])
        return app.command_reply(iq, command, "completed", form)

    # ------------------------------------------------------------------ publishes
    def _publish(self, iq: app.Iq, domain: str) -> list[Route | Delivery]:
        backend, device, summary = self._accept(app.parse_publish(iq), domain)
        return [Delivery(backend, device, summary, iq)]

    def publish_direct(self, ref: int, domain: str, node: str, fields: FormFields,
                       publish_options: FormFields | None,
                       elements: tuple[str, ...] = ()) -> Delivery:
        """A publish of this process's own push service to one of its pubsub hosts, taken
        without the round trip through ejabberd: what the IQ path would read from the
        publish IQ the shim builds, the same checks and refusals (RequestError, as the IQ
        path's error answers), and the provider's first answer goes to the publisher as
        the answer to ``ref`` (see :func:`publish_reply`)."""
        backend, device, summary = self._accept(
            app.direct_publish(node, fields, publish_options, elements), domain)
        return Delivery(backend, device, summary, None, ref)

    def _accept(self, request: app.PublishRequest, domain: str
                ) -> tuple[Backend, RegisteredDevice, dict[str, str]]:
        device = self.store.device(request.node)
        if device is None or device.pubsub_host != domain:
            raise RequestError("item-not-found", "no such node", "cancel")
        if not app.secret_matches(device.secret, request.secret):
            raise RequestError("forbidden", "wrong or missing secret in publish-options", "auth")
        # Only now, with the secret checked, is a token spent (see PUBLISH_BURST).
        refusal = self._publish_limit.take(device.node, self._clock())
        if refusal is not None:
            if refusal.first:
                log.warning("app server: too many publishes for %s's device %r, refused for "
                            "now (%d at once, then %g a second)", device.user, device.device_id,
                            PUBLISH_BURST, PUBLISH_REFILL_PER_SECOND)
            raise RequestError("resource-constraint", "too many notifications for this node; "
                               f"retry in {refusal.retry_after_seconds} s", "wait")
        backend = self._backend_of(device)
        if backend is None:
            log.warning("app server: no backend %s/%s any more for a registered device",
                        device.provider, device.app_name)
            raise RequestError("item-not-found", "this registration's backend is gone", "cancel")
        summary = request.summary
        if self.logic.has("provider_data") and not self.logic.shapes_async:
            # the admin's module shapes the payload (an async one: at the provider edge)
            summary = self.logic.provider_data(
                LogicDevice(device.user, device.provider, device.app_name, device.device_id,
                            device.device_name), summary)
        return backend, device, summary

    def _backend_of(self, device: RegisteredDevice) -> Backend | None:
        return self._backends.get((device.provider, device.app_name, device.pubsub_host))

    def queued_deliveries(self) -> list[tuple[QueuedPush, Delivery]]:
        """Pushes a provider deferred before this process started, still to be sent."""
        found = []
        for push in self.store.queued_pushes(self.config.ejabberd_node):
            device = self.store.device(push.device_node)
            backend = self._backend_of(device) if device is not None else None
            if device is None or backend is None:  # unregistered meanwhile
                self.store.remove_queued_push(push.id)
                continue
            found.append((push, Delivery(backend, device, push.summary, None)))
        return found
