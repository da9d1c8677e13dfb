"""ext_mod's own maintenance commands on an installed mod_push_py: `modules_update_specs`
(which downloads every module source whose spec names a url, and always ejabberd-contrib)
and `module_upgrade` leave the module installed and running, and nothing leaves loopback.

The node is fenced in before anything runs: its resolver knows only names that resolve to
127.0.0.1 (inetrc `{lookup, [file]}`), ext_mod's HTTP client goes through a recording proxy
on loopback that refuses everything (ext_mod:geturl/1 reads PROXY_SERVER), and `git`,
`curl`, `wget`, `mix`, `rebar3` on the node's PATH are stand-ins that record and fail
(ext_mod fetches rebar dependencies with `git clone` through os:cmd)."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from devtools.instance import Instance, free_port
from tests.conftest import Scenario
from tests.xmpp_peers import Peers

pytestmark = pytest.mark.e2e

STAND_INS = ("git", "curl", "wget", "mix", "rebar3")


class RefusingProxy:
    """An HTTP proxy on 127.0.0.1 that records each request's first line and answers 403."""

    def __init__(self) -> None:
        self.port = free_port()
        self.requests: list[str] = []
        self._server = socket.create_server(("127.0.0.1", self.port))
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self._server.accept()
            except OSError:
                return  # closed
            with connection:
                connection.settimeout(10)
                data = b""
                try:
                    while b"\r\n\r\n" not in data and len(data) < 65536:
                        chunk = connection.recv(4096)
                        if not chunk:
                            break
                        data += chunk
                    self.requests.append(data.split(b"\r\n", 1)[0].decode(errors="replace"))
                    connection.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n"
                                       b"Connection: close\r\n\r\n")
                except OSError:
                    pass

    def close(self) -> None:
        self._server.close()
        self._thread.join(timeout=10)


@pytest.fixture
def fenced(folder: Path) -> Iterator[tuple[Instance, RefusingProxy, Path]]:
    """An ejabberd that can reach nothing but loopback, mod_push_py installed in it."""
    instance = Instance(folder / "ejabberd", extra_hosts=["github.com", "api.github.com"])
    instance.write_config()
    inetrc = instance.folder / "inetrc"
    inetrc.write_text(inetrc.read_text() + "{lookup, [file]}.\n")  # no DNS: the last wins
    stand_ins = folder / "bin"
    stand_ins.mkdir()
    calls = folder / "calls.log"
    calls.touch()
    calls.chmod(0o666)
    for name in STAND_INS:
        script = stand_ins / name
        script.write_text(f'#!/bin/sh\necho "{name} $*" >> {calls}\nexit 1\n')
        script.chmod(0o755)
    proxy = RefusingProxy()
    try:
        instance.start(install=False)
        instance.erl(f'os:putenv("PROXY_SERVER", "127.0.0.1:{proxy.port}"), '
                     f'os:putenv("PATH", "{stand_ins}:" ++ os:getenv("PATH"))')
        instance.install()  # module_install, inside the fence
        yield instance, proxy, calls
    finally:
        instance.discard()
        proxy.close()


def test_update_specs_and_upgrade_leave_the_module_running(
        fenced: tuple[Instance, RefusingProxy, Path]) -> None:
    instance, proxy, calls = fenced
    sources = instance.folder / "modules" / "sources" / "mod_push_py"
    # The fence holds: names resolve to loopback or not at all, the stand-ins come first.
    assert "{127,0,0,1}" in instance.erl('inet:gethostbyname("github.com")')
    assert instance.erl('inet:gethostbyname("example.org")') == "{error,nxdomain}"
    assert instance.erl('os:find_executable("git")') == f'"{calls.parent / "bin" / "git"}"'

    mark = instance.log_mark()
    instance.ctl("modules_update_specs", check=False, timeout=180)  # fails: offline
    # Our spec names no url: ext_mod skips it (add_sources(_, "") -> {error, no_url}) and
    # leaves its sources alone. The only download is ejabberd-contrib's, which ext_mod
    # always tries, through the refusing proxy.
    instance.wait_for_log(r"Update package mod_push_py: \{error,no_url\}", mark)
    assert (sources / "mod_push_py.spec").is_file()
    assert sorted(p.name for p in (sources / "src").glob("*.erl")) == [
        "mod_push_py.erl", "mod_push_py_actions.erl", "mod_push_py_opt.erl",
        "mod_push_py_port.erl"]
    assert proxy.requests == ["CONNECT github.com:443 HTTP/1.1"]
    assert "mod_push_py" in instance.ctl("modules_installed")
    assert "Python process up" in instance.ctl("push_status", instance.host)

    mark = instance.log_mark()
    instance.ctl("module_upgrade", "mod_push_py", timeout=180)  # uninstall, then install
    instance.wait_ready(mark)
    assert "mod_push_py" in instance.ctl("modules_installed")
    assert "Python process up" in instance.ctl("push_status", instance.host)
    assert proxy.requests == ["CONNECT github.com:443 HTTP/1.1"]  # nothing more
    assert calls.read_text() == ""  # no git, curl, wget, mix, rebar3

    scenario = Scenario(instance)

    async def push(peers: Peers) -> None:
        server, phone, sender = await scenario.cast(peers)
        await phone.enable_push(server.boundjid.full, "after-upgrade")
        await scenario.go_pending(phone)
        sender.send_message(mto=phone.boundjid.bare, mbody="hello", mtype="chat")
        first, = await server.wait_for("after-upgrade", 1)
        assert first.summary.get("message-count") == "1"

    scenario.run(push)
