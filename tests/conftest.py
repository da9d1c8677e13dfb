from __future__ import annotations

import asyncio
import gc
import itertools
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings

# Property tests are repeatable by default (CI must not turn red on a new random draw);
# HYPOTHESIS_PROFILE=explore draws new examples on every run.
settings.register_profile("repeatable", derandomize=True, database=None)
settings.register_profile("explore")
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from devtools.instance import Instance  # noqa: E402
from pymod_push.store import Store, open_store  # noqa: E402
from tests.builders import stores_from  # noqa: E402
from tests.xmpp_peers import AppServer, Client, Peers  # noqa: E402

_names = itertools.count(1)


def _instance(options: dict[str, Any], modules: dict[str, Any] | None = None, *,
              prefix: str = "pymod_push-e2e-", ready_hosts: tuple[str, ...] = (),
              **instance_args: Any) -> Iterator[Instance]:
    """An ejabberd with mod_push_py at these options, mod_mam and these other modules
    (instance_args: Instance's other fields); started once the Python processes of its
    host and of ready_hosts are ready."""
    if shutil.which("ejabberdctl") is None:
        pytest.fail("ejabberd is not installed: run the tests with 'make test'")
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    folder.chmod(0o755)
    instance = Instance(folder, options=options,
                        modules={"mod_mam": {"default": "always"}, **(modules or {})},
                        **instance_args)
    instance.write_config()
    try:
        mark = instance.log_mark()
        instance.start()
        for host in ready_hosts:
            instance.wait_for_log(rf"Python process ready on {re.escape(host)}\b", mark)
        yield instance
    finally:
        instance.discard()
        if not (folder / "keep").exists():
            shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def ejabberd() -> Iterator[Instance]:
    """An ejabberd with mod_push_py at its default options."""
    yield from _instance({})


@pytest.fixture(scope="session")
def ejabberd_short_timeout() -> Iterator[Instance]:
    """Push sessions time out after 2 s; bodies and senders included in pushes."""
    yield from _instance({"resume_timeout": 2, "include_message_bodies": True,
                          "include_senders": True})


class Scenario:
    """Accounts and XMPP peers for one test on one instance."""

    def __init__(self, instance: Instance) -> None:
        self.instance = instance
        self.host = instance.host

    def account(self, prefix: str) -> tuple[str, str]:
        name = f"{prefix}{next(_names)}"
        self.instance.register(name, self.host, "secret-" + name)
        return f"{name}@{self.host}", "secret-" + name

    def run(self, scenario: Callable[[Peers], Awaitable[None]]) -> None:
        async def main() -> None:
            peers = Peers(self.instance.c2s_port)
            try:
                await scenario(peers)
            finally:
                await peers.close()

        asyncio.run(main())
        # Finalize the clients' sockets and transports now: CPython 3.11.2 fails with
        # "AST constructor recursion depth mismatch" when such finalizers run in the
        # middle of compile(), which pytest calls to show a failure.
        gc.collect()

    async def cast(self, peers: Peers) -> tuple[AppServer, Client, Client]:
        """An external app server, a push user and someone who writes to the user, online."""
        app, alice, bob = await asyncio.to_thread(
            lambda: [self.account(prefix) for prefix in ("app", "alice", "bob")])
        return await peers.app_server(*app), await peers.user(*alice), await peers.user(*bob)

    async def app_and_users(self, peers: Peers, *names: str) -> list[Any]:
        """An external app server and a user of each name prefix, online."""
        accounts = await asyncio.to_thread(lambda: [self.account(n) for n in ("app", *names)])
        app = await peers.app_server(*accounts[0])
        return [app, *[await peers.user(*a) for a in accounts[1:]]]

    def push_goes_through(self, node: str) -> None:
        """A user enables push at an external app server and goes pending; one message from
        someone else makes exactly one push, from the host, counting one message."""

        async def push(peers: Peers) -> None:
            server, phone, sender = await self.cast(peers)
            await phone.enable_push(server.boundjid.full, node)
            await self.go_pending(phone)
            sender.send_message(mto=phone.boundjid.bare, mbody="hello", mtype="chat")
            first, = await server.wait_for(node, 1)
            assert first.sender == self.host
            assert first.summary.get("message-count") == "1"

        self.run(push)

    async def go_pending(self, client: Client) -> None:
        """Drop the client's TCP connection and wait until the server has its session pending."""
        mark = self.instance.log_mark()
        client.drop()
        await asyncio.to_thread(self.instance.wait_for_log,
                                rf"push session {client.boundjid.full} is pending", mark)


@pytest.fixture
def folder() -> Iterator[Path]:
    """A throwaway folder that the ejabberd user can enter."""
    path = Path(tempfile.mkdtemp(prefix="pymod_push-e2e-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def scenario(ejabberd: Instance) -> Scenario:
    return Scenario(ejabberd)


@pytest.fixture
def short_timeout(ejabberd_short_timeout: Instance) -> Scenario:
    return Scenario(ejabberd_short_timeout)


@pytest.fixture(scope="session")
def postgres() -> Iterator[Any]:
    """A PostgreSQL server of the test run's own (see tests/postgres.py)."""
    from tests.postgres import PostgresServer

    server = PostgresServer()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def postgres_url(postgres: Any) -> str:
    """A fresh PostgreSQL database for a test module."""
    return str(postgres.new_database())


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest) -> Iterator[None]:
    """The test runs once on SQLite and once on PostgreSQL: builders.make_service opens its
    store on the database of the run (SQLite in memory, or a fresh PostgreSQL database)."""
    if request.param == "sqlite":
        yield
        return
    server: Any = request.getfixturevalue("postgres")
    opened: list[Store] = []

    def new_store() -> Store:
        opened.append(open_store("", server.new_database()))
        return opened[-1]
    try:
        with stores_from(new_store):
            yield
    finally:
        for store in opened:
            store.close()
