"""``pymod-push doctor``: what it looks at (``gather``: ejabberd, the installed module and
its .beam, the Python process, the configuration, the databases) and what it concludes
(``diagnose``: one Finding per check, ok, WARN or FAIL).

``diagnose`` and the readers (``beam_version``, ``is_loopback``, ``database_files``) are
plain functions; ``gather`` does the I/O.
"""

from __future__ import annotations

import gzip
import ipaddress
import platform
import stat
import struct
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pymod_push import __version__, etf
from pymod_push.install.ejabberd_config import module_options, removal_text
from pymod_push.install.errors import InstallError
from pymod_push.install.instance import Ejabberd, ejabberd_version, read_or_none
from pymod_push.install.layout import EJABBERD_USER, check_python
from pymod_push.install.shim import MODULE


def beam_attributes(data: bytes) -> dict[str, Any]:
    """The module attributes (-vsn, -behaviour...) in a .beam's Attr chunk (an External
    Term Format list of {Name, Value})."""
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    if data[:4] != b"FOR1" or data[8:12] != b"BEAM":
        raise ValueError("not a BEAM file")
    position = 12
    while position + 8 <= len(data):
        chunk, size = data[position:position + 4], struct.unpack(">I", data[position + 4:
                                                                              position + 8])[0]
        if chunk == b"Attr":
            terms = etf.decode(data[position + 8:position + 8 + size])
            return {str(name): value for name, value in terms}
        position += 8 + (size + 3) // 4 * 4
    return {}


def beam_version(data: bytes) -> str | None:
    """The -vsn("X") of a .beam (a charlist, or a list of one term); None when the compiler
    put its default there (the MD5 of the code, a large integer)."""
    value = beam_attributes(data).get("vsn")
    if not isinstance(value, list) or not value:
        return None
    if len(value) == 1 and not isinstance(value[0], int):
        item = value[0]
        if isinstance(item, bytes):
            return item.decode(errors="replace")
        if not isinstance(item, list):
            return str(item)
        value = item
    if all(isinstance(c, int) and 32 <= c < 127 for c in value):
        return "".join(map(chr, value))
    return None


def is_loopback(listen: str) -> bool:
    """Whether a ``host:port`` (metrics_listen) listens on a loopback address only."""
    host = listen.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name: it may resolve to anything


def database_files(options: Sequence[Mapping[str, Any]], spool: Path,
                   glob: Callable[[Path, str], list[Path]]) -> list[Path]:
    """The SQLite files of the module's ``db_file`` options (``auto``: pymod_push_HOST.sqlite3
    in the spool directory); none with ``db_url`` (PostgreSQL)."""
    files: list[Path] = []
    for option in options or [{}]:
        if option.get("db_url"):
            continue
        db_file = str(option.get("db_file", "auto"))
        found = glob(spool, "pymod_push_*.sqlite3") if db_file == "auto" else [Path(db_file)]
        files += [path for path in found if path not in files]
    return files


@dataclass
class Finding:
    ok: bool
    text: str
    warn: bool = False  # printed WARN: worth a look, not a failure


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
    user: str = EJABBERD_USER
    config_source: str = ""  # where the configuration was read
    conflict_places: str = ""  # removal_text of the conflicts
    beam_version: str | None = None  # the installed .beam's -vsn
    beam: Path | None = None  # the installed .beam, if there is one
    access_all: bool = False  # access_backends: all somewhere
    databases: dict[Path, int] = field(default_factory=dict)  # SQLite file -> st_mode
    metrics_listen: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what the doctor could not look at
    ctl: str = ""  # the ejabberdctl used


def diagnose(facts: Facts) -> list[Finding]:  # noqa: C901 - one branch per check
    findings = [Finding(True, f"pymod-push {__version__}, Python {platform.python_version()} "
                              f"({sys.executable})")]
    if facts.ejabberd_version is None:
        findings.append(Finding(False, "ejabberd is not running (ejabberdctl status)"))
    else:
        findings.append(Finding(True, f"ejabberd {facts.ejabberd_version} is running"
                                + (f" ({facts.ctl})" if facts.ctl else "")))
    if facts.config_source:
        findings.append(Finding(True, f"configuration: {facts.config_source}"))
    sources = facts.modules_dir / "sources" / MODULE
    if facts.sources_present:
        findings.append(Finding(True, f"module sources in {sources}"))
    elif facts.installed:  # prebuilt (pymod-push build-module): nothing to compile from
        findings.append(Finding(True, f"{MODULE} is prebuilt, without sources in {sources}: "
                                "to upgrade, rebuild it (pymod-push build-module)"))
    else:
        findings.append(Finding(False, f"module sources in {sources}: missing"))
    findings.append(Finding(facts.installed, f"{MODULE} is "
                            + ("installed" if facts.installed else "not installed "
                               "(pymod-push install)")))
    if facts.beam is not None:
        if facts.beam_version == __version__:
            findings.append(Finding(True, f"{facts.beam} built from pymod_push {__version__}"))
        else:
            built = facts.beam_version or "an older pymod_push (no version in it)"
            findings.append(Finding(False, f"{facts.beam} built from {built}, Python package "
                                    f"{__version__}: run pymod-push upgrade"))
    for name in facts.conflicts:
        findings.append(Finding(False, f"{name} is enabled in ejabberd's configuration: "
                                f"{MODULE} stays inert on such hosts; remove {name} "
                                "(pymod-push install --replace-builtin comments it out)"))
    if facts.conflicts and facts.conflict_places:
        findings.append(Finding(False, "the lines to remove:\n" + facts.conflict_places))
    if facts.python is not None:
        if facts.python_check is None:
            same = facts.python_package_version == __version__
            findings.append(Finding(
                True, f"python: {facts.python}, runs as {facts.user}, pymod_push "
                f"{facts.python_package_version}" + ("" if same else
                                                     f" (this pymod-push is {__version__})")))
        else:
            findings.append(Finding(False, f"python: {facts.python}: {facts.python_check}"))
    if facts.access_all:
        findings.append(Finding(True, "access_backends: all: users of any server (remote "
                                "users too) may register devices at the built-in app server; "
                                "'local' (the default) or an access rule limits it", warn=True))
    for path, mode in facts.databases.items():
        if mode & 0o077:
            findings.append(Finding(True, f"database {path} is mode {stat.S_IMODE(mode):04o}: "
                                    f"other users may read it; chmod 600 {path}", warn=True))
        else:
            findings.append(Finding(True, f"database {path}: mode {stat.S_IMODE(mode):04o}"))
    for listen in facts.metrics_listen:
        if not is_loopback(listen):
            findings.append(Finding(True, f"metrics_listen {listen} is not a loopback address: "
                                    "/metrics is open to the network (use 127.0.0.1, or a "
                                    "firewall)", warn=True))
    for note in facts.notes:
        findings.append(Finding(True, note, warn=True))
    for host, status in facts.statuses.items():
        up = "Python process up" in status  # the shim's own line, Python's follow
        findings.append(Finding(up, f"{host}: " + " | ".join(status.strip().splitlines())))
    return findings


def _read(path: Path) -> str:
    return read_or_none(path) or ""


def gather(server: Ejabberd) -> Facts:
    status = server.run("status", check=False)
    version = ejabberd_version(status)
    installed = version is not None and MODULE in server.run("modules_installed",
                                                             check=False).split()
    python = None
    notes: list[str] = []
    conf_options: dict[str, Any] = {}
    conf = _read(server.installed_conf)
    if conf:
        loaded = yaml.safe_load(conf) or {}
        conf_options = dict(((loaded.get("modules") or {}).get(MODULE)) or {})
        python = conf_options.get("python")
    python_check = package_version = None
    if python is not None:
        try:
            package_version = check_python(str(python), server.user)
        except InstallError as exc:
            python_check = str(exc)
    statuses = {}
    if installed:
        for host in server.run("registered_vhosts", check=False).split():
            status = server.run("push_status", host, check=False).strip() or "(no answer)"
            if "unknown command" in status:  # the module is inert: its commands are not there
                status = "mod_push_py is not started on any host (see ejabberd's log)"
            statuses[host] = status
    conflicts, view, source = server.conflicts(running=version is not None)
    notes += view.problems
    beam = server.installed_beam if server.installed_beam.is_file() else None
    built = None
    if beam is not None:
        try:
            built = beam_version(beam.read_bytes())
        except (OSError, ValueError, etf.DecodeError) as exc:
            notes.append(f"cannot read {beam}: {exc}")
    options = [*module_options(view.config), conf_options]
    databases: dict[Path, int] = {}
    for path in database_files(options, server.layout.spool,
                               lambda directory, pattern: sorted(directory.glob(pattern))):
        try:
            databases[path] = path.stat().st_mode
        except OSError as exc:
            if not isinstance(exc, FileNotFoundError):
                notes.append(f"cannot look at the database {path}: {exc.strerror}")
    return Facts(version, server.modules, installed, server.sources.is_dir(),
                 None if python is None else str(python), python_check, package_version,
                 conflicts, statuses, user=server.user, config_source=source,
                 conflict_places=removal_text(
                     [e for e in view.entries if e.module in conflicts], conflicts)
                 if conflicts else "",
                 beam_version=built, beam=beam,
                 access_all=any(str(o.get("access_backends")) == "all" for o in options),
                 databases=databases,
                 metrics_listen=sorted({str(o["metrics_listen"]) for o in options
                                        if o.get("metrics_listen")}),
                 notes=notes, ctl=server.ctl)
