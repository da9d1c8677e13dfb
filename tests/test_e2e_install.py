"""Installing the module: module_check, the mod_push conflict and a protocol version mismatch."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from devtools.instance import EJABBERD_USER, Instance, default_python

pytestmark = pytest.mark.e2e

FAKE_PORT_PROGRAM = '''
import os, struct, sys
size, = struct.unpack(">I", os.read(0, 4))
os.read(0, size)
reply = b"\\x83h\\x03w\\x05hellob\\x00\\x00\\x03\\xe7t\\x00\\x00\\x00\\x00"  # {hello, 999, #{}}
os.write(1, struct.pack(">I", len(reply)) + reply)
sys.exit(3)
'''


@pytest.fixture
def folder() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="pymod_push-install-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _started(instance: Instance) -> Iterator[Instance]:
    instance.write_config()
    try:
        instance.start(install=False)
        yield instance
    finally:
        instance.stop()


def test_module_check_passes(ejabberd: Instance) -> None:
    assert "mod_push_py" in ejabberd.ctl("modules_installed")
    ejabberd.ctl("module_check", "mod_push_py")  # raises on a non-zero exit


def test_refuses_to_start_where_mod_push_is_enabled(folder: Path) -> None:
    instance = Instance(folder, modules={"mod_push": {}, "mod_push_keepalive": {}})
    for running in _started(instance):
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
    fake = folder / "fake" / "pymod_push"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "__main__.py").write_text(FAKE_PORT_PROGRAM)
    wrapper = folder / "python"
    wrapper.write_text(f"#!/bin/sh\nPYTHONPATH={folder / 'fake'} exec {default_python()} \"$@\"\n")
    wrapper.chmod(0o755)
    subprocess.run(["chown", "-R", EJABBERD_USER, str(folder)], check=True)
    instance = Instance(folder, python=str(wrapper))
    for running in _started(instance):
        mark = running.log_mark()
        running.ctl("module_install", "mod_push_py")
        line = running.wait_for_log(r"protocol version mismatch", mark)
        assert "speaks version 1" in line and "999" in line
        # The exit that follows is expected: logged, and no restart is scheduled.
        running.wait_for_log(r"Python process exited with status 3$", mark)
        log = running.log_file.read_text()
        assert "restarting it in" not in log
