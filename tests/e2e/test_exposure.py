"""What a user of this server, or of another, cannot turn against others (issue 29, rows 10,
11, 12 and the access_backends default), against a real ejabberd:

- push enabled toward someone's client or a component that is no app server reaches it
  max_publish_errors times, then the registration is disabled;
- the built-in app server serves this server's own users by default, not a JID of another
  domain (a component's user stands for one here), unless access_backends is all;
- the database files are 0600 and the Python process's umask 077;
- modules planted in the port's working directory (the spool) are not imported;
- what is remembered per pending session is bounded by mod_stream_mgmt's max_ack_queue.

One ejabberd for the module, with a component listener (comp.localhost) and, in its spool
before it starts, a json.py and a pymod_push.py that leave a mark if they ever run."""

from __future__ import annotations

import asyncio
import re
import shutil
import stat
import subprocess
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.sax.saxutils import quoteattr

import pytest
import yaml
from slixmpp import ComponentXMPP
from slixmpp.exceptions import IqError
from slixmpp.xmlstream.handler import Callback
from slixmpp.xmlstream.matcher import MatchXPath

from devtools.instance import EJABBERD_USER, Instance, free_port
from tests.conftest import Scenario
from tests.xmpp_peers import NS_COMMANDS, NS_DATA, NS_PUBSUB, TIMEOUT, Client, Peers

pytestmark = pytest.mark.e2e

COMPONENT = "comp.localhost"
COMPONENT_SECRET = "component-secret"
REGISTER_HOST = "push.localhost"
PLANTED = {"json.py": "planted-json-ran", "pymod_push.py": "planted-pymod_push-ran"}
NS_STANZAS = "urn:ietf:params:xml:ns:xmpp-stanzas"
LOG_TIMEOUT = 20.0
MAX_ACK_QUEUE = 700  # for what the fixed code logs at once; the old code never does


@dataclass
class Setup:
    scenario: Scenario
    component_port: int


@pytest.fixture(scope="module")
def setup() -> Iterator[Setup]:
    folder = Path(tempfile.mkdtemp(prefix="pymod_push-exposure-"))
    folder.chmod(0o755)
    component_port = free_port()
    # A backend that registration alone exercises (its endpoint is never reached here).
    backend = {"type": "ubuntu", "register_host": REGISTER_HOST,
               "pubsub_host": "pubsub.localhost", "endpoint": f"https://127.0.0.1:{free_port()}"}
    instance = Instance(folder, options={"backends": [backend]}, modules={"mod_stream_mgmt": {
        "resume_timeout": 300, "resend_on_timeout": "if_offline", "max_ack_queue": MAX_ACK_QUEUE}})
    instance.write_config()
    config_file = folder / "ejabberd.yml"
    config = yaml.safe_load(config_file.read_text())
    config["listen"].append({"port": component_port, "ip": "127.0.0.1",
                             "module": "ejabberd_service",
                             "hosts": {COMPONENT: {"password": COMPONENT_SECRET}}})
    config_file.write_text(yaml.safe_dump(config, sort_keys=False))
    for name, mark in PLANTED.items():
        (instance.spool / name).write_text(
            "import pathlib\n"
            f"pathlib.Path(__file__).with_name({mark!r}).write_text('ran')\n")
    subprocess.run(["chown", "-R", f"{EJABBERD_USER}:{EJABBERD_USER}", str(folder)],
                   check=True)
    try:
        instance.start()
        yield Setup(Scenario(instance), component_port)
    finally:
        instance.discard()
        shutil.rmtree(folder, ignore_errors=True)


class Component(ComponentXMPP):
    """comp.localhost: answers publishes with an error, counting them."""

    def __init__(self, port: int) -> None:
        super().__init__(COMPONENT, COMPONENT_SECRET, "127.0.0.1", port)
        self.publishes = 0
        self.register_handler(Callback("publish", MatchXPath(
            f"{{jabber:component:accept}}iq/{{{NS_PUBSUB}}}pubsub"), self._on_publish))

    def _on_publish(self, iq: Any) -> None:
        if iq["type"] == "set":
            self.publishes += 1
            _answer_error(iq, "feature-not-implemented")

    async def online(self) -> Component:
        started = asyncio.get_running_loop().create_future()
        self.add_event_handler("session_start",
                               lambda _: started.done() or started.set_result(1),
                               disposable=True)
        self.connect()
        await asyncio.wait_for(started, TIMEOUT)
        return self

    async def register(self, sender: str) -> Any:
        """The built-in app server's registration command, from sender (of this domain)."""
        iq = self.make_iq_set(ito=REGISTER_HOST, ifrom=sender)
        iq.append(_register_command())
        return await iq.send(timeout=TIMEOUT)


def _answer_error(iq: Any, condition: str) -> None:
    """A 'cancel' error in the stream's own namespace (slixmpp's error element would be in
    jabber:client's also on a component's stream, where ejabberd does not read it)."""
    iq.stream.send_raw(
        f"<iq type='error' id={quoteattr(iq['id'])} from={quoteattr(iq['to'].full)} "
        f"to={quoteattr(iq['from'].full)}><error type='cancel'><{condition} "
        f"xmlns='{NS_STANZAS}'/></error></iq>")


def _register_command() -> ET.Element:
    return ET.fromstring(
        f"<command xmlns='{NS_COMMANDS}' node='register-push-ubuntu' action='execute'>"
        f"<x xmlns='{NS_DATA}' type='submit'>"
        "<field var='token'><value>ubuntu-token</value></field>"
        "<field var='application-id'><value>org.example.app</value></field></x></command>")


class Victim(Client):
    """Someone's client, online: answers publishes as a client would (service-unavailable),
    counting them."""

    def __init__(self, jid: str, password: str, port: int) -> None:
        super().__init__(jid, password, port)
        self.publishes = 0
        self.register_handler(Callback("publish", MatchXPath(
            f"{{jabber:client}}iq/{{{NS_PUBSUB}}}pubsub"), self._on_publish))

    def _on_publish(self, iq: Any) -> None:
        if iq["type"] == "set":
            self.publishes += 1
            _answer_error(iq, "service-unavailable")


def _log_count(instance: Instance, pattern: str, count: int, mark: int,
               timeout: float = LOG_TIMEOUT) -> None:
    regex = re.compile(pattern)
    deadline = time.monotonic() + timeout
    while len(regex.findall(instance.log_file.read_bytes()[mark:].decode(errors="replace"))) \
            < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"fewer than {count} log lines matching {pattern!r}")
        time.sleep(0.05)


def _awaiting_answer(instance: Instance) -> int:
    status = instance.ctl("push_status", instance.host)
    found = re.search(r"awaiting an app server's answer: (\d+)", status)
    assert found is not None, status
    return int(found.group(1))


def test_push_toward_a_client_or_component_stops_after_max_publish_errors(
        setup: Setup) -> None:
    """mallory enables push toward a victim's full JID and toward a component, then gets
    10 messages while pending: each victim gets max_publish_errors (3) publishes, not 20
    (10 and their retries), and then none; mallory's real app server gets all 10."""
    scenario = setup.scenario
    instance = scenario.instance
    messages = 10

    async def run(peers: Peers) -> None:
        accounts = await asyncio.to_thread(
            lambda: [scenario.account(p) for p in ("app", "mallory", "bob", "victim")])
        app = await peers.app_server(*accounts[0])
        mallory = await peers.user(*accounts[1])
        bob = await peers.user(*accounts[2])
        victim = Victim(*accounts[3], peers.port)
        peers.clients.append(victim)
        await victim.online()
        component = Component(setup.component_port)
        peers.clients.append(component)
        await component.online()
        await mallory.enable_push(victim.boundjid.full, "reflect")
        await mallory.enable_push(COMPONENT, "reflect")
        await mallory.enable_push(app.boundjid.full, "witness")
        mark = instance.log_mark()
        await scenario.go_pending(mallory)
        who = re.escape(f"{mallory.boundjid.user}/{mallory.boundjid.resource}")
        targets = [re.escape(victim.boundjid.full), re.escape(COMPONENT)]
        for n in range(messages):
            bob.send_message(mto=mallory.boundjid.full, mbody=f"m{n}", mtype="chat")
            await app.wait_for("witness", n + 1)
            for target in targets:  # each answer handled before the next message
                if n < 2:
                    pattern = rf"push to {who} at {target} failed .*error {n + 1} of 3"
                elif n == 2:
                    pattern = rf"push disabled for {who} at {target} after 3 error"
                else:
                    continue
                await asyncio.to_thread(_log_count, instance, pattern, 1, mark)
        # Nothing is left to retry toward them: nothing more can reach them.
        await asyncio.to_thread(_wait_nothing_awaiting, instance)
        assert (victim.publishes, component.publishes) == (3, 3)
        assert len(app.received["witness"]) == messages
        (registration,) = [line for line in instance.ctl(
            "push_list", mallory.boundjid.user, instance.host).splitlines() if "witness" in line]
        assert app.boundjid.full in registration

    scenario.run(run)


def _wait_nothing_awaiting(instance: Instance) -> None:
    deadline = time.monotonic() + LOG_TIMEOUT
    while _awaiting_answer(instance) > 0:
        if time.monotonic() > deadline:
            raise TimeoutError("notifications still awaiting an answer")
        time.sleep(0.2)


async def _command_result(client: Client | Component, sender: str | None = None) -> str:
    """How the registration command ends: 'completed' or the error's condition."""
    try:
        if isinstance(client, Component):
            assert sender is not None
            answer = await client.register(sender)
        else:
            iq = client.make_iq_set(ito=REGISTER_HOST)
            iq.append(_register_command())
            answer = await iq.send(timeout=TIMEOUT)
    except IqError as exc:
        return _condition(exc.iq.xml)
    command = answer.xml.find(f"{{{NS_COMMANDS}}}command")
    assert command is not None
    return str(command.get("status"))


def _condition(iq: ET.Element) -> str:
    """The first error's condition, whatever the stream's namespace (slixmpp reads only
    jabber:client's)."""
    for error in (child for child in iq if child.tag.endswith("}error")):
        for condition in error:
            name = condition.tag.rpartition("}")[2]
            if condition.tag.startswith(f"{{{NS_STANZAS}}}") and name != "text":
                return name
    raise AssertionError(f"no error condition in {ET.tostring(iq)!r}")


def test_the_built_in_app_server_serves_local_users_unless_access_backends_is_all(
        setup: Setup) -> None:
    """By default (access_backends: local, defined by no access rule in this server's
    configuration) a JID of another domain is refused with forbidden, this server's own
    user is served; with access_backends: all both are."""
    scenario = setup.scenario
    instance = scenario.instance
    stranger = f"eve@{COMPONENT}/phone"

    async def attempt(peers: Peers) -> tuple[str, str]:
        local = await peers.user(*await asyncio.to_thread(scenario.account, "local"))
        component = Component(setup.component_port)
        peers.clients.append(component)
        await component.online()
        return await _command_result(local), await _command_result(component, stranger)

    results: list[tuple[str, str]] = []

    async def run(peers: Peers) -> None:
        results.append(await attempt(peers))

    scenario.run(run)
    assert results[-1] == ("completed", "forbidden")
    conf = instance.folder / "modules" / "mod_push_py" / "conf" / "mod_push_py.yml"
    original = conf.read_text()
    opened = yaml.safe_load(original)
    opened["modules"]["mod_push_py"]["access_backends"] = "all"
    try:
        conf.write_text(yaml.safe_dump(opened, sort_keys=False))
        mark = instance.log_mark()
        instance.ctl("reload_config")
        instance.wait_ready(mark)
        scenario.run(run)
        assert results[-1] == ("completed", "completed")
    finally:
        conf.write_text(original)
        mark = instance.log_mark()
        instance.ctl("reload_config")
        instance.wait_ready(mark)


def test_the_database_is_private_and_the_process_umask_077(setup: Setup) -> None:
    instance = setup.scenario.instance
    database = instance.spool / f"pymod_push_{instance.host}.sqlite3"
    files = [Path(f"{database}{suffix}") for suffix in ("", "-wal", "-shm")]
    assert files[0].exists() and files[1].exists()
    assert {f.name: stat.S_IMODE(f.stat().st_mode) for f in files if f.exists()} == {
        f.name: 0o600 for f in files if f.exists()}
    pid = instance.python_pid()
    assert pid is not None
    status = Path(f"/proc/{pid}/status").read_text()
    assert re.search(r"^Umask:\s+0077$", status, re.M), status


def test_modules_planted_in_the_spool_are_not_imported(setup: Setup) -> None:
    """The port runs in the spool directory: a json.py or pymod_push.py there would shadow
    the real ones if that directory were on sys.path. The module works (the other tests,
    the process's handshake) and neither planted file ever ran."""
    instance = setup.scenario.instance
    assert all((instance.spool / name).exists() for name in PLANTED)
    pid = instance.python_pid()
    assert pid is not None
    args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    assert b"-P" in args
    assert not [mark for mark in PLANTED.values() if (instance.spool / mark).exists()]


def test_the_bound_on_remembered_messages_is_mod_stream_mgmts_max_ack_queue(
        setup: Setup) -> None:
    instance = setup.scenario.instance
    instance.wait_for_log(rf"ready for {instance.host} .*at most {MAX_ACK_QUEUE} pushed "
                          "messages remembered per pending session")
