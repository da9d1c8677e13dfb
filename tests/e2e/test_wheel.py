"""The wheel carries the shim: built from the checkout with pip, it holds erl_shim/ as the
checkout has it and the pymod-push command."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from devtools.instance import ROOT

pytestmark = pytest.mark.e2e


def test_the_wheel_carries_the_shim(folder: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--no-build-isolation", "-w", str(folder), str(ROOT)],
                   check=True, capture_output=True, cwd=folder)
    wheel, = folder.glob("pymod_push-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        shim = {name.removeprefix("pymod_push/erl_shim/") for name in names
                if name.startswith("pymod_push/erl_shim/")}
        assert shim == {"COPYING", "README.md", "README.txt", "mod_push_py.spec",
                        "conf/mod_push_py.yml", "src/mod_push_py.erl",
                        "src/mod_push_py_port.erl", "src/mod_push_py_opt.erl",
                        "src/mod_push_py_actions.erl", "src/mod_push_py_muc.erl",
                        "src/mod_push_py_up.erl", "src/mod_push_py_commands.erl"}
        for name in shim:
            assert archive.read(f"pymod_push/erl_shim/{name}") == \
                (ROOT / "erl_shim" / name).read_bytes()
        entry_points = archive.read(next(n for n in names if n.endswith("entry_points.txt")))
        assert b"pymod-push = pymod_push.install:main" in entry_points
        # every module of the checkout, and none a build folder kept from an older layout
        # (pymod_push/install.py beside pymod_push/install/)
        modules = {name for name in names if name.startswith("pymod_push/")
                   and name.endswith(".py") and not name.startswith("pymod_push/erl_shim/")}
        assert modules == {str(path.relative_to(ROOT)) for path in
                           (ROOT / "pymod_push").rglob("*.py")}
