"""pymod-push against a real, throwaway ejabberd: install, doctor, upgrade, uninstall, and the
refusal when the ejabberd user cannot run the interpreter (its decisions without ejabberd:
tests/unit/test_install_cli.py; what the wheel carries: test_wheel.py)."""

from __future__ import annotations

import filecmp
import os
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from devtools.instance import ROOT, Instance, default_python

pytestmark = pytest.mark.e2e

CLI = str(Path(default_python()).parent / "pymod-push")


@pytest.fixture
def bare(folder: Path) -> Iterator[Instance]:
    """A running ejabberd without mod_push_py, nor its sources."""
    instance = Instance(folder / "ejabberd")
    instance.write_config()
    shutil.rmtree(instance.folder / "modules" / "sources" / "mod_push_py")
    try:
        instance.start(install=False)
        yield instance
    finally:
        instance.discard()


def pymod_push(instance: Instance, *args: str, python: str | None = None,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    command = [CLI] if python is None else [python, "-m", "pymod_push.install"]
    return subprocess.run([*command, "--ctl", "ejabberdctl", "--config-dir",
                           str(instance.folder), *args],
                          capture_output=True, text=True, timeout=600, env=env)


def test_install_doctor_upgrade_uninstall(bare: Instance) -> None:
    sources = bare.folder / "modules" / "sources" / "mod_push_py"
    mark = bare.log_mark()
    result = pymod_push(bare, "install")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "module_install mod_push_py: done" in result.stdout
    assert "pymod-push doctor" in result.stdout  # what to do next
    bare.wait_ready(mark)
    assert "mod_push_py" in bare.ctl("modules_installed")
    conf = yaml.safe_load((bare.folder / "modules" / "mod_push_py" / "conf" /
                           "mod_push_py.yml").read_text())
    assert conf["modules"]["mod_push_py"]["python"] == default_python()  # the running one
    for erl in ("mod_push_py.erl", "mod_push_py_port.erl", "mod_push_py_opt.erl",
                "mod_push_py_actions.erl"):
        assert filecmp.cmp(sources / "src" / erl, ROOT / "erl_shim" / "src" / erl, shallow=False)

    doctor = pymod_push(bare, "doctor")
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    assert "FAIL" not in doctor.stdout
    assert "ok   localhost: Python process up" in doctor.stdout  # push_status
    assert f"python: {default_python()}, runs as ejabberd" in doctor.stdout

    # An option set by the admin survives an upgrade.
    conf_file = bare.folder / "modules" / "mod_push_py" / "conf" / "mod_push_py.yml"
    conf["modules"]["mod_push_py"]["include_senders"] = True
    conf_file.write_text(yaml.safe_dump(conf))
    mark = bare.log_mark()
    result = pymod_push(bare, "upgrade")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "module_upgrade mod_push_py: done" in result.stdout
    bare.wait_ready(mark)
    staged = yaml.safe_load((sources / "conf" / "mod_push_py.yml").read_text())
    assert staged["modules"]["mod_push_py"] == {"python": default_python(),
                                                "include_senders": True}

    result = pymod_push(bare, "uninstall")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "mod_push_py" not in bare.ctl("modules_installed")
    assert not sources.exists()
    doctor = pymod_push(bare, "doctor")
    assert doctor.returncode == 1
    assert "FAIL mod_push_py is not installed" in doctor.stdout


def test_doctor_reports_mod_push_still_enabled(folder: Path) -> None:
    instance = Instance(folder / "ejabberd", modules={"mod_push": {}})
    instance.write_config()
    try:
        instance.start(install=False)
        result = pymod_push(instance, "install")
        assert result.returncode == 0, result.stdout + result.stderr
        assert "remove mod_push from ejabberd's modules" in result.stdout
        doctor = pymod_push(instance, "doctor")
        assert doctor.returncode == 1
        assert "FAIL mod_push is enabled in ejabberd's configuration" in doctor.stdout
        assert "FAIL localhost: mod_push_py is not started on any host" in doctor.stdout
    finally:
        instance.discard()


def test_install_refuses_an_interpreter_the_ejabberd_user_cannot_run(bare: Instance) -> None:
    private = bare.folder.parent / "private"
    private.mkdir(mode=0o700)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(private / "venv")],
                   check=True)
    python = str(private / "venv" / "bin" / "python")
    # pymod_push and its dependencies from the checkout's environment, for root only.
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{sysconfig.get_path('purelib')}"}
    result = pymod_push(bare, "install", python=python, env=env)
    assert result.returncode == 1
    assert f"the user 'ejabberd' cannot run {python}: it cannot enter {private}" \
        in result.stderr
    assert f"chmod o+x {private}" in result.stderr
    # Nothing was done.
    assert not (bare.folder / "modules" / "sources" / "mod_push_py").exists()
    assert "mod_push_py" not in bare.ctl("modules_installed")

