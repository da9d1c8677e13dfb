"""One push per message per registration, end to end, where it used to break: after a Python
restart followed by an ejabberd restart, for a pending session with more than a thousand
queued messages, and while the app server is overloaded for a minute.

Hundreds of users are made with the light client (devtools.xmpp_light: in-band
registration), and the app server is a light client too, counting what it gets per message
body. Each test has an ejabberd of its own (they restart things or change options)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import sqlite3
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from devtools.instance import Instance
from devtools.xmpp_light import IN_BAND_CONFIG, IN_BAND_MODULES, Xmpp
from tests.builders import NS_DATA, NS_PUSH

pytestmark = pytest.mark.e2e

APP_JID = "app@localhost/srv"
BODIES_ON = ("<x xmlns='jabber:x:data' type='submit'><field var='FORM_TYPE'><value>"
             "urn:xmpp:push:options</value></field><field var='include-message-bodies'>"
             "<value>1</value></field></x>")
TIMEOUT = 60.0


@pytest.fixture
def make_instance() -> Iterator[Callable[..., Instance]]:
    made: list[tuple[Instance, Path]] = []

    def make(**options: Any) -> Instance:
        folder = Path(tempfile.mkdtemp(prefix="pymod_push-once-"))
        folder.chmod(0o755)
        instance = Instance(folder, options={"include_message_bodies": True, **options},
                            modules={**IN_BAND_MODULES, "mod_mam": {"default": "always"}},
                            extra_config=IN_BAND_CONFIG)
        instance.write_config()
        made.append((instance, folder))
        instance.start()
        return instance

    try:
        yield make
    finally:
        for instance, folder in made:
            instance.discard()
            shutil.rmtree(folder, ignore_errors=True)


def registration_errors(instance: Instance) -> dict[int, int]:
    """How many registrations have counted how many errors, read from the database."""
    database = instance.spool / f"pymod_push_{instance.host}.sqlite3"
    with contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as db:
        return dict(db.execute("SELECT errors, COUNT(*) FROM registrations GROUP BY errors"))


class AppServer:
    """An external app server: answers every publish with a result, counts the bodies;
    while overloaded, with a 'wait' error instead (nothing counted)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.overloaded = False
        self.bodies: Counter[str] = Counter()
        self.counts: dict[str, str] = {}  # body -> the message-count that came with it
        self.publishes = 0
        self._arrived = asyncio.Event()
        self.client: Xmpp | None = None
        self._reader: asyncio.Task[None] | None = None

    async def connect(self, register: bool = False) -> None:
        client = Xmpp(self.port, "app", "secret", "srv")
        client.on_stanza = self._on_stanza
        # Before connect: publishes waiting for it may come with the bind's answer.
        self.client = client
        await client.connect(register=register)
        self._reader = asyncio.create_task(client.run())

    def _on_stanza(self, element: ET.Element) -> None:
        if not element.tag.endswith("iq") or element.get("type") != "set":
            return
        assert self.client is not None
        if self.overloaded:
            self.client.send(f"<iq type='error' id='{element.get('id')}' "
                             f"to='{element.get('from')}'><error type='wait'>"
                             "<resource-constraint xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/>"
                             "</error></iq>")
            return
        fields = {f.get("var"): f.findtext(f"{{{NS_DATA}}}value")
                  for f in element.iter(f"{{{NS_DATA}}}field")}
        self.publishes += 1
        body = fields.get("last-message-body")
        if body is not None:
            self.bodies[body] += 1
            self.counts[body] = fields.get("message-count") or ""
        self.client.send(f"<iq type='result' id='{element.get('id')}' "
                         f"to='{element.get('from')}'/>")
        self._arrived.set()

    async def wait_until(self, condition: Callable[[], bool], timeout: float = TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            self._arrived.clear()
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"app server: {self.publishes} publishes, "
                                   f"{len(self.bodies)} bodies")
            try:
                await asyncio.wait_for(self._arrived.wait(), left)
            except TimeoutError:
                pass


async def push_user(port: int, name: str, node: str, pending: bool) -> Xmpp:
    """A user registered in band with push enabled at APP_JID (bodies on); with pending,
    stream management is on and the connection is lost, so the session is pending."""
    user = Xmpp(port, name, "secret", "phone")
    await user.connect(register=True)
    if pending:
        user.send("<enable xmlns='urn:xmpp:sm:3' resume='true'/>")
        await user._until(lambda e: e.tag.endswith("enabled"))
    answer = await user.request(f"<iq type='set' id='e'><enable xmlns='{NS_PUSH}' "
                                f"jid='{APP_JID}' node='{node}'>{BODIES_ON}</enable></iq>", "e")
    assert answer.get("type") == "result", ET.tostring(answer)
    user.abort()
    return user


async def push_users(instance: Instance, count: int, pending: bool) -> list[str]:
    mark = instance.log_mark()
    names = [f"push{i}" for i in range(count)]
    for start in range(0, count, 25):
        await asyncio.gather(*(push_user(instance.c2s_port, name, f"n-{name}", pending)
                               for name in names[start:start + 25]))
    if pending:
        await asyncio.to_thread(wait_log_count, instance, r"push session push\d+@localhost/phone "
                                "is pending", count, mark)
    return names


def wait_log_count(instance: Instance, pattern: str, count: int, mark: int,
                   timeout: float = TIMEOUT) -> None:
    regex = re.compile(pattern)
    deadline = time.monotonic() + timeout
    while True:
        found = len(regex.findall(instance.log_file.read_bytes()[mark:].decode(errors="replace")))
        if found >= count:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{found} of {count} log lines matching {pattern!r}")
        time.sleep(0.1)


async def sender(instance: Instance) -> Xmpp:
    client = Xmpp(instance.c2s_port, "sender", "secret", "s")
    await client.connect(register=True)
    return client


def send(client: Xmpp, to: str, body: str) -> None:
    client.send(f"<message type='chat' to='{to}' id='{body}'><body>{body}</body></message>")


def python_pid(instance: Instance, mark: int) -> int:
    ready = instance.wait_for_log(r"Python process ready on", mark)
    return int(re.search(r'pid => <<"(\d+)">>', ready).group(1))  # type: ignore[union-attr]


def awaiting_answer(instance: Instance) -> int:
    status = instance.ctl("push_status", instance.host)
    return int(re.search(r"awaiting an app server's answer: (\d+)", status).group(1))  # type: ignore[union-attr]


def wait_outbox_empty(instance: Instance, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while (left := awaiting_answer(instance)) > 0:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{left} notifications still awaiting an answer")
        time.sleep(0.5)


def test_a_python_restart_then_an_ejabberd_restart_pushes_no_message_twice(
        make_instance: Callable[..., Instance]) -> None:
    """Messages pushed before a crash of the Python process come back as offline and
    archived when `ejabberdctl stop` ends the pending sessions: none is pushed again (the
    marks of what was pushed are in the database, not in the dead process's memory)."""
    instance = make_instance()

    async def before_stop() -> list[str]:
        app = AppServer(instance.c2s_port)
        await app.connect(register=True)
        names = await push_users(instance, 20, pending=True)
        writer = await sender(instance)
        first = [f"first-{n}" for n in range(100)]
        for n, body in enumerate(first):
            send(writer, f"{names[n % 20]}@localhost", body)
        await app.wait_until(lambda: len(app.bodies) == 100)
        # Answered, so not in flight at the kill (those may go twice: at-least-once).
        await asyncio.to_thread(wait_outbox_empty, instance)
        killed = instance.log_mark()
        os.kill(await asyncio.to_thread(python_pid, instance, 0), signal.SIGKILL)
        await asyncio.to_thread(python_pid, instance, killed)  # the next one is ready
        second = [f"second-{n}" for n in range(100)]
        for n, body in enumerate(second):
            send(writer, f"{names[n % 20]}@localhost", body)
        await app.wait_until(lambda: len(app.bodies) == 200)
        assert set(app.bodies) == set(first + second)
        assert max(app.bodies.values()) == 1
        await asyncio.to_thread(wait_outbox_empty, instance)  # every publish answered
        return first + second

    sent = asyncio.run(before_stop())
    stopped = instance.log_mark()
    instance.stop()
    # The pending sessions ended with the server: their messages went offline (and through
    # the hooks to Python) and the wakes after the start are marked.
    instance.start(install=False)
    instance.wait_for_log(r"ejabberd started: waking 20 push registration", stopped)

    async def after_start() -> None:
        app = AppServer(instance.c2s_port)
        await app.connect()
        await app.wait_until(lambda: app.publishes >= 20)  # the wakes (no body)
        await asyncio.to_thread(wait_outbox_empty, instance)
        assert app.bodies == Counter(), f"pushed again after the restarts: {len(app.bodies)}"
        writer = await sender(instance)
        send(writer, "push0@localhost", "after")
        await app.wait_until(lambda: "after" in app.bodies)
        # Counts go on from the 5 + 5 messages of push0 before (or from 0 after the wake's
        # reset), never inflated by the re-routed ones.
        print(f"\nafter the restarts: {app.publishes - 1} wake(s), 0 of {len(sent)} "
              f"messages pushed again; message-count of the next push {app.counts['after']}")
        assert int(app.counts["after"]) <= 11

    asyncio.run(after_start())


def test_a_long_pending_session_pushes_each_of_1100_messages_once(
        make_instance: Callable[..., Instance]) -> None:
    """More than a thousand messages queued for one pending session, then its resume timeout
    ends: they all come back as offline (and archived), and none is pushed again."""
    instance = make_instance(resume_timeout=45)
    count = 1100

    async def run() -> None:
        app = AppServer(instance.c2s_port)
        await app.connect(register=True)
        (name,) = await push_users(instance, 1, pending=True)
        writer = await sender(instance)
        for n in range(count):
            send(writer, f"{name}@localhost", f"m{n}")
            if n % 100 == 99:
                await asyncio.sleep(0)  # let the writer drain
        await app.wait_until(lambda: len(app.bodies) == count)
        assert app.counts[f"m{count - 1}"] == str(count)
        # The resume timeout ends; ejabberd stores the queue offline (resend_on_timeout).
        await asyncio.to_thread(wait_offline, instance, name, count)
        send(writer, f"{name}@localhost", "sentinel")  # handled after every re-route
        await app.wait_until(lambda: "sentinel" in app.bodies)
        twice = {body: n for body, n in app.bodies.items() if n > 1}
        print(f"\n{count} queued messages: {app.publishes} publishes, {len(twice)} twice")
        assert twice == {} and app.publishes == count + 1
        assert app.counts["sentinel"] == str(count + 1)

    asyncio.run(run())


def wait_offline(instance: Instance, name: str, count: int) -> None:
    """Until the session's queue is in offline storage (after its resume timeout)."""
    deadline = time.monotonic() + 120
    while int(instance.ctl("get_offline_count", name, instance.host).strip() or 0) < count:
        if time.monotonic() > deadline:
            raise TimeoutError("the queue did not go to offline storage")
        time.sleep(0.5)


def test_an_app_server_overloaded_for_a_minute_costs_no_registration_and_no_message(
        make_instance: Callable[..., Instance]) -> None:
    """200 users of one external app server (an XMPP client), which answers every publish
    with a 'wait' error for a minute while 250 messages arrive: each registration counts
    that once (publish_error_window), and every notification is retried until the app
    server is back: each message pushed exactly once, no registration disabled. (An app
    server that logs out instead gets service-unavailable from its server, which counts
    every time, as from a target that is no app server: test_exposure.py.)"""
    away_s = 60.0
    # Retries that reach well past the outage for any message sent during it (the first:
    # 2 + 5 + 8 x 10 = 87 s), every 10 s, so that all are through soon after it is back.
    instance = make_instance(retry_delays=[2, 5, *[10] * 8])

    async def run() -> None:
        app = AppServer(instance.c2s_port)
        await app.connect(register=True)
        names = await push_users(instance, 200, pending=False)
        writer = await sender(instance)
        send(writer, f"{names[0]}@localhost", "before")
        await app.wait_until(lambda: "before" in app.bodies)
        mark = instance.log_mark()
        app.overloaded = True
        left = time.monotonic()
        bodies = [f"away-{n}" for n in range(250)]
        for n, body in enumerate(bodies):  # over the first 50 s of the outage
            send(writer, f"{names[n % 200]}@localhost", body)
            await asyncio.sleep(0.2)
        await asyncio.sleep(max(0.0, away_s - (time.monotonic() - left)))
        assert not app.bodies.keys() & set(bodies)
        # Each registration's errors as counted (the log's lines may be fewer: ejabberd's
        # logger drops lines when they come faster than it writes)
        counted_now = registration_errors(instance)
        app.overloaded = False
        back = time.monotonic()
        await app.wait_until(lambda: len(app.bodies) == 251, timeout=120)
        waited = time.monotonic() - back
        log = instance.log_file.read_bytes()[mark:].decode(errors="replace")
        logged = len(re.findall(r"push to push\d+/phone at app@localhost/srv failed", log))
        disabled = len(re.findall(r"push disabled for", log))
        status = instance.ctl("push_status", instance.host)
        registrations = int(re.search(r"push registrations: (\d+)", status).group(1))  # type: ignore[union-attr]
        print(f"\napp server overloaded {away_s:.0f} s, {len(bodies)} messages: all pushed "
              f"{waited:.1f} s after it was back; registrations by errors counted "
              f"{counted_now} (one each; {logged} logged), registrations disabled "
              f"{disabled}, held {registrations}")
        assert max(app.bodies.values()) == 1
        assert disabled == 0 and registrations == 200
        assert counted_now == {1: 200}

    asyncio.run(run())
