"""What the shim and Python agree on comes from Python (core/shim_facts.py) in the hello reply:
the account's disco features, the app server's command items and labels; the shim has no copy
of them, and derives a Python provider's default name by Python's rule only to refuse a
configuration."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path

from pymod_push import etf
from pymod_push.appserver import requests as app
from pymod_push.core import ios_extensions
from pymod_push.core.config import COMMAND_GROUPS, Backend, Config, default_name
from pymod_push.core.shim_facts import (
    COMMAND_LABELS,
    account_features,
    command_items,
    hello_facts,
)
from pymod_push.etf import Atom
from pymod_push.protocol import PROTOCOL_VERSION, hello_reply

SHIM = Path(__file__).resolve().parents[2] / "erl_shim" / "src"
HOST = "example.org"


def backend(index: int, type_: str, app_name: str = "any", register_host: str = HOST,
            **options: str) -> Backend:
    return Backend(index, type_, app_name, register_host, "pubsub.example.org", options)


def test_account_features_are_xep_0357_and_tigase_with_ios_extensions() -> None:
    assert account_features(Config(HOST)) == ("urn:xmpp:push:0", *ios_extensions.FEATURES)
    assert account_features(Config(HOST, ios_extensions=False)) == ("urn:xmpp:push:0",)
    assert "tigase:push:encrypt:aes-128-gcm" in ios_extensions.FEATURES
    assert "tigase:push:away:0" not in ios_extensions.FEATURES  # not implemented


def test_command_items_in_the_shims_order_and_wording() -> None:
    backends = [backend(0, "wns", "win", auth_key="k", package_sid="s"),
                backend(1, "python", module="hooks.py", name="webhook"),
                backend(2, "apns", "chatninja"), backend(3, "gcm", "old"),
                backend(4, "apns", "another"), backend(5, "apns", "chatninja"),
                backend(6, "mozilla"), backend(7, "ubuntu"),
                backend(8, "python", module="aaa", name="aaa")]
    assert command_items(backends) == [
        ("register-push-apns", "Register at APNs (another, chatninja)"),
        ("register-push-fcm", "Register at FCM (old)"),
        ("register-push-gcm", "Register at FCM (gcm) (old)"),
        ("register-push-ubuntu", "Register at Ubuntu Push (any)"),
        ("register-push-webpush", "Register at Web Push (any)"),
        ("register-push-mozilla", "Register at Web Push (mozilla) (any)"),
        ("register-push-wns", "Register at WNS (win)"),
        ("register-push-aaa", "Register at aaa (any)"),  # Python providers last, by name
        ("register-push-webhook", "Register at webhook (any)"),
        ("list-push-registrations", "List push registrations"),
        ("unregister-push", "Unregister push devices")]
    assert command_items([]) == []
    assert set(COMMAND_LABELS) == set(COMMAND_GROUPS)


def test_the_app_servers_own_hosts_list_the_same_items() -> None:
    backends = [backend(0, "apns", "chatninja", "push.example.org"),
                backend(1, "fcm", "chatninja", "push.example.org")]
    xml = (b"<iq xmlns='jabber:client' type='get' id='i1' from='alice@example.org/phone' "
           b"to='push.example.org'><query xmlns='http://jabber.org/protocol/disco#items' "
           b"node='http://jabber.org/protocol/commands'/></iq>")
    answer = ET.fromstring(app.disco_items(app.parse_iq(xml), "push.example.org", backends))
    items = [(i.get("node"), i.get("name")) for i in answer.iter(f"{{{app.NS_DISCO_ITEMS}}}item")]
    assert items == command_items(backends)
    assert ("register-push-apns", "Register at APNs (chatninja)") in items


def test_hello_facts_are_the_hosts_own_and_reach_the_shim_as_terms() -> None:
    config = Config(HOST, ios_extensions=False,
                    backends=(backend(0, "ubuntu"),
                              backend(1, "apns", "chatninja", "push.example.org")))
    facts = hello_facts(config)
    assert facts == {"features": ["urn:xmpp:push:0"],
                     "commands": [("register-push-ubuntu", "Register at Ubuntu Push (any)"),
                                  ("list-push-registrations", "List push registrations"),
                                  ("unregister-push", "Unregister push devices"),
                                  ("push-diagnose", "Push notifications check-up")]}
    # the users' push check-up is there without the app server too
    assert hello_facts(Config(HOST))["commands"] == [("push-diagnose",
                                                      "Push notifications check-up")]
    reply = etf.decode(etf.encode(hello_reply({"version": "1.0", "pid": "42"}, facts)))
    assert reply == (Atom("hello"), PROTOCOL_VERSION, {
        Atom("version"): b"1.0", Atom("pid"): b"42",
        Atom("features"): [b"urn:xmpp:push:0"],
        Atom("commands"): [(b"register-push-ubuntu", b"Register at Ubuntu Push (any)"),
                           (b"list-push-registrations", b"List push registrations"),
                           (b"unregister-push", b"Unregister push devices"),
                           (b"push-diagnose", b"Push notifications check-up")]})


def test_the_shim_keeps_no_copy_of_pythons_decisions() -> None:
    sources = {path.name: path.read_text() for path in SHIM.glob("*.erl")}
    assert set(sources) == {"mod_push_py.erl", "mod_push_py_port.erl", "mod_push_py_opt.erl",
                            "mod_push_py_actions.erl", "mod_push_py_muc.erl",
                            "mod_push_py_up.erl", "mod_push_py_commands.erl"}
    for name, text in sources.items():
        for literal in ('<<"tigase:push:', '<<"Register at', '<<"register-push-', '"APNs"'):
            assert literal not in text, (name, literal)
        assert "PROTOCOL_VERSION, 3)" not in text, name
    assert f"-define(PROTOCOL_VERSION, {PROTOCOL_VERSION})." in sources["mod_push_py_port.erl"]
    # What ejabberd must refuse before Python runs: a Python provider named after a
    # shipped one (its register-push-NAME would shadow that command).
    check = sources["mod_push_py_opt.erl"].split("check_backend(#{type := python, module",
                                                1)[1].split("end;", 1)[0]
    refused = set(re.findall(r'<<"(\w+)">>', check.split("lists:member(Name,", 1)[1]
                                              .split("]) of", 1)[0]))
    assert refused == set(COMMAND_GROUPS)


def test_default_name_is_what_the_shim_derives() -> None:
    # filename:basename/1 and filename:extension/1 on the same paths (the shim checks the
    # name it derives; Python's is the provider's name).
    for module, name in [("/etc/ejabberd/push/webhook.py", "webhook"),
                         ("company.push.ntfy", "ntfy"), ("gotify", "gotify"),
                         ("x.py.py", "x.py"), ("a.b/c", "c"), ("c.PY", "PY"),
                         (".py", "py"), ("a/.py", "py"), ("foo/", "foo"), ("a//", "a"),
                         ("..py", "."), ("x.", ""), ("/", "")]:
        assert default_name(module) == name, module
