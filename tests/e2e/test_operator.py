"""Operator features on a real ejabberd of their own: ejabberdctl commands (push_wake_all and
push_delete_old act on every user of the host) and the example push logic module."""

from __future__ import annotations

import asyncio
import re
import shutil
import statistics
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from devtools.instance import Instance, free_port
from tests.conftest import Scenario
from tests.xmpp_peers import Peers

pytestmark = pytest.mark.e2e

METRICS_PORT = free_port()
EXAMPLE_LOGIC = str(Path(__file__).resolve().parent.parent.parent / "examples" / "push_logic.py")

COMMANDS = {"push_status": "Status of mod_push_py", "push_list": "List a user's push",
            "push_delete": "Delete a user's push", "push_test": "Send a test push",
            "push_wake_all": "Wake every pending push session",
            "push_delete_old": "Delete push registrations enabled more than N days ago",
            "push_reload_logic": ("Load the push logic module (option logic) and the "
                                  "python providers again"),
            "push_diagnose": "Push check-up of a user: why do they get no notifications?",
            "push_diagnose_test": "Push check-up of a user, with a test push to each"}


@pytest.fixture(scope="module")
def instance() -> Iterator[Instance]:
    folder = Path(tempfile.mkdtemp(prefix="pymod_push-commands-"))
    folder.chmod(0o755)
    logic_file = folder / "push_logic.py"  # a copy: test_reloading_... edits it
    shutil.copy(EXAMPLE_LOGIC, logic_file)
    logic_file.chmod(0o644)
    made = Instance(folder, options={"logic": str(logic_file),
                                     "metrics_listen": f"127.0.0.1:{METRICS_PORT}"})
    made.write_config()
    try:
        made.start()
        yield made
    finally:
        made.discard()
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.parametrize(("command", "description"), COMMANDS.items())
def test_every_command_has_help(instance: Instance, command: str, description: str) -> None:
    text = instance.ctl("help", command)
    assert f"Command Name: {command}" in text and "Tags: push" in text
    assert description in " ".join(text.split())


def test_status_list_test_wake_delete(instance: Instance) -> None:
    scenario = Scenario(instance)

    async def run(peers: Peers) -> None:
        server, phone, sender = await scenario.cast(peers)
        await phone.enable_push(server.boundjid.full, "cmd-node")
        user = phone.boundjid.user

        status = await asyncio.to_thread(instance.ctl, "push_status", "localhost")
        assert "Python process up since" in status and "pymod_push" in status
        assert "push registrations: 1" in status

        listed = await asyncio.to_thread(instance.ctl, "push_list", user, "localhost")
        assert f"session {phone.boundjid.resource}: {server.boundjid.full} node cmd-node" \
            in listed

        sent = await asyncio.to_thread(instance.ctl, "push_test", user, "localhost")
        assert "sent 1 test push" in sent
        (test_push,) = await server.wait_for("cmd-node", 1)
        assert test_push.summary["message-count"] == "0"

        await scenario.go_pending(phone)
        woken = await asyncio.to_thread(instance.ctl, "push_wake_all", "localhost")
        assert "woke 1 pending push session" in woken
        await server.wait_for("cmd-node", 2)

        status = await asyncio.to_thread(instance.ctl, "push_status", "localhost")
        assert "woken 2" in status and "published 2" in status

        deleted = await asyncio.to_thread(instance.ctl, "push_delete", user, "localhost",
                                          "cmd-node")
        assert "deleted 1 push registration" in deleted
        listed = await asyncio.to_thread(instance.ctl, "push_list", user, "localhost")
        assert "no push registrations" in listed
        # No push any more: the next one the app server sees is from a new registration.
        sender.send_message(mto=phone.boundjid.full, mbody="after delete", mtype="chat")

        other, = [await peers.user(*await asyncio.to_thread(scenario.account, "carol"))]
        await other.enable_push(server.boundjid.full, "old-node")
        old = await asyncio.to_thread(instance.ctl, "push_delete_old", "localhost", "0")
        assert "deleted 1 push registration" in old
        listed = await asyncio.to_thread(instance.ctl, "push_list", other.boundjid.user,
                                         "localhost")
        assert "no push registrations" in listed
        assert len(server.received["cmd-node"]) == 2  # nothing after the delete

    scenario.run(run)


def test_commands_answer_clearly_when_arguments_are_wrong(instance: Instance) -> None:
    text = instance.ctl("push_status", "nosuchhost.example", check=False)
    assert "not running on nosuchhost.example" in text
    text = instance.ctl("push_delete", "nobody", "localhost", "no-such-node")
    assert "deleted 0 push registration(s)" in text


def test_the_example_push_logic_module(instance: Instance) -> None:
    scenario = Scenario(instance)

    async def run(peers: Peers) -> None:
        server, phone, sender = await scenario.cast(peers)
        bot = await peers.user(*await asyncio.to_thread(scenario.account, "botty"))
        await phone.enable_push(server.boundjid.full, "logic-node")
        await scenario.go_pending(phone)
        bot.send_message(mto=phone.boundjid.full, mbody="beep", mtype="chat")
        sender.send_message(mto=phone.boundjid.full, mbody="urgent: call me", mtype="chat")
        (push,) = await server.wait_for("logic-node", 1)
        assert push.summary["last-message-priority"] == "high"
        assert push.summary["message-count"] == "1"  # the bot's message did not count
        sender.send_message(mto=phone.boundjid.full, mbody="later", mtype="chat")
        pushes = await server.wait_for("logic-node", 2)
        assert "last-message-priority" not in pushes[1].summary

    scenario.run(run)


def test_reloading_the_push_logic_without_a_restart(instance: Instance) -> None:
    """An edited module is used from push_reload_logic on; a broken one is refused with
    its reason (answer and log), and the one running stays; the process never restarts."""
    scenario = Scenario(instance)
    logic_file = instance.folder / "push_logic.py"
    tagging = ("def summary(message, recipient, fields):\n"
               "    return {**fields, 'last-message-body': 'v2: ' + message.body}\n")

    async def run(peers: Peers) -> None:
        server, phone, sender = await scenario.cast(peers)
        await phone.enable_push(server.boundjid.full, "reload-node")
        await scenario.go_pending(phone)
        pid = await asyncio.to_thread(instance.ctl, "push_status", "localhost")

        async def pushed_body(text: str, count: int) -> str:
            sender.send_message(mto=phone.boundjid.full, mbody=text, mtype="chat")
            pushes = await server.wait_for("reload-node", count)
            return str(pushes[count - 1].summary.get("last-message-body", ""))

        logic_file.write_text(tagging)
        assert await pushed_body("one", 1) == ""  # bodies are off: the example is running
        answer = await asyncio.to_thread(instance.ctl, "push_reload_logic", "localhost")
        assert answer.strip() == f"push logic {logic_file} reloaded: summary"
        assert await pushed_body("two", 2) == "v2: two"

        mark = instance.log_mark()
        for broken, reason in [("def summary(:\n", "does not import (SyntaxError"),
                               ("def summary(message, recipient, fields):\n"
                                "    return None\n", "summary returned NoneType")]:
            logic_file.write_text(broken)
            answer = await asyncio.to_thread(instance.ctl, "push_reload_logic", "localhost")
            assert answer.startswith(f"error: push logic {logic_file} not reloaded: ")
            assert reason in answer and answer.rstrip().endswith("the running one stays")
            await asyncio.to_thread(instance.wait_for_log,
                                    rf"push logic .* not reloaded: .*{re.escape(reason)}", mark)
        assert await pushed_body("three", 3) == "v2: three"  # still the last good one
        status = await asyncio.to_thread(instance.ctl, "push_status", "localhost")
        assert _process_line(status) == _process_line(pid)  # no restart meanwhile

    try:
        scenario.run(run)
    finally:
        shutil.copy(EXAMPLE_LOGIC, logic_file)
        assert "reloaded" in instance.ctl("push_reload_logic", "localhost")


ASYNC_LOGIC = """
import asyncio

async def should_push(message, recipient, default):
    if recipient.user.startswith("slowpoke"):
        await asyncio.sleep(5)  # a service of the admin's that does not answer
    return default

async def summary(message, recipient, fields):
    await asyncio.sleep(0.005)  # one that does
    return {**fields, "asked": "yes"}
"""


def test_an_async_hook_that_hangs_delays_no_other_user(instance: Instance) -> None:
    """With async push logic whose should_push hangs for one user: that user's pushes
    come after the budget (50 ms each), in order, with our defaults; another user's push,
    sent while they wait, is not delayed (printed), and gets the logic's summary."""
    scenario = Scenario(instance)
    logic_file = instance.folder / "push_logic.py"

    async def run(peers: Peers) -> None:
        server, phone, sender = await scenario.cast(peers)
        slow = await peers.user(*await asyncio.to_thread(scenario.account, "slowpoke"))
        await phone.enable_push(server.boundjid.full, "quick-node")
        await slow.enable_push(server.boundjid.full, "slow-node")
        await scenario.go_pending(phone)
        await scenario.go_pending(slow)

        async def latency(label: str, count: int) -> float:
            started = time.monotonic()
            sender.send_message(mto=phone.boundjid.full, mbody=label, mtype="chat")
            pushes = await server.wait_for("quick-node", count)
            assert pushes[-1].summary["asked"] == "yes"
            return time.monotonic() - started

        quiet = [await latency(f"quiet {n}", n + 1) for n in range(5)]
        for n in range(10):  # 10 notifications wait for should_push, 50 ms each at most
            sender.send_message(mto=slow.boundjid.full, mbody=f"slow {n}", mtype="chat")
        during = await latency("during", 6)
        slow_pushes = await server.wait_for("slow-node", 10)
        assert [p.summary["message-count"] for p in slow_pushes] == [str(n) for n in
                                                                     range(1, 11)]
        assert all("asked" not in p.summary for p in slow_pushes)  # no time left for it
        delay = during - statistics.median(quiet)
        print(f"\nanother user's push while 10 notifications waited for a hanging hook: "
              f"{during * 1000:.1f} ms (quiet median {statistics.median(quiet) * 1000:.1f} ms)")
        assert delay <= 0.1

    logic_file.write_text(ASYNC_LOGIC)
    try:
        assert "reloaded" in instance.ctl("push_reload_logic", "localhost")
        scenario.run(run)
    finally:
        shutil.copy(EXAMPLE_LOGIC, logic_file)
        assert "reloaded" in instance.ctl("push_reload_logic", "localhost")


def _process_line(status: str) -> str:
    return next(line for line in status.splitlines() if "Python process up since" in line)


def test_prometheus_metrics(instance: Instance) -> None:
    scenario = Scenario(instance)

    def scrape() -> str:
        url = f"http://127.0.0.1:{METRICS_PORT}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
            return str(response.read().decode())

    async def run(peers: Peers) -> None:
        server, phone, sender = await scenario.cast(peers)
        await phone.enable_push(server.boundjid.full, "metrics-node")
        await scenario.go_pending(phone)
        sender.send_message(mto=phone.boundjid.full, mbody="counted", mtype="chat")
        await server.wait_for("metrics-node", 1)

    before = scrape()
    scenario.run(run)
    after = scrape()

    def value(text: str, line_start: str) -> float:
        found = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                 if line.startswith(line_start)]
        return found[0] if found else 0.0

    published = 'pymod_push_publishes_total{host="localhost",outcome="published"}'
    assert value(after, published) >= value(before, published) + 1
    pending = 'pymod_push_events_total{host="localhost",type="SessionPending"}'
    assert value(after, pending) >= value(before, pending) + 1
    assert value(after, 'pymod_push_registrations{host="localhost"}') >= 1
    assert "# TYPE pymod_push_provider_latency_seconds histogram" in after
    with pytest.raises(urllib.error.HTTPError):
        urllib.request.urlopen(f"http://127.0.0.1:{METRICS_PORT}/other", timeout=10)


def test_python_logging_follows_ejabberds_loglevel(instance: Instance) -> None:
    mark = instance.log_mark()
    instance.ctl("set_loglevel", "debug")
    try:
        instance.wait_for_log(r"pymod_push: log level now debug, as ejabberd's", mark)
    finally:
        instance.ctl("set_loglevel", "info")
