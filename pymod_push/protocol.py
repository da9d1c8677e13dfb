"""The port protocol: Erlang terms <-> typed events and actions.

docs/protocol.md describes every message with an example; this module is the
only place that knows their shapes. Unknown events are reported, not fatal.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from pymod_push import etf
from pymod_push.etf import Atom

# A data form as sent over the port: ((var, (value, ...)), ...), FORM_TYPE first.
FormFields = tuple[tuple[str, tuple[str, ...]], ...]

# 4: the hello reply carries what the shim keeps (features, commands); 5: the shim's
# counters frame ({counters, #{...}}, for the metrics); 6: muc_message events and
# {groupchat, ...} actions (groupchat_pushes); 7: UnifiedPush (up_register, up_post,
# up_presence events, {up, Id} iq_reply outcomes; up_push, http_reply, unified_push actions)
PROTOCOL_VERSION = 7

SessionKey = tuple[str, str, str]  # (user, server, resource), stringprep'ed
UserKey = tuple[str, str]  # (user, server)


class ProtocolError(ValueError):
    """A term that is not a known event of this protocol version."""


# Made for every push, like the other classes marked 'per push': not frozen, as a frozen
# dataclass's __init__ (object.__setattr__ per field) takes 4 times a plain one's. They
# are values all the same: nothing changes one once made.
@dataclass(slots=True)
class Stanza:
    """What the shim tells about a stanza: the fields every decision needs, plus its XML."""

    kind: str  # "message" | "presence"
    sender: str
    id: str
    type: str
    body: str
    xml: bytes
    nick: str = ""  # group chat: the user's nickname in that room, if the shim knows it
    # The sender is in the user's roster (subscription to/from/both, or asked for by the
    # user); None: the shim did not say (group chat, a carbon, ios_extensions off)
    known: bool | None = None


# ----------------------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class Hello:
    version: int
    host: str
    options: dict[str, Any]


@dataclass(frozen=True, slots=True)
class SessionPending:
    session: SessionKey
    queued: tuple[Stanza, ...]


@dataclass(frozen=True, slots=True)
class SessionResumed:
    session: SessionKey


@dataclass(frozen=True, slots=True)
class SessionOpened:
    session: SessionKey


@dataclass(slots=True)  # per push: not frozen (see protocol.Stanza)
class StanzaToPending:
    session: SessionKey
    stanza: Stanza


@dataclass(frozen=True, slots=True)
class Offline:
    """A message stored for a user with no session (offline storage or archive)."""

    user: UserKey
    stanza: Stanza
    source: str  # "offline" | "archived"


@dataclass(frozen=True, slots=True)
class UserRemoved:
    user: UserKey


@dataclass(frozen=True, slots=True)
class PushIq:
    ref: Any  # opaque: echoed back in the answer
    sender: SessionKey
    to: tuple[str, str, str]  # the addressed account, resource ""
    type: str
    lang: str
    xml: bytes  # the IQ's payload element, b"" if none


@dataclass(slots=True)  # per push: not frozen (see protocol.Stanza)
class PublishReply:
    ref: int
    outcome: str  # "result" | "timeout" | "error"
    error_type: str = ""
    condition: str = ""


@dataclass(frozen=True, slots=True)
class EjabberdStarted:
    """ejabberd has booted (start-up complete): the sessions it had before are gone."""


@dataclass(frozen=True, slots=True)
class LogLevel:
    """ejabberd's loglevel changed (ejabberdctl set_loglevel)."""

    level: str


@dataclass(frozen=True, slots=True)
class AdminCommand:
    """An ejabberdctl command (push_status, push_list, ...) for this host."""

    ref: Any  # opaque: echoed back in the result
    name: str
    args: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class AppServerIq:
    """An IQ for the built-in app server (its pubsub or registration host)."""

    allowed: bool  # the sender passes the access_backends rule
    xml: bytes


@dataclass(frozen=True, slots=True)
class MucMessage:
    """A groupchat message in a room of this host, for its affiliated members who are
    push-enabled, not in the room and not MUC/Sub subscribers (groupchat_pushes)."""

    room: str  # bare JID
    members_only: bool
    anonymous: bool
    users: tuple[UserKey, ...]
    stanza: Stanza  # from room/nick, never the sender's real JID


@dataclass(frozen=True, slots=True)
class Bookmarks:
    """A push user's XEP-0402 bookmarks (item id = room JID, the <conference/>'s XML):
    one published (retracted: xml None; replace False), or all of them as read (replace
    True) after a read_bookmarks action."""

    user: UserKey
    items: tuple[tuple[str, bytes | None], ...]
    replace: bool


@dataclass(frozen=True, slots=True)
class UpRegister:
    """A UnifiedPush register IQ from a local user's session (access checked by the shim)."""

    ref: Any  # opaque: echoed back in the answer
    sender: SessionKey
    lang: str
    xml: bytes  # the <register/> element


@dataclass(frozen=True, slots=True)
class UpPost:
    """A POST to a UnifiedPush endpoint; answered with an http_reply of the same ref
    unless its deadline (ms since the epoch) has passed."""

    ref: Any  # {Pid, Ref} of the HTTP request's process: opaque, echoed back
    token: str
    ttl: bytes | None  # the raw header values, None when absent
    urgency: bytes | None
    topic: bytes | None
    deadline_ms: int
    body: bytes


@dataclass(frozen=True, slots=True)
class UpPresence:
    """An available presence of a UnifiedPush user's session to the host (on each bind)."""

    session: SessionKey


@dataclass(frozen=True, slots=True)
class UpReply:
    """What became of an up_push ({up, Id}): result | error | timeout | offline | pending
    | timeout_pending (it timed out while its session is pending: it waits in the
    session's queue)."""

    id: int
    outcome: str
    error_type: str = ""
    condition: str = ""


Event = (
    SessionPending | SessionResumed | SessionOpened | StanzaToPending | Offline | UserRemoved
    | PushIq | PublishReply | AppServerIq | EjabberdStarted | AdminCommand | LogLevel
    | MucMessage | Bookmarks | UpRegister | UpPost | UpPresence | UpReply
)


@dataclass(frozen=True, slots=True)
class Batch:
    """A frame of events. Epoch and sequence number let Python acknowledge what it has
    handled and committed, and skip a batch the shim sends again after a crash."""

    epoch: int
    seq: int
    events: list[Any]  # terms, parsed one by one so that one bad event spoils nothing


@dataclass(frozen=True, slots=True)
class ShimCounters:
    """The shim's counters since the module started on the host (they outlive the Python
    process): Python's restarts, the events held while it was down or behind, those
    dropped. The shim sends them after the hello and every 10 s, outside the batches."""

    restarts: int = 0
    held: int = 0
    dropped: int = 0


def parse_counters(term: Any) -> ShimCounters | None:
    """{counters, #{restarts => R, held => H, dropped => D}}, or None for any other frame
    (a missing or odd count reads 0)."""
    if not (type(term) is tuple and len(term) == 2 and term[0] == "counters"
            and isinstance(term[1], dict)):
        return None
    counts = {str(k): v for k, v in term[1].items()}

    def count(name: str) -> int:
        value = counts.get(name)
        return value if type(value) is int and value >= 0 else 0

    return ShimCounters(count("restarts"), count("held"), count("dropped"))


def parse_batch(term: Any) -> Batch:
    if (isinstance(term, tuple) and len(term) == 4 and term[0] == Atom("events")
            and isinstance(term[1], int) and isinstance(term[2], int)
            and isinstance(term[3], list)):
        return Batch(term[1], term[2], term[3])
    raise ProtocolError("a frame of events is {events, Epoch, Seq, [Event]}")


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, str):
        return str(value)
    raise ProtocolError(f"expected a binary, got {type(value).__name__}")


def _binary(value: Any) -> bytes:
    # Not bytes(value): bytes(10**12) would allocate a terabyte of zeros.
    if isinstance(value, bytes):
        return value
    raise ProtocolError(f"expected a binary, got {type(value).__name__}")


def _session(value: Any) -> SessionKey:
    user, server, resource = value
    return _text(user), _text(server), _text(resource)


def _user(value: Any) -> UserKey:
    user, server = value
    return _text(user), _text(server)


_NICK, _ROSTER = Atom("nick"), Atom("roster")


def _stanza(value: Any) -> Stanza:
    kind, sender, stanza_id, stanza_type, body, xml, *context = value
    extra = context[0] if context and isinstance(context[0], dict) else None
    nick = extra.get(_NICK) if extra else None
    return Stanza(str(kind), _text(sender), _text(stanza_id), str(stanza_type), _text(body),
                  _binary(xml), "" if nick is None else _text(nick),
                  _known(extra.get(_ROSTER)) if extra else None)


_KNOWN_SUBSCRIPTIONS = frozenset({"to", "from", "both"})


def _known(roster: Any) -> bool | None:
    """{Subscription, Ask} of the sender's roster item ({none, none}: no item)."""
    if not isinstance(roster, tuple) or len(roster) != 2:
        return None
    subscription, ask = (str(part) for part in roster)
    return subscription in _KNOWN_SUBSCRIPTIONS or ask in ("out", "both", "subscribe")


def parse_hello(term: Any) -> Hello:
    try:
        tag, version, host, options = term
    except (TypeError, ValueError):
        raise ProtocolError("the first frame is not a hello") from None
    if tag != "hello" or not isinstance(version, int) or not isinstance(options, dict):
        raise ProtocolError("the first frame is not a hello")
    return Hello(version, _text(host), {str(k): v for k, v in options.items()})


def parse_event(term: Any) -> Event:
    """Turn one decoded term into an event, or raise :class:`ProtocolError`."""
    if not isinstance(term, tuple) or not term or not isinstance(term[0], Atom):
        raise ProtocolError("an event is a tuple tagged with an atom")
    tag, args = term[0], term[1:]
    try:
        if tag == "stanza":
            return StanzaToPending(_session(args[0]), _stanza(args[1]))
        if tag == "session_pending":
            return SessionPending(_session(args[0]), tuple(_stanza(s) for s in args[1]))
        if tag == "session_resumed":
            return SessionResumed(_session(args[0]))
        if tag == "session_opened":
            return SessionOpened(_session(args[0]))
        if tag in ("offline", "archived"):
            return Offline(_user(args[0]), _stanza(args[1]), str(tag))
        if tag == "user_removed":
            return UserRemoved(_user(args[0]))
        if tag == "muc_message":
            room, flags, users, stanza = args
            if not isinstance(flags, dict) or not isinstance(users, list):
                raise ProtocolError("a muc_message has a flags map and a list of users")
            return MucMessage(_text(room), flags.get(Atom("members_only")) is True,
                              flags.get(Atom("anonymous")) is True,
                              tuple(_user(u) for u in users), _stanza(stanza))
        if tag == "bookmark":
            user, item, xml = args
            return Bookmarks(_user(user), ((_text(item), None if xml == "undefined"
                                            else _binary(xml)),), False)
        if tag == "bookmarks":
            user, items = args
            return Bookmarks(_user(user), tuple((_text(i), _binary(x)) for i, x in items), True)
        if tag == "ejabberd_started":
            return EjabberdStarted()
        if tag == "loglevel":
            return LogLevel(str(args[0]))
        if tag == "command":
            ref, name, command_args = args
            return AdminCommand(ref, str(name), tuple(_text(a) for a in command_args))
        if tag == "iq":
            ref, sender, to, iq_type, lang, xml = args
            return PushIq(ref, _session(sender), _session(to), str(iq_type), _text(lang),
                          _binary(xml))
        if tag == "app_server_iq":
            allowed, xml = args
            return AppServerIq(allowed is True, _binary(xml))
        if tag == "up_register":
            ref, sender, lang, xml = args
            return UpRegister(ref, _session(sender), _text(lang), _binary(xml))
        if tag == "up_post":
            ref, token, meta, body = args
            if not isinstance(meta, dict):
                raise ProtocolError("an up_post has a map of its headers")
            deadline = meta.get(_DEADLINE)
            if type(deadline) is not int:
                raise ProtocolError("an up_post has an integer deadline")
            return UpPost(ref, _text(token), _header(meta.get(_TTL)),
                          _header(meta.get(_URGENCY)), _header(meta.get(_TOPIC)), deadline,
                          _binary(body))
        if tag == "up_presence":
            return UpPresence(_session(args[0]))
        if tag == "iq_reply" and type(args[0]) is tuple:
            return _up_reply(*args)
        if tag == "iq_reply":
            ref, outcome = args
            if type(ref) is not int:  # Python's own publish refs come back
                raise ProtocolError(f"an iq_reply ref is an integer, not {ref!r:.40}")
            if isinstance(outcome, tuple):
                _, error_type, condition = outcome
                return PublishReply(ref, "error", str(error_type), str(condition))
            return PublishReply(ref, str(outcome))
    except (ValueError, TypeError, IndexError) as exc:
        raise ProtocolError(f"malformed {tag} event: {exc}") from None
    raise ProtocolError(f"unknown event {tag!r}")


_TTL, _URGENCY, _TOPIC, _DEADLINE = Atom("ttl"), Atom("urgency"), Atom("topic"), Atom("deadline")
_UP_OUTCOMES = frozenset({"result", "timeout", "offline", "pending"})


def _header(value: Any) -> bytes | None:
    return None if value is None or value == "undefined" else _binary(value)


def _up_reply(ref: Any, outcome: Any) -> UpReply:
    """iq_reply of an up_push: ref {up, Id}; outcome result | timeout | offline |
    pending | {timeout, pending} | {error, Type, Condition}."""
    if len(ref) != 2 or ref[0] != "up" or type(ref[1]) is not int:
        raise ProtocolError(f"an iq_reply ref is an integer or {{up, Id}}, not {ref!r:.40}")
    if isinstance(outcome, tuple):
        if len(outcome) == 2 and outcome[0] == "timeout" and outcome[1] == "pending":
            return UpReply(ref[1], "timeout_pending")
        if len(outcome) != 3 or outcome[0] != "error":
            raise ProtocolError("an up_push outcome is an atom, {timeout, pending} or an error")
        return UpReply(ref[1], "error", str(outcome[1]), str(outcome[2]))
    if not isinstance(outcome, Atom) or outcome not in _UP_OUTCOMES:
        raise ProtocolError(f"unknown up_push outcome {outcome!r:.40}")
    return UpReply(ref[1], str(outcome))


# ---------------------------------------------------------------------------- actions

_A = Atom


@dataclass(frozen=True, slots=True)
class IqResult:
    ref: Any
    xml: str | None = None


@dataclass(frozen=True, slots=True)
class IqError:
    ref: Any
    error_type: str  # cancel | modify | wait | auth | continue
    condition: str  # RFC 6120 condition, e.g. "bad-request"
    text: str


@dataclass(slots=True)  # per push: not frozen (see protocol.Stanza)
class Publish:
    """A notification to an app server: the shim builds the pubsub publish IQ from these
    parts (no XML to parse on ejabberd's side) and routes it from the server's domain."""

    ref: int
    to: str  # the app server's JID
    node: str
    fields: FormFields  # the summary form, FORM_TYPE first
    publish_options: FormFields | None
    timeout_ms: int
    # XML elements that go into <notification/> after the form (Tigase's <encrypted/>,
    # <priority/>, <jingle/>); fields are () when there is no form
    elements: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class SetPush:
    """Mark a live session push-enabled (keep it resumable this long) or not."""

    session: SessionKey
    resume_timeout_ms: int | None  # None: push disabled for the session
    # Whether the shim attaches the sender's roster item to the session's stanzas (None:
    # not said, the shim attaches it as it did before this field)
    roster: bool | None = field(default=None, compare=False)  # a hint, not the action


@dataclass(frozen=True, slots=True)
class PushOptionsUpdate:
    """The options form disco#info shows a user: their values, or the server's defaults
    (user None); fields None forgets a user's own values."""

    user: UserKey | None
    fields: list[tuple[str, bool]] | None


@dataclass(frozen=True, slots=True)
class Route:
    """Route a stanza (an answer of the app server) as it is."""

    xml: str


@dataclass(frozen=True, slots=True)
class Log:
    level: str  # debug | info | notice | warning | error | critical
    text: str


@dataclass(frozen=True, slots=True)
class Ack:
    """Every event of batches up to this one is handled and its effects are committed."""

    seq: int


@dataclass(frozen=True, slots=True)
class PushUsers:
    """The users with push registrations, as the shim keeps them for group chat pushes:
    reset (the whole set, after each hello), add or remove."""

    change: str  # "reset" | "add" | "remove"
    users: tuple[UserKey, ...]


@dataclass(frozen=True, slots=True)
class ReadBookmarks:
    """Ask the shim for all of a user's bookmarks (answered by a bookmarks event)."""

    user: UserKey


@dataclass(frozen=True, slots=True)
class CommandResult:
    """The text ejabberdctl prints for an AdminCommand."""

    ref: Any
    text: str


@dataclass(frozen=True, slots=True)
class UpPush:
    """Deliver a kept UnifiedPush message to the full JID that registered its endpoint:
    an IQ-set <push/> from the host (the shim base64-encodes the payload), answered by an
    iq_reply event with ref {up, id}."""

    id: int
    session: SessionKey
    application: str
    instance: str
    payload: bytes
    timeout_ms: int


@dataclass(frozen=True, slots=True)
class HttpReply:
    """The answer to an up_post (its ref as it came)."""

    ref: Any
    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes


@dataclass(frozen=True, slots=True)
class UpUsers:
    """The users with UnifiedPush endpoints, as the shim keeps them (which sessions'
    resumptions and presences to the host it reports): reset, add or remove."""

    change: str  # "reset" | "add" | "remove"
    users: tuple[UserKey, ...]


Action = (IqResult | IqError | Publish | SetPush | PushOptionsUpdate | Route | Log | Ack
          | CommandResult | PushUsers | ReadBookmarks | UpPush | HttpReply | UpUsers)


def action_term(action: Action) -> tuple[Any, ...]:
    """The Erlang term for an action (see docs/protocol.md)."""
    match action:
        case IqResult(ref, xml):
            return (_A("iq_result"), ref, xml.encode() if xml is not None else _A("undefined"))
        case IqError(ref, error_type, condition, text):
            return (_A("iq_error"), ref, _A(error_type), _A(condition), text.encode())
        case Publish(ref, to, node, fields, publish_options, timeout_ms, elements):
            term = (_A("publish"), ref, to.encode(), node.encode(),
                    [_field(var, values) if var == _BODY_FIELD else _field_term(var, values)
                     for var, values in fields],
                    _A("undefined") if publish_options is None else _form_term(publish_options),
                    timeout_ms)
            return (*term, [e.encode() for e in elements]) if elements else term
        case SetPush(session, timeout, roster):
            set_push = (_A("set_push"), tuple(p.encode() for p in session),
                        False if timeout is None else timeout)
            return set_push if timeout is None or roster is None else (*set_push, roster)
        case PushOptionsUpdate(user, values):
            key = _A("default") if user is None else tuple(p.encode() for p in user)
            return (_A("push_options"), key,
                    _A("undefined") if values is None else [(v.encode(), b) for v, b in values])
        case Route(xml):
            return (_A("route"), xml.encode())
        case Log(level, text):
            return (_A("log"), _A(level), text.encode())
        case Ack(seq):
            return (_A("ack"), seq)
        case CommandResult(ref, text):
            return (_A("command_result"), ref, text.encode())
        case ReadBookmarks((name, server)):
            return (_A("groupchat"), (_A("read_bookmarks"), (name.encode(), server.encode())))
        case PushUsers(change, users):
            return (_A("groupchat"), (_A("users"), _A(change),
                                      [(u.encode(), s.encode()) for u, s in users]))
        case UpPush(push_id, session, application, instance, payload, timeout_ms):
            return (_A("up_push"), (_A("up"), push_id), tuple(p.encode() for p in session),
                    application.encode(), instance.encode(), payload, timeout_ms)
        case HttpReply(ref, status, headers, body):
            return (_A("http_reply"), ref, status,
                    [(n.encode(), v.encode()) for n, v in headers], body)
        case UpUsers(change, users):
            return (_A("unified_push"), (_A("users"), _A(change),
                                         [(u.encode(), s.encode()) for u, s in users]))
    raise TypeError(f"not an action: {action!r}")


# Encoding a publish was a fifth of Python's CPU per push: the fields that recur (the form
# types, counts, senders) and a registration's publish-options are encoded once. Message
# bodies do not recur, and are not kept in memory longer than their push.
_BODY_FIELD = "last-message-body"


def _field(var: str, values: tuple[str, ...]) -> tuple[bytes, list[bytes]]:
    return (var.encode(), [value.encode() for value in values])


@lru_cache(maxsize=4096)
def _field_term(var: str, values: tuple[str, ...]) -> etf.Encoded:
    return etf.encoded(_field(var, values))


# One per registration (its publish-options hold its secret), so bounded as the
# registrations kept in memory are (store.USER_MEMORY), not lower: past the bound, each
# push would encode its form again. The key is the registration's own parsed form
# (Registration.publish_form): an entry costs only its encoded bytes.
@lru_cache(maxsize=65536)
def _form_term(fields: FormFields) -> etf.Encoded:
    return etf.encoded([_field(var, values) for var, values in fields])


def hello_reply(info: dict[str, str], facts: dict[str, Any] | None = None) -> tuple[Any, ...]:
    """{hello, Version, #{...}}: ``info`` about this process (version, python, pid), text;
    ``facts``, what the shim keeps and answers ejabberd's hooks with (core/shim_facts), as
    terms."""
    reply: dict[Any, Any] = {_A(k): v.encode() for k, v in info.items()}
    reply.update((_A(k), v) for k, v in (facts or {}).items())
    return (_A("hello"), PROTOCOL_VERSION, reply)
