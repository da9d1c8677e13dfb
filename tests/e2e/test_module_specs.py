"""ext_mod's own maintenance commands on an installed mod_push_py: `modules_update_specs`
(which fetches every module source whose spec names a url, and always downloads
ejabberd-contrib) and `module_upgrade` leave the module installed and running, and nothing
leaves loopback. The staged spec's url is a tarball of the staged sources beside sources/
(pymod_push/install/module_source.py): the update puts back the same files. A prebuilt module
(build-module, read-only, no sources/) is left alone.

The node is fenced in before anything runs: its resolver knows only names that resolve to
127.0.0.1 (inetrc `{lookup, [file]}`), ext_mod's HTTP client goes through a recording proxy
on loopback that refuses everything (ext_mod:geturl/1 reads PROXY_SERVER), and `git`,
`curl`, `wget`, `mix`, `rebar3` on the node's PATH are stand-ins that record and fail
(ext_mod fetches rebar dependencies with `git clone` through os:cmd)."""

from __future__ import annotations

import re
import socket
import stat
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml

from devtools.instance import Instance, default_python, free_port
from pymod_push.install import module_source
from tests.conftest import Scenario

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


@contextmanager
def fence(folder: Path, **options: Any) -> Iterator[tuple[Instance, RefusingProxy, Path]]:
    """An ejabberd started in folder/ejabberd that can reach nothing but loopback."""
    instance = Instance(folder / "ejabberd", extra_hosts=["github.com", "api.github.com"],
                        **options)
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
        yield instance, proxy, calls
    finally:
        instance.discard()
        proxy.close()


@pytest.fixture
def fenced(folder: Path) -> Iterator[tuple[Instance, RefusingProxy, Path]]:
    """A fenced ejabberd, mod_push_py installed in it (module_install, inside the fence)."""
    with fence(folder) as (instance, proxy, calls):
        instance.install()
        yield instance, proxy, calls


def snapshot(root: Path) -> dict[str, tuple[int, int, bytes | None]]:
    """Every path under root: its mode, modification time and content."""
    return {str(path.relative_to(root)): (path.lstat().st_mode, path.lstat().st_mtime_ns,
                                          path.read_bytes() if path.is_file() else None)
            for path in [root, *root.rglob("*")]}


def staged(sources: Path) -> dict[str, tuple[bytes | None, int]]:
    """The staged files (bytes) and folders (None) with their modes; not ebin/, which
    module_install compiles into (and ext_mod deletes with the rest before extracting)."""
    return {str(path.relative_to(sources)): (path.read_bytes() if path.is_file() else None,
                                             stat.S_IMODE(path.stat().st_mode))
            for path in sources.rglob("*")
            if path.relative_to(sources).parts[0] != "ebin"}


def test_update_specs_and_upgrade_leave_the_module_running(
        fenced: tuple[Instance, RefusingProxy, Path]) -> None:
    instance, proxy, calls = fenced
    modules = instance.folder / "modules"
    sources = modules / "sources" / "mod_push_py"
    archive = modules / "mod_push_py.tgz"
    # The fence holds: names resolve to loopback or not at all, the stand-ins come first.
    assert "{127,0,0,1}" in instance.erl('inet:gethostbyname("github.com")')
    assert instance.erl('inet:gethostbyname("example.org")') == "{error,nxdomain}"
    assert instance.erl('os:find_executable("git")') == f'"{calls.parent / "bin" / "git"}"'
    # The staged spec names the tarball of these sources beside sources/, and a real home.
    spec = yaml.safe_load((sources / "mod_push_py.spec").read_text())
    assert spec["url"] == str(archive) and archive.is_file()
    assert spec["home"] == module_source.PACKAGE_DIR.as_uri()
    before = staged(sources)
    assert "src/mod_push_py.erl" in before and "conf/mod_push_py.yml" in before
    instance.ctl("module_check", "mod_push_py")  # home and url given: it passes

    mark = instance.log_mark()
    result = subprocess.run(["ejabberdctl", "--config-dir", str(instance.folder),
                             "modules_update_specs"], capture_output=True, text=True,
                            timeout=180)
    # ext_mod re-extracts our sources from the tarball (deleting sources/mod_push_py first:
    # nothing else, no ebin/, is left): the same files, byte for byte, with their modes.
    instance.wait_for_log(r"Update package mod_push_py: ok", mark)
    assert staged(sources) == before
    assert not (sources / "ebin").exists()
    # The only failure is ejabberd-contrib's download, which ext_mod always tries, through
    # the refusing proxy: offline, that one fails (with the network, the command exits 0).
    contrib = instance.wait_for_log(r"Update packages from repo \S*ejabberd-contrib\S*: ", mark)
    assert ": ok" not in contrib
    assert "mod_push_py" not in result.stdout + result.stderr
    assert result.returncode != 0  # ejabberd-contrib's error
    assert proxy.requests == ["CONNECT github.com:443 HTTP/1.1"]
    assert "mod_push_py" in instance.ctl("modules_installed")
    assert "Python process up" in instance.ctl("push_status", instance.host)

    mark = instance.log_mark()
    instance.ctl("module_upgrade", "mod_push_py", timeout=180)  # uninstall, then install
    instance.wait_ready(mark)
    assert "mod_push_py" in instance.ctl("modules_installed")
    assert "Python process up" in instance.ctl("push_status", instance.host)
    instance.ctl("module_check", "mod_push_py")
    assert staged(sources) == before
    assert proxy.requests == ["CONNECT github.com:443 HTTP/1.1"]  # nothing more
    assert calls.read_text() == ""  # no git, curl, wget, mix, rebar3

    Scenario(instance).push_goes_through("after-upgrade")


def test_update_specs_leaves_a_prebuilt_module_alone(folder: Path) -> None:
    """build-module's folder has no sources/: modules_update_specs has nothing of ours to
    update, and cannot even make sources/ in a read-only CONTRIB_MODULES_PATH."""
    modules = folder / "modules"
    result = subprocess.run([str(Path(default_python()).parent / "pymod-push"),
                             "build-module", "--out", str(modules), "--python",
                             default_python()], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    spec = yaml.safe_load((modules / "mod_push_py" / "mod_push_py.spec").read_text())
    assert spec["url"] == "" and spec["home"] == ""  # the repository's: nothing invented
    subprocess.run(["chmod", "-R", "a-w", str(modules)], check=True)
    before = snapshot(modules)
    try:
        with fence(folder, modules_path=modules) as (instance, proxy, calls):
            instance.wait_ready()
            mark = instance.log_mark()
            instance.ctl("modules_update_specs", check=False, timeout=180)
            instance.wait_for_log(r"Update packages from repo \S*ejabberd-contrib", mark)
            with open(instance.log_file, "rb") as log:
                log.seek(mark)
                text = log.read().decode(errors="replace")
            # sources/ could not be made (ensure_dir): no download was even tried.
            assert re.search(r"ejabberd-contrib\S*:\s*\{error,\s*eacces\}", text), text
            assert "Update package mod_push_py" not in text
            assert proxy.requests == [] and calls.read_text() == ""
            assert snapshot(modules) == before
            assert "mod_push_py" in instance.ctl("modules_installed")
            assert "Python process up" in instance.ctl("push_status", instance.host)
    finally:
        subprocess.run(["chmod", "-R", "u+w", str(modules)], check=True)  # for cleanup
