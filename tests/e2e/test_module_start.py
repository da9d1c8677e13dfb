"""Installing the module: module_check, the mod_push conflict and a protocol version mismatch."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from devtools.instance import EJABBERD_USER, Instance, default_python
from pymod_push import etf
from pymod_push.etf import Atom
from pymod_push.protocol import PROTOCOL_VERSION
from tests.conftest import Scenario
from tests.xmpp_peers import NS_PUSH, Peers

pytestmark = pytest.mark.e2e

WRONG_VERSION = b"\x83h\x03w\x05hellob\x00\x00\x03\xe7t\x00\x00\x00\x00"  # {hello, 999, #{}}
RIGHT_VERSION = etf.encode((Atom("hello"), PROTOCOL_VERSION, {}))  # {hello, 4, #{}}
# A log line and no hello: the shim waits for it (status starting)
NO_HELLO = etf.encode((Atom("log"), Atom("info"), b"a stand-in that says no hello"))
FAKE_PORT_PROGRAM = '''
import os, struct, sys
size, = struct.unpack(">I", os.read(0, 4))
os.read(0, size)
reply = {reply}
os.write(1, struct.pack(">I", len(reply)) + reply)
if {exit_after_hello}:
    sys.exit(3)
while os.read(0, 65536):  # read and never answer
    pass
'''


def fake_python(folder: Path, reply: bytes, exit_after_hello: bool) -> str:
    """An interpreter path whose 'python -m pymod_push' is a stand-in of ours."""
    fake = folder / "fake" / "pymod_push"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "__main__.py").write_text(
        FAKE_PORT_PROGRAM.format(reply=reply, exit_after_hello=exit_after_hello))
    wrapper = folder / "python"
    wrapper.write_text(f"#!/bin/sh\nPYTHONPATH={folder / 'fake'} exec {default_python()} \"$@\"\n")
    wrapper.chmod(0o755)
    subprocess.run(["chown", "-R", EJABBERD_USER, str(folder)], check=True)
    return str(wrapper)


@contextmanager
def _started(instance: Instance) -> Iterator[Instance]:
    instance.write_config()
    try:
        instance.start(install=False)
        yield instance
    finally:
        instance.discard()


def test_module_check_passes(ejabberd: Instance) -> None:
    assert "mod_push_py" in ejabberd.ctl("modules_installed")
    ejabberd.ctl("module_check", "mod_push_py")  # raises on a non-zero exit


def test_refuses_to_start_where_mod_push_is_enabled(folder: Path) -> None:
    instance = Instance(folder, modules={"mod_push": {}, "mod_push_keepalive": {}})
    with _started(instance) as running:
        mark = running.log_mark()
        running.ctl("module_install", "mod_push_py")
        line = running.wait_for_log(r"mod_push_py is not started on localhost", mark)
        assert "mod_push is enabled there" in line
        # At boot, the same conflict must not stop ejabberd: the module stays inert.
        running.stop()
        mark = running.log_mark()
        running.start(install=False)
        running.wait_for_log(r"mod_push_py is not started on localhost", mark)
        running.ctl("register", "carol", "localhost", "pw")
        assert "carol" in running.ctl("registered_users", "localhost")


def test_version_mismatch_is_logged_once_not_a_crash_loop(folder: Path) -> None:
    instance = Instance(folder, python=fake_python(folder, WRONG_VERSION, exit_after_hello=True))
    with _started(instance) as running:
        mark = running.log_mark()
        running.ctl("module_install", "mod_push_py")
        line = running.wait_for_log(r"protocol version mismatch", mark)
        assert f"speaks version {PROTOCOL_VERSION}" in line and "999" in line
        # The exit that follows is expected: logged, and no restart is scheduled.
        running.wait_for_log(r"Python process exited with status 3$", mark)
        log = running.log_file.read_text()
        assert "restarting it in" not in log


def test_push_iq_gets_an_error_when_python_does_not_answer(folder: Path) -> None:
    instance = Instance(folder, python=fake_python(folder, RIGHT_VERSION, exit_after_hello=False),
                        options={"reply_timeout": 1})
    with _started(instance) as running:
        running.install()
        scenario = Scenario(running)
        alice = scenario.account("alice")

        async def run(peers: Peers) -> None:
            client = await peers.user(*alice)
            started = time.monotonic()
            enable = f"<enable xmlns='{NS_PUSH}' jid='push.example' node='n'/>"
            _, condition = await client.push_iq_error(enable)
            assert condition == "internal-server-error"
            assert time.monotonic() - started < 10  # reply_timeout (1 s), not the client's
            # The session was not held up meanwhile.
            await client.plugin["xep_0030"].get_info(jid=client.boundjid.bare)

        scenario.run(run)


def test_before_pythons_hello_disco_lists_xep_0357_alone_and_no_commands(folder: Path) -> None:
    """What the shim says of Python's decisions comes in Python's hello (core/shim_facts.py):
    before it, the account's disco#info has XEP-0357's feature and none of Tigase's (though
    ios_extensions is on), and the host lists none of the app server's commands."""
    backends = [{"type": "ubuntu", "register_host": "localhost", "pubsub_host": "push.localhost"}]
    instance = Instance(folder, python=fake_python(folder, NO_HELLO, exit_after_hello=False),
                        options={"backends": backends, "ios_extensions": True})
    with _started(instance) as running:
        mark = running.log_mark()
        running.ctl("module_install", "mod_push_py")
        running.wait_for_log(r"a stand-in that says no hello", mark)
        scenario = Scenario(running)
        alice = scenario.account("alice")

        async def run(peers: Peers) -> None:
            client = await peers.user(*alice)
            disco = client.plugin["xep_0030"]
            info = await disco.get_info(jid=client.boundjid.bare)
            features = set(info["disco_info"]["features"])
            assert NS_PUSH in features
            assert not {f for f in features if f.startswith("tigase:push:")}, features
            items = await disco.get_items(jid="localhost",
                                          node="http://jabber.org/protocol/commands")
            nodes = {node for _, node, _ in items["disco_items"]["items"]}
            assert "ping" in nodes  # ejabberd's own
            assert not {n for n in nodes if "push" in n}, nodes

        scenario.run(run)
