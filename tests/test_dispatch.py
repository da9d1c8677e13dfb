"""The provider edge against fakes over HTTP/2 and TLS, without ejabberd: WNS and Ubuntu Push
(APNs, FCM and Web Push are driven end to end in test_e2e_appserver.py)."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from devtools.instance import free_port
from pymod_push.appservice import AppServer, Delivery
from pymod_push.core.appserver import Iq
from pymod_push.core.config import Backend, Config
from pymod_push.providers.dispatch import Dispatcher, Quieted
from pymod_push.store import Device, QueuedPush, Store
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


def push(backend: Backend, device: Device,
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


def _device(token: str, **extra: str) -> Device:
    return Device("node-1", "s", "alice@localhost", "d1", "", "x", "app", "pubsub.localhost",
                  token, **extra)


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
    device = Device("node-1", "s", "alice@localhost", "d1", "", "ubuntu", "any",
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
            device = Device(f"node-{device_id}", "s", "alice@localhost", device_id, "",
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
            dispatcher.submit(Delivery(backend, _device(f"tok{n}", application_id="app.id_app"),
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
