"""The plain data the layers share: registrations, devices of the built-in app server,
entries of the outbox and of the provider queue, and the store's one failure.

No behaviour here beyond derived keys: the store reads and writes these, the service
decides with them, the providers build requests from them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pymod_push.core.ios_extensions import Extensions
from pymod_push.protocol import FormFields, SessionKey, UserKey


@dataclass(slots=True)
class Registration:
    user: str
    server: str
    resource: str
    push_jid: str
    node: str
    publish_options: str | None
    errors: int = 0
    message_count: int = 0
    subscription_count: int = 0
    last_error_at: float | None = None  # when an error was last counted (see count_error)
    # Tigase's push extensions (ios_extensions.to_json; holds the client's key: no repr)
    extensions: str = field(default="", repr=False)
    # Derived, kept with the registration by the service so that each is parsed once, not
    # per push (a count-bounded cache thrashes with many users): publish_options parsed
    # (xep0357.publish_options_form) and extensions parsed. Not stored, not compared, no
    # repr (the secret, the key).
    publish_form: FormFields | None = field(default=None, repr=False, compare=False)
    parsed_extensions: Extensions | None = field(default=None, repr=False, compare=False)

    @property
    def key(self) -> tuple[str, str, str, str]:
        return (self.user, self.server, self.push_jid, self.node)

    @property
    def session(self) -> SessionKey:
        return (self.user, self.server, self.resource)

    @property
    def user_key(self) -> UserKey:
        return (self.user, self.server)


@dataclass(slots=True)
class OutboxEntry:
    """A notification sent to an app server and not yet answered for good."""

    id: int
    registration: tuple[str, str, str, str]
    summary: list[tuple[str, str]]
    attempt: int
    due: float


@dataclass(slots=True)
class QueuedPush:
    """A push for a device of the built-in app server, deferred by its provider."""

    id: int
    device_node: str
    summary: dict[str, str]
    attempt: int
    due: float
    created: float
    # Since when its device's pushes fail, without a delivery (the device is given up after
    # a while: see delivery/dispatcher.py); the same for all of a device's queued pushes.
    failing_since: float


@dataclass(slots=True, frozen=True)  # frozen: the store keeps and shares them
class RegisteredDevice:
    """A device registered at the built-in app server."""

    node: str
    secret: str
    user: str  # bare JID
    device_id: str
    device_name: str
    provider: str  # apns | fcm | webpush | ubuntu | wns
    app_name: str
    pubsub_host: str
    token: str
    application_id: str = ""
    p256dh: str = ""
    auth: str = ""
    voip_token: str = ""  # APNs PushKit token, used for urgent pushes where configured
    extra: str = ""  # a Python provider's registration fields, JSON (python_provider.py)



class DatabaseUnavailable(Exception):
    """PostgreSQL cannot be reached (store.postgres): nothing of the open transaction is lost, it
    is sent again when the database is back; the port holds events meanwhile."""
