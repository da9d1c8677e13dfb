"""The push decisions, driven directly: events in, actions out, no ejabberd needed."""

from __future__ import annotations

import random
import sys
import tracemalloc
from dataclasses import replace
from pathlib import Path

import pytest

from pymod_push import etf
from pymod_push.core.config import Config
from pymod_push.etf import Atom
from pymod_push.port.runtime import max_ack_queue
from pymod_push.protocol import (
    IqError,
    IqResult,
    Offline,
    Publish,
    PublishReply,
    PushIq,
    PushOptionsUpdate,
    SessionKey,
    SessionOpened,
    SessionPending,
    SessionResumed,
    SetPush,
    Stanza,
    StanzaToPending,
    UserRemoved,
    action_term,
    parse_event,
)
from pymod_push.records import Registration
from pymod_push.service.decisions import (
    DEFAULT_MAX_ACK_QUEUE,
    PUSHED_RETENTION_MARGIN_S,
    PushService,
)
from pymod_push.service.pushed import SCANNED_MARKS, PushedTo
from pymod_push.store import Store
from pymod_push.store.schema import MIGRATIONS
from tests.builders import APP, PHONE, SECRET_FORM, enable, fields, make_service, message, push_iq

# The store make_service uses: SQLite in memory, or a fresh PostgreSQL database (with the
# registrations it keeps in memory), each test once with each.
pytestmark = pytest.mark.usefixtures("database")


def test_enable_stores_and_marks_the_session() -> None:
    service = make_service(resume_timeout_ms=1234)
    assert service.handle(enable(), 0) == [SetPush(PHONE, 1234), IqResult("ref")]
    (registration,) = service.store.for_session(PHONE)
    assert (registration.push_jid, registration.node) == (APP, "node1")
    assert "s3cr3t" in (registration.publish_options or "")


@pytest.mark.parametrize(("request_iq", "condition"), [
    (push_iq("<enable xmlns='urn:xmpp:push:0' jid='a' node='n'/>", iq_type="get"),
     "not-allowed"),
    (push_iq("<enable xmlns='urn:xmpp:push:0' jid='a'/>"), "bad-request"),
    (push_iq("<enable xmlns='urn:xmpp:push:0' node='n'/>"), "bad-request"),
    (push_iq("<enable xmlns='urn:xmpp:push:0' jid='a b' node='n'/>"), "jid-malformed"),
    (push_iq("<enable xmlns='urn:xmpp:push:0' jid='a@b@c' node='n'/>"), "jid-malformed"),
    (push_iq("<disable xmlns='urn:xmpp:push:0'/>"), "bad-request"),
    (push_iq("<other xmlns='urn:xmpp:push:0'/>"), "bad-request"),
    (push_iq("<enable xmlns='urn:xmpp:push:0' jid='a' node='n'"), "bad-request"),
    (push_iq("<enable xmlns='urn:xmpp:push:0' jid='a' node='n'/>",
             to=("bob", "example.org", "")), "forbidden"),
    (push_iq("<enable xmlns='urn:xmpp:push:0' jid='a' node='" + "n" * 2000 + "'/>"),
     "not-acceptable"),
])
def test_bad_requests_get_errors(request_iq: PushIq, condition: str) -> None:
    service = make_service()
    (answer,) = service.handle(request_iq, 0)
    assert isinstance(answer, IqError) and answer.condition == condition and answer.text
    assert service.store.for_user(("alice", "example.org")) == []


def test_pending_messages_push_with_counts_and_publish_options() -> None:
    service = make_service()
    service.handle(enable(), 0)
    first = service.handle(StanzaToPending(PHONE, message(stanza_id="1")), 0)
    second = service.handle(StanzaToPending(PHONE, message(stanza_id="2")), 0)
    assert fields(first[0]) == {"FORM_TYPE": "urn:xmpp:push:summary", "message-count": "1",
                                "pending-subscription-count": "0"}
    assert fields(second[0])["message-count"] == "2"
    route = second[0]
    assert isinstance(route, Publish)
    assert (route.to, route.node) == (APP, "node1")
    assert route.publish_options == (
        ("FORM_TYPE", ("http://jabber.org/protocol/pubsub#publish-options",)),
        ("secret", ("s3cr3t",)))


def test_what_does_not_push() -> None:
    service = make_service()
    service.handle(enable(), 0)
    chat_state = Stanza("message", "bob@example.org", "c", "chat", "",
                        b"<message><composing xmlns='http://jabber.org/protocol/chatstates'/>"
                        b"</message>")
    assert service.handle(StanzaToPending(PHONE, chat_state), 0) == []
    assert service.handle(StanzaToPending(PHONE, message(stanza_type="error")), 0) == []
    assert service.handle(StanzaToPending(PHONE, message(body="   ")), 0) == []
    unsubscribe = Stanza("presence", "bob@example.org", "", "unsubscribe", "", b"<presence/>")
    assert service.handle(StanzaToPending(PHONE, unsubscribe), 0) == []
    # A session that never enabled push.
    other = ("alice", "example.org", "laptop")
    assert service.handle(StanzaToPending(other, message()), 0) == []


def test_notify_on_all_pushes_bodiless_messages() -> None:
    service = make_service(notify_on="all")
    service.handle(enable(), 0)
    receipt = Stanza("message", "bob@example.org", "r", "chat", "", b"<message/>")
    assert len(service.handle(StanzaToPending(PHONE, receipt), 0)) == 1


def test_subscription_requests_are_counted_apart() -> None:
    service = make_service(include_senders=True)
    service.handle(enable(), 0)
    subscribe = Stanza("presence", "carol@example.org", "", "subscribe", "", b"<presence/>")
    (push,) = service.handle(StanzaToPending(PHONE, subscribe), 0)
    assert fields(push) == {"FORM_TYPE": "urn:xmpp:push:summary", "message-count": "0",
                            "pending-subscription-count": "1",
                            "last-subscription-sender": "carol@example.org"}


def test_senders_and_bodies_only_when_configured() -> None:
    service = make_service(include_senders=True, include_message_bodies=True,
                           include_message_count=False, include_subscription_count=False)
    service.handle(enable(), 0)
    (push,) = service.handle(StanzaToPending(PHONE, message(body="a & <b>")), 0)
    assert fields(push) == {"FORM_TYPE": "urn:xmpp:push:summary",
                            "last-message-sender": "bob@example.org/pc",
                            "last-message-body": "a & <b>"}


def test_resume_and_reconnect_reset_counts() -> None:
    service = make_service()
    service.handle(enable(), 0)
    service.handle(StanzaToPending(PHONE, message(stanza_id="1")), 0)
    assert service.handle(SessionResumed(PHONE), 0) == []
    (push,) = service.handle(StanzaToPending(PHONE, message(stanza_id="2")), 0)
    assert fields(push)["message-count"] == "1"
    # A new session of the same device is push-enabled again, counts from zero.
    assert service.handle(SessionOpened(PHONE), 0) == [SetPush(PHONE, Config.resume_timeout_ms)]
    (push,) = service.handle(StanzaToPending(PHONE, message(stanza_id="3")), 0)
    assert fields(push)["message-count"] == "1"
    assert service.handle(SessionOpened(("alice", "example.org", "other")), 0) == []


def test_queued_messages_push_when_the_session_goes_pending() -> None:
    service = make_service()
    service.handle(enable(), 0)
    pushes = service.handle(SessionPending(PHONE, (message(stanza_id="1"),
                                                   message(stanza_id="2"))), 0)
    assert [fields(p)["message-count"] for p in pushes] == ["1", "2"]


def test_a_message_rerouted_to_offline_storage_does_not_push_again() -> None:
    service = make_service()
    service.handle(enable(), 0)
    original = message(stanza_id="m1")
    assert len(service.handle(StanzaToPending(PHONE, original), 0)) == 1
    # On timeout ejabberd re-routes it with a <delay/>: new XML, same message.
    rerouted = replace(original, xml=original.xml.replace(b"</message>", b"<delay/></message>"))
    assert service.handle(Offline(PHONE[:2], rerouted, "archived"), 0) == []
    assert service.handle(Offline(PHONE[:2], rerouted, "offline"), 0) == []
    (push,) = service.handle(Offline(PHONE[:2], message(stanza_id="m2"), "offline"), 0)
    assert fields(push)["message-count"] == "2"


def test_offline_pushes_every_registration_of_the_user() -> None:
    service = make_service()
    service.handle(enable("n1"), 0)
    service.handle(push_iq("<enable xmlns='urn:xmpp:push:0' jid='other.app' node='n2'/>",
                           sender=("alice", "example.org", "tablet")), 0)
    pushes = service.handle(Offline(PHONE[:2], message(), "offline"), 0)
    assert [p.to for p in pushes if isinstance(p, Publish)] == [APP, "other.app"]


def test_disable_one_node_or_all_nodes_of_an_app_server() -> None:
    service = make_service()
    service.handle(enable("n1"), 0)
    service.handle(enable("n2"), 0)
    disable_one = push_iq(f"<disable xmlns='urn:xmpp:push:0' jid='{APP}' node='n1'/>")
    assert service.handle(disable_one, 0) == [IqResult("ref")]  # n2 still enabled
    assert [r.node for r in service.store.for_session(PHONE)] == ["n2"]
    disable_all = push_iq(f"<disable xmlns='urn:xmpp:push:0' jid='{APP}'/>")
    assert service.handle(disable_all, 0) == [SetPush(PHONE, None), IqResult("ref")]
    assert service.handle(StanzaToPending(PHONE, message()), 0) == []


def test_re_enable_replaces_the_registration() -> None:
    service = make_service()
    service.handle(enable("n1"), 0)
    service.handle(push_iq(f"<enable xmlns='urn:xmpp:push:0' jid='{APP}' node='n1'/>",
                           sender=("alice", "example.org", "phone2")), 0)
    (registration,) = service.store.for_user(("alice", "example.org"))
    assert registration.resource == "phone2" and registration.publish_options is None


def test_a_new_secret_goes_with_the_next_publish() -> None:
    """The parsed publish-options are kept with the registration: re-enabling with another
    secret (or none) is what the next publish carries, never the form parsed before."""
    service = make_service()
    service.handle(enable(), 0)
    before = service.handle(StanzaToPending(PHONE, message(stanza_id="1")), 0)
    service.handle(enable(form=SECRET_FORM.replace("s3cr3t", "n3w")), 0)
    after = service.handle(StanzaToPending(PHONE, message(stanza_id="2")), 0)
    service.handle(enable(form=""), 0)
    without = service.handle(StanzaToPending(PHONE, message(stanza_id="3")), 0)
    secrets = [dict(p.publish_options or ()).get("secret") for p in (*before, *after, *without)
               if isinstance(p, Publish)]
    assert secrets == [("s3cr3t",), ("n3w",), None]


def _reply(service: PushService, push: object, outcome: str, error_type: str = "",
           now: float = 0) -> list[object]:
    assert isinstance(push, Publish)
    return list(service.handle(PublishReply(push.ref, outcome, error_type, "x"), now))


def test_transient_errors_are_retried_with_backoff() -> None:
    service = make_service(retry_delays_ms=(1000, 5000))
    service.handle(enable(), 0)
    (push,) = service.handle(StanzaToPending(PHONE, message()), 0)
    assert _reply(service, push, "error", "wait", now=10) == []
    assert service.next_deadline() == 11
    assert service.tick(10.5) == []
    (retry,) = service.tick(11)
    assert isinstance(retry, Publish) and fields(retry) == fields(push)
    assert retry.ref != push.ref
    assert _reply(service, retry, "timeout", now=20) == []
    assert service.next_deadline() == 25
    (last,) = service.tick(25)
    assert _reply(service, last, "timeout", now=30) == []  # retries used up: given up
    assert service.next_deadline() is None
    assert service.store.for_session(PHONE)  # transient failures never disable


def test_rejections_disable_after_max_errors_spread_over_windows_and_success_resets() -> None:
    service = make_service(max_publish_errors=2, publish_error_window_ms=600_000)
    service.handle(enable(), 0)
    (push,) = service.handle(StanzaToPending(PHONE, message(stanza_id="1")), 0)
    assert _reply(service, push, "error", "cancel") == []
    (push,) = service.handle(StanzaToPending(PHONE, message(stanza_id="2")), 0)
    assert _reply(service, push, "result") == []
    assert service.store.for_session(PHONE)[0].errors == 0
    (push,) = service.handle(StanzaToPending(PHONE, message(stanza_id="3")), 0)
    assert _reply(service, push, "error", "cancel", now=1000) == []
    (push,) = service.handle(StanzaToPending(PHONE, message(stanza_id="4")), 0)
    assert _reply(service, push, "error", "cancel", now=1599) == []  # same window
    assert service.store.for_session(PHONE)[0].errors == 1
    (push,) = service.handle(StanzaToPending(PHONE, message(stanza_id="5")), 0)
    assert _reply(service, push, "error", "cancel", now=1600) == [SetPush(PHONE, None)]
    assert service.store.for_session(PHONE) == []
    assert service.tick(10_000) == []  # its notifications waiting for a retry are dropped
    assert service.next_deadline() is None and service.store.totals()["outbox"] == 0


NOT_AN_APP_SERVER = ["service-unavailable", "feature-not-implemented", "forbidden",
                     "not-allowed", "recipient-unavailable"]


def _answer(service: PushService, push: object, error_type: str, condition: str,
            now: float = 0) -> list[object]:
    assert isinstance(push, Publish)
    return list(service.handle(PublishReply(push.ref, "error", error_type, condition), now))


@pytest.mark.parametrize("condition", NOT_AN_APP_SERVER)
def test_a_target_that_is_no_app_server_is_given_up_after_max_errors_in_a_row(
        condition: str) -> None:
    """Push pointed at someone's client or a service (which answer a publish with these
    'cancel' errors): each answer counts, within one window too, so that the target gets
    max_publish_errors publishes and no more (a burst once counted once, the rest retried)."""
    service = make_service(max_publish_errors=3, publish_error_window_ms=600_000)
    service.handle(enable(), 0)
    for n in range(2):
        (push,) = service.handle(StanzaToPending(PHONE, message(stanza_id=str(n))), n)
        assert _answer(service, push, "cancel", condition, now=n) == []
        assert service.store.for_session(PHONE)[0].errors == n + 1
    (push,) = service.handle(StanzaToPending(PHONE, message(stanza_id="2")), 2)
    assert _answer(service, push, "cancel", condition, now=2) == [SetPush(PHONE, None)]
    assert service.store.for_session(PHONE) == []
    assert service.store.totals()["outbox"] == 0  # its retries went with it
    assert service.handle(StanzaToPending(PHONE, message(stanza_id="3")), 3) == []
    assert service.tick(10_000) == []  # the retries of the first two are dropped
    assert service.store.totals()["outbox"] == 0
    assert service.counters["not_an_app_server"] == 3


def test_a_burst_reflected_at_once_is_disabled_by_its_first_answers() -> None:
    """Publishes in flight when the registration is disabled: their answers change nothing
    and none of them is tried again."""
    service = make_service(max_publish_errors=3)
    service.handle(enable(), 0)
    pushes = [service.handle(StanzaToPending(PHONE, message(stanza_id=str(n))), 0)[0]
              for n in range(10)]
    answers = [_answer(service, push, "cancel", "service-unavailable", now=1)
               for push in pushes]
    assert answers == [[], [], [SetPush(PHONE, None)], *[[]] * 7]
    assert service.tick(10_000) == [] and service.next_deadline() is None
    assert service.store.totals()["outbox"] == 0


def test_wait_errors_and_timeouts_stay_counted_once_per_window_among_the_others() -> None:
    service = make_service(max_publish_errors=3, publish_error_window_ms=600_000)
    service.handle(enable(), 0)
    (push,) = service.handle(StanzaToPending(PHONE, message(stanza_id="1")), 0)
    assert _answer(service, push, "cancel", "service-unavailable", now=0) == []
    for n in range(2, 12):  # a restart's burst: unanswered, then 'wait'
        (push,) = service.handle(StanzaToPending(PHONE, message(stanza_id=str(n))), n)
        if n % 2:
            assert _answer(service, push, "wait", "resource-constraint", now=n) == []
        else:
            assert list(service.handle(PublishReply(push.ref, "timeout"), n)) == []
    assert service.store.for_session(PHONE)[0].errors == 1
    (push,) = service.handle(StanzaToPending(PHONE, message(stanza_id="a")), 20)
    assert _answer(service, push, "cancel", "internal-server-error", now=20) == []
    assert service.store.for_session(PHONE)[0].errors == 1  # not one of them: windowed


def test_a_success_resets_the_count_of_errors_in_a_row() -> None:
    service = make_service(max_publish_errors=3)
    service.handle(enable(), 0)
    for n, answer in enumerate(["feature-not-implemented", "service-unavailable", None,
                                "service-unavailable", "service-unavailable"]):
        (push,) = service.handle(StanzaToPending(PHONE, message(stanza_id=str(n))), n)
        if answer is None:
            assert _reply(service, push, "result") == []
        else:
            assert _answer(service, push, "cancel", answer, now=n) == []
    (registration,) = service.store.for_session(PHONE)
    assert registration.errors == 2


def test_a_burst_of_errors_counts_once_and_every_notification_is_retried() -> None:
    """An app server away for a while (an XMPP client reconnecting: service-unavailable
    from its server) fails every publish of a burst: the registration stays and each
    notification goes out once the app server is back."""
    service = make_service(max_publish_errors=3, retry_delays_ms=(5000, 30_000))
    service.handle(enable(), 0)
    pushes = [service.handle(StanzaToPending(PHONE, message(stanza_id=str(n), body=f"m{n}")),
                             n / 10)[0] for n in range(50)]
    for push in pushes:
        assert _reply(service, push, "error", "cancel", now=10) == []
    assert service.store.for_session(PHONE)[0].errors == 1
    retries = service.tick(15)
    assert len(retries) == 50
    for push in retries:
        assert _reply(service, push, "error", "cancel", now=16) == []
    retries = service.tick(46)
    assert sorted(fields(p)["message-count"] for p in retries) == sorted(
        fields(p)["message-count"] for p in pushes)
    for push in retries:
        assert _reply(service, push, "result", now=47) == []
    (registration,) = service.store.for_session(PHONE)
    assert registration.errors == 0 and registration.last_error_at is None
    assert service.next_deadline() is None and service.store.totals()["outbox"] == 0


def test_a_message_is_pushed_once_across_restarts_however_many_are_queued(
        tmp_path: Path) -> None:
    """The marks of pushed messages are in the database: a new process (after a crash)
    recognizes a message that comes back as offline or archived, also the oldest of a
    long pending session."""
    path = f"{tmp_path}/push.sqlite3"
    first = PushService(Config("example.org"), Store(path))
    first.handle(enable(), 0)
    first.handle(SessionPending(PHONE, []), 1)
    stanzas = [message(stanza_id=str(n), body=f"message {n}") for n in range(1200)]
    assert all(len(first.handle(StanzaToPending(PHONE, s), 1 + n / 100)) == 1
               for n, s in enumerate(stanzas))
    first.store.close()
    second = PushService(Config("example.org"), Store(path))
    for stanza in stanzas:
        assert second.handle(Offline(PHONE[:2], stanza, "offline"), 2) == []
        assert second.handle(Offline(PHONE[:2], stanza, "archived"), 2) == []
    (registration,) = second.store.for_session(PHONE)
    assert registration.message_count == 1200  # not inflated by the re-routes
    new = message(stanza_id="new", body="after the restart")
    assert len(second.handle(Offline(PHONE[:2], new, "offline"), 3)) == 1


def test_each_registration_of_a_session_gets_the_message_once() -> None:
    service = make_service()
    service.handle(enable("n1"), 0)
    service.handle(enable("n2"), 0)
    assert len(service.handle(StanzaToPending(PHONE, message()), 0)) == 2
    assert service.handle(Offline(PHONE[:2], message(), "offline"), 0) == []


def test_a_session_back_forgets_what_it_was_pushed_and_old_marks_expire() -> None:
    service = make_service(resume_timeout_ms=3_600_000)
    service.handle(enable(), 0)
    assert len(service.handle(StanzaToPending(PHONE, message()), 0)) == 1
    service.handle(SessionResumed(PHONE), 10)
    # Resumed without acknowledging it, gone again: the queued message pushes again.
    assert len(service.handle(SessionPending(PHONE, [message()]), 20)) == 1
    assert service.store.totals()["pushed"] == 2
    hour, margin = 3600, PUSHED_RETENTION_MARGIN_S
    assert service.forget_old_marks(hour + margin - 1) == 0
    assert service.forget_old_marks(hour + margin + 1) == 1
    assert service.handle(Offline(PHONE[:2], message(), "offline"), 30) == []
    assert service.forget_old_marks(20 + hour + margin + 1) == 1
    # Forgotten: by then the message cannot come back any more.
    assert len(service.handle(Offline(PHONE[:2], message(), "offline"), 30)) == 1


def test_marks_go_soon_after_the_resume_timeout_from_the_first_push_not_the_last() -> None:
    """A pending session ends at the latest its resume timeout after it went pending, which
    pushes to it do not extend: its marks go PUSHED_RETENTION_MARGIN_S after that, however
    recent its last push (it was an hour after the last push)."""
    hour = 3600
    service = make_service(resume_timeout_ms=hour * 1000)
    service.handle(enable(), 0)
    service.handle(SessionPending(PHONE, []), 0)
    for n in range(10):  # one message every 6 minutes until the session ends
        assert len(service.handle(StanzaToPending(PHONE, message(stanza_id=str(n))),
                                  n * hour / 10)) == 1
    late = hour + PUSHED_RETENTION_MARGIN_S + 1
    assert PUSHED_RETENTION_MARGIN_S <= 600
    service.forget_old_marks(late)
    assert PHONE not in service._pushed
    assert len(service.handle(Offline(PHONE[:2], message(stanza_id="9"), "offline"), late)) == 1


def test_marks_go_soon_after_the_session_ends_even_if_its_first_push_came_late() -> None:
    """Counted from when the session went pending, not from its first push: a session
    pushed first just before its resume timeout ends is forgotten as soon after its end."""
    hour = 3600
    service = make_service(resume_timeout_ms=hour * 1000)
    service.handle(enable(), 0)
    service.handle(SessionPending(PHONE, []), 0)
    assert len(service.handle(StanzaToPending(PHONE, message()), 0.9 * hour)) == 1
    service.forget_old_marks(hour + PUSHED_RETENTION_MARGIN_S - 1)
    assert PHONE in service._pushed  # the session may still be there: kept
    service.forget_old_marks(hour + PUSHED_RETENTION_MARGIN_S + 1)
    assert PHONE not in service._pushed


def test_marks_per_pending_session_are_bounded_by_max_ack_queue_and_compact() -> None:
    """At most max_ack_queue messages are remembered per pending session (ejabberd ends a
    session that holds more unacknowledged), the newest, in 8 bytes each: a flood of
    messages to a pending user costs a bounded amount of memory."""
    service = PushService(Config("example.org"), Store(":memory:"), max_ack_queue=300)
    service.handle(enable(), 0)
    service.handle(SessionPending(PHONE, []), 0)
    stanzas = [message(stanza_id=str(n), body=f"m{n}") for n in range(1000)]
    for n, stanza in enumerate(stanzas):
        assert len(service.handle(StanzaToPending(PHONE, stanza), n / 100)) == 1
    pushed = service._pushed[PHONE]
    assert len(pushed) == 300
    assert sum(map(sys.getsizeof, (pushed, pushed.scanned, pushed.ring, pushed.by_mark))) \
        <= 16 * 300
    # The session ends: what it held (at most the newest 300) comes back, pushed once.
    for stanza in stanzas[-300:]:
        assert service.handle(Offline(PHONE[:2], stanza, "offline"), 20) == []
    assert len(pushed) == 300
    # Older ones were forgotten: one comes back, it is pushed again.
    assert len(service.handle(Offline(PHONE[:2], stanzas[-301], "offline"), 20)) == 1


def test_the_bound_counts_each_registration_of_the_session() -> None:
    service = PushService(Config("example.org"), Store(":memory:"), max_ack_queue=100)
    service.handle(enable("n1"), 0)
    service.handle(enable("n2"), 0)
    stanzas = [message(stanza_id=str(n), body=f"m{n}") for n in range(250)]
    for stanza in stanzas:
        assert len(service.handle(StanzaToPending(PHONE, stanza), 1)) == 2
    assert len(service._pushed[PHONE]) == 2 * 100
    for stanza in stanzas[-100:]:
        assert service.handle(Offline(PHONE[:2], stanza, "offline"), 2) == []


def test_the_bound_follows_the_registrations_without_reading_them_per_push(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """At the bound, the registrations of the session are counted from those the push
    read anyway (they were read again from the store at every push): a registration
    disabled meanwhile lowers the bound at the next push, the oldest marks going first."""
    service = PushService(Config("example.org"), Store(":memory:"), max_ack_queue=100)
    service.handle(enable("n1"), 0)
    service.handle(enable("n2"), 0)
    service.handle(SessionPending(PHONE, []), 0)
    reads: list[SessionKey] = []
    read = service.store.for_session

    def counted_read(session: SessionKey) -> list[Registration]:
        reads.append(session)
        return read(session)
    monkeypatch.setattr(service.store, "for_session", counted_read)
    stanzas = [message(stanza_id=str(n), body=f"m{n}") for n in range(300)]
    for stanza in stanzas:
        assert len(service.handle(StanzaToPending(PHONE, stanza), 1)) == 2
    assert reads == []
    assert len(service._pushed[PHONE]) == 2 * 100
    # n2 disabled from another of alice's sessions: one registration's bound again.
    tablet = ("alice", "example.org", "tablet")
    service.handle(push_iq(f"<disable xmlns='urn:xmpp:push:0' jid='{APP}' node='n2'/>",
                           sender=tablet), 2)
    assert len(service.handle(StanzaToPending(PHONE, message(stanza_id="last")), 3)) == 1
    assert len(service._pushed[PHONE]) == 100
    for stanza in stanzas[-49:]:  # with the last one, the newest 100 of n1 and n2
        assert service.handle(Offline(PHONE[:2], stanza, "offline"), 4) == []
    assert len(service.handle(Offline(PHONE[:2], stanzas[-60], "offline"), 4)) == 1


def test_a_new_process_reads_back_the_newest_marks_within_the_bound(tmp_path: Path) -> None:
    path = f"{tmp_path}/push.sqlite3"
    first = PushService(Config("example.org"), Store(path), max_ack_queue=100)
    first.handle(enable(), 0)
    first.handle(SessionPending(PHONE, []), 1)
    stanzas = [message(stanza_id=str(n), body=f"m{n}") for n in range(250)]
    for n, stanza in enumerate(stanzas):
        assert len(first.handle(StanzaToPending(PHONE, stanza), 1 + n / 1000)) == 1
    first.store.commit()
    first.store.close()
    second = PushService(Config("example.org"), Store(path), max_ack_queue=100)
    assert len(second._pushed[PHONE]) == 100
    for stanza in stanzas[-100:]:
        assert second.handle(Offline(PHONE[:2], stanza, "offline"), 2) == []


@pytest.mark.parametrize(("told", "kept"), [
    (700, 700), (None, DEFAULT_MAX_ACK_QUEUE), (Atom("infinity"), DEFAULT_MAX_ACK_QUEUE),
    (0, DEFAULT_MAX_ACK_QUEUE), (True, DEFAULT_MAX_ACK_QUEUE)])
def test_the_hello_tells_the_bound(told: object, kept: int) -> None:
    """mod_stream_mgmt's max_ack_queue as the shim sends it; its default when it sends
    none (an older shim) or something that is no positive number."""
    assert max_ack_queue(told) == kept


def test_pushed_marks_are_the_newest_within_the_bound_as_in_a_list() -> None:
    """PushedTo against a plain list of the marks remembered: random marks (repeated ones,
    the extremes of 64 bits), a bound that grows and shrinks (as registrations come and
    go) below and beyond SCANNED_MARKS, whether or not the ring has wrapped; found
    exactly when the list has them, the oldest forgotten first."""
    rng = random.Random(29)
    pushed = PushedTo(0.0)
    remembered: list[int] = []
    keep = 50
    bisected = 0
    for step in range(12000):
        if step % 450 == 0:
            keep = rng.choice([1, 2, 7, 50, SCANNED_MARKS - 1, SCANNED_MARKS,
                               SCANNED_MARKS + 1, 300, 600])
        mark = rng.choice([rng.getrandbits(64) - 2**63, rng.randrange(-40, 40),
                           -(2**63), 2**63 - 1, *remembered[:1], *remembered[-1:]])
        new = mark not in remembered
        assert (mark in pushed) is not new
        assert pushed.remember(mark, keep) is new
        if new:
            remembered = [*remembered, mark][-keep:]
        assert len(pushed) == len(remembered)
        if pushed.scanned is None:
            bisected += 1
            assert [pushed.ring[at] for at in pushed.by_mark] == sorted(remembered)
        if step % 50 == 0:
            assert all(m in pushed for m in remembered)
    assert bisected > 3000  # most of the time beyond SCANNED_MARKS
    assert all(rng.getrandbits(64) - 2**63 not in pushed for _ in range(1000))


def test_a_remembered_mark_takes_at_most_16_bytes() -> None:
    """Measured over max_ack_queue (5,000) marks: what the session's record allocates,
    the marks and whatever finds them (the issue's bound: 16 bytes a message)."""
    rng = random.Random(13)
    marks = [rng.getrandbits(64) - 2**63 for _ in range(DEFAULT_MAX_ACK_QUEUE)]
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        pushed = PushedTo(0.0)
        for mark in marks:
            pushed.remember(mark, DEFAULT_MAX_ACK_QUEUE)
        allocated = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(pushed) == DEFAULT_MAX_ACK_QUEUE
    assert allocated <= 16 * DEFAULT_MAX_ACK_QUEUE


def test_a_success_resets_errors_counted_before_a_restart(tmp_path: Path) -> None:
    path = f"{tmp_path}/push.sqlite3"
    first = PushService(Config("example.org", max_publish_errors=3), Store(path))
    first.handle(enable(), 0)
    (push,) = first.handle(StanzaToPending(PHONE, message(stanza_id="1")), 0)
    assert _reply(first, push, "error", "cancel") == []
    first.store.close()
    second = PushService(Config("example.org", max_publish_errors=3), Store(path))
    assert second.store.for_session(PHONE)[0].errors == 1
    (push,) = second.handle(StanzaToPending(PHONE, message(stanza_id="2")), 0)
    assert _reply(second, push, "result") == []
    assert second.store.for_session(PHONE)[0].errors == 0


def test_user_removal_deletes_registrations() -> None:
    service = make_service()
    service.handle(enable(), 0)
    service.handle(UserRemoved(PHONE[:2]), 0)
    assert service.store.for_user(PHONE[:2]) == []


def test_registrations_survive_a_restart(tmp_path: object) -> None:
    path = f"{tmp_path}/push.sqlite3"
    first = PushService(Config("example.org"), Store(path))
    first.handle(enable(), 0)
    first.store.close()
    second = PushService(Config("example.org"), Store(path))
    assert second.store.schema_version() == len(MIGRATIONS)
    (push,) = second.handle(Offline(PHONE[:2], message(), "offline"), 0)
    assert isinstance(push, Publish) and ("secret", ("s3cr3t",)) in (push.publish_options or ())


def test_item_not_found_disables_at_once() -> None:
    service = make_service(max_publish_errors=3)
    service.handle(enable(), 0)
    (push,) = service.handle(StanzaToPending(PHONE, message()), 0)
    assert isinstance(push, Publish)
    answer = service.handle(PublishReply(push.ref, "error", "cancel", "item-not-found"), 0)
    assert answer == [SetPush(PHONE, None)]
    assert service.store.for_session(PHONE) == []


@pytest.mark.parametrize("payload", [
    "<encrypted xmlns='eu.siacs.conversations.axolotl'><payload>x</payload></encrypted>",
    "<encrypted xmlns='urn:xmpp:omemo:2'><payload>x</payload></encrypted>",
    "<x xmlns='jabber:x:encrypted'>pgp</x>",
    "<openpgp xmlns='urn:xmpp:openpgp:0'>pgp</openpgp>",
])
def test_encrypted_messages_never_push_their_fallback_body(payload: str) -> None:
    service = make_service(include_message_bodies=True)
    service.handle(enable(), 0)
    fallback = "I sent you an encrypted message but your client does not seem to support it"
    (push,) = service.handle(StanzaToPending(PHONE, message(body=fallback, extra=payload)), 0)
    assert fields(push)["last-message-body"] == "Encrypted message"


def test_own_messages_from_another_device_do_not_push() -> None:
    service = make_service(notify_on="all")  # not even when every message pushes
    service.handle(enable(), 0)
    carbon = ("<sent xmlns='urn:xmpp:carbons:2'><forwarded xmlns='urn:xmpp:forward:0'>"
              "<message xmlns='jabber:client' to='bob@example.org'><body>hi</body></message>"
              "</forwarded></sent>")
    sent = message(body="", sender="alice@example.org", extra=carbon)
    assert service.handle(StanzaToPending(PHONE, sent), 0) == []
    received = message(body="", sender="alice@example.org",
                       extra=carbon.replace("sent", "received"))
    assert len(service.handle(StanzaToPending(PHONE, received), 0)) == 1


def room_message(body: str, nick: str = "alice", sender_nick: str = "bob") -> Stanza:
    return replace(message(body=body, sender=f"room@muc.example.org/{sender_nick}",
                           stanza_type="groupchat"), nick=nick)


@pytest.mark.parametrize(("policy", "body", "nick", "sender_nick", "pushes"), [
    ("mentions", "alice: lunch?", "alice", "bob", True),
    ("mentions", "Lunch, Alice?", "alice", "bob", True),
    ("mentions", "lunch anyone?", "alice", "bob", False),
    ("mentions", "malice aforethought", "alice", "bob", False),  # a word, not the nick
    ("mentions", "alice: lunch?", "", "bob", False),  # the shim does not know the nick
    ("mentions", "alice: I said it", "alice", "alice", False),  # the room's echo
    ("always", "lunch anyone?", "alice", "bob", True),
    ("always", "", "alice", "bob", False),  # subject changes, chat states
    ("never", "alice: lunch?", "alice", "bob", False),
])
def test_group_chat_pushes_per_policy(policy: str, body: str, nick: str, sender_nick: str,
                                      pushes: bool) -> None:
    service = make_service(notify_groupchat=policy, include_message_bodies=True)
    service.handle(enable(), 0)
    actions = service.handle(StanzaToPending(PHONE, room_message(body, nick, sender_nick)), 0)
    assert len(actions) == int(pushes)
    if pushes:
        assert fields(actions[0])["last-message-body"] == body


def test_call_proposals_push_at_once_marked_urgent() -> None:
    service = make_service(include_message_bodies=True, include_senders=True)
    service.handle(enable(), 0)
    propose = ("<propose xmlns='urn:xmpp:jingle-message:0' id='call1'>"
               "<description xmlns='urn:xmpp:jingle:apps:rtp:1' media='audio'/></propose>")
    (push,) = service.handle(StanzaToPending(PHONE, message(body="", extra=propose)), 0)
    assert fields(push) == {"FORM_TYPE": "urn:xmpp:push:summary", "message-count": "1",
                            "pending-subscription-count": "0",
                            "last-message-sender": "bob@example.org/pc",
                            "last-message-body": "Incoming call",
                            "last-message-priority": "high"}
    # Without bodies and senders allowed, the call is still marked urgent.
    quiet = make_service()
    quiet.handle(enable(), 0)
    (push,) = quiet.handle(StanzaToPending(PHONE, message(body="", extra=propose)), 0)
    assert fields(push)["last-message-priority"] == "high"
    assert "last-message-body" not in fields(push)
    # Retracting a call is not a call: the device that rang gets one push that stops it,
    # not urgent (test_calls.py has the rest).
    retract = propose.replace("propose", "retract")
    (stop,) = quiet.handle(StanzaToPending(PHONE, message(body="", extra=retract,
                                                          stanza_id="m2")), 0)
    assert fields(stop) == {"FORM_TYPE": "urn:xmpp:push:summary", "call-ended": "retracted",
                            "call-sid": "call1"}


def test_the_shims_group_chat_context_is_parsed() -> None:
    term = (Atom("stanza"), (b"alice", b"example.org", b"phone"),
            (Atom("message"), b"room@muc.example.org/bob", b"g1", Atom("groupchat"),
             b"alice: hi", b"<message/>", {Atom("nick"): b"alice"}))
    event = parse_event(term)
    assert isinstance(event, StanzaToPending) and event.stanza.nick == "alice"
    plain = (Atom("stanza"), (b"alice", b"example.org", b"phone"),
             (Atom("message"), b"bob@example.org", b"m1", Atom("chat"), b"hi", b"<message/>"))
    event = parse_event(plain)
    assert isinstance(event, StanzaToPending) and event.stanza.nick == ""


def options_form(**values: str) -> str:
    inner = "".join(f"<field var='{var}'><value>{value}</value></field>"
                    for var, value in values.items())
    return ("<x xmlns='jabber:x:data' type='submit'><field var='FORM_TYPE'>"
            f"<value>urn:xmpp:push:options</value></field>{inner}</x>")


def enable_with(form: str, resource: str = "phone", node: str = "node1") -> PushIq:
    return push_iq(f"<enable xmlns='urn:xmpp:push:0' jid='{APP}' node='{node}'>{form}"
                   f"{SECRET_FORM}</enable>", sender=("alice", "example.org", resource))


def test_first_enable_sets_the_users_options_and_answers_them() -> None:
    service = make_service()
    actions = service.handle(enable_with(options_form(**{
        "include-senders": "1", "include-message-bodies": "true",
        "include-message-count": "0", "unknown-field": "x"})), 0)
    update, _, result = actions
    assert update == PushOptionsUpdate(("alice", "example.org"), [
        ("include-senders", True), ("include-message-count", False),
        ("include-subscription-count", True), ("include-message-bodies", True)])
    assert isinstance(result, IqResult) and "urn:xmpp:push:options" in (result.xml or "")
    # The publish-options form is still the one passed on to the app server.
    (registration,) = service.store.for_session(PHONE)
    assert "s3cr3t" in (registration.publish_options or "")
    (push,) = service.handle(StanzaToPending(PHONE, message(body="hi")), 0)
    assert fields(push) == {"FORM_TYPE": "urn:xmpp:push:summary",
                            "pending-subscription-count": "0",
                            "last-message-sender": "bob@example.org/pc",
                            "last-message-body": "hi"}


def test_another_resource_may_only_turn_options_off() -> None:
    service = make_service()
    service.handle(enable_with(options_form(**{"include-senders": "0"})), 0)
    actions = service.handle(enable_with(options_form(**{
        "include-senders": "1", "include-message-count": "0"}), resource="tablet",
        node="node2"), 0)
    update = actions[0]
    assert isinstance(update, PushOptionsUpdate)
    assert dict(update.fields or []) == {"include-senders": False,
                                         "include-message-count": False,
                                         "include-subscription-count": True,
                                         "include-message-bodies": False}


def test_admin_limits_win_over_what_users_ask() -> None:
    service = make_service(allow_message_bodies=False, allow_senders=False)
    service.handle(enable_with(options_form(**{"include-senders": "1",
                                               "include-message-bodies": "1"})), 0)
    (push,) = service.handle(StanzaToPending(PHONE, message(body="hi")), 0)
    assert "last-message-body" not in fields(push)
    assert "last-message-sender" not in fields(push)


@pytest.mark.parametrize("form", [
    options_form(**{"include-senders": "maybe"}),
    "<x xmlns='jabber:x:data' type='submit'><field var='FORM_TYPE'><value>"
    "urn:xmpp:push:options</value></field><field var='include-senders'><value>1</value>"
    "<value>0</value></field></x>",
    options_form(**{"include-senders": "1" * 5000}),
])
def test_malformed_options_forms_are_bad_requests(form: str) -> None:
    service = make_service()
    (answer,) = service.handle(enable_with(form), 0)
    assert isinstance(answer, IqError) and answer.condition in ("bad-request", "not-acceptable")
    assert answer.text
    assert service.store.for_user(("alice", "example.org")) == []


def test_the_shim_learns_defaults_and_stored_options_at_start() -> None:
    service = make_service(include_senders=True, allow_senders=False)
    service.handle(enable_with(options_form(**{"include-message-count": "0"})), 0)
    defaults, alice = service.initial_actions()
    assert defaults == PushOptionsUpdate(None, [
        ("include-senders", False), ("include-message-count", True),
        ("include-subscription-count", True), ("include-message-bodies", False)])
    assert isinstance(alice, PushOptionsUpdate) and alice.user == ("alice", "example.org")
    assert dict(alice.fields or [])["include-message-count"] is False


def test_a_publish_goes_to_the_shim_as_documented() -> None:
    """{publish, Ref, To, Node, Fields, Options, TimeoutMs}, whatever parts were cached."""
    service = make_service()
    service.handle(enable(), 0)
    for stanza_id in ("first", "second"):
        (push,) = service.handle(StanzaToPending(PHONE, message(stanza_id=stanza_id)), 0)
        assert isinstance(push, Publish)

        def form(fields: tuple[tuple[str, tuple[str, ...]], ...]) -> list[object]:
            return [(var.encode(), [value.encode() for value in values]) for var, values in fields]
        expected = (Atom("publish"), push.ref, APP.encode(), b"node1", form(push.fields),
                    form(push.publish_options or ()), push.timeout_ms)
        assert etf.encode(action_term(push)) == etf.encode(expected)
    assert fields(push)["message-count"] == "2"
