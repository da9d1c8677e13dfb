"""``pymod-push install`` / ``upgrade`` / ``uninstall``: stage the module sources (the
shim, its conf file with ``python``, the spec's url and home), module_install or
module_upgrade, and with ``--replace-builtin`` comment out mod_push and
mod_push_keepalive where they are enabled (a backup kept), then reload_config."""

from __future__ import annotations

import os
import shutil
import textwrap
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from pymod_push import __version__
from pymod_push.install.ejabberd_config import (
    Entry,
    backup_name,
    comment_out,
    removal_text,
    secret_free_diff,
)
from pymod_push.install.errors import InstallError
from pymod_push.install.instance import Ejabberd, ejabberd_version
from pymod_push.install.layout import check_python, chown_to_ejabberd
from pymod_push.install.module_source import archive_path, seal
from pymod_push.install.shim import MODULE, module_conf, shim_source


def stage_sources(server: Ejabberd, python: str) -> None:
    """Copy the shim to the module sources, with ``python`` in its conf file."""
    existing = server.installed_conf.read_text() if server.installed_conf.is_file() else None
    target = server.sources
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(shim_source(), target)
        (target / "conf" / f"{MODULE}.yml").write_text(module_conf(python, existing))
        seal(target)  # the spec's url: a tarball of these sources, for modules_update_specs
    except OSError as exc:
        raise InstallError(f"cannot write the module sources to {target}: {exc.strerror} "
                           "(a read-only modules directory? see 'pymod-push build-module')") \
            from None
    chown_to_ejabberd(server.modules, server.user)


def replace_builtin(server: Ejabberd, entries: Sequence[Entry], conflicts: Sequence[str],
                    out: Callable[[str], None]) -> None:
    """Comment the entries out in their files (a backup kept, same mode and owner), show
    the change, reload_config; on a failed reload the files are put back. Nothing is
    changed when one of them cannot be (a macro's, flow style, not found in the files)."""
    blocked = [entry for entry in entries if entry.why_not_editable is not None]
    unplaced = sorted(set(conflicts) - {entry.module for entry in entries})
    if blocked or unplaced:
        raise InstallError("cannot comment these out (nothing was changed):\n"
                           + removal_text(blocked, unplaced)
                           + "\nRemove them by hand, then 'ejabberdctl reload_config'")
    restored: list[tuple[Path, Path]] = []
    for path in dict.fromkeys(entry.file for entry in entries):
        old = path.read_text()
        new = comment_out(old, [entry for entry in entries if entry.file == path])
        backup = backup_name(path, time.time())
        try:
            shutil.copy2(path, backup)
            if os.geteuid() == 0:
                st = path.stat()
                os.chown(backup, st.st_uid, st.st_gid)
            with open(path, "w") as handle:  # the same file: its mode and owner stay
                handle.write(new)
        except OSError as exc:
            raise InstallError(f"cannot edit {path}: {exc.strerror}; remove the lines by "
                               "hand:\n" + removal_text(entries, [])) from None
        restored.append((path, backup))
        out(f"commented out in {path} (backup: {backup}):\n"
            + secret_free_diff(old, new, path).rstrip())
    try:
        server.run("reload_config")
    except InstallError as exc:
        for path, backup in restored:
            shutil.copyfile(backup, path)
        raise InstallError(f"{exc}\nthe configuration files are back as they were") from None
    out("ejabberdctl reload_config: done")


def install(server: Ejabberd, python: str, upgrade: bool, out: Callable[[str], None],
            replace: bool = False) -> None:
    version = check_python(python, server.user)
    out(f"the user '{server.user}' runs {python} with pymod_push {version}")
    if version != __version__:
        raise InstallError(f"{python} has pymod_push {version}, this pymod-push is "
                           f"{__version__}: run the pymod-push of that environment")
    status = server.run("status", check=False)
    if ejabberd_version(status) is None:
        raise InstallError(f"ejabberd is not running ({server.ctl} status): start it first\n"
                           + status.strip())
    conflicts, view, _ = server.conflicts(running=True)
    entries = [entry for entry in view.entries if entry.module in conflicts]
    if conflicts and replace:
        replace_builtin(server, entries, conflicts, out)
        conflicts = []
    installed = MODULE in server.run("modules_installed").split()
    stage_sources(server, python)
    out(f"copied the module sources to {server.sources}")
    command = "module_upgrade" if installed else "module_install"
    if upgrade and not installed:
        out(f"{MODULE} was not installed: installing it")
    server.run(command, MODULE)
    out(f"ejabberdctl {command} {MODULE}: done")
    lines = ["", f"{MODULE} is installed; its options are in {server.installed_conf}",
             "(or in the modules section of ejabberd.yml). Next:"]
    if conflicts:
        lines.append(f"  - remove {' and '.join(conflicts)} from ejabberd's modules: "
                     f"{MODULE} stays inert where they are enabled. The lines:\n"
                     + textwrap.indent(removal_text(entries, conflicts), "  ")
                     + "\n    then 'ejabberdctl reload_config' and 'pymod-push upgrade'; or "
                     "let 'pymod-push install --replace-builtin' comment them out")
    lines += ["  - make sure mod_stream_mgmt (resume_timeout) and mod_offline are enabled",
              "  - configure backends / options as the pymod_push README describes, then "
              "'ejabberdctl reload_config'",
              "  - check everything: pymod-push doctor"]
    out("\n".join(lines))


def uninstall(server: Ejabberd, out: Callable[[str], None]) -> None:
    if MODULE in server.run("modules_installed").split():
        server.run("module_uninstall", MODULE)
        out(f"ejabberdctl module_uninstall {MODULE}: done")
    else:
        out(f"{MODULE} was not installed")
    if server.sources.exists():
        shutil.rmtree(server.sources)
        out(f"removed {server.sources}")
    if archive_path(server.sources).exists():
        archive_path(server.sources).unlink()
        out(f"removed {archive_path(server.sources)}")
    out("The Python package stays: remove its virtual environment when you no longer need it.")
