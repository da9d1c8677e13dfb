"""ejabberd.yml as ejabberd reads it: included files (include_config_file, with
allow_only / disallow), macros (define_macro, EJABBERD_MACRO_*), the modules sections
(top-level and per host); where mod_push and mod_push_keepalive are enabled, by file and
lines, the text telling the admin which lines to remove, and the same lines commented out
(with a diff that hides secrets, and the backup's name) for ``--replace-builtin``.

All plain functions: reading a file goes through the ``read`` they are given.
"""

from __future__ import annotations

import difflib
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pymod_push.install.shim import MODULE

CONFLICTING = ("mod_push", "mod_push_keepalive")


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
