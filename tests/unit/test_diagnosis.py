"""The push check-up (service/diagnosis.py, core/push_history.py, the admin commands
diagnose/diagnose_test): what it says, that it never shows a token, a node, a secret, a key
or a body, when push_diagnose_test answers, and the users' ad-hoc command (their own
registrations only, test pushes rate limited)."""

from __future__ import annotations

import base64
import logging
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator

import pytest

from pymod_push.core import ios_extensions
from pymod_push.core.config import Config
from pymod_push.core.push_history import (
    HISTORY,
    LINE_CHARS,
    UserLogHandler,
    about,
    describe,
    printable,
    short_hash,
)
from pymod_push.delivery.dispatcher import _answer_text
from pymod_push.port import admin_commands as admin
from pymod_push.protocol import AdminCommand, CommandResult, Publish, PublishReply, PushIq, Route
from pymod_push.providers import DeliveryOutcome, Reply
from pymod_push.service import diagnosis
from pymod_push.service.decisions import PushService
from pymod_push.store import Store
from tests.builders import (
    ALICE,
    HOST,
    NOW,
    NS_COMMANDS,
    NS_DATA,
    OWN_HOST_BACKENDS,
    PHONE,
    PUBSUB_HOST,
    command_xml,
    iq_xml,
    registered,
)

TOKEN = "c0ffee" * 10
NODE_SECRET_FORM = "pubsub-secret-42"
KEY = b"0123456789abcdef"


@pytest.fixture(autouse=True)
def fresh_history() -> Iterator[None]:
    HISTORY.clear()
    diagnosis._last_test.clear()
    admin.DEFERRED.clear()
    yield
    HISTORY.clear()
    admin.DEFERRED.clear()


def enable(service: PushService, jid: str, node: str, secret: str = NODE_SECRET_FORM,
           session: tuple[str, str, str] = PHONE, extra: str = "") -> None:
    options = (f"<x xmlns='{NS_DATA}' type='submit'><field var='FORM_TYPE'><value>"
               "http://jabber.org/protocol/pubsub#publish-options</value></field><field "
               f"var='secret'><value>{secret}</value></field></x>")
    xml = f"<enable xmlns='urn:xmpp:push:0' jid='{jid}' node='{node}'>{options}{extra}</enable>"
    service.handle(PushIq("e", session, (*session[:2], ""), "set", "en", xml.encode()), NOW)


def own_service() -> tuple[PushService, str]:
    """Alice with a device at the service's own app server (its token TOKEN), enabled."""
    service = PushService(Config(HOST, backends=OWN_HOST_BACKENDS), Store(":memory:"))
    node, secret = registered(service, TOKEN)
    enable(service, PUBSUB_HOST, node, secret)
    return service, node


def test_the_report_names_the_device_and_shows_no_secret() -> None:
    service, node = own_service()
    enable(service, "push.example.net", "external-node-77",
           extra=f"<encrypt xmlns='tigase:push:encrypt:0' alg='aes-128-gcm'>"
                 f"{base64.b64encode(KEY).decode()}</encrypt>")
    (registration, external) = service.store.for_user(ALICE)
    key = registration.key if registration.node == node else external.key
    HISTORY.sent(key, [("message-count", "2"), ("last-message-body", "meet me at noon"),
                       ("last-message-sender", "bob@example.org/pc")], NOW)
    HISTORY.answered(key, "delivered", NOW + 0.042)
    HISTORY.device_sent(node, {"message-count": "2", "last-message-body": "meet me"}.items(),
                        NOW)
    HISTORY.device_answered(node, "delivered (HTTP 200)", NOW + 0.030)
    text = diagnosis.report(service, ALICE, {"push.example.net": "s2s: connected"},
                            NOW + 1).text
    assert "this server's app server (pubsub.example.org): apns (app 'chatninja')" in text
    assert "sent message-count 2, a body (15 characters), the sender; answer: delivered "\
           "after 42 ms" in text
    assert "last push to the device's provider: " in text and "after 30 ms" in text
    assert "reachable from here: s2s: connected" in text
    assert "Tigase push extensions (filters): encrypt (payload encrypted" in text
    assert f"node {short_hash(node)}" in text
    for secret in (TOKEN, node, "external-node-77", NODE_SECRET_FORM, "meet me", "bob@",
                   base64.b64encode(KEY).decode(), KEY.decode()):
        assert secret not in text, secret
    # the registration's secret (the device's) is in no line either
    (device,) = service.store.devices_of("alice@example.org")
    assert device.secret not in text and device.token not in text


def test_describe_says_counts_and_presence_never_text() -> None:
    said = describe([("FORM_TYPE", "urn:xmpp:push:summary"), ("message-count", "3"),
                     ("last-message-priority", "high"), ("last-message-body", "pin 1234"),
                     ("last-message-sender", "eve@example.org"),
                     (ios_extensions.ELEMENT_KEY + "0", "<encrypted xmlns='x' iv='a'>AAA"
                                                       "</encrypted>")])
    assert said == ("message-count 3, priority high, a body (8 characters), the sender, "
                    "<encrypted/> element")
    assert describe([]) == "nothing but the wake-up"


def test_errors_and_how_far_from_disabled() -> None:
    service = PushService(Config(HOST, max_publish_errors=5), Store(":memory:"))
    enable(service, "push.example.net", "n1")
    (registration,) = service.store.for_user(ALICE)
    service.store.set_errors(registration.key, 2, NOW)
    text = diagnosis.report(service, ALICE, {}, NOW).text
    assert "errors: 2 of 5 (max_publish_errors): disabled after 3 more" in text
    HISTORY.was_disabled(("alice", HOST, "push.example.net", "n2"), "5 error(s), the last: "
                         "cancel item-not-found", NOW)
    text = diagnosis.report(service, ALICE, {}, NOW).text
    assert (f"the registration at push.example.net node {short_hash('n2')} after 5 error(s), "
            "the last: cancel item-not-found") in text


def test_log_lines_are_kept_per_user_escaped_and_cut() -> None:
    logger = logging.getLogger("pymod_push.test_diagnosis")
    logger.setLevel(logging.INFO)
    handler = UserLogHandler()
    logger.addHandler(handler)
    try:
        logger.warning("push to %s failed\x1b[31m\nforged", "alice", extra=about(*ALICE))
        logger.warning("about nobody")
        logger.info("x" * (LINE_CHARS + 50), extra=about("alice@example.org"))
    finally:
        logger.removeHandler(handler)
    (first, second) = HISTORY.logs["alice@example.org"]
    assert first[1:] == ("warning", "push to alice failed\\x1b[31m\\nforged")
    assert second[2].endswith("…") and len(second[2]) == LINE_CHARS + 1
    assert list(HISTORY.logs) == ["alice@example.org"]
    assert printable("a\tb") == "a\\tb"


def run_admin(service: PushService, name: str, *args: str) -> list[object]:
    return list(admin.run(AdminCommand("ref", name, args), service,
                          admin.ProcessInfo(), NOW))


def test_push_diagnose_test_answers_once_its_pushes_are_answered() -> None:
    service = PushService(Config(HOST), Store(":memory:"))
    enable(service, "push.example.net", "n1")
    enable(service, "app.example.com", "n2", session=(*ALICE, "tablet"))
    assert run_admin(service, "diagnose_domains", "Alice", HOST)[-1] == CommandResult(
        "ref", "app.example.com\npush.example.net")
    publishes = run_admin(service, "diagnose_test", "alice", HOST,
                          "push.example.net\ts2s: connected")
    assert [type(p) for p in publishes] == [Publish, Publish]  # no answer yet
    assert len(admin.DEFERRED) == 1 and admin.due_results(0.0) == []
    first, second = publishes
    assert isinstance(first, Publish) and isinstance(second, Publish)
    service.handle(PublishReply(first.ref, "result"), NOW + 0.01)
    assert admin.due_results(0.0) == []
    service.handle(PublishReply(second.ref, "error", "wait", "resource-constraint"), NOW + 0.02)
    (result,) = admin.due_results(0.0)
    assert isinstance(result, CommandResult) and result.ref == "ref"
    assert result.text.startswith("sent 2 test push(es)\n")
    assert "(a test push), sent message-count 0" in result.text
    assert re.search(r"answer: delivered after \d+ ms", result.text)  # wall clock
    assert re.search(r"answer: transient: wait resource-constraint after \d+ ms", result.text)
    assert "reachable from here: s2s: connected" in result.text
    assert "reachable from here: not asked" in result.text
    assert admin.DEFERRED == []


def test_push_diagnose_test_answers_after_its_wait_without_answers() -> None:
    service = PushService(Config(HOST), Store(":memory:"))
    enable(service, "push.example.net", "n1")
    run_admin(service, "diagnose_test", "alice", HOST)
    deadline = admin.DEFERRED[0].deadline
    assert admin.due_results(deadline - 0.1) == []
    (result,) = admin.due_results(deadline)
    assert isinstance(result, CommandResult)
    assert "not all answered within 10 s" in result.text and "no answer yet" in result.text
    text = run_admin(service, "diagnose", "bob", HOST)[-1]
    assert isinstance(text, CommandResult) and "no push registrations" in text.text


def adhoc(service: PushService, fields: dict[str, str] | None, sender: str = "alice@"
          f"{HOST}/phone", at: float = 0.0) -> list[object]:
    xml = iq_xml("set", HOST, command_xml(diagnosis.DIAGNOSE_COMMAND, fields), sender=sender)
    answer = diagnosis.adhoc(service, xml, NOW, lambda: at)
    assert answer is not None
    return list(answer)


def command_of(actions: list[object]) -> ET.Element:
    route = actions[-1]
    assert isinstance(route, Route)
    element = ET.fromstring(route.xml).find(f"{{{NS_COMMANDS}}}command")
    assert element is not None
    return element


def test_the_adhoc_command_shows_the_users_own_and_rate_limits_tests() -> None:
    service = PushService(Config(HOST), Store(":memory:"))
    enable(service, "push.example.net", "alice-node")
    enable(service, "other.example.net", "bob-node", session=("bob", HOST, "pc"))
    first = command_of(adhoc(service, None))
    assert first.get("status") == "executing"
    text = ET.tostring(first, encoding="unicode")
    assert "push.example.net" in text and "other.example.net" not in text
    assert "alice-node" not in text and short_hash("alice-node") in text
    assert first.find(f"{{{NS_DATA}}}x/{{{NS_DATA}}}field[@var='test']") is not None

    sent = adhoc(service, {"test": "1"}, at=100.0)
    assert [type(a) for a in sent] == [Publish, Route]
    assert command_of(sent).findtext(f"{{{NS_COMMANDS}}}note", "").startswith(
        "Sent 1 test push(es)")
    refused = adhoc(service, {"test": "1"}, at=159.0)
    assert [type(a) for a in refused] == [Route]
    note = command_of(refused).find(f"{{{NS_COMMANDS}}}note")
    assert note is not None and note.get("type") == "warn"
    assert note.text == "A test push can be sent once every 60 s: try again in 1 s."
    assert [type(a) for a in adhoc(service, {"test": "1"}, at=160.0)] == [Publish, Route]
    refused = adhoc(service, {"test": "1"}, at=219.5)
    assert command_of(refused).findtext(f"{{{NS_COMMANDS}}}note") == (
        "A test push can be sent once every 60 s: try again in 1 s.")
    # bob's own limit, not alice's
    assert [type(a) for a in adhoc(service, {"test": "true"}, "bob@example.org/pc",
                                   at=160.0)] == [Publish, Route]
    assert command_of(adhoc(service, {"test": "0"})).get("status") == "completed"


def test_the_test_push_interval_is_the_option() -> None:
    service = PushService(Config(HOST, diagnose_test_interval_ms=5000), Store(":memory:"))
    enable(service, "push.example.net", "n1")
    assert [type(a) for a in adhoc(service, {"test": "1"}, at=10.0)] == [Publish, Route]
    note = command_of(adhoc(service, {"test": "1"}, at=12.0)).findtext(
        f"{{{NS_COMMANDS}}}note")
    assert note == "A test push can be sent once every 5 s: try again in 3 s."
    assert [type(a) for a in adhoc(service, {"test": "1"}, at=15.0)] == [Publish, Route]
    assert Config.from_options("example.org", {"diagnose_test_interval": 30_000}
                               ).diagnose_test_interval_ms == 30_000


def test_the_adhoc_command_is_for_local_users_and_its_own_node() -> None:
    service = PushService(Config(HOST), Store(":memory:"))
    answer = adhoc(service, None, sender="mallory@elsewhere.net/x")
    (route,) = answer
    assert isinstance(route, Route) and "forbidden" in route.xml
    other = iq_xml("set", HOST, command_xml("register-push-apns"))
    assert diagnosis.adhoc(service, other, NOW) is None
    to_app_server = iq_xml("set", "push.example.org", command_xml(diagnosis.DIAGNOSE_COMMAND))
    assert diagnosis.adhoc(service, to_app_server, NOW) is None


def test_device_answers_as_the_check_up_shows_them() -> None:
    assert _answer_text(Reply(DeliveryOutcome.DELIVERED), 200) == "delivered (HTTP 200)"
    assert _answer_text(Reply(DeliveryOutcome.UNREGISTERED, "BadDeviceToken\n"), 410) == \
        "unregistered (HTTP 410): BadDeviceToken\\n"
