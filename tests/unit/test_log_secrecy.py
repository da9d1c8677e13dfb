"""Bodies, device tokens, node secrets and publish-options never reach the log, at any level,
unless the admin sets log_sensitive; ejabberd's loglevel is followed."""

from __future__ import annotations

import logging
from dataclasses import replace

import pytest

from pymod_push.port.app import python_level
from pymod_push.protocol import Publish, PushIq, StanzaToPending
from pymod_push.service.decisions import PushService
from pymod_push.store import Store
from tests.builders import (
    PHONE,
    make_app_server,
    make_service,
    message,
    publish,
    push_iq,
    register,
)

BODY = "the-secret-body-4711"
SECRET = "node-secret-0815"
TOKEN = "fe" * 32
IOS_KEY = "c2VjcmV0LWlvcy1rZXktMQ=="  # the 16-byte key of Tigase's <encrypt/> (Siskin IM)


def enable_with_bodies() -> PushIq:
    xml = ("<enable xmlns='urn:xmpp:push:0' jid='push.example.net' node='n1'>"
           "<x xmlns='jabber:x:data' type='submit'><field var='FORM_TYPE'><value>"
           "urn:xmpp:push:options</value></field><field var='include-message-bodies'>"
           "<value>1</value></field></x>"
           "<x xmlns='jabber:x:data' type='submit'><field var='FORM_TYPE'><value>"
           "http://jabber.org/protocol/pubsub#publish-options</value></field>"
           f"<field var='secret'><value>{SECRET}</value></field></x></enable>")
    return push_iq(xml)


def drive(log_sensitive: bool) -> None:
    config = replace(make_service().config, log_sensitive=log_sensitive)
    service = PushService(config, Store(":memory:"))
    service.handle(enable_with_bodies(), 0)
    service.handle(push_iq(
        "<enable xmlns='urn:xmpp:push:0' jid='push.example.net' node='n2'>"
        "<encrypt xmlns='tigase:push:encrypt:0' alg='aes-128-gcm'>"
        f"{IOS_KEY}</encrypt></enable>"), 0)
    (push, encrypted) = service.handle(StanzaToPending(PHONE, message(body=BODY)), 0)
    assert isinstance(push, Publish)  # the body and the secret are in the push, as they should
    assert isinstance(encrypted, Publish) and encrypted.elements
    assert ("last-message-body", (BODY,)) in push.fields
    assert ("secret", (SECRET,)) in (push.publish_options or ())
    server = make_app_server()
    node, secret = register(server, token=TOKEN)
    publish(server, node, secret)
    publish(server, node, "wrong-" + secret)


def test_nothing_sensitive_in_the_log_at_debug(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="pymod_push"):
        drive(log_sensitive=False)
    assert caplog.records  # the paths did log
    for needle in (BODY, SECRET, TOKEN, IOS_KEY):
        assert needle not in caplog.text


def test_log_sensitive_shows_what_was_published(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="pymod_push"):
        drive(log_sensitive=True)
    assert BODY in caplog.text
    assert IOS_KEY not in caplog.text  # the device's key: never, it is not a notification


@pytest.mark.parametrize(("ejabberd", "python"), [
    ("debug", logging.DEBUG), ("info", logging.INFO), ("notice", logging.INFO),
    ("warning", logging.WARNING), ("error", logging.ERROR), ("critical", logging.CRITICAL),
    ("none", logging.CRITICAL + 10), (None, logging.INFO)])
def test_python_follows_ejabberds_loglevel(ejabberd: str | None, python: int) -> None:
    assert python_level(ejabberd) == python
