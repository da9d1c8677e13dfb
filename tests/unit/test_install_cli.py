"""pymod-push's decisions (pymod_push/install.py), without an ejabberd; the end-to-end runs
against a real one are in tests/e2e/test_install.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pymod_push import __version__
from pymod_push.install import (
    Facts,
    InstallError,
    blocking_directory,
    diagnose,
    ejabberd_version,
    enabled_modules,
    module_conf,
    modules_dir,
    parse_ctl_cfg,
    shim_source,
    unreachable_message,
)

CTL_CFG = """\
#CONTRIB_MODULES_PATH=/commented/out
ERLANG_NODE=ejabberd@localhost
CONTRIB_MODULES_PATH="/srv/ejabberd modules"   # quoted, with a comment
SPOOL_DIR=/var/lib/ejabberd
BROKEN='unterminated
"""


def test_ctl_cfg_assignments_and_the_modules_dir() -> None:
    cfg = parse_ctl_cfg(CTL_CFG)
    assert cfg == {"ERLANG_NODE": "ejabberd@localhost",
                   "CONTRIB_MODULES_PATH": "/srv/ejabberd modules",
                   "SPOOL_DIR": "/var/lib/ejabberd"}
    assert modules_dir(cfg, "/var/lib/ejabberd") == Path("/srv/ejabberd modules")
    # Unset or empty: ext_mod's default, the ejabberd user's ~/.ejabberd-modules.
    assert modules_dir({}, "/var/lib/ejabberd") == Path("/var/lib/ejabberd/.ejabberd-modules")
    assert modules_dir({"CONTRIB_MODULES_PATH": ""}, "/h") == Path("/h/.ejabberd-modules")


def test_the_first_directory_the_user_cannot_enter() -> None:
    closed = {"/root", "/root/deeper"}
    assert blocking_directory("/root/deeper/venv/bin/python",
                              lambda d: d not in closed) == "/root"
    assert blocking_directory("/opt/venv/bin/python", lambda d: d not in closed) is None
    seen: list[str] = []
    blocking_directory("/a/b/python", lambda d: seen.append(d) or True)
    assert seen == ["/", "/a", "/a/b"]  # the interpreter's own directories, top down


def test_unreachable_message_names_the_directory_and_what_to_do() -> None:
    text = unreachable_message("/root/venv/bin/python", "/root", "Permission denied")
    assert "cannot enter /root" in text and "chmod o+x /root" in text
    assert "python3 -m venv /opt/pymod_push" in text
    text = unreachable_message("/opt/v/bin/python", None, "ModuleNotFoundError: pymod_push")
    assert "ModuleNotFoundError" in text and "chmod -R a+rX /opt/v" in text


def test_module_conf_sets_python_and_keeps_other_options() -> None:
    fresh = yaml.safe_load(module_conf("/opt/v/bin/python"))
    assert fresh == {"modules": {"mod_push_py": {"python": "/opt/v/bin/python"}}}
    existing = module_conf("/old/python").replace(
        "python: /old/python", "python: /old/python\n    include_senders: true")
    upgraded = yaml.safe_load(module_conf("/new/python", existing))
    assert upgraded == {"modules": {"mod_push_py": {"python": "/new/python",
                                                    "include_senders": True}}}


def test_enabled_modules_top_level_and_per_host() -> None:
    config = yaml.safe_dump({"modules": {"mod_mam": {}, "mod_push": {}},
                             "host_config": {"b.example": {"modules": {"mod_push_keepalive":
                                                                       {}}}}})
    assert enabled_modules(config) == {"mod_mam", "mod_push", "mod_push_keepalive"}
    assert enabled_modules("modules: [unclosed") == set()
    assert enabled_modules("") == set()


def test_ejabberd_version_from_status() -> None:
    status = ("The node ejabberd@localhost is started with status: started\n"
              "ejabberd 26.07 is running in that node\n")
    assert ejabberd_version(status) == "26.07"
    assert ejabberd_version("Failed RPC connection to the node ejabberd@localhost: nodedown") \
        is None


def test_shim_source_in_the_wheel_or_the_checkout(tmp_path: Path) -> None:
    package = tmp_path / "site-packages" / "pymod_push"
    (package / "erl_shim").mkdir(parents=True)
    with pytest.raises(InstallError, match="reinstall"):
        shim_source(package)
    (package / "erl_shim" / "mod_push_py.spec").write_text("")
    assert shim_source(package) == package / "erl_shim"
    # An editable install of the checkout: the repository's erl_shim.
    assert (shim_source() / "src" / "mod_push_py.erl").is_file()


def _facts(**changes: object) -> Facts:
    facts = Facts(ejabberd_version="24.12", modules_dir=Path("/m"), installed=True,
                  sources_present=True, python="/opt/v/bin/python", python_check=None,
                  python_package_version=__version__, conflicts=[],
                  statuses={"example.org": "Python process up since 2026-12-01T13:53:47+00:00 "
                                            "(pid 7, pymod_push 0.1.0)\npymod_push 0.1.0"})
    for name, value in changes.items():
        setattr(facts, name, value)
    return facts


def test_doctor_all_well() -> None:
    findings = diagnose(_facts())
    assert all(finding.ok for finding in findings)
    assert any("ejabberd 24.12 is running" in f.text for f in findings)
    assert any(f.text.startswith("example.org: Python process up since") for f in findings)


@pytest.mark.parametrize(("changes", "complaint"), [
    ({"ejabberd_version": None, "installed": False, "statuses": {}}, "not running"),
    ({"installed": False, "statuses": {}}, "pymod-push install"),
    ({"sources_present": False}, "missing"),
    ({"conflicts": ["mod_push"]}, "mod_push is enabled"),
    ({"python_check": "cannot enter /root"}, "cannot enter /root"),
    ({"statuses": {"example.org": "mod_push_py is not running on example.org"}},
     "not running on example.org"),
    ({"statuses": {"example.org": "Python process down; restarted 3 time(s)"}},
     "Python process down"),
])
def test_doctor_complains(changes: dict[str, object], complaint: str) -> None:
    failed = [f.text for f in diagnose(_facts(**changes)) if not f.ok]
    assert failed and any(complaint in text for text in failed), failed


def test_doctor_notes_another_package_version() -> None:
    text = " ".join(f.text for f in diagnose(_facts(python_package_version="0.0.9")))
    assert f"pymod_push 0.0.9 (this pymod-push is {__version__})" in text
