"""Nothing lost, end to end: ejabberd restarts with a pending push user, the Python process
is killed with SIGKILL while messages stream to pending users, a provider is down for a
while. Each test has an ejabberd of its own (they restart or kill things)."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from devtools.instance import Instance
from tests.conftest import Scenario
from tests.fake_providers import fake_apns
from tests.xmpp_peers import NS_DATA, Client, Peers, form_fields

pytestmark = pytest.mark.e2e

TOPIC = "org.example.recovery"
BODIES = {"include-message-bodies": "1"}


class Setup:
    def __init__(self, folder: Path) -> None:
        self.apns, backend = fake_apns(folder, "recovery", TOPIC)
        self.instance = Instance(folder, options={"backends": [backend]})
        self.instance.write_config()
        self.scenario = Scenario(self.instance)


@pytest.fixture
def setup() -> Iterator[Setup]:
    folder = Path(tempfile.mkdtemp(prefix="pymod_push-recovery-"))
    folder.chmod(0o755)
    made = Setup(folder)
    try:
        made.instance.start()
        yield made
    finally:
        made.instance.discard()
        shutil.rmtree(folder, ignore_errors=True)


async def push_user(scenario: Scenario, peers: Peers, token: str) -> Client:
    """A user registered at the built-in app server (APNs), push enabled, bodies on."""
    jid, password = await asyncio.to_thread(scenario.account, "user")
    client = await peers.user(jid, password)
    command = await client.command("localhost", "register-push-apns", {"token": token})
    fields = form_fields(command.find(f"{{{NS_DATA}}}x"))
    await client.enable_push("pubsub.localhost", fields["node"][0], secret=fields["secret"][0],
                             options=BODIES)
    return client


def bodies(setup: Setup, token: str, status: int = 200) -> list[str]:
    """The bodies of the pushes to that device the fake answered with that status."""
    return [r.json().get("last-message-body", "") for r in setup.apns.received
            if r.path == f"/3/device/{token}" and r.status == status]


def test_a_restart_wakes_the_pending_push_user_once(setup: Setup) -> None:
    scenario, instance = setup.scenario, setup.instance
    token = "ab" * 32
    phone_jid = ""

    async def before(peers: Peers) -> None:
        nonlocal phone_jid
        phone = await push_user(scenario, peers, token)
        phone_jid = phone.boundjid.bare
        await scenario.go_pending(phone)

    scenario.run(before)
    assert setup.apns.received == []
    instance.stop()
    mark = instance.log_mark()
    instance.start(install=False)
    instance.wait_for_log(r"ejabberd started: waking 1 push registration", mark)

    async def after(peers: Peers) -> None:
        (wake,) = await setup.apns.wait_for(1)
        assert wake.path == f"/3/device/{token}" and not wake.refused
        # Registrations at the app server are untouched: an offline message still pushes,
        # and it is the only other push (the wake came once).
        jid, password = await asyncio.to_thread(scenario.account, "sender")
        sender = await peers.user(jid, password)
        sender.send_message(mto=phone_jid, mbody="after the restart", mtype="chat")
        await setup.apns.wait_for(2)
        assert bodies(setup, token) == ["", "after the restart"]

    scenario.run(after)


def test_sigkill_of_python_while_messages_stream_loses_no_push(setup: Setup) -> None:
    scenario, instance = setup.scenario, setup.instance
    # Below the app server's per-device burst (appservice.PUBLISH_BURST), which is not
    # what this test is about.
    tokens = [f"{i:02x}" * 32 for i in range(1, 7)]
    per_user = 12

    async def run(peers: Peers) -> None:
        users = [await push_user(scenario, peers, token) for token in tokens]
        jid, password = await asyncio.to_thread(scenario.account, "sender")
        sender = await peers.user(jid, password)
        for user in users:
            await scenario.go_pending(user)
        ready = await asyncio.to_thread(instance.wait_for_log, r"Python process ready on")
        pid = int(re.search(r"pid => <<\"(\d+)\">>", ready).group(1))  # type: ignore[union-attr]
        mark = instance.log_mark()
        for n in range(per_user):
            for user in users:
                sender.send_message(mto=user.boundjid.full, mbody=f"message {n}", mtype="chat")
            if n == per_user // 2:
                os.kill(pid, signal.SIGKILL)
        await asyncio.to_thread(instance.wait_for_log, r"Python process exited with status",
                                mark)
        await asyncio.to_thread(instance.wait_ready, mark)
        wanted = {f"message {n}" for n in range(per_user)}
        for token in tokens:
            while not wanted <= set(bodies(setup, token)):
                await setup.apns.wait_for(len(setup.apns.received) + 1)
        # Duplicates are possible only for what was in flight when the process died.
        total = sum(len(bodies(setup, token)) for token in tokens)
        assert total - len(tokens) * per_user <= 2 * len(tokens)

    scenario.run(run)


def test_provider_outage_pushes_are_delivered_after_recovery(setup: Setup) -> None:
    scenario = setup.scenario
    token = "cd" * 32
    path = f"/3/device/{token}"
    setup.apns.answers[path] = (503, {"reason": "ServiceUnavailable"})

    async def run(peers: Peers) -> None:
        phone = await push_user(scenario, peers, token)
        jid, password = await asyncio.to_thread(scenario.account, "sender")
        sender = await peers.user(jid, password)
        await scenario.go_pending(phone)
        for n in range(5):
            sender.send_message(mto=phone.boundjid.full, mbody=f"during outage {n}", mtype="chat")
        sent = {f"during outage {n}" for n in range(5)}
        while not sent <= set(bodies(setup, token, 503)):  # each one refused at least once
            await setup.apns.wait_for(len(setup.apns.received) + 1)
        del setup.apns.answers[path]  # the provider is back
        while not sent <= set(bodies(setup, token)):
            await setup.apns.wait_for(len(setup.apns.received) + 1)
        sender.send_message(mto=phone.boundjid.full, mbody="after", mtype="chat")
        while "after" not in bodies(setup, token):
            await setup.apns.wait_for(len(setup.apns.received) + 1)
        assert Counter(bodies(setup, token)) == {**{f"during outage {n}": 1 for n in range(5)},
                                                 "after": 1}  # none duplicated

    scenario.run(run)
