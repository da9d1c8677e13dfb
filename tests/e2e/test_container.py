"""contrib/container/Containerfile, built and run with podman: a user enables push toward an
app server, goes pending, another user writes, the push arrives; the container is stopped
and started again on the same volume and the registration is still there.

The base image is made locally (devtools/container_base.sh: debootstrap, `podman import`;
kept in podman's store for a week) because no registry is reachable from CI; the image is
built with contrib/container/build.sh (the wheels made on this machine, no index in the
build). podman runs with runc, explicit ulimits no higher than this machine allows, --init,
a read-only root, and bridge networking with c2s published on 127.0.0.1 only. Skipped,
saying why, where podman is not installed or not usable (not root).
"""

from __future__ import annotations

import asyncio
import os
import re
import resource
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from devtools.instance import ROOT, free_port
from tests.xmpp_peers import BODIES, AppServer, Client

pytestmark = pytest.mark.e2e

IMAGE = "localhost/pymod_push-ejabberd:test"
HOST = "localhost"
READY = re.compile(rf"Python process ready on {HOST}\b")


def _why_not() -> str | None:
    if shutil.which("podman") is None:
        return "podman is not installed (CI installs it: apt-get install podman runc)"
    if shutil.which("runc") is None:
        return "runc is not installed (podman must use it: crun fails on hybrid cgroups)"
    if os.geteuid() != 0:
        return "needs root (debootstrap for the base image, podman's bridge networking)"
    return None


def _run(*args: str, timeout: float = 600, check: bool = True,
         env: dict[str, str] | None = None) -> str:
    result = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({result.returncode}):\n"
                             f"{result.stdout}{result.stderr}")
    return result.stdout


def ulimits() -> list[str]:
    """--ulimit arguments at this machine's hard limits: podman's defaults (nofile
    1048576) are above them and runc then fails to start the container. runc cannot set
    nproc above the kernel's pid_max either (seen here: hard limit 96367, pid_max 32768)."""
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    nproc = resource.getrlimit(resource.RLIMIT_NPROC)[1]
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    nofile = 1_048_576 if nofile == resource.RLIM_INFINITY else nofile
    nproc = pid_max if nproc == resource.RLIM_INFINITY else min(nproc, pid_max)
    return ["--ulimit", f"nofile={nofile}:{nofile}", "--ulimit", f"nproc={nproc}:{nproc}"]


@dataclass
class Container:
    """One run of the image: a named container on a named volume."""

    name: str
    volume: str
    port: int

    def start_new(self) -> None:
        # A read-only root (with tmpfs on /run, /tmp and the logs), as Kubernetes'
        # readOnlyRootFilesystem: the module is prebuilt, nothing is written outside.
        _run("podman", "run", "--detach", "--name", self.name, "--runtime", "runc", "--init",
             *ulimits(), "--read-only", "--tmpfs", "/var/log/ejabberd",
             "--publish", f"127.0.0.1:{self.port}:5222",
             "--volume", f"{self.volume}:/var/lib/ejabberd", "--env", f"XMPP_HOST={HOST}",
             IMAGE)

    def logs(self) -> str:
        return _run("podman", "logs", self.name, check=False, timeout=60)

    def wait_for_log(self, pattern: re.Pattern[str] | str, count: int = 1,
                     timeout: float = 90) -> None:
        """Until the container's output has ``count`` lines matching ``pattern``."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            text = self.logs()
            if sum(1 for line in text.splitlines() if regex.search(line)) >= count:
                return
            state = _run("podman", "inspect", "--format", "{{.State.Status}}", self.name,
                         check=False).strip()
            if state not in ("running", "created", "configured") or \
                    time.monotonic() > deadline:
                tail = "\n".join(text.splitlines()[-40:])
                raise AssertionError(f"no {count} line(s) matching {regex.pattern!r} "
                                     f"(container {state}); its output ends:\n{tail}")
            time.sleep(0.2)

    def ctl(self, *args: str) -> str:
        return _run("podman", "exec", self.name, "ejabberdctl", *args, timeout=120)

    def remove(self) -> None:
        _run("podman", "rm", "--force", "--time", "0", self.name, check=False)
        _run("podman", "volume", "rm", "--force", self.volume, check=False)


@pytest.fixture(scope="module")
def image() -> Iterator[str]:
    """The base image (cached), then the image of this checkout, timed."""
    reason = _why_not()
    if reason:
        pytest.skip(reason)
    started = time.monotonic()
    base = _run(str(ROOT / "devtools" / "container_base.sh"), timeout=900).strip()
    based = time.monotonic()
    previous = _run("podman", "image", "inspect", "--format", "{{.Id}}", IMAGE,
                    check=False).strip()
    mirror = _run("bash", "-c", f". {ROOT}/devtools/debian_mirror.sh && apt_mirror").strip()
    _run(str(ROOT / "contrib" / "container" / "build.sh"), "--base", base, "--tag", IMAGE,
         "--", "--quiet", timeout=900, env={**os.environ, "DEBIAN_MIRROR": mirror})
    built = time.monotonic()
    now = _run("podman", "image", "inspect", "--format", "{{.Id}}", IMAGE).strip()
    if previous and previous != now:  # the last run's image: kept its layers, not itself
        _run("podman", "rmi", previous, check=False)
    print(f"\ncontainer: base image {based - started:.1f} s, build {built - based:.1f} s")
    yield IMAGE


@pytest.fixture
def container(image: str) -> Iterator[Container]:
    name = f"pymod_push-test-{os.getpid()}"
    run = Container(name, f"{name}-data", free_port())
    run.remove()  # what an interrupted run with this pid left
    try:
        yield run
    finally:
        run.remove()
        left = _run("podman", "ps", "--all", "--quiet", "--filter", f"name=^{name}$")
        volumes = _run("podman", "volume", "ls", "--quiet", "--filter", f"name={run.volume}")
        assert not left.strip() and not volumes.strip(), "the container or volume is left"


@pytest.mark.timeout(900)  # cold: the base image and the image's build first (about 60 s here)
def test_push_through_the_container_and_after_a_restart(container: Container) -> None:
    started = time.monotonic()
    container.start_new()
    container.wait_for_log(READY)
    accounts = {name: f"secret-{name}-{os.getpid()}" for name in ("app", "alice", "bob")}
    for name, password in accounts.items():
        container.ctl("register", name, HOST, password)
    app_jid = f"app@{HOST}/appserver"  # a fixed resource: the same full JID after the restart

    async def first_push() -> None:
        app = await AppServer(app_jid, accounts["app"], container.port).online()
        alice = await Client(f"alice@{HOST}", accounts["alice"], container.port).online()
        bob = await Client(f"bob@{HOST}", accounts["bob"], container.port).online()
        try:
            assert str(app.boundjid) == app_jid
            await alice.enable_push(app_jid, "container-node", options=BODIES)
            pending = re.compile(rf"push session {re.escape(alice.boundjid.full)} is pending")
            alice.drop()
            await asyncio.to_thread(container.wait_for_log, pending)
            bob.send_message(mto=f"alice@{HOST}", mbody="first", mtype="chat")
            push, = await app.wait_for("container-node", 1)
            assert push.summary["last-message-body"] == "first"
            assert push.summary["last-message-sender"].split("/")[0] == f"bob@{HOST}"
        finally:
            for client in (app, bob):
                client.disconnect()
                await asyncio.wait_for(client.disconnected, 10)

    asyncio.run(first_push())

    _run("podman", "stop", "--time", "60", container.name, timeout=120)
    assert _run("podman", "inspect", "--format", "{{.State.Status}} {{.State.ExitCode}}",
                container.name).split() == ["exited", "0"]  # ejabberd stopped cleanly
    _run("podman", "start", container.name)
    container.wait_for_log(READY, count=2)
    # The registration was kept in the volume (the module's SQLite database).
    assert "container-node" in container.ctl("push_list", "alice", HOST)

    async def second_push() -> None:
        app = await AppServer(app_jid, accounts["app"], container.port).online()
        bob = await Client(f"bob@{HOST}", accounts["bob"], container.port).online()
        try:
            bob.send_message(mto=f"alice@{HOST}", mbody="second", mtype="chat")
            deadline = time.monotonic() + 30
            # A wake-up push after the start may come first: the one for "second" counts.
            while not any(p.summary.get("last-message-body") == "second"
                          for p in app.received.get("container-node", [])):
                await app.wait_for("container-node",
                                   len(app.received.get("container-node", [])) + 1,
                                   timeout=max(0.1, deadline - time.monotonic()))
        finally:
            for client in (app, bob):
                client.disconnect()
                await asyncio.wait_for(client.disconnected, 10)

    asyncio.run(second_push())
    print(f"\ncontainer: test {time.monotonic() - started:.1f} s")
