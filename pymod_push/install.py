"""``pymod-push``: install, upgrade, uninstall and check mod_push_py in an ejabberd.

    pymod-push install     # the shim to ejabberd's module sources, python = this interpreter
    pymod-push install --replace-builtin   # also comments out mod_push, mod_push_keepalive
    pymod-push upgrade     # the same sources again (after a pip upgrade), module_upgrade
    pymod-push uninstall
    pymod-push doctor      # versions, conflicts, permissions, exposure, the Python process
    pymod-push logic check FILE   # your push logic on sample stanzas (see logic_check)

Run it as root (or as the ejabberd user) with the interpreter of the virtual environment
that has pymod_push. It finds ``ejabberdctl`` on the PATH, in /usr/sbin, /opt/ejabberd-*/bin
(ProcessOne's installers), /opt/ejabberd/bin or /home/ejabberd/bin (container images);
``--ctl`` and ``--config-dir`` pick another instance. The configuration is asked from the
running node (``ejabberdctl dump_config``), else read from its files (included files and
macros count).

The decisions are plain functions (where ejabberd is, its layout, which lines enable
mod_push, how to become the ejabberd user, what the doctor concludes); ``Ejabberd`` and
``main`` do the I/O.
"""

from __future__ import annotations

import argparse
import difflib
import gzip
import ipaddress
import os
import platform
import pwd
import re
import shlex
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pymod_push import __version__, etf
from pymod_push.module_source import archive_path, seal

MODULE = "mod_push_py"
EJABBERD_USER = "ejabberd"  # INSTALLUSER of Debian's and ProcessOne's ejabberdctl
CONFLICTING = ("mod_push", "mod_push_keepalive")
PACKAGE_DIR = Path(__file__).resolve().parent
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


def _version_key(name: str) -> tuple[int, ...]:
    return tuple(int(number) for number in re.findall(r"\d+", name))


def ctl_candidates(root: Path = Path("/")) -> list[Path]:
    """Where to look for ejabberdctl below ``root`` (after the PATH), in order."""
    found: list[Path] = []
    for place in CTL_PLACES:
        if "*" in place:
            found += sorted(root.glob(place), key=lambda path: _version_key(path.parts[-3]),
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


def module_conf(python: str, existing: str | None = None) -> str:
    """conf/mod_push_py.yml with ``python`` set, other options of an existing one kept."""
    options: dict[str, object] = {}
    if existing:
        loaded = yaml.safe_load(existing) or {}
        options = dict(((loaded.get("modules") or {}).get(MODULE)) or {})
    options["python"] = python
    return ("# Options of mod_push_py, written by 'pymod-push install'; see the README.\n"
            + yaml.safe_dump({"modules": {MODULE: options}}, sort_keys=False))


def _modules_sections(config: Mapping[str, Any]) -> Iterator[Mapping[str, Any]]:
    """The ``modules`` maps: top-level, and of each host in host_config and
    append_host_config."""
    if isinstance(config.get("modules"), Mapping):
        yield config["modules"]
    for section in ("host_config", "append_host_config"):
        hosts = config.get(section)
        if isinstance(hosts, Mapping):
            for host_config in hosts.values():
                if isinstance(host_config, Mapping) and isinstance(host_config.get("modules"),
                                                                   Mapping):
                    yield host_config["modules"]


def enabled_modules(config: str | Mapping[str, Any]) -> set[str]:
    """The modules of ejabberd.yml's top-level and per-host ``modules`` sections (a text,
    or a configuration already read)."""
    if isinstance(config, str):
        try:
            config = yaml.safe_load(config) or {}
        except yaml.YAMLError:
            return set()
    if not isinstance(config, Mapping):
        return set()
    return {str(name) for modules in _modules_sections(config) for name in modules}


def module_options(config: Mapping[str, Any], module: str = MODULE) -> list[dict[str, Any]]:
    """The options ``module`` has in each ``modules`` section where it is."""
    return [dict(modules[module]) if isinstance(modules[module], Mapping) else {}
            for modules in _modules_sections(config) if module in modules]


# -- the configuration files: includes, macros, and the lines that enable mod_push


@dataclass
class Entry:
    """A ``mod_push``/``mod_push_keepalive`` entry of a configuration file, by lines."""

    module: str
    file: Path
    first: int  # 1-based, inclusive
    last: int
    lines: list[str]
    why_not_editable: str | None = None  # None: commenting the lines out removes it
    empties: int | None = None  # the line of a ``modules:`` left empty without it


@dataclass
class ConfigView:
    """ejabberd.yml with its included files, macros applied; where the conflicts are."""

    config: dict[str, Any]
    files: list[Path]
    entries: list[Entry]
    problems: list[str]


def _includes(value: Any) -> list[tuple[str, dict[str, Any]]]:
    """include_config_file as a string, a list, or a map of file -> allow_only/disallow."""
    if isinstance(value, str):
        return [(value, {})]
    if isinstance(value, list):
        return [(str(item), {}) for item in value]
    if isinstance(value, Mapping):
        return [(str(name), dict(options) if isinstance(options, Mapping) else {})
                for name, options in value.items()]
    return []


def _filtered(options: Mapping[str, Any], keys: Iterator[Any]) -> list[Any]:
    allow, deny = options.get("allow_only"), options.get("disallow")
    return [key for key in keys if (allow is None or str(key) in map(str, allow))
            and (deny is None or str(key) not in map(str, deny))]


def apply_macros(value: Any, macros: Mapping[str, Any]) -> Any:
    """Values that are a macro's name replaced by the macro's value (keys stay)."""
    if isinstance(value, str) and value in macros:
        return macros[value]
    if isinstance(value, Mapping):
        return {key: apply_macros(item, macros) for key, item in value.items()}
    if isinstance(value, list):
        return [apply_macros(item, macros) for item in value]
    return value


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """An included file's options into the configuration: maps merged, the rest kept."""
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(merged.get(key), Mapping) and isinstance(value, Mapping):
            merged[key] = _merge(dict(merged[key]), value)
        elif key not in merged:
            merged[key] = value
    return merged


def _mapping_items(node: yaml.Node) -> list[tuple[yaml.Node, yaml.Node]]:
    return list(node.value) if isinstance(node, yaml.MappingNode) else []


def _entries(path: Path, text: str, node: yaml.Node, keys: list[Any],
             macros: Mapping[str, Any]) -> list[Entry]:
    """The conflicting modules' entries in one file's ``modules`` sections."""
    lines = text.splitlines()
    sections: list[yaml.Node] = []
    for key, value in _mapping_items(node):
        if key.value not in keys:
            continue
        if key.value == "modules":
            sections.append(value)
        elif key.value in ("host_config", "append_host_config"):
            for _, host in _mapping_items(value):
                sections += [v for k, v in _mapping_items(host) if k.value == "modules"]
    found: list[Entry] = []
    for section in sections:
        line = section.start_mark.line
        if isinstance(section, yaml.ScalarNode) and section.value in macros:
            for name in sorted(enabled_modules({"modules": macros[section.value]})
                               & set(CONFLICTING)):
                found.append(Entry(name, path, line + 1, line + 1, [lines[line]],
                                   f"it comes from the macro {section.value}"))
            continue
        items = _mapping_items(section)
        mine = [(k, v) for k, v in items if k.value in CONFLICTING]
        for key, value in mine:
            found.append(_entry(path, lines, key, value, getattr(section, "flow_style", None)))
        if mine and len(mine) == len(items) and all(e.why_not_editable is None
                                                     for e in found[-len(mine):]):
            owner = section.start_mark.line - 1  # the ``modules:`` line above a block
            if owner >= 0 and re.match(r"\s*modules:\s*(#.*)?$", lines[owner]):
                found[-1].empties = owner + 1
    return found


def _entry(path: Path, lines: list[str], key: yaml.Node, value: yaml.Node,
           flow: bool | None) -> Entry:
    first = key.start_mark.line
    end, column = value.end_mark.line, value.end_mark.column
    last = end if end < len(lines) and lines[end][:column].strip() else end - 1
    while last > first and (not lines[last].strip() or lines[last].lstrip().startswith("#")):
        last -= 1
    last = max(last, first)
    why = None
    if flow or lines[first][:key.start_mark.column].strip():
        why = "it shares its line with other entries (flow style): edit it by hand"
    elif last == end and lines[end][column:].strip() and \
            not lines[end][column:].strip().startswith("#"):
        why = "its line goes on with other entries: edit it by hand"
    return Entry(str(key.value), path, first + 1, last + 1, lines[first:last + 1], why)


def read_config(main: Path, read: Callable[[Path], str | None],
                env: Mapping[str, str] | None = None) -> ConfigView:
    """ejabberd.yml and the files it includes (include_config_file: a string, a list, or
    a map with allow_only / disallow), define_macro and EJABBERD_MACRO_* applied."""
    loaded: list[tuple[Path, str, yaml.Node, list[Any], dict[str, Any]]] = []
    problems: list[str] = []
    pending: list[tuple[Path, dict[str, Any]]] = [(main, {})]
    while pending:
        path, options = pending.pop(0)
        if any(path == seen for seen, *_ in loaded) or len(loaded) > 50:
            continue
        text = read(path)
        if text is None:
            problems.append(f"cannot read {path}")
            continue
        try:
            node = yaml.compose(text)
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            problems.append(f"{path} is not valid YAML: {str(exc).splitlines()[0]}")
            continue
        if not isinstance(data, Mapping) or node is None:
            continue
        keys = _filtered(options, iter(data))
        loaded.append((path, text, node, keys, {key: data[key] for key in keys}))
        pending += [(path.parent / name, include)
                    for name, include in _includes(data.get("include_config_file"))]
    macros: dict[str, Any] = {}
    for *_, data in reversed(loaded):  # the main file's own macros win
        if isinstance(data.get("define_macro"), Mapping):
            macros.update(data["define_macro"])
    for name, value in (env or {}).items():
        if name.startswith("EJABBERD_MACRO_"):
            try:
                macros[name.removeprefix("EJABBERD_MACRO_")] = yaml.safe_load(value)
            except yaml.YAMLError:
                macros[name.removeprefix("EJABBERD_MACRO_")] = value
    config: dict[str, Any] = {}
    entries: list[Entry] = []
    for path, text, node, keys, data in loaded:
        config = _merge(config, apply_macros(
            {k: v for k, v in data.items() if k not in ("include_config_file", "define_macro")},
            macros))
        entries += _entries(path, text, node, keys, macros)
    return ConfigView(config, [path for path, *_ in loaded], entries, problems)


def removal_text(entries: Sequence[Entry], conflicts: Sequence[str]) -> str:
    """Which lines enable ``conflicts``, for the admin to remove."""
    out: list[str] = []
    for entry in entries:
        span = f"line {entry.first}" if entry.first == entry.last else \
            f"lines {entry.first}-{entry.last}"
        out.append(f"  {entry.file}, {span} ({entry.module})"
                   + (f": {entry.why_not_editable}" if entry.why_not_editable else ":"))
        out += [f"    {entry.first + n:5} | {line}" for n, line in enumerate(entry.lines)]
    unplaced = sorted(set(conflicts) - {entry.module for entry in entries})
    if unplaced:
        out.append(f"  {' and '.join(unplaced)}: enabled in the running configuration, not "
                   "in a file pymod-push reads (look where its configuration comes from)")
    return "\n".join(out)


def comment_out(text: str, entries: Sequence[Entry]) -> str:
    """``text`` with the entries' lines commented out (and a ``modules:`` they leave
    empty made ``modules: {}``)."""
    lines = text.splitlines(keepends=True)
    for entry in entries:
        if entry.why_not_editable is not None:
            continue
        indent = len(lines[entry.first - 1]) - len(lines[entry.first - 1].lstrip())
        for index in range(entry.first - 1, entry.last):
            line = lines[index]
            if line.strip():
                cut = min(indent, len(line) - len(line.lstrip()))
                lines[index] = line[:cut] + "# " + line[cut:]
        if entry.empties is not None:
            line = lines[entry.empties - 1]
            lines[entry.empties - 1] = re.sub(r"modules:", "modules: {}", line, count=1)
    return "".join(lines)


def secret_free_diff(old: str, new: str, path: Path) -> str:
    """The change as a unified diff, values of context lines that may hold secrets hidden."""
    hide = re.compile(r"^( .*(?:pass|secret|token|key|_url)\w*\s*:\s*).+$", re.IGNORECASE)
    return "".join(hide.sub(r"\1<hidden>", line) if line.startswith(" ") else line
                   for line in difflib.unified_diff(old.splitlines(keepends=True),
                                                    new.splitlines(keepends=True),
                                                    str(path), str(path), n=1))


def backup_name(path: Path, now: float) -> Path:
    return path.with_name(f"{path.name}.bak-pymod_push-"
                          f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime(now))}")


# -- what the doctor reads in the module's .beam and options


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


def ejabberd_version(status_output: str) -> str | None:
    match = re.search(r"ejabberd (\S+) is running", status_output)
    return match.group(1) if match else None


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


# ---------------------------------------------------------------------- the edges


def _read_or_none(path: Path) -> str | None:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError):
        return None


@dataclass
class Ejabberd:
    """One ejabberd instance, through its ejabberdctl."""

    ctl: str
    config_dir: Path | None  # given with --config-dir: passed to ejabberdctl
    modules: Path
    layout: Layout = field(default_factory=lambda: Layout(None, {}, None))

    @property
    def user(self) -> str:
        return self.layout.user

    @classmethod
    def locate(cls, ctl: str | None, config_dir: Path | None,
               modules: Path | None, root: Path = Path("/")) -> Ejabberd:
        found = find_ctl(ctl, root)
        layout = find_layout(found if os.sep in found else (shutil.which(found) or found),
                             config_dir, _read_or_none, root, os.environ)
        try:
            entry = pwd.getpwnam(layout.user)
        except KeyError:
            raise InstallError(f"there is no user '{layout.user}': is ejabberd "
                               "installed?") from None
        switch_user([], layout.user, os.geteuid(), _current_user())  # root or that user
        if modules is None:
            modules = modules_dir(layout.settings, entry.pw_dir)
        return cls(found, config_dir, modules, layout)

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

    @property
    def installed_beam(self) -> Path:
        return self.modules / MODULE / "ebin" / f"{MODULE}.beam"

    def config_file(self) -> Path | None:
        return self.layout.config_file

    def files_view(self) -> ConfigView:
        main_file = self.config_file()
        if main_file is None:
            return ConfigView({}, [], [], ["no ejabberd.yml found (give --config-dir)"])
        return read_config(main_file, _read_or_none, os.environ)

    def running_config(self) -> dict[str, Any] | None:
        """The node's effective configuration (``ejabberdctl dump_config``: included files
        and macros resolved), None if it cannot tell. The node writes the file as its user:
        a private directory in that user's home (systemd gives ejabberd a /tmp of its own),
        removed at once; the dump holds passwords, nothing of it is printed."""
        entry = pwd.getpwnam(self.user)
        home = Path(entry.pw_dir)
        base = str(home) if home.is_dir() and os.access(home, os.W_OK) else None
        directory = Path(tempfile.mkdtemp(prefix=".pymod_push-", dir=base))
        try:
            directory.chmod(0o700)
            if os.geteuid() == 0:
                os.chown(directory, entry.pw_uid, entry.pw_gid)
            dump = directory / "config.yml"
            try:
                self.run("dump_config", str(dump), timeout=60)
            except (InstallError, subprocess.SubprocessError):
                return None
            loaded = yaml.safe_load(_read_or_none(dump) or "")
            return dict(loaded) if isinstance(loaded, Mapping) else None
        except yaml.YAMLError:
            return None
        finally:
            shutil.rmtree(directory, ignore_errors=True)

    def conflicts(self, running: bool) -> tuple[list[str], ConfigView, str]:
        """mod_push / mod_push_keepalive where enabled: in the running node's configuration
        when it runs, else in the files; the files say where."""
        view = self.files_view()
        config = self.running_config() if running else None
        source = "asked from the running node (ejabberdctl dump_config)"
        if config is None:
            config = view.config
            source = f"read from {', '.join(map(str, view.files)) or 'no file'}"
        found = sorted(enabled_modules(config) & set(CONFLICTING))
        view.config = config
        return found, view, source


def _current_user() -> str:
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
                       _current_user(), group=group)
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
    elif _current_user() != user:
        raise InstallError(f"cannot give {path} to '{user}': only root can (chown); run "
                           f"pymod-push as root or as '{user}'")


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


def _read(path: Path) -> str:
    return _read_or_none(path) or ""


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
    parser.add_argument("--ctl", help="ejabberdctl to use (default: the one on PATH, else "
                        "in /usr/sbin, /opt/ejabberd-*/bin, /opt/ejabberd/bin, "
                        "/home/ejabberd/bin)")
    parser.add_argument("--config-dir", type=Path,
                        help="ejabberd's configuration directory (ejabberdctl --config-dir)")
    parser.add_argument("--modules-dir", type=Path,
                        help="ejabberd's CONTRIB_MODULES_PATH (default: from ejabberdctl.cfg, "
                        "else ~ejabberd/.ejabberd-modules)")
    parser.add_argument("--python", default=sys.executable,
                        help="the interpreter ejabberd runs (default: this one)")
    parser.add_argument("--replace-builtin", action="store_true",
                        help="install/upgrade: comment out mod_push and mod_push_keepalive "
                        "where they are enabled (a backup kept), then reload_config")
    parser.add_argument("--root", type=Path, default=Path("/"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        server = Ejabberd.locate(args.ctl, args.config_dir, args.modules_dir, args.root)
        if args.command in ("install", "upgrade"):
            install(server, args.python, args.command == "upgrade", print,
                    args.replace_builtin)
        elif args.command == "uninstall":
            uninstall(server, print)
        else:
            findings = diagnose(gather(server))
            for finding in findings:
                label = "ok   " if finding.ok and not finding.warn else \
                    "WARN " if finding.ok else "FAIL "
                print(label + finding.text)
            return 0 if all(finding.ok for finding in findings) else 1
    except InstallError as exc:
        print(f"pymod-push {args.command}: {exc}", file=sys.stderr)
        return 1
    except (OSError, subprocess.SubprocessError, yaml.YAMLError) as exc:
        print(f"pymod-push {args.command}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
