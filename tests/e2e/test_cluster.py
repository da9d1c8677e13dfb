"""A real two-node ejabberd cluster (`ejabberdctl join_cluster`), each node with its own
Python process, both on one PostgreSQL database: one push per message whichever node it
comes through, registrations usable on both nodes, a node's restart wakes its users once."""

from __future__ import annotations

import asyncio
import re
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from devtools.instance import Instance
from tests.conftest import Scenario
from tests.fake_providers import FakeProvider, fake_apns
from tests.xmpp_peers import NS_DATA, Client, Peers, form_fields

pytestmark = pytest.mark.e2e

TOPIC = "org.example.cluster"


@dataclass
class Cluster:
    a: Instance
    b: Instance
    apns: FakeProvider

    def scenario(self, node: Instance) -> Scenario:
        return Scenario(node)


@pytest.fixture(scope="module")
def cluster(postgres_url: str) -> Iterator[Cluster]:
    folder = Path(tempfile.mkdtemp(prefix="pymod_push-cluster-"))
    folder.chmod(0o755)
    apns, backend = fake_apns(folder, "cluster", TOPIC)
    options = {"db_url": postgres_url, "backends": [backend]}
    a = Instance(folder / "a", options=options, clustered=True)
    b = Instance(folder / "b", options=options, clustered=True)
    for node in (a, b):
        node.folder.mkdir()
        node.write_config()
    try:
        a.start()
        b.start()
        b.join_cluster(a)
        yield Cluster(a, b, apns)
    finally:
        b.discard()
        a.discard()
        shutil.rmtree(folder, ignore_errors=True)


def bodies(cluster: Cluster, token: str) -> list[str]:
    return [r.json().get("last-message-body", "") for r in cluster.apns.received
            if r.path == f"/3/device/{token}" and r.status == 200]


async def wait_for_bodies(cluster: Cluster, token: str, count: int) -> list[str]:
    while len(bodies(cluster, token)) < count:
        await cluster.apns.wait_for(len(cluster.apns.received) + 1)
    return bodies(cluster, token)


async def device_on_a(cluster: Cluster, peers_a: Peers, peers_b: Peers,
                      token: str) -> tuple[Client, str]:
    """Registered at the app server through node B, push enabled on node A, pending there."""
    scenario = cluster.scenario(cluster.a)
    jid, password = await asyncio.to_thread(scenario.account, "user")
    on_b = await peers_b.user(jid, password)
    command = await on_b.command("localhost", "register-push-apns", {"token": token})
    fields = form_fields(command.find(f"{{{NS_DATA}}}x"))
    await on_b.go_offline()
    phone = await peers_a.user(jid, password)
    await phone.enable_push("pubsub.localhost", fields["node"][0], secret=fields["secret"][0],
                            options={"include-message-bodies": "1"})
    await scenario.go_pending(phone)
    return phone, jid


def run_on_both(cluster: Cluster, scenario: object) -> None:
    async def main() -> None:
        peers_a, peers_b = Peers(cluster.a.c2s_port), Peers(cluster.b.c2s_port)
        try:
            await scenario(peers_a, peers_b)  # type: ignore[operator]
        finally:
            await peers_a.close()
            await peers_b.close()

    asyncio.run(main())


def test_one_push_per_message_sent_through_the_other_node(cluster: Cluster) -> None:
    token = "a1" * 32

    async def run(peers_a: Peers, peers_b: Peers) -> None:
        phone, jid = await device_on_a(cluster, peers_a, peers_b, token)
        sender_jid, password = await asyncio.to_thread(cluster.scenario(cluster.b).account,
                                                       "sender")
        sender = await peers_b.user(sender_jid, password)
        sender.send_message(mto=phone.boundjid.full, mbody="first", mtype="chat")
        assert await wait_for_bodies(cluster, token, 1) == ["first"]
        sender.send_message(mto=phone.boundjid.full, mbody="second", mtype="chat")
        assert await wait_for_bodies(cluster, token, 2) == ["first", "second"]

    run_on_both(cluster, run)


def test_restarting_a_node_wakes_its_users_once(cluster: Cluster) -> None:
    on_a, on_b = "b1" * 32, "b2" * 32
    users: dict[str, str] = {}

    async def before(peers_a: Peers, peers_b: Peers) -> None:
        _, users["a"] = await device_on_a(cluster, peers_a, peers_b, on_a)
        # The other user's session lives on node B: registered through A, pending on B.
        _, users["b"] = await device_on_a(Cluster(cluster.b, cluster.a, cluster.apns),
                                          peers_b, peers_a, on_b)

    run_on_both(cluster, before)
    mark = cluster.a.log_mark()
    cluster.a.stop()
    cluster.a.start(install=False)
    cluster.a.wait_for_log(r"ejabberd started: waking \d+ push registration", mark)

    async def after(peers_a: Peers, peers_b: Peers) -> None:
        assert await wait_for_bodies(cluster, on_a, 1) == [""]  # the wake
        sender_jid, password = await asyncio.to_thread(cluster.scenario(cluster.b).account,
                                                       "sender")
        sender = await peers_b.user(sender_jid, password)
        sender.send_message(mto=users["b"], mbody="to b", mtype="chat")
        sender.send_message(mto=users["a"], mbody="to a", mtype="chat")
        # Node B's user was not woken (its session is still pending on B), and node A's
        # user was woken once: each got exactly what follows.
        assert await wait_for_bodies(cluster, on_b, 1) == ["to b"]
        assert await wait_for_bodies(cluster, on_a, 2) == ["", "to a"]

    run_on_both(cluster, after)


def log_count(node: Instance, pattern: str, mark: int) -> int:
    text = node.log_file.read_bytes()[mark:].decode(errors="replace")
    return len(re.findall(pattern, text))


def test_a_database_outage_under_load_loses_nothing_and_pushes_nothing_twice(
        cluster: Cluster, postgres: Any) -> None:
    """PostgreSQL stopped for 20 s while messages keep coming to pending sessions on node A
    through node B: ejabberd keeps serving, every message is pushed once when it is back,
    and each node's log says so once. (Each device gets fewer than the built-in app
    server's burst allowance of 20 publishes, which would otherwise defer the rest.)"""
    tokens = tuple(f"d{n}" * 32 for n in range(1, 7))
    expected: dict[str, list[str]] = {token: [] for token in tokens}
    marks: list[int] = []

    async def run(peers_a: Peers, peers_b: Peers) -> None:
        phones = [(await device_on_a(cluster, peers_a, peers_b, t))[0] for t in tokens]
        accounts = await asyncio.to_thread(lambda: [cluster.scenario(cluster.b).account(p)
                                                    for p in ("sender", "watcher")])
        sender = await peers_b.user(*accounts[0])
        watcher = await peers_a.user(*accounts[1])  # online, no push: served by ejabberd
        seen: list[str] = []
        arrived = asyncio.Event()

        def on_message(message: Any) -> None:
            seen.append(str(message["body"]))
            arrived.set()
        watcher.add_event_handler("message", on_message)

        def burst(label: str) -> None:
            for phone, token in zip(phones, tokens, strict=True):
                sender.send_message(mto=phone.boundjid.full, mbody=label, mtype="chat")
                expected[token].append(label)

        for i in range(2):
            burst(f"before-{i}")
        for token in tokens:
            assert Counter(await wait_for_bodies(cluster, token, 2)) == Counter(
                expected[token])
        marks.extend([cluster.a.log_mark(), cluster.b.log_mark()])
        await asyncio.to_thread(postgres.halt)
        try:
            began, served = time.monotonic(), 0
            while time.monotonic() - began < 20:
                if served % 10 == 0:
                    burst(f"during-{served}")
                sender.send_message(mto=accounts[1][0], mbody=f"served-{served}", mtype="chat")
                served += 1
                await asyncio.sleep(0.1)
            while len(seen) < served:  # ejabberd kept serving all along
                arrived.clear()
                await asyncio.wait_for(arrived.wait(), 20)
            assert seen == [f"served-{n}" for n in range(served)]
            assert all(len(bodies(cluster, token)) == 2 for token in tokens)  # held
        finally:
            await asyncio.to_thread(postgres.start)
        for i in range(2):
            burst(f"after-{i}")
        for token in tokens:
            got = await wait_for_bodies(cluster, token, len(expected[token]))
            assert Counter(got) == Counter(expected[token])  # each exactly once

    run_on_both(cluster, run)
    # The log line comes through the port after the pushes it precedes may have arrived.
    cluster.a.wait_for_log(r"database back after", marks[0], timeout=30)
    assert log_count(cluster.a, r"database unavailable", marks[0]) == 1
    assert log_count(cluster.a, r"database back after", marks[0]) == 1
    assert log_count(cluster.b, r"database unavailable", marks[1]) == log_count(
        cluster.b, r"database back after", marks[1]) <= 1
