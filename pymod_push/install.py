"""``pymod-push``: install, upgrade, uninstall and check mod_push_py in an ejabberd.

    pymod-push install     # the shim to ejabberd's module sources, python = this interpreter
    pymod-push upgrade     # the same sources again (after a pip upgrade), module_upgrade
    pymod-push uninstall
    pymod-push doctor      # versions, conflicts, permissions, the Python process
    pymod-push logic check FILE   # your push logic on sample stanzas (see logic_check)

Run it as root (or as the ejabberd user) with the interpreter of the virtual environment
that has pymod_push. ``--ctl`` and ``--config-dir`` pick the ejabberd instance.

The decisions are plain functions (what the sources dir is, which directory stops the
ejabberd user, what the doctor concludes); ``Ejabberd`` and ``main`` do the I/O.
"""

from __future__ import annotations

import argparse
import os
import platform
import pwd
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from pymod_push import __version__

MODULE = "mod_push_py"
EJABBERD_USER = "ejabberd"  # INSTALLUSER of Debian's and ProcessOne's ejabberdctl
CONFLICTING = ("mod_push", "mod_push_keepalive")
PACKAGE_DIR = Path(__file__).resolve().parent


class InstallError(Exception):
    """What went wrong and what to do, for the admin."""


# ---------------------------------------------------------------------- decisions


def shim_source(package_dir: Path = PACKAGE_DIR) -> Path:
    """The shim's sources: in the wheel (pymod_push/erl_shim), else the checkout's erl_shim."""
    for candidate in (package_dir / "erl_shim", package_dir.parent / "erl_shim"):
        if (candidate / f"{MODULE}.spec").is_file():
            return candidate
    raise InstallError(f"the sources of {MODULE} are not next to {package_dir}: "
                       "reinstall the pymod_push package")


def parse_ctl_cfg(text: str) -> dict[str, str]:
    """The plain ``NAME=value`` assignments of an ejabberdctl.cfg (a shell file)."""
    values: dict[str, str] = {}
    for line in text.splitlines():
        match = re.match(r"\s*([A-Z_][A-Z0-9_]*)=(.*)$", line)
        if match:
            try:
                words = shlex.split(match.group(2), comments=True)
            except ValueError:
                continue
            values[match.group(1)] = words[0] if words else ""
    return values


def modules_dir(ctl_cfg: dict[str, str], user_home: str) -> Path:
    """Where ejabberd's ext_mod keeps module sources and installed modules: the
    CONTRIB_MODULES_PATH of ejabberdctl.cfg, else ~ejabberd/.ejabberd-modules."""
    return Path(ctl_cfg.get("CONTRIB_MODULES_PATH") or Path(user_home) / ".ejabberd-modules")


def blocking_directory(path: str, can_enter: Callable[[str], bool]) -> str | None:
    """The first directory from / down to ``path``'s parent that the user cannot enter."""
    parts = Path(path).parent.parts
    for depth in range(1, len(parts) + 1):
        directory = str(Path(*parts[:depth]))
        if not can_enter(directory):
            return directory
    return None


def unreachable_message(python: str, blocking: str | None, detail: str) -> str:
    if blocking is not None:
        return (f"the user '{EJABBERD_USER}' cannot run {python}: it cannot enter {blocking}.\n"
                f"ejabberd starts the port program as '{EJABBERD_USER}'. Put the virtual "
                "environment where it can go, e.g.\n"
                "    python3 -m venv /opt/pymod_push && /opt/pymod_push/bin/pip install "
                "pymod_push\n"
                "    /opt/pymod_push/bin/pymod-push install\n"
                f"or let it through: chmod o+x {blocking}")
    return (f"the user '{EJABBERD_USER}' cannot run '{python} -c \"import pymod_push\"': "
            f"{detail}\nMake the virtual environment readable: chmod -R a+rX "
            f"{Path(python).parent.parent}")


def module_conf(python: str, existing: str | None = None) -> str:
    """conf/mod_push_py.yml with ``python`` set, other options of an existing one kept."""
    options: dict[str, object] = {}
    if existing:
        loaded = yaml.safe_load(existing) or {}
        options = dict(((loaded.get("modules") or {}).get(MODULE)) or {})
    options["python"] = python
    return ("# Options of mod_push_py, written by 'pymod-push install'; see the README.\n"
            + yaml.safe_dump({"modules": {MODULE: options}}, sort_keys=False))


def enabled_modules(config_text: str) -> set[str]:
    """The modules of ejabberd.yml's top-level and per-host ``modules`` sections."""
    try:
        config = yaml.safe_load(config_text) or {}
    except yaml.YAMLError:
        return set()
    found = set((config.get("modules") or {}).keys())
    for host_config in (config.get("host_config") or {}).values():
        found |= set(((host_config or {}).get("modules") or {}).keys())
    return found


def ejabberd_version(status_output: str) -> str | None:
    match = re.search(r"ejabberd (\S+) is running", status_output)
    return match.group(1) if match else None


@dataclass
class Finding:
    ok: bool
    text: str


@dataclass
class Facts:
    """What the doctor looked at (gathered by ``gather``)."""

    ejabberd_version: str | None  # None: not running
    modules_dir: Path
    installed: bool
    sources_present: bool
    python: str | None  # the python option of the installed module
    python_check: str | None  # None: the ejabberd user runs it and imports pymod_push
    python_package_version: str | None
    conflicts: list[str]
    statuses: dict[str, str] = field(default_factory=dict)  # host -> push_status


def diagnose(facts: Facts) -> list[Finding]:
    findings = [Finding(True, f"pymod-push {__version__}, Python {platform.python_version()} "
                              f"({sys.executable})")]
    if facts.ejabberd_version is None:
        findings.append(Finding(False, "ejabberd is not running (ejabberdctl status)"))
    else:
        findings.append(Finding(True, f"ejabberd {facts.ejabberd_version} is running"))
    findings.append(Finding(facts.sources_present,
                            f"module sources in {facts.modules_dir / 'sources' / MODULE}"
                            + ("" if facts.sources_present else ": missing")))
    findings.append(Finding(facts.installed, f"{MODULE} is "
                            + ("installed" if facts.installed else "not installed "
                               "(pymod-push install)")))
    for name in facts.conflicts:
        findings.append(Finding(False, f"{name} is enabled in ejabberd's configuration: "
                                f"{MODULE} stays inert on such hosts; remove {name}"))
    if facts.python is not None:
        if facts.python_check is None:
            same = facts.python_package_version == __version__
            findings.append(Finding(
                True, f"python: {facts.python}, runs as {EJABBERD_USER}, pymod_push "
                f"{facts.python_package_version}" + ("" if same else
                                                     f" (this pymod-push is {__version__})")))
        else:
            findings.append(Finding(False, f"python: {facts.python}: {facts.python_check}"))
    for host, status in facts.statuses.items():
        up = "Python process up" in status  # the shim's own line, Python's follow
        findings.append(Finding(up, f"{host}: " + " | ".join(status.strip().splitlines())))
    return findings


# ---------------------------------------------------------------------- the edges


@dataclass
class Ejabberd:
    """One ejabberd instance, through its ejabberdctl."""

    ctl: str
    config_dir: Path | None
    modules: Path

    @classmethod
    def locate(cls, ctl: str | None, config_dir: Path | None,
               modules: Path | None) -> Ejabberd:
        found = ctl or shutil.which("ejabberdctl") or (
            "/usr/sbin/ejabberdctl" if os.path.exists("/usr/sbin/ejabberdctl") else None)
        if found is None:
            raise InstallError("ejabberdctl not found: install ejabberd, or give --ctl PATH")
        if modules is None:
            cfg_file = (config_dir or Path("/etc/ejabberd")) / "ejabberdctl.cfg"
            cfg = parse_ctl_cfg(cfg_file.read_text()) if cfg_file.is_file() else {}
            try:
                home = pwd.getpwnam(EJABBERD_USER).pw_dir
            except KeyError:
                raise InstallError(f"there is no user '{EJABBERD_USER}': is ejabberd "
                                   "installed?") from None
            modules = modules_dir(cfg, home)
        return cls(found, config_dir, modules)

    def run(self, *args: str, check: bool = True, timeout: float = 300) -> str:
        command = [self.ctl, *(["--config-dir", str(self.config_dir)]
                               if self.config_dir else []), *args]
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise InstallError(f"{shlex.join(command)} failed ({result.returncode}):\n"
                               f"{result.stdout}{result.stderr}".rstrip())
        return result.stdout

    @property
    def sources(self) -> Path:
        return self.modules / "sources" / MODULE

    @property
    def installed_conf(self) -> Path:
        return self.modules / MODULE / "conf" / f"{MODULE}.yml"

    def config_file(self) -> Path:
        cfg_file = (self.config_dir or Path("/etc/ejabberd")) / "ejabberdctl.cfg"
        cfg = parse_ctl_cfg(cfg_file.read_text()) if cfg_file.is_file() else {}
        return Path(cfg.get("EJABBERD_CONFIG_PATH")
                    or (self.config_dir or Path("/etc/ejabberd")) / "ejabberd.yml")


def as_ejabberd(*command: str) -> subprocess.CompletedProcess[str]:
    """A command as the ejabberd user, in the clean environment a port program gets."""
    prefix: list[str] = []
    if os.geteuid() == 0:
        prefix = ["runuser", "-u", EJABBERD_USER, "--"]
    elif pwd.getpwuid(os.geteuid()).pw_name != EJABBERD_USER:
        raise InstallError(f"run pymod-push as root or as the user '{EJABBERD_USER}'")
    return subprocess.run([*prefix, "env", "-i", "PATH=/usr/bin:/bin", *command],
                          capture_output=True, text=True, cwd="/", timeout=60)


def check_python(python: str) -> str:
    """The pymod_push version the ejabberd user gets from ``python``; InstallError if none."""
    result = as_ejabberd(python, "-c", "import pymod_push; print(pymod_push.__version__)")
    if result.returncode == 0:
        return result.stdout.strip()
    blocking = blocking_directory(
        python, lambda directory: as_ejabberd("test", "-x", directory).returncode == 0)
    raise InstallError(unreachable_message(python, blocking, result.stderr.strip()))


def chown_to_ejabberd(path: Path) -> None:
    if os.geteuid() == 0:
        subprocess.run(["chown", "-R", f"{EJABBERD_USER}:", str(path)], check=True)


def stage_sources(server: Ejabberd, python: str) -> None:
    """Copy the shim to the module sources, with ``python`` in its conf file."""
    existing = server.installed_conf.read_text() if server.installed_conf.is_file() else None
    target = server.sources
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(shim_source(), target)
    (target / "conf" / f"{MODULE}.yml").write_text(module_conf(python, existing))
    chown_to_ejabberd(server.modules)


def install(server: Ejabberd, python: str, upgrade: bool, out: Callable[[str], None]) -> None:
    version = check_python(python)
    out(f"the user '{EJABBERD_USER}' runs {python} with pymod_push {version}")
    if version != __version__:
        raise InstallError(f"{python} has pymod_push {version}, this pymod-push is "
                           f"{__version__}: run the pymod-push of that environment")
    status = server.run("status", check=False)
    if ejabberd_version(status) is None:
        raise InstallError(f"ejabberd is not running ({server.ctl} status): start it first\n"
                           + status.strip())
    installed = MODULE in server.run("modules_installed").split()
    stage_sources(server, python)
    out(f"copied the module sources to {server.sources}")
    command = "module_upgrade" if installed else "module_install"
    if upgrade and not installed:
        out(f"{MODULE} was not installed: installing it")
    server.run(command, MODULE)
    out(f"ejabberdctl {command} {MODULE}: done")
    conflicts = sorted(enabled_modules(_read(server.config_file())) & set(CONFLICTING))
    lines = ["", f"{MODULE} is installed; its options are in {server.installed_conf}",
             "(or in the modules section of ejabberd.yml). Next:"]
    if conflicts:
        lines.append(f"  - remove {' and '.join(conflicts)} from ejabberd's modules: "
                     f"{MODULE} stays inert where they are enabled")
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
    out("The Python package stays: remove its virtual environment when you no longer need it.")


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def gather(server: Ejabberd) -> Facts:
    status = server.run("status", check=False)
    version = ejabberd_version(status)
    installed = version is not None and MODULE in server.run("modules_installed",
                                                             check=False).split()
    python = None
    conf = _read(server.installed_conf)
    if conf:
        options = ((yaml.safe_load(conf) or {}).get("modules") or {}).get(MODULE) or {}
        python = options.get("python")
    python_check = package_version = None
    if python is not None:
        try:
            package_version = check_python(str(python))
        except InstallError as exc:
            python_check = str(exc)
    statuses = {}
    if installed:
        for host in server.run("registered_vhosts", check=False).split():
            status = server.run("push_status", host, check=False).strip() or "(no answer)"
            if "unknown command" in status:  # the module is inert: its commands are not there
                status = "mod_push_py is not started on any host (see ejabberd's log)"
            statuses[host] = status
    return Facts(version, server.modules, installed, server.sources.is_dir(),
                 None if python is None else str(python), python_check, package_version,
                 sorted(enabled_modules(_read(server.config_file())) & set(CONFLICTING)),
                 statuses)


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["logic"]:  # pymod-push logic check FILE: the admin's push logic, offline
        from pymod_push.logic_check import main as logic_main
        return logic_main(argv[1:])
    if argv[:1] == ["build-module"]:  # a prebuilt module folder (pymod_push/build_module.py)
        from pymod_push.build_module import main as build_module_main
        return build_module_main(argv[1:])
    parser = argparse.ArgumentParser(prog="pymod-push", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["install", "upgrade", "uninstall", "doctor", "logic"],
                        help="logic: 'pymod-push logic check FILE' tries your push logic")
    parser.add_argument("--ctl", help="ejabberdctl to use (default: the one on PATH)")
    parser.add_argument("--config-dir", type=Path,
                        help="ejabberd's configuration directory (ejabberdctl --config-dir)")
    parser.add_argument("--modules-dir", type=Path,
                        help="ejabberd's CONTRIB_MODULES_PATH (default: from ejabberdctl.cfg, "
                        "else ~ejabberd/.ejabberd-modules)")
    parser.add_argument("--python", default=sys.executable,
                        help="the interpreter ejabberd runs (default: this one)")
    args = parser.parse_args(argv)
    try:
        server = Ejabberd.locate(args.ctl, args.config_dir, args.modules_dir)
        if args.command in ("install", "upgrade"):
            install(server, args.python, args.command == "upgrade", print)
        elif args.command == "uninstall":
            uninstall(server, print)
        else:
            findings = diagnose(gather(server))
            for finding in findings:
                print(("ok   " if finding.ok else "FAIL ") + finding.text)
            return 0 if all(finding.ok for finding in findings) else 1
    except InstallError as exc:
        print(f"pymod-push {args.command}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
