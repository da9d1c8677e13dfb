"""``pymod-push logic check FILE``: an admin's push logic tried offline, before it runs.

The admin's module (option ``logic``) is run against sample stanzas (chat, group chat with
and without a mention, a call, an OMEMO message, a subscription request, a 1 MB body) and
any stanzas given with ``--stanza``. For each, it prints what the server would do: the
decision (and ours without the module), the summary an app server gets, and the payload
each provider of the built-in app server would get. The decisions are the server's own:
the stanza goes through a push service with a throwaway database, exactly as an event from
ejabberd would. Nothing is contacted: provider requests are built, never sent (their
credentials are made up on the spot). Providers written in Python (backends of type python
in ``--config``) are loaded and checked, and what their ``send`` would get is printed; it is
not called.

    pymod-push logic check /etc/ejabberd/push_logic.py [--option include_message_bodies=true]
        [--config /etc/ejabberd/ejabberd.yml] [--stanza '<message ...>'] [--nick NICK]
        [--user juliet@example.org]

Exit status: 0 when every function ran within its budget and returned what it must, 1 when
one failed (raised, returned the wrong type, was too slow; the output says which), 2 when
the module does not load or the input is wrong.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import logging
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import http_ece  # type: ignore[import-untyped]
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from pymod_push import logic
from pymod_push.core import safexml
from pymod_push.core.config import Backend, Config
from pymod_push.core.notify import trigger_of, unwrap_carbon
from pymod_push.delivery.dispatcher import PROVIDERS
from pymod_push.protocol import Publish, PushIq, Stanza, StanzaToPending
from pymod_push.providers import Provider, notification_text
from pymod_push.python_provider import ProviderError, PythonProvider, load_provider
from pymod_push.records import RegisteredDevice
from pymod_push.service.decisions import PushService
from pymod_push.service.logic_work import LogicWork
from pymod_push.store import Store

HOST = "example.org"
USER = "juliet"
APP_SERVER = "push.example.net"
NS_CLIENT = "{jabber:client}"
SHOWN = 600  # characters of a payload printed; the size is always given in full


@dataclass(frozen=True)
class Sample:
    name: str
    xml: str
    nick: str = ""  # the user's nickname in the room (group chat)


def _message(body: str, *, sender: str = "romeo@example.net/orchard", kind: str = "chat",
             extra: str = "", number: int = 1) -> str:
    body_xml = f"<body>{body}</body>" if body else ""
    return (f"<message xmlns='jabber:client' type='{kind}' from='{sender}' "
            f"to='{USER}@{HOST}' id='sample-{number}'>{body_xml}{extra}</message>")


SAMPLES = (
    Sample("chat message", _message("Hello Juliet, are you there?", number=1)),
    Sample("group chat, mentioning the user",
           _message("juliet: the balcony, at nine?", sender="capulets@rooms.example.org/romeo",
                    kind="groupchat", number=2), nick="juliet"),
    Sample("group chat, not mentioning the user",
           _message("Who is coming tonight?", sender="capulets@rooms.example.org/tybalt",
                    kind="groupchat", number=3), nick="juliet"),
    Sample("call (Jingle Message Initiation)",
           _message("", extra="<propose xmlns='urn:xmpp:jingle-message:0' id='call-1'>"
                    "<description xmlns='urn:xmpp:jingle:apps:rtp:1' media='audio'/>"
                    "</propose>", number=4)),
    Sample("OMEMO-encrypted message",
           _message("I sent you an OMEMO encrypted message but your client doesn't seem to "
                    "support that.", extra="<encrypted xmlns='eu.siacs.conversations.axolotl'>"
                    "<header sid='1'><iv>AAAA</iv></header><payload>AAAA</payload>"
                    "</encrypted>", number=5)),
    Sample("subscription request",
           f"<presence xmlns='jabber:client' type='subscribe' from='mercutio@example.net' "
           f"to='{USER}@{HOST}' id='sample-6'/>"),
    Sample("1 MB body", _message("\u2764" * 100_000 + "x" * 700_000, number=7)),
)


class CheckError(Exception):
    """The module or the input is not usable (exit status 2)."""


def stanza_of(xml: str, nick: str = "") -> Stanza:
    """What the shim would tell Python about this stanza."""
    try:
        root = safexml.parse(xml.encode())
    except ET.ParseError as exc:
        raise CheckError(f"not a stanza ({exc}): {xml[:80]}") from exc
    kind = root.tag.rpartition("}")[2]
    if kind not in ("message", "presence"):
        raise CheckError(f"a <message/> or <presence/> is needed, not <{kind}/>")
    default_type = "normal" if kind == "message" else "available"
    body = root.findtext(f"{NS_CLIENT}body") or root.findtext("body") or ""
    return Stanza(kind, root.get("from", f"someone@{HOST}"), root.get("id", ""),
                  root.get("type", default_type), body, xml.encode(), nick)


# ------------------------------------------------------------------- providers
@dataclass
class Tried:
    """A provider with a device of its own, credentials made up."""

    provider: Provider
    device: RegisteredDevice
    limit: int  # the provider's payload limit, bytes
    show: Callable[[bytes], bytes]  # the request body as the device reads it


def _pem(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def providers(folder: Path, user: str = f"{USER}@{HOST}") -> dict[str, Tried]:
    """One provider of each kind, as the built-in app server would have them; endpoints
    are .invalid names, and nothing is sent anyway."""
    (folder / "apns.p8").write_bytes(_pem(ec.generate_private_key(ec.SECP256R1())))
    (folder / "vapid.pem").write_bytes(_pem(ec.generate_private_key(ec.SECP256R1())))
    (folder / "fcm.json").write_text(json.dumps({
        "type": "service_account", "project_id": "check", "client_email": "check@check.invalid",
        "private_key": _pem(rsa.generate_private_key(public_exponent=65537,
                                                     key_size=2048)).decode(),
        "token_uri": "https://oauth.invalid/token"}))
    common = {"endpoint": "https://provider.invalid"}
    options: dict[str, dict[str, Any]] = {
        "apns": {**common, "key_file": str(folder / "apns.p8"), "key_id": "CHECK",
                 "team_id": "CHECK", "topic": "org.example.app",
                 "voip_topic": "org.example.app.voip"},
        "fcm": {**common, "service_account_file": str(folder / "fcm.json")},
        "webpush": {"vapid_private_key_file": str(folder / "vapid.pem"),
                    "vapid_subject": "mailto:admin@example.org"},
        "wns": {**common, "package_sid": "ms-app://check", "auth_key": "check",
                "channel_domains": ["wns.invalid"]},  # the device's below
        "ubuntu": dict(common),
    }
    receiver = ec.generate_private_key(ec.SECP256R1())
    auth = b"0123456789abcdef"
    public = receiver.public_key().public_bytes(serialization.Encoding.X962,
                                                serialization.PublicFormat.UncompressedPoint)

    def decrypted(body: bytes) -> bytes:
        return bytes(http_ece.decrypt(body, private_key=receiver, auth_secret=auth,
                                      version="aes128gcm"))

    def device(kind: str, **extra: str) -> RegisteredDevice:
        return RegisteredDevice(f"node-{kind}", "secret", user, "phone", "the user's phone",
                      kind, "check", f"push.{HOST}", extra.pop("token", "00" * 32), **extra)

    def unchanged(body: bytes) -> bytes:
        return body

    found = {}
    for index, (kind, backend_options) in enumerate(options.items()):
        backend = Backend(index, kind, "check", HOST, f"push.{HOST}", backend_options)
        found[kind] = Tried(PROVIDERS[kind](backend), device(kind), 4096, unchanged)
    found["apns"].device = device("apns", voip_token="11" * 32)
    found["webpush"].device = device(
        "webpush", token="https://webpush.invalid/subscription",
        p256dh=base64.urlsafe_b64encode(public).decode().rstrip("="),
        auth=base64.urlsafe_b64encode(auth).decode().rstrip("="))
    found["webpush"].show = decrypted
    found["wns"].device = device("wns", token="https://wns.invalid/channel")
    found["wns"].limit = 5120
    found["ubuntu"].device = device("ubuntu", token="ubuntu-token",
                                    application_id="org.example_app")
    return found


# ------------------------------------------------------------------- the check
class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@contextmanager
def _collected() -> Iterator[_Collect]:
    collect = _Collect()
    logger = logging.getLogger("pymod_push")
    logger.addHandler(collect)
    propagate, logger.propagate = logger.propagate, False
    try:
        yield collect
    finally:
        logger.removeHandler(collect)
        logger.propagate = propagate


def _shown(data: bytes) -> str:
    text = data.decode("utf-8", "replace")
    return text if len(text) <= SHOWN else f"{text[:SHOWN]}… (cut here for display)"


def check(spec: str, options: dict[str, Any], stanzas: Sequence[Sample],
          out: Callable[[str], None], user: str = f"{USER}@{HOST}") -> int:
    """Run the module against the stanzas for this user (the recipient), printing
    through out; the exit status."""
    name, _, host = user.partition("@")
    if not name or not host or "/" in host:
        raise CheckError(f"--user takes a bare JID (user@domain), not {user!r}")
    with _collected() as loading:
        admin_logic = logic.load(spec)
    if admin_logic.module is None:
        raise CheckError("; ".join(loading.lines) or f"{spec} did not load")
    functions = [n for n in ("should_push", "summary", "provider_data") if admin_logic.has(n)]
    out(f"push logic {spec}: {', '.join(functions) or 'no functions (the defaults apply)'}")
    config = Config.from_options(host, options)
    shown = {k: v for k, v in sorted(options.items()) if k != "backends"}
    out(f"options: {shown or 'the defaults'}; recipient {user}")
    failed = False
    python = []  # the config's providers written in Python: loaded and checked, not called
    for backend in (b for b in config.backends if b.type == "python"):
        try:
            python.append(load_provider(backend))
            out(f"python provider {backend.group}: registers "
                f"{', '.join(python[-1].fields) or 'no fields'}")
        except ProviderError as error:
            failed = True
            out(f"PROBLEM: python provider {backend.group}: {error}")
    with tempfile.TemporaryDirectory(prefix="pymod_push-check-") as folder:
        tried = providers(Path(folder), user)
        store = Store(str(Path(folder) / "check.db"))
        service = PushService(config, store, admin_logic)
        now = time.time()
        for number, sample in enumerate(stanzas, start=1):
            session = (name, host, f"sample{number}")
            service.handle(PushIq(number, session, (name, host, ""), "set", "en",
                                  f"<enable xmlns='urn:xmpp:push:0' jid='{APP_SERVER}' "
                                  f"node='node{number}'/>".encode()), now)
            stanza = stanza_of(sample.xml, sample.nick)
            unwrapped = unwrap_carbon(stanza, (name, host))
            default = unwrapped is not None and trigger_of(unwrapped, config) is not None
            with _collected() as problems:
                publishes = _answered(service, service.handle(StanzaToPending(session, stanza),
                                                              now), now)
                out(f"\n== {sample.name} ({len(sample.xml.encode()):,} bytes)")
                out(f"decision: {'push' if publishes else 'no push'} (without the module: "
                    f"{'push' if default else 'no push'})")
                for publish in publishes[:1]:
                    fields = {k: v[0] if v else "" for k, v in publish.fields
                              if k != "FORM_TYPE"}
                    out("summary: " + (", ".join(f"{k}={_shown(v.encode())!r}"
                                                 for k, v in fields.items()) or "(empty)"))
                    for kind, one in tried.items():
                        out(f"{kind}: " + _payload(one, admin_logic, fields, now))
                    for provider in python:
                        out(f"{provider.name} (python, not called): "
                            + _notification(provider, admin_logic, fields, user))
            for line in problems.lines:
                failed = True
                out(f"PROBLEM: {line}")
        store.close()
    out("\n" + ("some functions failed: the server would use its defaults there (see "
                "PROBLEM lines)" if failed else "every function ran as it should"))
    return 1 if failed else 0


def _answered(service: PushService, results: Sequence[Any], now: float) -> list[Publish]:
    """The publishes, once the admin's async functions (if any) have answered, as the
    port would ask them (within the budget)."""
    publishes = [r for r in results if isinstance(r, Publish)]
    for work in (r for r in results if isinstance(r, LogicWork)):
        while (waiting := service.waiting_for_logic(work.target[:2])) is not None:
            call = service.logic_call(waiting)
            answers = (asyncio.run(service.logic.decide(call.message, call.cases))
                       if call.message is not None else [(False, None)] * len(call.cases))
            publishes += [a for a in service.finish_logic(call, answers, now)
                          if isinstance(a, Publish)]
    return publishes


def _payload(one: Tried, admin_logic: logic.Logic, fields: dict[str, str], now: float) -> str:
    summary = dict(fields)
    if admin_logic.has("provider_data"):
        device = one.device
        seen = logic.Device(device.user, device.provider, device.app_name, device.device_id,
                            device.device_name)
        summary = (asyncio.run(admin_logic.provider_data_async(seen, summary))
                   if admin_logic.shapes_async else admin_logic.provider_data(seen, summary))
    urgent = summary.get("last-message-priority") == "high"
    request = one.provider.request(one.device, summary, now, urgent)
    body = one.show(request.body)
    size = len(request.body)
    flag = "" if size <= one.limit else f" OVER THE LIMIT OF {one.limit}"
    return f"{size} bytes{flag}{', urgent' if urgent else ''}: {_shown(body)}"


def _notification(provider: PythonProvider, admin_logic: logic.Logic, fields: dict[str, str],
                  user: str) -> str:
    """What a provider written in Python would get (its send is not called: it would
    contact its service)."""
    summary = dict(fields)
    if admin_logic.has("provider_data"):
        seen = logic.Device(user, provider.name, "check", "phone", "the user's phone")
        summary = (asyncio.run(admin_logic.provider_data_async(seen, summary))
                   if admin_logic.shapes_async else admin_logic.provider_data(seen, summary))
    title, text = notification_text(summary)
    urgent = summary.get("last-message-priority") == "high"
    return (f"title={_shown(title.encode())!r}, text={_shown(text.encode())!r}, "
            f"urgent={urgent}")


def _options(pairs: Sequence[str], config: Path | None) -> dict[str, Any]:
    options: dict[str, Any] = {}
    if config is not None:
        try:
            document = yaml.safe_load(config.read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise CheckError(f"cannot read {config}: {exc}") from exc
        modules = (document or {}).get("modules") or {}
        options.update(modules.get("mod_push_py") or {})
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep:
            raise CheckError(f"--option takes NAME=VALUE, not {pair!r}")
        options[name.strip()] = yaml.safe_load(value)
    options.pop("logic", None)
    return options


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pymod-push logic",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["check"])
    parser.add_argument("file", help="the module: a .py file or an import name")
    parser.add_argument("--option", action="append", default=[], metavar="NAME=VALUE",
                        help="a mod_push_py option (YAML value), e.g. "
                        "include_message_bodies=true; may be repeated")
    parser.add_argument("--config", type=Path,
                        help="take mod_push_py's options from this ejabberd.yml")
    parser.add_argument("--stanza", action="append", default=[], metavar="XML",
                        help="a stanza of your own to try as well; may be repeated")
    parser.add_argument("--user", default=f"{USER}@{HOST}",
                        help="the recipient's bare JID (default: %(default)s)")
    parser.add_argument("--nick", default="",
                        help="the user's nickname in the room of a --stanza group chat message")
    args = parser.parse_args(argv)
    try:
        options = _options(args.option, args.config)
        stanzas = list(SAMPLES) + [Sample(f"your stanza {n}", xml, args.nick)
                                   for n, xml in enumerate(args.stanza, start=1)]
        for sample in stanzas[len(SAMPLES):]:
            stanza_of(sample.xml)  # refused before anything runs
        return check(args.file, options, stanzas, print, args.user)
    except CheckError as exc:
        print(f"pymod-push logic check: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
