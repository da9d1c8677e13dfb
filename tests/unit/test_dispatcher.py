"""The provider edge against fakes over HTTP/2 and TLS, without ejabberd: WNS and Ubuntu Push
(APNs, FCM and Web Push are driven end to end in tests/e2e/test_appserver.py)."""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import logging
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from devtools.instance import free_port
from pymod_push.appserver.requests import Iq
from pymod_push.appserver.server import AppServer, Delivery
from pymod_push.core.config import Backend, Config
from pymod_push.delivery.dispatcher import Dispatcher, Quieted
from pymod_push.providers import b64url_encode
from pymod_push.records import QueuedPush, RegisteredDevice
from pymod_push.store import Store, open_store
from tests.builders import device
from tests.fake_providers import (
    FakeProvider,
    LoopbackCA,
    Received,
    serve_in_thread,
    ubuntu_check,
    wns_check,
)

SUMMARY = {"FORM_TYPE": "urn:xmpp:push:summary", "message-count": "1"}
# The fakes listen there: allowed as a destination of users' URLs (option endpoint_allow_ips)
LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"),)


@pytest.fixture(scope="module")
def ca() -> Iterator[LoopbackCA]:
    with tempfile.TemporaryDirectory() as folder:
        yield LoopbackCA(Path(folder) / "tls")


Counters = dict[tuple[str, str], int]


def push(backend: Backend, device: RegisteredDevice,
         store: Store | None = None) -> tuple[list[str], list[str], Counters]:
    """Send one delivery; the publish answers, the removed nodes and the counters."""
    answers: list[str] = []
    gone: list[str] = []

    async def run() -> Counters:
        dispatcher = Dispatcher(Config("localhost", backends=(backend,),
                                       endpoint_allow_ips=LOOPBACK),
                                store or Store(":memory:"), gone.append, answers.append)
        dispatcher.submit(Delivery(backend, device, SUMMARY,
                                   Iq("p1", "set", "localhost", "pubsub.localhost", None)))
        while not any(k[1] != "retried" for k in dispatcher.counters):
            await asyncio.sleep(0.01)
        counters = dict(dispatcher.counters)
        await dispatcher.close()
        return counters

    return answers, gone, asyncio.run(run())


def wns(ca: LoopbackCA) -> tuple[FakeProvider, int, Backend]:
    fake, port = FakeProvider(wns_check("ms-app://sid", "s3cret")), free_port()
    serve_in_thread(fake, ca, port)
    backend = Backend(0, "wns", "app", "localhost", "pubsub.localhost", {
        "package_sid": "ms-app://sid", "auth_key": "s3cret",
        "endpoint": f"https://127.0.0.1:{port}", "cafile": str(ca.cafile),
        "channel_domains": ["127.0.0.1"]})  # the fake's channels
    return fake, port, backend


def _device(token: str, node: str = "node-1", **extra: str) -> RegisteredDevice:
    return device(token, node, secret="s", user="alice@localhost", device_id="d1",
                  pubsub_host="pubsub.localhost", **extra)


def test_wns_token_then_raw_notification_and_refresh_after_401(ca: LoopbackCA) -> None:
    fake, port, backend = wns(ca)
    channel = f"https://127.0.0.1:{port}/channel/device-1"
    answers, gone, counters = push(backend, _device(channel))
    token, notification = fake.received
    assert token.path == "/accesstoken.srf" and notification.path == "/channel/device-1"
    assert notification.refused == "" and notification.http_version == "2"
    assert counters[("wns", "delivered")] == 1 and "type='result'" in answers[0]
    # A channel the service forgot: the registration goes, the publisher is told.
    fake.reset()
    fake.answers["/channel/device-1"] = (410, {})
    answers, gone, counters = push(backend, _device(channel))
    assert gone == ["node-1"] and "item-not-found" in answers[0]


def test_a_wns_channel_stored_off_its_domains_fails_for_good_and_gets_nothing(
        ca: LoopbackCA) -> None:
    """A channel stored before channel_domains was checked (or the list changed since):
    the app's token is not sent there, and the push is not retried for hours either."""
    fake, port, backend = wns(ca)
    answers, gone, counters = push(backend, _device(f"https://localhost:{port}/channel/d"))
    assert [r.path for r in fake.received] == ["/accesstoken.srf"]  # the login only
    assert counters == {("wns", "failed"): 1} and "internal-server-error" in answers[0]


def test_wns_refreshes_its_token_once_on_401(ca: LoopbackCA) -> None:
    fake, port, backend = wns(ca)
    fake.next_answers["/channel/d"] = [(401, {})]
    _, _, counters = push(backend, _device(f"https://127.0.0.1:{port}/channel/d"))
    paths = [r.path for r in fake.received]
    assert paths == ["/accesstoken.srf", "/channel/d", "/accesstoken.srf", "/channel/d"]
    assert counters[("wns", "delivered")] == 1 and counters[("wns", "retried")] == 1


def test_ubuntu_push_and_a_busy_server(ca: LoopbackCA) -> None:
    fake, port = FakeProvider(ubuntu_check), free_port()
    serve_in_thread(fake, ca, port)
    backend = Backend(0, "ubuntu", "any", "localhost", "pubsub.localhost", {
        "endpoint": f"https://127.0.0.1:{port}", "cafile": str(ca.cafile)})
    fake.next_answers["/notify"] = [(503, {"retry-after": "0"})]
    answers, _, counters = push(backend, _device("tok", application_id="app.id_app"))
    first, second = fake.received
    assert isinstance(first, Received) and second.refused == ""
    assert second.json()["appid"] == "app.id_app"
    assert counters[("ubuntu", "delivered")] == 1
    assert "type='result'" in answers[0]  # queued for another attempt: accepted


def test_a_deferred_push_outlives_the_process_and_is_sent_by_the_next(
        ca: LoopbackCA, tmp_path: Path) -> None:
    fake, port = FakeProvider(ubuntu_check), free_port()
    serve_in_thread(fake, ca, port)
    backend = Backend(0, "ubuntu", "any", "localhost", "pubsub.localhost", {
        "endpoint": f"https://127.0.0.1:{port}", "cafile": str(ca.cafile)})
    config = Config("localhost", backends=(backend,), ejabberd_node="ejabberd@a")
    fake.answers["/notify"] = (503, {})  # down
    db = str(tmp_path / "push.sqlite3")
    store = Store(db)
    device = RegisteredDevice("node-1", "s", "alice@localhost", "d1", "", "ubuntu", "any",
                    "pubsub.localhost", "tok", application_id="app.id_app")
    store.add_device(device)
    store.commit()
    answers: list[str] = []

    async def first_process() -> None:
        dispatcher = Dispatcher(config, store, lambda node: None, answers.append)
        dispatcher.submit(Delivery(backend, device, SUMMARY, Iq("p1", "set", "localhost",
                                                                "pubsub.localhost", None)))
        await fake.wait_for(1)
        while not answers:  # the publish is answered once the push is safely queued
            await asyncio.sleep(0.01)
        # The process dies here: its tasks and connections are gone, the store is not.

    asyncio.run(first_process())
    assert "type='result'" in answers[0]
    (queued,) = Store(db).queued_pushes("ejabberd@a")
    assert queued.device_node == "node-1" and queued.summary == SUMMARY
    del fake.answers["/notify"]  # back

    async def second_process() -> Counters:
        store = Store(db)
        dispatcher = Dispatcher(config, store, lambda node: None, answers.append)
        dispatcher.resume(AppServer(config, store).queued_deliveries())
        while not dispatcher.counters[("ubuntu", "delivered")]:
            await asyncio.sleep(0.01)
        await dispatcher.close()
        return dict(dispatcher.counters)

    counters = asyncio.run(second_process())
    assert counters[("ubuntu", "delivered")] == 1 and len(answers) == 1  # answered once
    assert fake.received[-1].json()["appid"] == "app.id_app"
    assert Store(db).queued_pushes("ejabberd@a") == []


def test_an_async_provider_data_is_awaited_within_the_budget(ca: LoopbackCA,
                                                              tmp_path: Path) -> None:
    """provider_data as an 'async def': awaited before the first attempt; one that does
    not answer within the budget is cancelled and the data goes as it was."""
    from pymod_push import logic

    module = tmp_path / "shaping.py"
    module.write_text("import asyncio\n"
                      "async def provider_data(device, data):\n"
                      "    if device.device_id == 'slow':\n"
                      "        await asyncio.sleep(30)\n"
                      "    return {**data, 'tenant': device.user.split('@')[1]}\n")
    admin = logic.load(str(module))
    admin.budget_s = 0.2
    fake, port = FakeProvider(ubuntu_check), free_port()
    serve_in_thread(fake, ca, port)
    backend = Backend(0, "ubuntu", "any", "localhost", "pubsub.localhost", {
        "endpoint": f"https://127.0.0.1:{port}", "cafile": str(ca.cafile)})

    async def run() -> None:
        dispatcher = Dispatcher(Config("localhost", backends=(backend,)), Store(":memory:"),
                                lambda node: None, lambda xml: None)
        dispatcher.logic = lambda: admin
        for device_id in ("quick", "slow"):
            device = RegisteredDevice(f"node-{device_id}", "s", "alice@localhost", device_id, "",
                            "ubuntu", "any", "pubsub.localhost", "tok",
                            application_id="app.id_app")
            dispatcher.submit(Delivery(backend, device, SUMMARY,
                                       Iq("p1", "set", "localhost", "pubsub.localhost", None)))
        while sum(n for k, n in dispatcher.counters.items() if k[1] == "delivered") < 2:
            await asyncio.sleep(0.01)
        await dispatcher.close()

    started = time.monotonic()
    asyncio.run(run())
    assert time.monotonic() - started < 5  # the slow one did not hold anything up
    data = sorted((r.json()["data"] for r in fake.received), key=len)
    assert data == [{"message-count": "1"}, {"message-count": "1", "tenant": "localhost"}]


def test_lines_of_a_spell_are_logged_once_a_minute_with_how_many_were_left_out() -> None:
    quieted = Quieted(window_s=60)
    deferred = ("apns", "deferred", "ServiceUnavailable")
    assert quieted.left_out(deferred, 1000.0) == 0  # the first one: logged
    assert [quieted.left_out(deferred, 1000.0 + n) for n in range(1, 50)] == [None] * 49
    assert quieted.left_out(("apns", "failed", "BadDeviceToken"), 1001.0) == 0  # another kind
    assert quieted.left_out(deferred, 1060.0) == 49  # a minute on: logged, with the count
    assert quieted.left_out(deferred, 1061.0) is None
    assert quieted.left_out(deferred, 999.0) == 1  # a clock that went back: logged
    for n in range(Quieted.MAX_KINDS + 10):  # reasons are the provider's: bounded anyway
        quieted.left_out(("apns", "failed", f"reason {n}"), 2000.0)
    assert len(quieted._kinds) <= Quieted.MAX_KINDS


def test_a_provider_down_for_every_push_commits_through_the_callback_and_logs_once(
        ca: LoopbackCA, caplog: pytest.LogCaptureFixture) -> None:
    """Every push deferred: each is queued, and committed through the port's group commit
    (the callback) rather than one commit each; the log has one line for all of them."""
    fake, port = FakeProvider(ubuntu_check), free_port()
    serve_in_thread(fake, ca, port)
    backend = Backend(0, "ubuntu", "any", "localhost", "pubsub.localhost", {
        "endpoint": f"https://127.0.0.1:{port}", "cafile": str(ca.cafile)})
    fake.answers["/notify"] = (503, {})  # down
    store = Store(":memory:")
    answers: list[str] = []
    queued_at_commits: list[int] = []  # queue entries written when each commit was asked
    queued_when_answered: list[int] = []  # ... as of the last commit before each answer

    def answer(xml: str) -> None:
        queued_when_answered.append(queued_at_commits[-1] if queued_at_commits else 0)
        answers.append(xml)

    async def run() -> Counters:
        dispatcher = Dispatcher(Config("localhost", backends=(backend,)), store,
                                lambda node: None, answer, commit=lambda: queued_at_commits.append(
                                    len(store.queued_pushes(""))))
        for n in range(30):
            dispatcher.submit(Delivery(backend, _device(f"tok{n}", f"node-{n}",
                                                        application_id="app.id_app"),
                                       SUMMARY, Iq(f"p{n}", "set", "localhost",
                                                   "pubsub.localhost", None)))
        while len(answers) < 30 or dispatcher.counters[("ubuntu", "retried")] < 30:
            await asyncio.sleep(0.01)
        counters = dict(dispatcher.counters)
        await dispatcher.close()
        return counters

    with caplog.at_level(logging.INFO, logger="pymod_push"):
        counters = asyncio.run(run())
    assert counters[("ubuntu", "retried")] == 30 and len(store.queued_pushes("")) == 30
    assert all("type='result'" in answer for answer in answers)
    # Each push's queue entry was handed to a commit before its publisher was answered.
    assert all(queued > n for n, queued in enumerate(queued_when_answered))
    deferred = [r.getMessage() for r in caplog.records if "deferred" in r.getMessage()]
    assert len(deferred) == 1, deferred


def test_close_writes_and_answers_nothing_more_and_keeps_what_waits(
        ca: LoopbackCA, tmp_path: Path) -> None:
    """At the process's end (the port closes the dispatcher, then the store): pushes still
    in flight are neither answered nor queued (their publishes are in the outbox: the next
    process sends them again, as after a crash), a retry waiting is cancelled with its queue
    entry kept, and nothing touches the store after it is closed."""
    fake, port = FakeProvider(ubuntu_check), free_port()
    serve_in_thread(fake, ca, port)
    backend = Backend(0, "ubuntu", "any", "localhost", "pubsub.localhost", {
        "endpoint": f"https://127.0.0.1:{port}", "cafile": str(ca.cafile)})
    config = Config("localhost", backends=(backend,), ejabberd_node="ejabberd@a")
    db = str(tmp_path / "push.sqlite3")
    store = Store(db)
    answers: list[str] = []
    errors: list[dict[str, object]] = []
    kept: list[QueuedPush] = []
    fake.next_answers["/notify"] = [(503, {"retry-after": "3600"})]  # then 200s, held

    def delivery(n: int) -> Delivery:
        return Delivery(backend, _device(f"tok{n}", application_id="app.id_app"), SUMMARY,
                        Iq(f"p{n}", "set", "localhost", "pubsub.localhost", None))

    async def run() -> Dispatcher:
        asyncio.get_running_loop().set_exception_handler(lambda _, context: errors.append(context))
        dispatcher = Dispatcher(config, store, lambda node: None, answers.append)
        dispatcher.submit(delivery(0))
        while not answers:  # deferred for an hour: queued, its publisher answered
            await asyncio.sleep(0.01)
        fake.answer_when = threading.Event()
        for n in range(1, 6):
            dispatcher.submit(delivery(n))
        await fake.wait_for(6)  # all five arrived, none answered
        kept.extend(Store(db).queued_pushes("ejabberd@a"))  # the retry's, waiting
        await dispatcher.close()
        store.close()
        fake.answer_when.set()
        for _ in range(20):  # whatever close left scheduled would run now
            await asyncio.sleep(0)
        dispatcher.submit(delivery(6))  # too late: kept for the next process
        return dispatcher

    dispatcher = asyncio.run(run())
    assert errors == [] and not dispatcher._tasks
    assert len(answers) == 1 and "type='result'" in answers[0]
    assert len(kept) == 1 and Store(db).queued_pushes("ejabberd@a") == kept
    assert len(fake.received) == 6


# ------------------------------------------------------- bounded work per device (issue 29)

def _ubuntu(ca: LoopbackCA, fake: FakeProvider) -> Backend:
    port = free_port()
    serve_in_thread(fake, ca, port)
    return Backend(0, "ubuntu", "any", "localhost", "pubsub.localhost", {
        "endpoint": f"https://127.0.0.1:{port}", "cafile": str(ca.cafile)})


def _ubuntu_device(node: str) -> RegisteredDevice:
    return RegisteredDevice(node, "s", "alice@localhost", node, "", "ubuntu", "any",
                            "pubsub.localhost",
                  f"tok-{node}", application_id="app.id_app")


def _publish(backend: Backend, device: RegisteredDevice, n: int = 1) -> Delivery:
    return Delivery(backend, device, {**SUMMARY, "message-count": str(n)},
                    Iq(f"p{n}", "set", "localhost", "pubsub.localhost", None))


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_a_device_has_at_most_a_few_pushes_waiting_the_newest_also_after_a_restart(
        ca: LoopbackCA, tmp_path: Path, database: str, request: pytest.FixtureRequest) -> None:
    """An endpoint that answers 503 to every push: of a device's pushes at most
    MAX_WAITING_PER_DEVICE wait (rows and retries), the newest; those superseded are
    counted and every publish is answered. The next process keeps the bound, also over
    rows an earlier version left unbounded, and its new pushes supersede the oldest."""
    from pymod_push.delivery.dispatcher import MAX_WAITING_PER_DEVICE

    fake = FakeProvider(ubuntu_check)
    backend = _ubuntu(ca, fake)
    fake.answers["/notify"] = (503, {})  # down for good; retries wait ~ 1 s, 5 s, 30 s
    config = Config("localhost", backends=(backend,), ejabberd_node="ejabberd@a")
    opened: list[Store] = []

    def reopen() -> Store:  # the same database, as the next process opens it
        opened.append(open_store(str(tmp_path / "push.sqlite3")) if database == "sqlite"
                      else open_store("", url))
        return opened[-1]

    url = request.getfixturevalue("postgres").new_database() if database != "sqlite" else ""
    store = reopen()
    device, other = _ubuntu_device("node-1"), _ubuntu_device("node-2")
    for each in (device, other):
        store.add_device(each)
    store.commit()
    answers: list[str] = []
    publishes = 3 * MAX_WAITING_PER_DEVICE

    async def first_process() -> Counters:
        dispatcher = Dispatcher(config, store, lambda node: None, answers.append)
        for n in range(1, publishes + 1):
            dispatcher.submit(_publish(backend, device, n))
        while len(answers) < publishes:
            await asyncio.sleep(0.01)
        retrying = [t for t in dispatcher._tasks if not t.cancelling() and not t.done()]
        assert len(retrying) <= MAX_WAITING_PER_DEVICE  # superseded ones stopped
        counters = dict(dispatcher.counters)
        await dispatcher.close()
        return counters

    counters = asyncio.run(first_process())
    assert len(answers) == publishes and all("type='result'" in a for a in answers)
    assert counters[("ubuntu", "superseded")] == publishes - MAX_WAITING_PER_DEVICE
    kept = reopen().queued_pushes("ejabberd@a")
    assert len(kept) == MAX_WAITING_PER_DEVICE
    assert len({push.summary["message-count"] for push in kept}) == MAX_WAITING_PER_DEVICE
    # A database of before the bound: eight pushes of another device wait.
    for n in range(8):
        store.queue_push(QueuedPush(n + 1, "node-2", {**SUMMARY, "message-count": str(n)},
                                    0, time.time() + 3600, 1.0, 1.0), "ejabberd@a")
    store.commit()

    async def second_process() -> Counters:
        store = reopen()
        dispatcher = Dispatcher(config, store, lambda node: None, answers.append)
        dispatcher.resume(AppServer(config, store).queued_deliveries())
        assert dispatcher.counters[("ubuntu", "superseded")] == 8 - MAX_WAITING_PER_DEVICE
        newest = max(push.id for push in store.queued_pushes("ejabberd@a"))
        dispatcher.submit(_publish(backend, device, 99))
        while len(answers) < publishes + 1:
            await asyncio.sleep(0.01)
        rows = store.queued_pushes("ejabberd@a")
        assert max(push.id for push in rows) > newest  # the new one is the newest
        counters = dict(dispatcher.counters)
        await dispatcher.close()
        return counters

    counters = asyncio.run(second_process())
    assert counters[("ubuntu", "superseded")] == 8 - MAX_WAITING_PER_DEVICE + 1
    rows = reopen().queued_pushes("ejabberd@a")
    by_device = Counter(push.device_node for push in rows)
    assert by_device == {"node-1": MAX_WAITING_PER_DEVICE, "node-2": MAX_WAITING_PER_DEVICE}
    assert {push.summary["message-count"] for push in rows if push.device_node == "node-2"} \
        == {"3", "4", "5", "6", "7"}  # the newest
    assert "99" in {push.summary["message-count"] for push in rows}
    for each in opened:
        each.close()


def test_what_no_retry_can_mend_fails_at_once(ca: LoopbackCA) -> None:
    """Web Push: keys no request can be made with, a URL that is no https URL, an endpoint
    answering 408 (any 4xx but 429) and a destination the policy refuses fail at once:
    the publish gets its error, nothing is queued, the endpoint is asked at most once."""
    fake, port = FakeProvider(), free_port()
    serve_in_thread(fake, ca, port)
    backend = Backend(0, "webpush", "any", "localhost", "pubsub.localhost",
                      {"cafile": str(ca.cafile)})
    fake.answers["/sub/timeout"] = (408, {})
    fake.answers["/sub/bad"] = (400, {})
    receiver = ec.generate_private_key(ec.SECP256R1())
    p256dh = b64url_encode(receiver.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint))
    auth = b64url_encode(b"0123456789abcdef")

    def device(node: str, endpoint: str, key: str = p256dh) -> RegisteredDevice:
        return RegisteredDevice(node, "s", "alice@localhost", node, "", "webpush", "any",
                      "pubsub.localhost", endpoint, p256dh=key, auth=auth)

    base = f"https://127.0.0.1:{port}/sub"
    devices = [device("keys", f"{base}/keys", b64url_encode(b"\x04" + b"\x01" * 64)),
               device("http", f"http://127.0.0.1:{port}/sub/http"),
               device("timeout", f"{base}/timeout"), device("bad", f"{base}/bad")]

    def run(config: Config, sent: list[RegisteredDevice]) -> tuple[list[str], Counters, Store]:
        answers: list[str] = []
        store = Store(":memory:")

        async def go() -> Counters:
            dispatcher = Dispatcher(config, store, lambda node: None, answers.append)
            for n, each in enumerate(sent):
                dispatcher.submit(_publish(backend, each, n))
            while len(answers) < len(sent):
                await asyncio.sleep(0.01)
            counters = dict(dispatcher.counters)
            await dispatcher.close()
            return counters

        return answers, asyncio.run(go()), store

    answers, counters, store = run(
        Config("localhost", backends=(backend,), endpoint_allow_ips=LOOPBACK), devices)
    assert all("internal-server-error" in answer for answer in answers), answers
    assert counters == {("webpush", "failed"): 4} and store.queued_pushes("") == []
    assert sorted(r.path for r in fake.received) == ["/sub/bad", "/sub/timeout"]
    # 127.0.0.1 not allowed (the default): refused by the destination policy, for good.
    fake.reset()
    answers, counters, store = run(Config("localhost", backends=(backend,)),
                                   [device("denied", f"{base}/denied")])
    assert "internal-server-error" in answers[0]
    assert counters == {("webpush", "failed"): 1} and store.queued_pushes("") == []
    assert fake.received == []


@pytest.mark.parametrize("value", ["\u00b2", "-1", "99999999999999999999", "0x10", "",
                                   "Wed, 21 Oct 2015 07:28:00 GMT", " 7 ", "0", "99999"])
def test_a_retry_after_of_anything_but_ascii_digits_gets_the_default_delay(value: str) -> None:
    from pymod_push.delivery.dispatcher import RETRY_DELAYS, retry_delay
    from pymod_push.providers import DeliveryOutcome, Reply

    delays = {retry_delay(Reply(DeliveryOutcome.RETRY), {"retry-after": value}, 2)
              for _ in range(20)}
    if value.strip() in ("7", "0", "99999"):  # bounded: 1 s (no busy loop) to 10 minutes
        assert delays == {{"7": 7.0, "0": 1.0, "99999": 600.0}[value.strip()]}
    else:
        assert all(0.8 * RETRY_DELAYS[2] <= d <= 1.2 * RETRY_DELAYS[2] for d in delays)


def test_a_push_with_a_wrong_retry_after_is_retried_and_delivered(ca: LoopbackCA) -> None:
    """The retry of a push whose provider sent a Retry-After that is no number (or a huge
    one) comes after the default delay (the first: about a second), not never (the retry
    task dead, the push stuck until a restart) nor in 600 s."""
    fake = FakeProvider(ubuntu_check)
    backend = _ubuntu(ca, fake)
    values = ["\u00b2", "-1", "99999999999999999999", "Wed, 21 Oct 2015 07:28:00 GMT"]
    fake.next_answers["/notify"] = [(503, {"retry-after": value}) for value in values]
    errors: list[dict[str, object]] = []

    async def run() -> Counters:
        asyncio.get_running_loop().set_exception_handler(lambda _, context: errors.append(context))
        dispatcher = Dispatcher(Config("localhost", backends=(backend,)), Store(":memory:"),
                                lambda node: None, lambda xml: None)
        for n in range(len(values)):
            dispatcher.submit(_publish(backend, _ubuntu_device(f"node-{n}"), n))
        deadline = time.monotonic() + 20  # a retry in 600 s (or never) fails here
        while dispatcher.counters[("ubuntu", "delivered")] < len(values) \
                and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        counters = dict(dispatcher.counters)
        await dispatcher.close()
        return counters

    counters = asyncio.run(run())
    assert counters[("ubuntu", "delivered")] == len(values) == counters[("ubuntu", "retried")]
    assert errors == [] and [r.status for r in fake.received].count(503) == len(values)


def test_a_peers_reasons_are_cut_escaped_and_quieted_by_kind(
        ca: LoopbackCA, caplog: pytest.LogCaptureFixture) -> None:
    """A provider's reason of 64 KiB with CR/LF, another each time: the log has one line
    per kind (provider, outcome, status class), cut and with the control characters
    escaped (no forged line)."""
    answered = itertools.count()

    def hostile(request: Received) -> tuple[int, dict[str, Any]] | None:
        n = next(answered)
        reason = f"reason {n}\r\n2026-01-01 [critical] forged line {n}\x1b[31m" + "x" * 65536
        return (503 if request.json()["token"].startswith("tok-busy") else 400), \
            {"error": reason}

    fake = FakeProvider(hostile)
    backend = _ubuntu(ca, fake)

    async def run() -> Counters:
        dispatcher = Dispatcher(Config("localhost", backends=(backend,)), Store(":memory:"),
                                lambda node: None, lambda xml: None)
        for n in range(10):
            dispatcher.submit(_publish(backend, _ubuntu_device(f"busy-{n}"), n))
            dispatcher.submit(_publish(backend, _ubuntu_device(f"bad-{n}"), n))
        while dispatcher.counters[("ubuntu", "retried")] < 10 \
                or dispatcher.counters[("ubuntu", "failed")] < 10:
            await asyncio.sleep(0.01)
        counters = dict(dispatcher.counters)
        await dispatcher.close()
        return counters

    with caplog.at_level(logging.INFO, logger="pymod_push"):
        asyncio.run(run())
    lines = [r.getMessage() for r in caplog.records if "forged" in r.getMessage()]
    assert len([line for line in lines if "deferred" in line]) == 1, lines
    assert len([line for line in lines if "failed" in line]) == 1, lines
    for line in lines:
        assert len(line) < 500 and "\r" not in line and "\n" not in line, line[:300]
        assert "\x1b" not in line and "\\r\\n" in line and "\\x1b" in line


def test_a_device_that_only_fails_is_given_up_while_its_provider_delivers_others(
        ca: LoopbackCA, monkeypatch: pytest.MonkeyPatch) -> None:
    """Its pushes failing GIVE_UP_S long (shortened here) while another device's push was
    delivered: the device is given up (its registration removed, as if the provider had
    said it is gone; the publisher of the next push hears item-not-found), its waiting
    pushes end, all counted. With nothing delivered by the provider (its outage), nobody is
    given up: only the push that waited too long."""
    from pymod_push.delivery import dispatcher as dispatch

    monkeypatch.setattr(dispatch, "GIVE_UP_S", 0.3)

    def answer(request: Received) -> tuple[int, dict[str, Any]] | None:
        return (503, {}) if request.json()["token"].startswith("tok-failing") else None

    fake = FakeProvider(answer)
    backend = _ubuntu(ca, fake)
    failing, working = _ubuntu_device("failing"), _ubuntu_device("working")

    def run(with_delivery: bool) -> tuple[list[str], list[str], Counters, Store]:
        answers: list[str] = []
        gone: list[str] = []
        store = Store(":memory:")

        async def go() -> Counters:
            dispatcher = Dispatcher(Config("localhost", backends=(backend,)), store,
                                    gone.append, answers.append)
            dispatcher.submit(_publish(backend, failing, 1))
            while not answers:  # deferred: it waits, failing since now
                await asyncio.sleep(0.01)
            if with_delivery:  # then the provider delivers another device's push
                dispatcher.submit(_publish(backend, working, 2))
                while len(answers) < 2:
                    await asyncio.sleep(0.01)
            await asyncio.sleep(0.4)  # failing for longer than GIVE_UP_S now
            if with_delivery:  # the next push's publisher hears the device is gone
                dispatcher.submit(_publish(backend, failing, 3))
            # else the first retry (in about a second) finds the push too old
            while not dispatcher.counters[("ubuntu", "given_up")]:
                await asyncio.sleep(0.01)
            counters = dict(dispatcher.counters)
            await dispatcher.close()
            return counters

        counters = asyncio.run(go())
        return answers, gone, counters, store

    answers, gone, counters, store = run(with_delivery=True)
    assert gone == ["failing"] and "item-not-found" in answers[-1]
    assert counters[("ubuntu", "devices_given_up")] == 1
    assert counters[("ubuntu", "given_up")] == 2  # the one waiting and the new one
    assert store.queued_pushes("") == []
    answers, gone, counters, store = run(with_delivery=False)
    assert gone == [] and ("ubuntu", "devices_given_up") not in counters
    assert counters[("ubuntu", "given_up")] == 1 and store.queued_pushes("") == []


def test_a_device_whose_pushes_fail_for_good_is_given_up_while_its_provider_delivers_others(
        ca: LoopbackCA, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 4xx is not retried, but a device answered so on every push for GIVE_UP_S
    (shortened here), three times at least, while another device's push was delivered is
    given up too: its
    registration removed, the publisher hearing item-not-found. A delivery to it in between
    starts its time again; with nothing delivered by the provider, nobody is given up."""
    from pymod_push.delivery import dispatcher as dispatch

    monkeypatch.setattr(dispatch, "GIVE_UP_S", 0.3)
    bad_request = {"failing": True}

    def answer(request: Received) -> tuple[int, dict[str, Any]] | None:
        failing = request.json()["token"].startswith("tok-failing") and bad_request["failing"]
        return (400, {}) if failing else None

    fake = FakeProvider(answer)
    backend = _ubuntu(ca, fake)
    failing, working = _ubuntu_device("failing"), _ubuntu_device("working")

    def run(with_delivery: bool, recovers: bool = False) -> tuple[list[str], list[str],
                                                                   Counters]:
        answers: list[str] = []
        gone: list[str] = []
        bad_request["failing"] = True

        async def push(dispatcher: Dispatcher, device: RegisteredDevice, n: int) -> None:
            dispatcher.submit(_publish(backend, device, n))
            while len(answers) < n:
                await asyncio.sleep(0.01)

        async def go() -> Counters:
            dispatcher = Dispatcher(Config("localhost", backends=(backend,)),
                                    Store(":memory:"), gone.append, answers.append)
            await push(dispatcher, failing, 1)  # fails for good: noted, not retried
            if with_delivery:
                await push(dispatcher, working, 2)
            if recovers:  # the device works again once: its time starts again
                bad_request["failing"] = False
                await push(dispatcher, failing, 3)
                bad_request["failing"] = True
            await asyncio.sleep(0.4)  # longer than GIVE_UP_S since the first failure
            await push(dispatcher, failing, len(answers) + 1)  # its second failure: kept
            assert gone == []
            await push(dispatcher, failing, len(answers) + 1)  # the third
            counters = dict(dispatcher.counters)
            await dispatcher.close()
            return counters

        counters = asyncio.run(go())
        return answers, gone, counters

    answers, gone, counters = run(with_delivery=True)
    assert gone == ["failing"] and "item-not-found" in answers[-1]
    assert "item-not-found" not in answers[0]
    assert counters[("ubuntu", "devices_given_up")] == 1
    assert counters[("ubuntu", "failed")] == 3
    assert [r.json()["token"] for r in fake.received].count("tok-failing") == 3  # no retry
    answers, gone, counters = run(with_delivery=False)
    assert gone == [] and ("ubuntu", "devices_given_up") not in counters
    answers, gone, counters = run(with_delivery=True, recovers=True)
    assert gone == [] and ("ubuntu", "devices_given_up") not in counters


def test_what_raises_on_a_retrys_way_does_not_end_it(
        ca: LoopbackCA, caplog: pytest.LogCaptureFixture) -> None:
    """A store write that raises once while a push is deferred, a provider's reader that
    raises on an answer: logged by kind, and the push is still retried and delivered."""
    fake = FakeProvider(ubuntu_check)
    backend = _ubuntu(ca, fake)
    fake.next_answers["/notify"] = [(503, {})]
    store = Store(":memory:")
    update = store.update_queued_push
    raised: list[QueuedPush] = []

    def update_once(push: QueuedPush) -> None:
        if not raised:
            raised.append(push)
            raise RuntimeError("the disk is full")
        update(push)

    store.update_queued_push = update_once  # type: ignore[method-assign]

    async def run() -> Counters:
        dispatcher = Dispatcher(Config("localhost", backends=(backend,)), store,
                                lambda node: None, lambda xml: None)
        provider = dispatcher._providers[0]
        read = provider.reply
        calls = itertools.count()

        def reply_raising_once(status: int, headers: dict[str, str], body: bytes) -> Any:
            if next(calls) == 1:  # the retry's answer (a 200)
                raise TypeError("unhashable type: 'list'")
            return read(status, headers, body)

        provider.reply = reply_raising_once  # type: ignore[method-assign]
        dispatcher.submit(_publish(backend, _ubuntu_device("node-1")))
        deadline = time.monotonic() + 20
        while not dispatcher.counters[("ubuntu", "delivered")] and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        counters = dict(dispatcher.counters)
        await dispatcher.close()
        return counters

    with caplog.at_level(logging.INFO, logger="pymod_push"):
        counters = asyncio.run(run())
    assert raised and counters[("ubuntu", "delivered")] == 1
    assert store.queued_pushes("") == []
    assert any("RuntimeError while deferring it" in r.getMessage() for r in caplog.records)


def test_push_status_shows_the_bound_and_what_was_superseded_and_given_up() -> None:
    from pymod_push.port import admin_commands as admin
    from pymod_push.protocol import AdminCommand, CommandResult
    from tests.builders import make_service

    info = admin.ProcessInfo(provider_counters=Counter({
        ("webpush", "superseded"): 7, ("webpush", "delivered"): 2,
        ("webpush", "devices_given_up"): 1, ("webpush", "given_up"): 5}))
    (result,) = admin.run(AdminCommand("r", "status", ()), make_service(), info, 0.0)
    assert isinstance(result, CommandResult)
    assert "deferred by providers: 0 (at most 5 per device)" in result.text
    assert "pushes via webpush: delivered 2, given_up 5, superseded 7; devices given up " \
        "(their pushes failed for 6 h): 1" in result.text
