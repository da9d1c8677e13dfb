"""Module options as ejabberd validated them, handed over in the handshake."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from typing import Any


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _certfile(options: dict[str, Any]) -> str | None:
    value = options.get("certfile")
    return _text(value) if isinstance(value, (bytes, str)) and value != "undefined" else None


COMMAND_GROUPS = {"apns": "apns", "fcm": "fcm", "gcm": "fcm", "webpush": "webpush",
                  "mozilla": "webpush", "ubuntu": "ubuntu", "wns": "wns"}


def _plain(value: Any) -> Any:
    """A free-form option (a Python provider's) as YAML meant it: text, numbers, booleans,
    lists, and mappings (yconf hands those over as lists of pairs)."""
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    if isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, dict):
        return {_text(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        if value and all(isinstance(v, tuple) and len(v) == 2 for v in value):
            return {_text(k): _plain(v) for k, v in value}
        return [_plain(v) for v in value]
    return str(value)


@dataclass(frozen=True)
class Backend:
    """One app-server backend from the 'backends' option."""

    index: int
    # as configured: apns | fcm | gcm | webpush | mozilla | ubuntu | wns | python (a
    # provider written in Python: see pymod_push/python_provider.py)
    type: str
    app_name: str
    register_host: str
    pubsub_host: str
    options: dict[str, Any]  # the rest (certfile, key_file, endpoint, cafile, ...), as text

    @property
    def group(self) -> str:
        """The provider this backend talks to (gcm is FCM, mozilla is Web Push; a Python
        provider by its name): devices are stored under it, and register-push-GROUP is
        its registration command."""
        if self.type == "python":
            return str(self.options["name"])
        return COMMAND_GROUPS[self.type]

    def option(self, name: str, default: str | None = None) -> str | None:
        value = self.options.get(name)
        return default if value is None else value


IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def _ip_networks(values: Any) -> tuple[IpNetwork, ...]:
    """endpoint_allow_ips as econf:ip_mask() gives it: ({A, B, C, D} or an 8-tuple,
    mask bits) pairs."""
    networks = []
    for address, bits in values or ():
        if len(address) == 4:
            text = ".".join(str(part) for part in address)
        else:
            text = str(ipaddress.IPv6Address(b"".join(p.to_bytes(2, "big") for p in address)))
        networks.append(ipaddress.ip_network(f"{text}/{bits}", strict=False))
    return tuple(networks)


def default_name(module: str) -> str:
    """A Python provider's name when its backend gives none: its module's (a file's name
    without .py, an import name's last part). The shim derives the same (Erlang's
    filename:basename and filename:extension: trailing slashes do not count, '.py' alone
    is no extension) only to refuse a name that is a shipped provider's."""
    base = module.rstrip("/").rsplit("/", 1)[-1]
    return base[:-3] if base.endswith(".py") and base != ".py" else base.rsplit(".", 1)[-1]


def _backend(index: int, raw: dict[Any, Any], certfile: str | None) -> Backend:
    values = {str(k): _plain(v) for k, v in raw.items()}
    options = {k: v for k, v in values.items()
               if k not in ("type", "app_name", "register_host", "pubsub_host")}
    if values["type"] == "python" and "name" not in options:
        options["name"] = default_name(str(options.get("module", "")))
    if certfile and "certfile" not in options and values["type"] != "python":
        options["certfile"] = certfile
    return Backend(index, str(values["type"]), str(values.get("app_name", "any")),
                   str(values["register_host"]), str(values["pubsub_host"]), options)


@dataclass(frozen=True)
class Config:
    host: str
    resume_timeout_ms: int = 72 * 3600 * 1000
    publish_timeout_ms: int = 30_000
    include_senders: bool = False
    include_message_count: bool = True
    include_subscription_count: bool = True
    include_message_bodies: bool = False
    allow_senders: bool = True  # admin limits: what users may turn on at most
    allow_message_bodies: bool = True
    notify_on: str = "messages"  # "messages" | "all"
    notify_groupchat: str = "mentions"  # "mentions" | "always" | "never"
    max_publish_errors: int = 3
    publish_error_window_ms: int = 600_000  # failures within this count once (count_error)
    diagnose_test_interval_ms: int = 60_000  # a user's ad-hoc test pushes: one per this
    # Limits against hostile or careless accounts (see core/limits.py and README)
    max_body_length: int = 1024  # bytes of last-message-body in a publish (cut, marked)
    max_registrations: int = 20  # XEP-0357 registrations per account
    max_devices: int = 20  # devices per account at the built-in app server
    publish_rate: int = 1000  # publishes a second to any one remote app-server domain
    retry_delays_ms: tuple[int, ...] = (5_000, 30_000, 300_000)
    wake_on_start: bool = True  # after ejabberd boots, wake the push users it had
    wake_rate: int = 50  # wake pushes per second, so that a big server does not flood
    wake_before_timeout_ms: int = 3600 * 1000  # before a resume timeout ends, wake once
    # A call proposal older than this is a missed call (never urgent); a call's end within
    # it stops the devices its urgent push reached (core/calls.py, service/calls.py)
    call_ring_window_ms: int = 60_000
    # Pushes for absent room members (core/groupchat.py, service/groupchat.py), at most
    # one per member and room per interval unless mentioned
    groupchat_pushes: bool = True
    groupchat_push_interval_ms: int = 30_000
    ejabberd_node: str = ""  # the Erlang node this process serves (clusters share a db)
    logic: str | None = None  # the admin's push logic module (see pymod_push/logic.py)
    logic_budget_ms: int = 50  # how long a push may wait for the admin's functions
    metrics_listen: str | None = None  # "host:port" for Prometheus, off when None
    log_sensitive: bool = False  # debug logs may show bodies, tokens, summaries: only if asked
    # Tigase's push extensions (Siskin IM, Snikket iOS: core/ios_extensions): advertised
    # and honoured; off, an enable's extension elements are ignored (not stored)
    ios_extensions: bool = True
    db_file: str = ":memory:"
    db_url: str | None = None  # PostgreSQL shared by a cluster's nodes, instead of db_file
    backends: tuple[Backend, ...] = ()
    # Addresses that user-supplied destinations may reach although the destination
    # policy denies them by default (core/destination.py)
    endpoint_allow_ips: tuple[IpNetwork, ...] = ()
    # UnifiedPush (core/unifiedpush.py, service/unifiedpush.py): off when the URL is None
    unified_push_url: str | None = None  # the public base URL of the /up request handler
    unified_push_expiration_ms: int = 7 * 86400 * 1000  # given at each register
    unified_push_max_ttl_ms: int = 86400 * 1000  # a push is kept this long at most
    unified_push_max_kept: int = 100  # pushes kept per endpoint
    unified_push_rate: int = 60  # POSTs a minute per endpoint, after a burst of
    unified_push_burst: int = 10
    unified_push_max_endpoints: int = 100  # endpoints per account

    @classmethod
    def from_options(cls, host: str, options: dict[str, Any]) -> Config:
        """Build from the hello's option map (keys as in mod_push_py's mod_options)."""
        db_file = options.get("db_file", "auto")
        if db_file == "auto":
            spool = _text(options.get("spool_dir", "."))
            db_file = os.path.join(spool, f"pymod_push_{host}.sqlite3")
        return cls(
            host=host,
            resume_timeout_ms=int(options.get("resume_timeout", cls.resume_timeout_ms)),
            publish_timeout_ms=int(options.get("publish_timeout", cls.publish_timeout_ms)),
            include_senders=bool(options.get("include_senders", cls.include_senders)),
            include_message_count=bool(
                options.get("include_message_count", cls.include_message_count)),
            include_subscription_count=bool(
                options.get("include_subscription_count", cls.include_subscription_count)),
            include_message_bodies=bool(
                options.get("include_message_bodies", cls.include_message_bodies)),
            allow_senders=bool(options.get("allow_senders", cls.allow_senders)),
            allow_message_bodies=bool(options.get("allow_message_bodies",
                                                  cls.allow_message_bodies)),
            notify_on=str(options.get("notify_on", cls.notify_on)),
            notify_groupchat=str(options.get("notify_groupchat", cls.notify_groupchat)),
            max_publish_errors=int(options.get("max_publish_errors", cls.max_publish_errors)),
            publish_error_window_ms=int(options.get("publish_error_window",
                                                    cls.publish_error_window_ms)),
            diagnose_test_interval_ms=int(options.get("diagnose_test_interval",
                                                      cls.diagnose_test_interval_ms)),
            max_body_length=int(options.get("max_body_length", cls.max_body_length)),
            max_registrations=int(options.get("max_registrations", cls.max_registrations)),
            max_devices=int(options.get("max_devices", cls.max_devices)),
            publish_rate=int(options.get("publish_rate", cls.publish_rate)),
            retry_delays_ms=tuple(int(d) for d in options.get("retry_delays", cls.retry_delays_ms)),
            wake_on_start=bool(options.get("wake_on_start", cls.wake_on_start)),
            wake_rate=int(options.get("wake_rate", cls.wake_rate)),
            wake_before_timeout_ms=int(options.get("wake_before_timeout",
                                                   cls.wake_before_timeout_ms)),
            call_ring_window_ms=int(options.get("call_ring_window", cls.call_ring_window_ms)),
            groupchat_pushes=options.get("groupchat_pushes", cls.groupchat_pushes) is not False,
            groupchat_push_interval_ms=int(options.get("groupchat_push_interval",
                                                       cls.groupchat_push_interval_ms)),
            ejabberd_node=str(options.get("node", "")),
            log_sensitive=options.get("log_sensitive") is True,
            ios_extensions=options.get("ios_extensions", cls.ios_extensions) is not False,
            logic=_text(options["logic"]) if isinstance(options.get("logic"), bytes) else None,
            logic_budget_ms=int(options.get("logic_budget", cls.logic_budget_ms)),
            metrics_listen=(_text(options["metrics_listen"])
                            if isinstance(options.get("metrics_listen"), bytes) else None),
            db_file=_text(db_file),
            db_url=_text(options["db_url"]) if isinstance(options.get("db_url"), bytes) else None,
            backends=tuple(_backend(i, b, _certfile(options))
                           for i, b in enumerate(options.get("backends", []))),
            endpoint_allow_ips=_ip_networks(options.get("endpoint_allow_ips")),
            unified_push_url=(_text(options["unified_push_url"]).rstrip("/")
                              if isinstance(options.get("unified_push_url"), bytes) else None),
            unified_push_expiration_ms=int(options.get("unified_push_expiration",
                                                       cls.unified_push_expiration_ms)),
            unified_push_max_ttl_ms=int(options.get("unified_push_max_ttl",
                                                    cls.unified_push_max_ttl_ms)),
            unified_push_max_kept=int(options.get("unified_push_max_kept",
                                                  cls.unified_push_max_kept)),
            unified_push_rate=int(options.get("unified_push_rate", cls.unified_push_rate)),
            unified_push_burst=int(options.get("unified_push_burst", cls.unified_push_burst)),
            unified_push_max_endpoints=int(options.get("unified_push_max_endpoints",
                                                       cls.unified_push_max_endpoints)),
        )
