"""The options as the shim declares them (mod_opt_type, mod_options, mod_doc), as Python reads
them (Config.from_options) and as README documents them must agree: name and default."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHIM = (ROOT / "erl_shim" / "src" / "mod_push_py_opt.erl").read_text()  # the options
README = (ROOT / "README.md").read_text()
CONFIG = (ROOT / "pymod_push" / "core" / "config.py").read_text()
SHIM_ONLY = {"python", "reply_timeout", "queue_size", "access_backends"}  # not Python's
MS = {"seconds": 1000, "second": 1000, "s": 1000, "minutes": 60_000, "minute": 60_000,
      "min": 60_000, "hours": 3_600_000, "hour": 3_600_000}


def shim_defaults() -> dict[str, str]:
    body = SHIM.split("mod_options(_Host) ->", 1)[1].split("].", 1)[0]
    return dict(re.findall(r"\{(\w+), (.+?)\}(?:,\n|$)", body + "\n", re.M))


def readme_defaults() -> dict[str, str]:
    table = README.split("## Options", 1)[1].split("\n## ", 1)[0]
    return {name: default.strip() for name, default in
            re.findall(r"^\| `(\w+)` \| ([^|]+) \|", table, re.M)}


def normalise_shim(value: str) -> str:
    value = value.strip()
    timers = re.findall(r"timer:(\w+)\((\d+)\)", value)
    if timers:
        return ",".join(str(int(n) * MS[unit]) for unit, n in timers)
    if value.startswith("<<"):
        return value.strip('<>"')
    return {"undefined": "none"}.get(value, value)


def normalise_readme(value: str) -> str:
    parts = re.findall(r"`?(\d+)`? ?(seconds?|minutes?|hours?|s|min)\b", value)
    if parts:
        return ",".join(str(int(n) * MS[unit]) for n, unit in parts)
    return value.replace("`", "").strip()


def test_every_option_is_declared_documented_and_read() -> None:
    declared = set(re.findall(r"^mod_opt_type\((\w+)\)", SHIM, re.M))
    defaults = set(shim_defaults())
    documented_in_mod_doc = set(re.findall(r"\{(\w+),\n\s+#\{value", SHIM))
    in_readme = set(readme_defaults())
    read_by_python = set(re.findall(r'options(?:\.get\(|\[)"(\w+)"', CONFIG)) | {"certfile"}
    assert declared == defaults, declared ^ defaults
    assert declared == documented_in_mod_doc, declared ^ documented_in_mod_doc
    assert declared == in_readme, declared ^ in_readme
    assert declared - SHIM_ONLY <= read_by_python, (declared - SHIM_ONLY) - read_by_python


def test_readme_defaults_are_the_shims() -> None:
    readme = readme_defaults()
    for name, value in shim_defaults().items():
        assert normalise_readme(readme[name]) == normalise_shim(value), name
