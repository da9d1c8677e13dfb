"""Publishes to the module's own app server taken in-process (issue 15), end to end: a real
ejabberd, slixmpp clients, a fake APNs (HTTP/2, TLS).

A push user of the built-in app server makes the module publish to its own pubsub host: that
publish no longer goes out to ejabberd and back as an app_server_iq event (counted in the
metrics), and is answered as the IQ path answers the same publish sent by a client (another
server's publish still takes that path): a good secret, a wrong one, an unknown node, and a
device over its publish rate. Then the Python process is SIGKILLed while messages stream
to such users: each message reaches the fake APNs, none twice beyond what the next process
reports as in flight."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from slixmpp.exceptions import IqError

from devtools.instance import Instance, free_port
from pymod_push.appserver.server import PUBLISH_BURST
from tests.conftest import Scenario
from tests.fake_providers import FakeProvider, fake_apns
from tests.xmpp_peers import NS_DATA, NS_PUSH, Client, Peers, form_fields

pytestmark = pytest.mark.e2e

TOPIC = "org.example.inprocess"
PUBSUB = "pubsub.localhost"
BODIES = {"include-message-bodies": "1"}
IN_FLIGHT = re.compile(r"(\d+) notification\(s\) not answered before the restart")


class Setup:
    def __init__(self, folder: Path) -> None:
        self.apns, backend = fake_apns(folder, "inprocess", TOPIC)
        self.metrics_port = free_port()
        self.instance = Instance(folder, options={
            "backends": [backend], "metrics_listen": f"127.0.0.1:{self.metrics_port}",
            "retry_delays": [2, 2, 2]})
        self.instance.write_config()
        self.scenario = Scenario(self.instance)

    def app_server_iqs(self) -> int:
        """app_server_iq events Python got (each IQ to the app server's hosts)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics",
                                    timeout=10) as answer:
            text = answer.read().decode()
        found = re.search(r'pymod_push_events_total\{[^}]*type="AppServerIq"\} (\d+)', text)
        return int(found.group(1)) if found else 0

    def in_process(self) -> int:
        status = self.instance.ctl("push_status", self.instance.host)
        found = re.search(r"own app server taken in-process: (\d+)", status)
        assert found, status
        return int(found.group(1))


@pytest.fixture
def setup() -> Iterator[Setup]:
    folder = Path(tempfile.mkdtemp(prefix="pymod_push-inprocess-"))
    folder.chmod(0o755)
    made = Setup(folder)
    try:
        made.instance.start()
        yield made
    finally:
        made.instance.discard()
        if not (folder / "keep").exists():
            shutil.rmtree(folder, ignore_errors=True)


def publish_xml(node: str, secret: str | None) -> str:
    options = "" if secret is None else (
        f"<publish-options><x xmlns='{NS_DATA}' type='submit'><field var='FORM_TYPE'>"
        "<value>http://jabber.org/protocol/pubsub#publish-options</value></field>"
        f"<field var='secret'><value>{secret}</value></field></x></publish-options>")
    return (f"<pubsub xmlns='http://jabber.org/protocol/pubsub'><publish node='{node}'><item>"
            f"<notification xmlns='{NS_PUSH}'/></item></publish>{options}</pubsub>")


async def iq_path(client: Client, node: str, secret: str | None) -> str:
    """The answer to a publish a client sends to the pubsub host (the IQ path)."""
    try:
        await client.push_iq(publish_xml(node, secret), to=PUBSUB)
    except IqError as error:
        return f"{error.iq['error']['type']} {error.iq['error']['condition']}"
    return "result"


async def device(client: Client, token: str) -> tuple[str, str]:
    command = await client.command("localhost", "register-push-apns",
                                   {"token": token, "device-id": token[:8]})
    fields = form_fields(command.find(f"{{{NS_DATA}}}x"))
    return fields["node"][0], fields["secret"][0]


def outcome_in_log(setup: Setup, user: Client, mark: int) -> str:
    """What the module made of the answer to its publish for that user: the error it
    logged (as 'push to USER/RES at JID failed (TYPE CONDITION)' or 'push disabled ...
    (last: TYPE CONDITION)')."""
    who = re.escape(f"{user.boundjid.user}/{user.boundjid.resource} at {PUBSUB}")
    line = setup.instance.wait_for_log(rf"push (to {who} failed \(|disabled for {who} after)",
                                       mark, timeout=30)
    found = re.search(r"\((?:last: )?(\w+ [\w-]+)\)", line)
    assert found, line
    return found.group(1)


def bodies(apns: FakeProvider, token: str) -> list[str]:
    return [r.json().get("last-message-body", "") for r in apns.received
            if r.path == f"/3/device/{token}" and r.status == 200]


def test_own_publishes_skip_ejabberd_and_are_answered_as_the_iq_path(setup: Setup) -> None:
    scenario, instance, apns = setup.scenario, setup.instance, setup.apns

    async def run(peers: Peers) -> None:
        jid, password = await asyncio.to_thread(scenario.account, "sender")
        sender = await peers.user(jid, password)
        jid, password = await asyncio.to_thread(scenario.account, "other")
        other_server = await peers.user(jid, password)  # publishes as another server would
        tokens = iter(f"{n:02x}" * 32 for n in range(1, 100))
        cases = {"good secret": "result", "wrong secret": "auth forbidden",
                 "unknown node": "cancel item-not-found",
                 "over the rate": "wait resource-constraint"}
        for case, expected in cases.items():
            jid, password = await asyncio.to_thread(scenario.account, "phone")
            phone = await peers.user(jid, password)
            node, secret = await device(phone, next(tokens))
            # The IQ path, with a device of its own (the rate is per device).
            reference_node, reference_secret = await device(phone, next(tokens))
            sent_secret = "not the secret" if case == "wrong secret" else reference_secret
            sent_node = "no-such-node" if case == "unknown node" else reference_node
            count = PUBLISH_BURST + 1 if case == "over the rate" else 1
            before = setup.app_server_iqs()
            answers = [await iq_path(other_server, sent_node, sent_secret)
                       for _ in range(count)]
            assert setup.app_server_iqs() == before + count
            assert answers[-1] == expected, (case, answers)
            # The module's own publish, for a pending session of that user.
            token = next(tokens)
            if case == "over the rate":
                node, secret = await device(phone, token)
            else:
                token = ""
            await phone.enable_push(PUBSUB, "no-such-node" if case == "unknown node" else node,
                                    secret="not the secret" if case == "wrong secret"
                                    else secret, options=BODIES)
            await scenario.go_pending(phone)
            before, taken, mark = setup.app_server_iqs(), setup.in_process(), instance.log_mark()
            for n in range(count):
                sender.send_message(mto=phone.boundjid.full, mbody=f"{case} {n}", mtype="chat")
            if case == "good secret":
                await apns.wait_for(len(apns.received) + 1)
                assert apns.received[-1].json()["last-message-body"] == "good secret 0"
            else:
                assert await asyncio.to_thread(outcome_in_log, setup, phone, mark) == expected
            if case == "over the rate":  # the refused one is retried, and then goes through
                deadline = time.monotonic() + 30
                while len(bodies(apns, token)) < count and time.monotonic() < deadline:
                    await asyncio.sleep(0.2)
                assert sorted(bodies(apns, token)) == sorted(f"{case} {n}"
                                                             for n in range(count))
            assert setup.app_server_iqs() == before  # nothing came back through ejabberd
            assert setup.in_process() >= taken + count

    scenario.run(run)


def test_sigkill_of_python_while_pushing_in_process_loses_none(setup: Setup) -> None:
    """40 pending users of the built-in app server, 15 messages each streamed round robin,
    Python SIGKILLed a third of the way: every message reaches the fake APNs, and none
    twice beyond the publishes the next process found unanswered (those in flight)."""
    scenario, instance, apns = setup.scenario, setup.instance, setup.apns
    users, per_user = 40, 15  # below the per-device burst: pacing is not what is tested

    async def run(peers: Peers) -> None:
        async def push_user(n: int) -> tuple[Client, str]:
            jid, password = await asyncio.to_thread(scenario.account, "kill")
            client = await peers.user(jid, password)
            token = f"{n + 1:04x}" * 16
            node, secret = await device(client, token)
            await client.enable_push(PUBSUB, node, secret=secret, options=BODIES)
            return client, token

        made = []
        for start in range(0, users, 10):
            made += await asyncio.gather(*(push_user(n) for n in range(start, start + 10)))
        for client, _ in made:
            await scenario.go_pending(client)
        jid, password = await asyncio.to_thread(scenario.account, "sender")
        sender = await peers.user(jid, password)
        status = instance.ctl("push_status", instance.host)
        pid = int(re.search(r"Python process up since .*\(pid (\d+)", status).group(1))  # type: ignore[union-attr]
        expected: dict[str, set[str]] = {}
        killed = 0
        for n in range(per_user * users):
            client, token = made[n % users]
            body = f"kill-{n}"
            expected.setdefault(token, set()).add(body)
            sender.send_message(mto=client.boundjid.full, mbody=body, mtype="chat")
            if n == per_user * users // 3:
                killed = instance.log_mark()
                os.kill(pid, signal.SIGKILL)
            if n % 20 == 19:
                await asyncio.sleep(0.1)  # about 200 a second
        await asyncio.to_thread(instance.wait_ready, killed)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and any(
                wanted - set(bodies(apns, token)) for token, wanted in expected.items()):
            await asyncio.sleep(0.5)
        await asyncio.sleep(2)  # late duplicates would come now
        with open(instance.log_file, "rb") as handle:
            handle.seek(killed)
            flight = sum(int(n) for n in IN_FLIGHT.findall(handle.read().decode(errors="replace")))
        counts = Counter((token, body) for token in expected for body in bodies(apns, token))
        lost = sum(len(wanted - {b for t, b in counts if t == token})
                   for token, wanted in expected.items())
        twice = sum(n - 1 for n in counts.values())
        print(f"\nSIGKILL while pushing in-process: {per_user * users} messages, lost {lost}, "
              f"twice {twice}, in flight at the kill {flight}")
        assert lost == 0
        assert twice <= flight

    scenario.run(run)
