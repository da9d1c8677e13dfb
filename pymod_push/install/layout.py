"""Where an ejabberd is and how to act as its user: ejabberdctl (the PATH, ProcessOne's
installers, container images), its defaults and ejabberdctl.cfg (the configuration
directory, INSTALLUSER, SPOOL_DIR, CONTRIB_MODULES_PATH), and running commands as that
user (directly, or through runuser, setpriv or su as root).

The decisions are plain functions; ``as_ejabberd``, ``check_python`` and
``chown_to_ejabberd`` do the I/O.
"""

from __future__ import annotations

import os
import pwd
import re
import shlex
import shutil
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from pymod_push.install.errors import InstallError

EJABBERD_USER = "ejabberd"  # INSTALLUSER of Debian's and ProcessOne's ejabberdctl
# Where ejabberdctl may be, below the root, after the PATH: Debian's and most packages',
# ProcessOne's installers (/opt/ejabberd-VSN/bin, newest first), container images.
CTL_PLACES = ("usr/sbin/ejabberdctl", "opt/ejabberd-*/bin/ejabberdctl",
              "opt/ejabberd/bin/ejabberdctl", "home/ejabberd/bin/ejabberdctl")
# Where ejabberd.yml and ejabberdctl.cfg may be, when neither --config-dir nor ejabberdctl
# says: packages, ProcessOne's installers, container images, the BSDs.
CONFIG_DIRS = ("etc/ejabberd", "opt/ejabberd/conf", "home/ejabberd/conf",
               "usr/local/etc/ejabberd")
DEFAULT_SPOOL = "/var/lib/ejabberd"
# Settings of ejabberdctl.cfg the environment may give too (ejabberdctl keeps them).
ENV_SETTINGS = ("EJABBERD_CONFIG_PATH", "EJABBERDCTL_CONFIG_PATH", "CONTRIB_MODULES_PATH",
                "SPOOL_DIR", "CONFIG_DIR", "ETC_DIR", "INSTALLUSER")


def _expand(value: str, known: Mapping[str, str]) -> str:
    """$NAME and ${NAME} of earlier settings; unknown ones stay."""
    return re.sub(r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)\}|([A-Za-z_][A-Za-z0-9_]*))",
                  lambda m: known.get(m.group(1) or m.group(2), m.group(0)), value)


def parse_ctl_cfg(text: str, known: Mapping[str, str] | None = None) -> dict[str, str]:
    """The plain ``NAME=value`` assignments of an ejabberdctl.cfg (a shell file), and the
    defaults ejabberdctl itself sets (``: "${NAME:="value"}"``, kept when already set);
    ``$NAME`` expanded from ``known`` and earlier lines."""
    values: dict[str, str] = {}
    seen = dict(known or {})
    for line in text.splitlines():
        match = re.match(r"\s*([A-Z_][A-Z0-9_]*)=(.*)$", line)
        default = re.match(r'\s*:\s+"?\$\{([A-Z_][A-Z0-9_]*):=(.*)\}"?\s*$', line)
        if match:
            name, raw = match.groups()
        elif default:
            name, raw = default.groups()
            if name in seen:
                continue
        else:
            continue
        if "$(" in raw or "`" in raw:
            continue
        try:
            words = shlex.split(raw, comments=True)
        except ValueError:
            continue
        values[name] = _expand(words[0], seen) if words else ""
        seen[name] = values[name]
    return values


def modules_dir(ctl_cfg: Mapping[str, str], user_home: str) -> Path:
    """Where ejabberd's ext_mod keeps module sources and installed modules: the
    CONTRIB_MODULES_PATH of ejabberdctl.cfg, else ~ejabberd/.ejabberd-modules."""
    return Path(ctl_cfg.get("CONTRIB_MODULES_PATH") or Path(user_home) / ".ejabberd-modules")


def version_key(name: str) -> tuple[int, ...]:
    """'ejabberd-23.01' -> (23, 1): newest sorts last (ASCII digits only)."""
    return tuple(int(number) for number in re.findall(r"[0-9]+", name))


def ctl_candidates(root: Path = Path("/")) -> list[Path]:
    """Where to look for ejabberdctl below ``root`` (after the PATH), in order."""
    found: list[Path] = []
    for place in CTL_PLACES:
        if "*" in place:
            found += sorted(root.glob(place), key=lambda path: version_key(path.parts[-3]),
                            reverse=True)
        else:
            found.append(root / place)
    return found


def find_ctl(explicit: str | None, root: Path = Path("/"),
             which: Callable[[str], str | None] = shutil.which) -> str:
    """--ctl, else ejabberdctl on the PATH (for the real root), else the usual places."""
    if explicit:
        return explicit
    if root == Path("/") and (on_path := which("ejabberdctl")):
        return on_path
    for candidate in ctl_candidates(root):
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    places = ", ".join("/" + place.rsplit("/", 1)[0] for place in CTL_PLACES)
    raise InstallError(f"ejabberdctl not found: not on the PATH, nor in {places}.\n"
                       "Give its path: --ctl PATH")


@dataclass
class Layout:
    """Where an ejabberd keeps things, as its ejabberdctl and ejabberdctl.cfg say."""

    config_dir: Path | None  # None: no directory with ejabberd.yml or ejabberdctl.cfg found
    settings: dict[str, str]  # ejabberdctl's defaults, then ejabberdctl.cfg's
    ctl_cfg: Path | None

    @property
    def user(self) -> str:
        return self.settings.get("INSTALLUSER") or EJABBERD_USER

    @property
    def config_file(self) -> Path | None:
        named = self.settings.get("EJABBERD_CONFIG_PATH")
        if named and "$" not in named:
            return Path(named)
        return None if self.config_dir is None else self.config_dir / "ejabberd.yml"

    @property
    def spool(self) -> Path:
        named = self.settings.get("SPOOL_DIR", "")
        return Path(named if named and "$" not in named else DEFAULT_SPOOL)


def find_layout(ctl: str, config_dir: Path | None, read: Callable[[Path], str | None],
                root: Path = Path("/"), env: Mapping[str, str] | None = None) -> Layout:
    """ejabberdctl's own defaults (a shell script: its CONFIG_DIR / ETC_DIR, INSTALLUSER,
    SPOOL_DIR...), the configuration directory (--config-dir, else ejabberdctl's, else the
    first of CONFIG_DIRS holding ejabberd.yml or ejabberdctl.cfg) and its ejabberdctl.cfg."""
    known = {name: value for name, value in (env or {}).items() if name in ENV_SETTINGS}
    known["SCRIPT_DIR"] = str(Path(ctl).parent)
    if config_dir is not None:
        known["CONFIG_DIR"] = known["ETC_DIR"] = str(config_dir)
    script = parse_ctl_cfg(read(Path(ctl)) or "", known) if os.sep in ctl else {}
    script = {**known, **script}

    def holds_config(directory: Path) -> bool:
        return any(read(directory / name) is not None
                   for name in ("ejabberd.yml", "ejabberdctl.cfg"))

    directory = config_dir
    if directory is None:
        named = [Path(script[name]) for name in ("CONFIG_DIR", "ETC_DIR")
                 if script.get(name) and "$" not in script[name]]
        directory = next((d for d in [*named, *(root / place for place in CONFIG_DIRS)]
                          if holds_config(d)), None)
    cfg_path = None
    named_cfg = script.get("EJABBERDCTL_CONFIG_PATH", "")
    if config_dir is None and named_cfg and "$" not in named_cfg \
            and read(Path(named_cfg)) is not None:
        cfg_path = Path(named_cfg)
    elif directory is not None:
        cfg_path = directory / "ejabberdctl.cfg"
    cfg_text = None if cfg_path is None else read(cfg_path)
    cfg = parse_ctl_cfg(cfg_text, script) if cfg_text is not None else {}
    settings = {**script, **cfg}
    settings = {name: _expand(value, settings) for name, value in settings.items()}
    layout = Layout(directory, settings, cfg_path if cfg_text is not None else None)
    named_config = layout.config_file
    if named_config is not None and read(named_config) is None and directory is not None:
        settings["EJABBERD_CONFIG_PATH"] = str(directory / "ejabberd.yml")
    return layout


def switch_user(command: Sequence[str], user: str, euid: int, current: str,
                which: Callable[[str], str | None] = shutil.which,
                group: str | None = None) -> list[str]:
    """``command`` run as ``user`` (of ``group``, default the same name): directly when that
    is who we are (containers run everything as the ejabberd user), through runuser,
    setpriv or su as root."""
    if current == user:
        return list(command)
    if euid != 0:
        raise InstallError(f"run pymod-push as root or as the user '{user}' "
                           f"(ejabberd's INSTALLUSER), not as '{current}'")
    if which("runuser"):
        return ["runuser", "-u", user, "--", *command]
    if which("setpriv"):
        return ["setpriv", f"--reuid={user}", f"--regid={group or user}", "--init-groups", "--",
                *command]
    if which("su"):
        return ["su", "-s", "/bin/sh", user, "-c", shlex.join(command)]
    raise InstallError(f"cannot run commands as '{user}': none of runuser, setpriv, su is "
                       "on the PATH (install util-linux), or run pymod-push as that user")


def blocking_directory(path: str, can_enter: Callable[[str], bool]) -> str | None:
    """The first directory from / down to ``path``'s parent that the user cannot enter."""
    parts = Path(path).parent.parts
    for depth in range(1, len(parts) + 1):
        directory = str(Path(*parts[:depth]))
        if not can_enter(directory):
            return directory
    return None


def unreachable_message(python: str, blocking: str | None, detail: str,
                        user: str = EJABBERD_USER) -> str:
    if blocking is not None:
        return (f"the user '{user}' cannot run {python}: it cannot enter {blocking}.\n"
                f"ejabberd starts the port program as '{user}'. Put the virtual "
                "environment where it can go, e.g.\n"
                "    python3 -m venv /opt/pymod_push && /opt/pymod_push/bin/pip install "
                "pymod_push\n"
                "    /opt/pymod_push/bin/pymod-push install\n"
                f"or let it through: chmod o+x {blocking}")
    return (f"the user '{user}' cannot run '{python} -c \"import pymod_push\"': "
            f"{detail}\nMake the virtual environment readable: chmod -R a+rX "
            f"{Path(python).parent.parent}")


def current_user() -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return str(os.geteuid())


def as_ejabberd(*command: str, user: str = EJABBERD_USER) -> subprocess.CompletedProcess[str]:
    """A command as the ejabberd user, in the clean environment a port program gets."""
    try:
        group = str(pwd.getpwnam(user).pw_gid)
    except KeyError:
        group = None
    full = switch_user(["env", "-i", "PATH=/usr/bin:/bin", *command], user, os.geteuid(),
                       current_user(), group=group)
    return subprocess.run(full, capture_output=True, text=True, cwd="/", timeout=60)


def check_python(python: str, user: str = EJABBERD_USER) -> str:
    """The pymod_push version the ejabberd user gets from ``python``; InstallError if none."""
    result = as_ejabberd(python, "-c", "import pymod_push; print(pymod_push.__version__)",
                         user=user)
    if result.returncode == 0:
        return result.stdout.strip()
    blocking = blocking_directory(
        python, lambda directory: as_ejabberd("test", "-x", directory,
                                              user=user).returncode == 0)
    raise InstallError(unreachable_message(python, blocking, result.stderr.strip(), user))


def chown_to_ejabberd(path: Path, user: str = EJABBERD_USER) -> None:
    """Root gives what it wrote to the ejabberd user; that user itself owns it already."""
    if os.geteuid() == 0:
        subprocess.run(["chown", "-R", f"{user}:", str(path)], check=True)
    elif current_user() != user:
        raise InstallError(f"cannot give {path} to '{user}': only root can (chown); run "
                           f"pymod-push as root or as '{user}'")
