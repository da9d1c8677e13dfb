"""A module folder from 'pymod-push build-module', loaded by ejabberd at start from a
read-only CONTRIB_MODULES_PATH that holds only that folder: no module_install, nothing
written there, and pushes get through (the build's decisions without ejabberd:
tests/unit/test_build_module.py)."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pytest

from devtools.instance import Instance, default_python
from tests.conftest import Scenario

pytestmark = pytest.mark.e2e

CLI = str(Path(default_python()).parent / "pymod-push")


def snapshot(root: Path) -> dict[str, tuple[int, int, str]]:
    """Every path under root: its mode, modification time and content's digest."""
    found = {}
    for path in sorted([root, *root.rglob("*")]):
        stat = path.lstat()
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""
        found[str(path.relative_to(root))] = (stat.st_mode, stat.st_mtime_ns, digest)
    return found


def writable_by_ejabberd(path: Path) -> bool:
    return subprocess.run(["runuser", "-u", "ejabberd", "--", "test", "-w", str(path)],
                          cwd="/").returncode == 0


def test_prebuilt_module_loads_from_a_read_only_path(folder: Path) -> None:
    modules = folder / "modules"
    result = subprocess.run([CLI, "build-module", "--out", str(modules),
                             "--python", default_python()],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    module = modules / "mod_push_py"
    assert sorted(p.name for p in modules.iterdir()) == ["mod_push_py"]  # only the module
    assert {p.name for p in (module / "ebin").iterdir()} == {
        "mod_push_py.beam", "mod_push_py_port.beam", "mod_push_py_opt.beam",
        "mod_push_py_actions.beam", "mod_push_py_muc.beam", "mod_push_py_up.beam",
        "mod_push_py_commands.beam"}
    # Read-only for ejabberd (it runs as the user ejabberd; the files are root's).
    subprocess.run(["chmod", "-R", "a-w", str(modules)], check=True)
    assert not writable_by_ejabberd(modules) and not writable_by_ejabberd(module / "ebin")
    before = snapshot(modules)

    instance = Instance(folder / "ejabberd", modules_path=modules)
    instance.write_config()
    assert not (instance.folder / "modules" / "sources" / "mod_push_py").exists()
    try:
        mark = instance.log_mark()
        instance.start(install=False)  # no module_install, no module sources anywhere
        instance.wait_ready(mark)
        # ext_mod:modules_configs(): the module's conf file is read from the module path.
        instance.wait_for_log(rf"Loading third-party configuration from "
                              rf"{module / 'conf' / 'mod_push_py.yml'}", mark)
        assert "mod_push_py" in instance.ctl("modules_installed")  # ext_mod:installed()
        assert "Python process up" in instance.ctl("push_status", instance.host)
        python = instance.python_pid()
        assert python is not None
        with open(f"/proc/{python}/status") as status:  # the port program runs as ejabberd
            uid = next(int(line.split()[1]) for line in status if line.startswith("Uid:"))
        assert uid == int(subprocess.run(["id", "-u", "ejabberd"], capture_output=True,
                                         text=True, check=True).stdout)
        loaded = instance.erl('code:which(mod_push_py)')
        assert loaded == f'"{module / "ebin" / "mod_push_py.beam"}"'

        Scenario(instance).push_goes_through("prebuilt-node")
        # The doctor takes a prebuilt module for what it is: no sources to compile from.
        doctor = subprocess.run([CLI, "doctor", "--ctl", "ejabberdctl", "--config-dir",
                                 str(instance.folder)], capture_output=True, text=True,
                                timeout=300)
        assert doctor.returncode == 0, doctor.stdout + doctor.stderr
        assert "mod_push_py is prebuilt" in doctor.stdout
        assert f"{module / 'ebin' / 'mod_push_py.beam'} built from pymod_push" in doctor.stdout
        assert snapshot(modules) == before  # nothing written into the module path
    finally:
        instance.discard()
        subprocess.run(["chmod", "-R", "u+w", str(modules)], check=True)  # for cleanup
