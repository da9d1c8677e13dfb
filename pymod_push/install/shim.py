"""The ejabberd module this package carries: its name, its sources (the wheel's
pymod_push/erl_shim, else the checkout's erl_shim) and its conf file."""

from __future__ import annotations

from pathlib import Path

import yaml

from pymod_push.install.errors import InstallError

MODULE = "mod_push_py"
PACKAGE_DIR = Path(__file__).resolve().parent.parent  # pymod_push/


def shim_source(package_dir: Path = PACKAGE_DIR) -> Path:
    """The shim's sources: in the wheel (pymod_push/erl_shim), else the checkout's erl_shim."""
    for candidate in (package_dir / "erl_shim", package_dir.parent / "erl_shim"):
        if (candidate / f"{MODULE}.spec").is_file():
            return candidate
    raise InstallError(f"the sources of {MODULE} are not next to {package_dir}: "
                       "reinstall the pymod_push package")


def module_conf(python: str, existing: str | None = None) -> str:
    """conf/mod_push_py.yml with ``python`` set, other options of an existing one kept."""
    options: dict[str, object] = {}
    if existing:
        loaded = yaml.safe_load(existing) or {}
        options = dict(((loaded.get("modules") or {}).get(MODULE)) or {})
    options["python"] = python
    return ("# Options of mod_push_py, written by 'pymod-push install'; see the README.\n"
            + yaml.safe_dump({"modules": {MODULE: options}}, sort_keys=False))
