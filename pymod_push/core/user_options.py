"""Per-user push options (FORM_TYPE urn:xmpp:push:options): what a user may change.

The 2015 design: the configuration is per user, for all resources. An enable carrying
an options form sets it when no other resource of the user has push enabled; while
another one has, options can only be turned off (no privilege escalation). The admin's
limits (allow_senders, allow_message_bodies) cap whatever users ask for.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

from pymod_push.core.config import Config
from pymod_push.core.xep0357 import FORM_PUSH_OPTIONS, NS_DATA, Form, field_xml
from pymod_push.core.xmpp import RequestError

FIELD_NAMES = {"include-senders": "senders", "include-message-count": "message_count",
               "include-subscription-count": "subscription_count",
               "include-message-bodies": "message_bodies"}
TRUE, FALSE = ("1", "true"), ("0", "false")


@dataclass(frozen=True, slots=True)
class PushOptions:
    senders: bool
    message_count: bool
    subscription_count: bool
    message_bodies: bool

    def fields(self) -> list[tuple[str, bool]]:
        return [(var, getattr(self, attribute)) for var, attribute in FIELD_NAMES.items()]

    def form_xml(self) -> str:
        inner = "".join(field_xml(var, ["1" if value else "0"], "boolean")
                        for var, value in self.fields())
        return (f"<x xmlns='{NS_DATA}' type='result'>"
                f"{field_xml('FORM_TYPE', [FORM_PUSH_OPTIONS], 'hidden')}{inner}</x>")


def defaults(config: Config) -> PushOptions:
    """The server's defaults, within the admin's limits."""
    return within_limits(PushOptions(config.include_senders, config.include_message_count,
                                     config.include_subscription_count,
                                     config.include_message_bodies), config)


def within_limits(options: PushOptions, config: Config) -> PushOptions:
    if (config.allow_senders or not options.senders) and \
            (config.allow_message_bodies or not options.message_bodies):
        return options  # the usual case, without making a copy
    return replace(options, senders=options.senders and config.allow_senders,
                   message_bodies=options.message_bodies and config.allow_message_bodies)


def parse_request(form: Form) -> dict[str, bool]:
    """The options a submitted form asks for; unknown fields are ignored."""
    requested: dict[str, bool] = {}
    for var, values in form.fields:
        attribute = FIELD_NAMES.get(var)
        if attribute is None:
            continue
        if len(values) != 1 or values[0].strip().lower() not in TRUE + FALSE:
            raise RequestError("bad-request", f"field '{var}' must be one boolean "
                               "(1, 0, true or false)")
        requested[attribute] = values[0].strip().lower() in TRUE
    return requested


def accept(current: PushOptions, requested: dict[str, bool], others_enabled: bool,
           config: Config) -> PushOptions:
    """The new configuration: as asked (first push-enabled resource) or only switched off."""
    names = {f.name for f in fields(PushOptions)}
    if others_enabled:
        requested = {k: v and getattr(current, k) for k, v in requested.items()}
    return within_limits(replace(current, **{k: v for k, v in requested.items() if k in names}),
                         config)
