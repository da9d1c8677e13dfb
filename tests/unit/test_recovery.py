"""Restart recovery without ejabberd: notifications outlive the process, devices are woken
after a boot (paced, per node) and before a resume timeout runs out."""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from pymod_push.core.config import Config
from pymod_push.core.notify import fingerprint
from pymod_push.protocol import (
    EjabberdStarted,
    Publish,
    PublishReply,
    SessionPending,
    SessionResumed,
    Stanza,
    StanzaToPending,
)
from pymod_push.service.decisions import PushService
from pymod_push.store import Store
from tests.builders import PHONE, enable, fields, message


def service_on(path: Path, **options: object) -> PushService:
    config = replace(Config("example.org"), ejabberd_node="ejabberd@a", **options)
    return PushService(config, Store(str(path)))


def crash(service: PushService) -> None:
    """What is committed survives; the rest of the process does not."""
    service.store.commit()
    service.store.db.close()


def test_an_unanswered_notification_is_sent_again_by_the_next_process(tmp_path: Path) -> None:
    db = tmp_path / "push.sqlite3"
    first = service_on(db)
    first.handle(enable(), 100)
    (push,) = first.handle(StanzaToPending(PHONE, message()), 100)
    crash(first)

    second = service_on(db)
    assert second.next_deadline() == 100  # due at once
    (again,) = second.tick(101)
    assert isinstance(push, Publish) and isinstance(again, Publish)
    assert fields(again) == fields(push) and again.ref != push.ref
    # A late answer to the first process's publish is not mistaken for this one's.
    assert second.handle(PublishReply(push.ref, "result"), 102) == []
    assert second.handle(PublishReply(again.ref, "result"), 102) == []
    second.store.commit()
    assert second.store.outbox("ejabberd@a") == []
    crash(second)
    assert service_on(db).tick(200) == []  # delivered: nothing left to send


def test_an_answer_to_the_earlier_process_replayed_after_a_crash_stops_the_re_send(
        tmp_path: Path) -> None:
    """The app server answered a publish while the Python process was dead: the shim
    replays that answer to the next process, which then does not send it again."""
    db = tmp_path / "push.sqlite3"
    first = service_on(db)
    first.handle(enable(), 100)
    (delivered,) = first.handle(StanzaToPending(PHONE, message(stanza_id="a")), 100)
    (refused,) = first.handle(StanzaToPending(PHONE, message(stanza_id="b")), 100)
    (unanswered,) = first.handle(StanzaToPending(PHONE, message(stanza_id="c")), 100)
    crash(first)

    second = service_on(db)
    assert isinstance(delivered, Publish) and isinstance(refused, Publish)
    assert second.handle(PublishReply(delivered.ref, "result"), 101) == []
    assert second.handle(PublishReply(refused.ref, "error", "wait", "x"), 101) == []
    again = second.tick(102)
    assert sorted(fields(p)["message-count"] for p in again) == ["2", "3"]
    assert isinstance(unanswered, Publish)
    assert {p.ref for p in again}.isdisjoint({delivered.ref, refused.ref, unanswered.ref})
    for publish in again:
        assert second.handle(PublishReply(publish.ref, "result"), 103) == []
    second.store.commit()
    assert second.store.outbox("ejabberd@a") == [] and second.tick(1000) == []


def test_a_retry_scheduled_before_a_crash_keeps_its_time(tmp_path: Path) -> None:
    db = tmp_path / "push.sqlite3"
    first = service_on(db, retry_delays_ms=(30_000,))
    first.handle(enable(), 0)
    (push,) = first.handle(StanzaToPending(PHONE, message()), 0)
    assert isinstance(push, Publish)
    first.handle(PublishReply(push.ref, "error", "wait", "resource-constraint"), 1)
    crash(first)
    second = service_on(db, retry_delays_ms=(30_000,))
    assert second.next_deadline() == 31
    assert second.tick(30) == []
    (retry,) = second.tick(31)
    assert fields(retry) == fields(push)


def test_after_a_boot_each_registration_of_this_node_is_woken_once_paced(
        tmp_path: Path) -> None:
    db = tmp_path / "push.sqlite3"
    first = service_on(db, wake_rate=2)
    for resource in ("phone", "tablet", "watch"):
        session = ("alice", "example.org", resource)
        first.handle(replace(enable(node=resource), sender=session), 0)
    (push,) = first.handle(StanzaToPending(PHONE, message()), 0)  # counted for the wake
    assert isinstance(push, Publish)
    first.handle(PublishReply(push.ref, "result"), 0)
    crash(first)
    other = PushService(replace(Config("example.org"), ejabberd_node="ejabberd@b"),
                        Store(str(db)))
    assert other.handle(EjabberdStarted(), 0) == []
    assert other.tick(0) == []  # another node of the cluster wakes nobody of ours
    other.store.commit()  # as the port loop does after every batch

    booted = service_on(db, wake_rate=2)
    assert booted.handle(EjabberdStarted(), 10) == []
    first_second = booted.tick(10)
    assert len(first_second) == 2 and booted.next_deadline() == 11
    assert booted.tick(10.5) == []
    (last,) = booted.tick(11)
    woken = {r.node for r in [*first_second, last] if isinstance(r, Publish)}
    assert woken == {"phone", "tablet", "watch"}
    counts = [fields(r)["message-count"] for r in [*first_second, last]]
    assert sorted(counts) == ["0", "0", "1"]
    assert booted.tick(20) == []  # once


def test_wake_on_start_can_be_turned_off(tmp_path: Path) -> None:
    service = service_on(tmp_path / "push.sqlite3", wake_on_start=False,
                         resume_timeout_ms=10_000, wake_before_timeout_ms=3_000)
    service.handle(enable(), 0)
    service.handle(SessionPending(PHONE, ()), 0)
    assert service.store.pending_on("ejabberd@a") != []
    service.handle(EjabberdStarted(), 1)
    # The sessions are gone: not pending, no wake before a timeout that no longer exists.
    assert service.store.pending_on("ejabberd@a") == []
    assert service.tick(100) == [] and service.next_deadline() is None


def test_a_pending_session_is_woken_once_before_its_resume_timeout(tmp_path: Path) -> None:
    service = service_on(tmp_path / "push.sqlite3", resume_timeout_ms=10_000,
                         wake_before_timeout_ms=3_000)
    service.handle(enable(), 0)
    assert service.handle(SessionPending(PHONE, ()), 100) == []
    assert service.next_deadline() == 107
    assert service.tick(106) == []
    (wake,) = service.tick(107)
    assert fields(wake)["message-count"] == "0"
    assert service.tick(108) == []
    # A resumed session is not woken.
    service.handle(SessionPending(PHONE, ()), 200)
    service.handle(SessionResumed(PHONE), 201)
    assert service.tick(300) == []


def test_short_resume_timeouts_are_not_woken(tmp_path: Path) -> None:
    service = service_on(tmp_path / "push.sqlite3", resume_timeout_ms=2_000)
    service.handle(enable(), 0)
    service.handle(SessionPending(PHONE, ()), 0)
    assert service.next_deadline() is None


_TEXT = st.text(st.characters(blacklist_categories=("Cs",)))  # as XML can carry


@given(_TEXT, _TEXT, _TEXT, _TEXT)
def test_a_messages_fingerprint_is_the_one_earlier_versions_stored(
        kind: str, sender: str, stanza_id: str, body: str) -> None:
    """The pushed log keeps marks made of fingerprints: a new version that computed them
    otherwise would push again, after an upgrade, what was pushed before it."""
    stored = hashlib.blake2b(digest_size=12)  # as earlier versions computed it
    for part in (kind, sender, stanza_id, body):
        stored.update(part.encode())
        stored.update(b"\0")
    stanza = Stanza(kind, sender, stanza_id, "chat", body, b"<message/>")
    assert fingerprint(stanza) == stored.digest()
