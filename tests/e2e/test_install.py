"""pymod-push against a real, throwaway ejabberd: install, doctor, upgrade, uninstall, the
refusal when the ejabberd user cannot run the interpreter, an ejabberd laid out as ProcessOne's
installers do with mod_push in an included file (--replace-builtin), doctor as the ejabberd
user, a .beam from another version (its decisions without ejabberd:
tests/unit/test_install_cli.py; what the wheel carries: test_wheel.py)."""

from __future__ import annotations

import filecmp
import os
import pwd
import re
import shutil
import stat
import subprocess
import sys
import sysconfig
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from devtools.instance import ROOT, Instance, default_python
from pymod_push import __version__

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
                "mod_push_py_actions.erl", "mod_push_py_muc.erl", "mod_push_py_up.erl",
                "mod_push_py_commands.erl"):
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
    # The staged spec's url: a tarball of these very sources beside sources/ (for
    # modules_update_specs: tests/e2e/test_module_specs.py); module_check passes.
    archive = bare.folder / "modules" / "mod_push_py.tgz"
    assert yaml.safe_load((sources / "mod_push_py.spec").read_text())["url"] == str(archive)
    with tarfile.open(archive) as tar:
        packed = tar.extractfile("mod_push_py/conf/mod_push_py.yml")
        assert packed is not None
        assert packed.read() == (sources / "conf" / "mod_push_py.yml").read_bytes()
    bare.ctl("module_check", "mod_push_py")

    result = pymod_push(bare, "uninstall")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "mod_push_py" not in bare.ctl("modules_installed")
    assert not sources.exists() and not archive.exists()
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



def test_processone_layout_included_mod_push_replaced(folder: Path) -> None:
    """ejabberdctl only in /opt/ejabberd-VSN/bin, the configuration in /opt/ejabberd/conf (a
    tree below a test root), mod_push and mod_push_keepalive in an included file: doctor
    names the lines, install --replace-builtin comments them out (a backup kept, same mode
    and owner) and reloads, doctor is clean, also run as the ejabberd user."""
    root = folder / "root"
    conf = root / "opt" / "ejabberd" / "conf"
    included = conf / "push.yml"
    instance = Instance(conf, extra_config={"include_config_file": str(included)})
    instance.write_config()
    included.write_text("# the old push setup\nmodules:\n  mod_push:\n    include_body: false\n"
                        "  mod_push_keepalive:\n    resume_timeout: 72h\n")
    shutil.chown(included, "ejabberd", "ejabberd")
    included.chmod(0o640)
    ctl = root / "opt" / "ejabberd-23.01" / "bin" / "ejabberdctl"  # as the installers put it
    ctl.parent.mkdir(parents=True)
    ctl.write_text(f'#!/bin/sh\nexec /usr/sbin/ejabberdctl --config-dir "{conf}" "$@"\n')
    ctl.chmod(0o755)
    (root / "opt" / "ejabberd-9.0" / "bin").mkdir(parents=True)  # older: not this one

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([CLI, *args, "--root", str(root)], capture_output=True,
                              text=True, timeout=600)

    try:
        instance.start(install=False)
        result = cli("install")
        assert result.returncode == 0, result.stdout + result.stderr
        assert f"The lines:\n    {included}, lines 3-4 (mod_push):\n" \
               "          3 |   mod_push:\n          4 |     include_body: false\n" \
               in result.stdout, result.stdout
        assert f"{included}, lines 5-6 (mod_push_keepalive):" in result.stdout
        assert "pymod-push install --replace-builtin" in result.stdout
        doctor = cli("doctor")
        assert doctor.returncode == 1, doctor.stdout + doctor.stderr
        assert re.search(rf"^ok   ejabberd \S+ is running \({re.escape(str(ctl))}\)$",
                         doctor.stdout, re.MULTILINE), doctor.stdout
        assert "ok   configuration: asked from the running node (ejabberdctl dump_config)" \
            in doctor.stdout
        assert "FAIL mod_push is enabled in ejabberd's configuration" in doctor.stdout
        assert f"{included}, lines 3-4 (mod_push):" in doctor.stdout
        # The dump (it holds passwords) went to a private directory in the ejabberd user's
        # home (systemd gives ejabberd a /tmp of its own), removed after.
        assert not list(Path(pwd.getpwnam("ejabberd").pw_dir).glob(".pymod_push-*"))

        mark = instance.log_mark()
        before = included.stat()
        result = cli("install", "--replace-builtin")
        assert result.returncode == 0, result.stdout + result.stderr
        assert "ejabberdctl reload_config: done" in result.stdout
        diff = result.stdout.split(f"--- {included}\n+++ {included}\n", 1)[1]  # the change
        assert diff.startswith("@@ -1,6 +1,6 @@\n # the old push setup\n-modules:\n"
                               "-  mod_push:\n"), result.stdout
        assert "+modules: {}\n+  # mod_push:\n+  #   include_body: false\n" \
               "+  # mod_push_keepalive:\n+  #   resume_timeout: 72h\n" in diff
        backups = list(conf.glob("push.yml.bak-pymod_push-*"))
        assert len(backups) == 1
        assert "  mod_push:\n    include_body: false\n" in backups[0].read_text()
        for path in (included, backups[0]):
            after = path.stat()
            assert (stat.S_IMODE(after.st_mode), after.st_uid, after.st_gid) == \
                (0o640, before.st_uid, before.st_gid), path
        assert yaml.safe_load(included.read_text())["modules"] == {}
        instance.wait_ready(mark)  # mod_push_py starts now that mod_push is gone
        doctor = cli("doctor")
        assert doctor.returncode == 0, doctor.stdout + doctor.stderr
        assert "FAIL" not in doctor.stdout
        assert "ok   localhost: Python process up" in doctor.stdout
        assert f"built from pymod_push {__version__}" in doctor.stdout

        # As the ejabberd user itself (the containers' way): no runuser, the same answers.
        doctor = subprocess.run(["runuser", "-u", "ejabberd", "--", CLI, "doctor", "--root",
                                 str(root)], capture_output=True, text=True, timeout=600,
                                cwd="/")
        assert doctor.returncode == 0, doctor.stdout + doctor.stderr
        assert "FAIL" not in doctor.stdout
        assert f"python: {default_python()}, runs as ejabberd" in doctor.stdout
        assert "ok   localhost: Python process up" in doctor.stdout
    finally:
        instance.discard()


def test_doctor_fails_on_a_beam_from_another_version(bare: Instance) -> None:
    """The Python package upgraded and not the module (or the other way round): doctor
    FAILs and says what to do; after pymod-push upgrade it is well; warnings do not fail."""
    result = pymod_push(bare, "install")
    assert result.returncode == 0, result.stdout + result.stderr
    sources = bare.folder / "modules" / "sources" / "mod_push_py"
    erl = sources / "src" / "mod_push_py.erl"
    erl.write_text(re.sub(r'^-vsn\("[^"]*"\)\.', '-vsn("0.0.1").', erl.read_text(),
                          flags=re.MULTILINE))
    conf = sources / "conf" / "mod_push_py.yml"
    options = yaml.safe_load(conf.read_text())
    options["modules"]["mod_push_py"]["access_backends"] = "all"
    conf.write_text(yaml.safe_dump(options))
    mark = bare.log_mark()
    bare.ctl("module_upgrade", "mod_push_py")  # compiled in the node from those sources
    bare.wait_ready(mark)
    beam = bare.folder / "modules" / "mod_push_py" / "ebin" / "mod_push_py.beam"
    doctor = pymod_push(bare, "doctor")
    assert doctor.returncode == 1, doctor.stdout + doctor.stderr
    assert f"FAIL {beam} built from 0.0.1, Python package {__version__}: run pymod-push " \
           "upgrade" in doctor.stdout
    assert "WARN access_backends: all" in doctor.stdout

    mark = bare.log_mark()
    result = pymod_push(bare, "upgrade")
    assert result.returncode == 0, result.stdout + result.stderr
    bare.wait_ready(mark)
    database = bare.spool / "pymod_push_localhost.sqlite3"
    database.chmod(0o644)
    doctor = pymod_push(bare, "doctor")
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr  # warnings only
    assert f"ok   {beam} built from pymod_push {__version__}" in doctor.stdout
    assert "WARN access_backends: all" in doctor.stdout  # kept by the upgrade
    assert f"WARN database {database} is mode 0644" in doctor.stdout
