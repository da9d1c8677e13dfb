"""No event is lost, whatever dies (issue 12): 200 pending push users of an external app server
(an XMPP client that answers every publish), messages streaming to them at over 200 a second,
and the Python process SIGKILLed, the port owner killed, the port closing under a write.

One ejabberd for the module: the pending sessions are made once, each test connects the app
server again (same full JID) and its own senders. A message is identified by its body, which
every publish carries; duplicates are allowed only for publishes in flight at a crash, which
the next Python process reports ("N notification(s) not answered before the restart ...")."""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import shutil
import signal
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from devtools.instance import Instance
from tests.conftest import Scenario
from tests.xmpp_peers import AppServer, Client, Peers, Publish

pytestmark = pytest.mark.e2e

USERS = 200
RATE = 250  # messages a second
APP = "app@localhost/appserver"
IN_FLIGHT = re.compile(r"(\d+) notification\(s\) not answered before the restart")
CRASHES = re.compile(r"CRASH REPORT|exception error|bad argument|child_terminated|"
                     r"mod_push_py\S* terminating")


@dataclass
class Faults:
    instance: Instance
    scenario: Scenario
    users: dict[str, str] = field(default_factory=dict)  # node -> the user's full JID
    senders: Iterator[int] = field(default_factory=lambda: itertools.count(1))

    def run(self, scenario: Callable[[Peers], Awaitable[None]]) -> None:
        self.scenario.run(scenario)

    def status(self) -> str:
        return self.instance.ctl("push_status", self.instance.host)

    def python_pid(self) -> int:
        found = re.search(r"Python process up since .*\(pid (\d+)", self.status())
        assert found, self.status()
        return int(found.group(1))

    def restarts(self) -> int:
        found = re.search(r"restarted (\d+) time", self.status())
        assert found, self.status()
        return int(found.group(1))

    async def app_server(self, peers: Peers) -> AppServer:
        return await peers.app_server(APP, "pw")

    async def sender(self, peers: Peers) -> Client:
        return await peers.user(f"sender{next(self.senders) % 4}@localhost", "pw")


def _faults(options: dict[str, object]) -> Iterator[Faults]:
    folder = Path(tempfile.mkdtemp(prefix="pymod_push-faults-"))
    folder.chmod(0o755)
    # No registration may be disabled while the app server is away between two tests.
    instance = Instance(folder, options={"include_message_bodies": True,
                                         "max_publish_errors": 100_000, **options})
    instance.write_config()
    try:
        instance.start()
        names = ["app", *(f"sender{n}" for n in range(4)), *(f"u{n}" for n in range(USERS))]
        instance.erl("[ejabberd_auth:try_register(list_to_binary(N), <<\"localhost\">>, "
                     "<<\"pw\">>) || N <- [" + ",".join(f'"{n}"' for n in names) + "]]")
        made = Faults(instance, Scenario(instance))
        made.run(lambda peers: _pending_users(made, peers))
        yield made
    finally:
        instance.discard()
        if not (folder / "keep").exists():
            shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def faults() -> Iterator[Faults]:
    yield from _faults({})


@pytest.fixture(scope="module")
def faults_on_postgresql(postgres: Any) -> Iterator[Faults]:
    """The same with the state in PostgreSQL (db_url), whose commits the Python process
    does not wait for (it handles the next events meanwhile)."""
    yield from _faults({"db_url": postgres.new_database()})


async def _pending_users(faults: Faults, peers: Peers) -> None:
    """USERS push users of the app server, with pending sessions."""
    await faults.app_server(peers)
    mark = faults.instance.log_mark()

    async def one(n: int) -> Client:
        client = await peers.user(f"u{n}@localhost", "pw")
        await client.enable_push(APP, f"n{n}")
        faults.users[f"n{n}"] = client.boundjid.full
        return client

    for start in range(0, USERS, 25):
        clients = await asyncio.gather(*(one(n) for n in range(start, min(start + 25, USERS))))
        for client in clients:
            client.drop()

    def all_pending() -> None:
        deadline = time.monotonic() + 60
        while True:
            with open(faults.instance.log_file, "rb") as handle:
                handle.seek(mark)
                if handle.read().decode(errors="replace").count(" is pending") >= USERS:
                    return
            assert time.monotonic() < deadline, "not every push session became pending"
            time.sleep(0.1)

    await asyncio.to_thread(all_pending)


def _body(publish: Publish) -> str:
    return publish.summary.get("last-message-body", "")


@dataclass
class Tally:
    """What was sent to whom, and what the app server got."""

    prefix: str
    expected: dict[str, set[str]] = field(default_factory=dict)  # node -> bodies

    def add(self, node: str, body: str) -> None:
        self.expected.setdefault(node, set()).add(body)

    def missing(self, app: AppServer) -> int:
        return sum(len(bodies - {_body(p) for p in app.received.get(node, [])})
                   for node, bodies in self.expected.items())

    def duplicates(self, app: AppServer) -> int:
        mine = Counter((node, _body(p)) for node, publishes in app.received.items()
                       for p in publishes if _body(p).startswith(self.prefix))
        return sum(count - 1 for count in mine.values())

    async def wait_delivered(self, app: AppServer, timeout: float = 90) -> int:
        """Wait until every message was pushed, or nothing new arrived for 20 s; the number
        of messages never pushed."""
        deadline = time.monotonic() + timeout
        seen, quiet_since = -1, time.monotonic()
        while (missing := self.missing(app)) and time.monotonic() < deadline:
            total = sum(len(p) for p in app.received.values())
            if total != seen:
                seen, quiet_since = total, time.monotonic()
            elif time.monotonic() - quiet_since > 20:
                break
            await asyncio.sleep(0.2)
        return missing


async def stream(faults: Faults, senders: list[Client], tally: Tally, stop: asyncio.Event
                 ) -> tuple[int, float]:
    """Messages round robin to the pending users at RATE a second until ``stop``; returns how
    many were sent and in how many seconds."""
    nodes = list(faults.users)
    started = time.monotonic()
    sent = 0
    while not stop.is_set():
        due = int((time.monotonic() - started) * RATE)
        while sent < due:
            node = nodes[sent % len(nodes)]
            body = f"{tally.prefix}{sent}"
            tally.add(node, body)
            senders[sent % len(senders)].send_message(mto=faults.users[node], mbody=body,
                                                      mtype="chat")
            sent += 1
        await asyncio.sleep(0.01)
    return sent, time.monotonic() - started


def in_flight(instance: Instance, mark: int) -> int:
    """Publishes a new Python process found unanswered (sent again) since the mark."""
    with open(instance.log_file, "rb") as handle:
        handle.seek(mark)
        text = handle.read().decode(errors="replace")
    return sum(int(n) for n in IN_FLIGHT.findall(text))


def report(name: str, sent: str, lost: int, duplicates: int, flight: list[int]) -> None:
    print(f"\n{name}: {sent}; lost {lost}, duplicates {duplicates}, publishes in flight at "
          f"the kills {flight} (total {sum(flight)})")


def rate(sent: int, seconds: float) -> str:
    return f"{sent} messages in {seconds:.1f} s ({sent / seconds:.0f}/s) to {USERS} pending users"


async def end_stream(app: AppServer, tally: Tally, streaming: asyncio.Future[tuple[int, float]],
                     stop: asyncio.Event, name: str, flight: list[int]) -> None:
    """Stop the stream a second after the last fault, wait for every message's push and
    check the counts: none lost, duplicates only from publishes in flight at the faults."""
    await asyncio.sleep(1.0)
    stop.set()
    sent, seconds = await streaming
    lost = await tally.wait_delivered(app)
    duplicates = tally.duplicates(app)
    report(name, rate(sent, seconds), lost, duplicates, flight)
    assert sent / seconds >= 200
    assert lost == 0
    assert duplicates <= sum(flight)


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_sigkill_of_python_three_times_under_load(database: str,
                                                  request: pytest.FixtureRequest) -> None:
    faults: Faults = request.getfixturevalue(
        "faults" if database == "sqlite" else "faults_on_postgresql")
    instance = faults.instance
    tally = Tally("kill9-")
    restarts = faults.restarts()
    flight: list[int] = []

    async def run(peers: Peers) -> None:
        app = await faults.app_server(peers)
        senders = [await faults.sender(peers) for _ in range(2)]
        stop = asyncio.Event()
        streaming = asyncio.ensure_future(stream(faults, senders, tally, stop))
        for _ in range(3):
            pid = await asyncio.to_thread(faults.python_pid)
            await asyncio.sleep(1.0)  # the stream reaches this process
            mark = instance.log_mark()
            os.kill(pid, signal.SIGKILL)
            await asyncio.to_thread(instance.wait_ready, mark)  # the next one is up
            flight.append(in_flight(instance, mark))
        await end_stream(app, tally, streaming, stop, "SIGKILL of Python x3", flight)

    faults.run(run)
    assert faults.restarts() == restarts + 3


def test_port_closing_under_a_write_never_crashes_the_port_owner(faults: Faults) -> None:
    """Deterministic: the port owner is suspended with 100 events in its mailbox (more than
    one batch), Python is SIGKILLed and its port closes, then the owner resumes and writes a
    full batch to the closed port, its exit_status queued behind. Six times in a row."""
    instance = faults.instance
    tally = Tally("race-")
    rounds, per_round = 6, 100
    nodes = list(faults.users)[:per_round]
    sessions = []
    for node in nodes:
        user, resource = faults.users[node].split("/", 1)
        sessions.append(f'{{<<"{user.split("@")[0]}">>, <<"{resource}">>, "{node}"}}')
    for r in range(rounds):
        for node in nodes:
            tally.add(node, f"race-{r}-{node}")
    mark = instance.log_mark()

    async def run(peers: Peers) -> None:
        app = await faults.app_server(peers)
        result = await asyncio.to_thread(instance.erl, _RACE % {
            "rounds": rounds, "sessions": ",".join(sessions)}, 240)
        same_owner, closed_under_write = result.strip("{}").split(",")
        assert same_owner == "true", result  # never restarted by its supervisor
        assert closed_under_write == str(rounds), result
        lost = await tally.wait_delivered(app)
        duplicates = tally.duplicates(app)
        flight = in_flight(instance, mark)
        report(f"port closed under a write x{rounds}", f"{rounds * per_round} messages", lost,
               duplicates, [flight])
        assert lost == 0
        assert duplicates <= flight

    faults.run(run)
    log = instance.log_file.read_bytes()[mark:].decode(errors="replace")
    assert log.count("Python process exited with status") == rounds
    assert not [line for line in log.splitlines() if CRASHES.search(line)]


# In the node: wait until Python is up and no publish waits for the app server's answer
# (so that no push is in flight at the kill, and none may come twice), suspend the port
# owner, queue the events (the c2s_handle_send hook of each pending session, as for a
# message to it), kill Python, wait until its port is closed, resume. Returns
# {SameOwner, RoundsWithClosedPort}.
_RACE = """
Host = <<"localhost">>,
Owner = whereis(mod_push_py_localhost),
Up = fun Up(N) ->
         Status = mod_push_py_commands:push_status(Host),
         case {string:find(Status, "Python process up"),
               string:find(Status, "awaiting an app server's answer: 0,")} of
             {_, nomatch} when N > 0 -> timer:sleep(50), Up(N - 1);
             {nomatch, _} when N > 0 -> timer:sleep(50), Up(N - 1);
             {_, nomatch} -> error(python_not_up);
             {nomatch, _} -> error(python_not_up);
             _ -> ok
         end
     end,
Closed = fun Closed(Port, N) ->
             case erlang:port_info(Port) of
                 undefined -> 1;
                 _ when N > 0 -> timer:sleep(5), Closed(Port, N - 1);
                 _ -> 0
             end
         end,
Round = fun(R) ->
    Up(400),
    {links, Links} = process_info(Owner, links),
    [Port] = [P || P <- Links, is_port(P)],
    {os_pid, OsPid} = erlang:port_info(Port, os_pid),
    sys:suspend(Owner),
    [begin
         Body = iolist_to_binary(io_lib:format("race-~B-~s", [R, Node])),
         Xml = <<"<message xmlns='jabber:client' from='sender0@localhost/race' to='",
                 U/binary, "@localhost/", Res/binary, "' type='chat' id='", Body/binary,
                 "'><body>", Body/binary, "</body></message>">>,
         Pkt = xmpp:decode(fxml_stream:parse_element(Xml)),
         mod_push_py:c2s_handle_send(#{push_py => 1, mgmt_state => pending, lserver => Host,
                                       user => U, server => Host, resource => Res}, Pkt, ok)
     end || {U, Res, Node} <- [%(sessions)s]],
    os:cmd("kill -9 " ++ integer_to_list(OsPid)),
    Done = Closed(Port, 1000),
    sys:resume(Owner),
    Done
end,
Count = lists:sum([Round(R) || R <- lists:seq(0, %(rounds)d - 1)]),
Up(400),
{whereis(mod_push_py_localhost) == Owner, Count}
"""


def test_port_owner_killed_under_load(faults: Faults) -> None:
    instance = faults.instance
    tally = Tally("owner-")
    restarts = faults.restarts()
    flight: list[int] = []
    owners: list[str] = []

    async def run(peers: Peers) -> None:
        app = await faults.app_server(peers)
        senders = [await faults.sender(peers) for _ in range(2)]
        stop = asyncio.Event()
        streaming = asyncio.ensure_future(stream(faults, senders, tally, stop))
        for _ in range(2):
            await asyncio.sleep(1.0)
            mark = instance.log_mark()
            owners.append(await asyncio.to_thread(
                instance.erl, "P = whereis(mod_push_py_localhost), exit(P, kill), P"))
            await asyncio.to_thread(instance.wait_for_log, r"the port owner restarted", mark)
            await asyncio.to_thread(instance.wait_ready, mark)
            flight.append(in_flight(instance, mark))
        await end_stream(app, tally, streaming, stop, "port owner killed x2", flight)

    faults.run(run)
    assert len(set(owners)) == 2  # a new port owner each time
    assert faults.restarts() == restarts + 2


def test_a_push_iq_is_answered_though_the_port_owner_dies(faults: Faults) -> None:
    """The enable reaches a port owner that is stuck (suspended), which is then killed: the
    next port owner finds the IQ and its event in the keeper's tables, and Python answers."""
    instance = faults.instance
    instance.erl("sys:suspend(whereis(mod_push_py_localhost))")

    async def run(peers: Peers) -> None:
        user = await faults.sender(peers)
        mark = instance.log_mark()
        # Kill the port owner once the IQ waits in its table (and its event in the mailbox).
        killing = asyncio.ensure_future(asyncio.to_thread(instance.erl, """
            Wait = fun W(N) ->
                       case ets:match(mod_push_py_meta_localhost, {{iq, '$1'}, '_', '_'}) of
                           [] when N > 0 -> timer:sleep(10), W(N - 1);
                           Found -> length(Found)
                       end
                   end,
            Waiting = Wait(1000),
            exit(whereis(mod_push_py_localhost), kill),
            Waiting"""))
        await asyncio.sleep(0)
        answer = asyncio.ensure_future(user.enable_push(APP, "iq-node"))
        assert await killing == "1"
        result = await answer  # an error answer raises IqError
        assert result["type"] == "result"
        await asyncio.to_thread(instance.wait_for_log, r"the port owner restarted", mark)
        await asyncio.to_thread(instance.wait_ready, mark)

    faults.run(run)


def test_pythons_hello_facts_outlive_the_port_owner(faults: Faults) -> None:
    """What Python's hello told the shim (the account's disco features, the app server's
    commands on the host) is in the keeper's table: it is there while the next port owner
    has no Python process yet, and the hooks answer with it meanwhile."""
    instance = faults.instance
    mark = instance.log_mark()
    found = instance.erl("""
        exit(whereis(mod_push_py_localhost), kill),
        timer:sleep(50),
        {ets:lookup(mod_push_py_meta_localhost, python),
         ets:lookup(mod_push_py_meta_localhost, {python_fact, features})}""")
    assert found.startswith("{[{python,false}],"), found  # the next Python not started yet
    assert "<<\"urn:xmpp:push:0\">>" in found and "<<\"tigase:push:encrypt:0\">>" in found
    instance.wait_for_log(r"the port owner restarted", mark)
    instance.wait_ready(mark)
