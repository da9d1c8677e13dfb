"""pymod-push's decisions (pymod_push/install/), without an ejabberd; the end-to-end runs
against a real one are in tests/e2e/test_install.py."""

from __future__ import annotations

import re
import shlex
import shutil
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from pymod_push import __version__
from pymod_push.install.commands import replace_builtin
from pymod_push.install.doctor import (
    Facts,
    beam_version,
    database_files,
    diagnose,
    is_loopback,
)
from pymod_push.install.ejabberd_config import (
    backup_name,
    comment_out,
    enabled_modules,
    module_options,
    read_config,
    removal_text,
    secret_free_diff,
)
from pymod_push.install.errors import InstallError
from pymod_push.install.instance import Ejabberd, ejabberd_version
from pymod_push.install.layout import (
    blocking_directory,
    find_ctl,
    find_layout,
    modules_dir,
    parse_ctl_cfg,
    switch_user,
    unreachable_message,
)
from pymod_push.install.shim import module_conf, shim_source

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
    ({"sources_present": False, "installed": False, "statuses": {}}, "missing"),
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


def test_doctor_accepts_a_prebuilt_module_without_sources() -> None:
    findings = diagnose(_facts(sources_present=False))  # installed: from build-module
    assert all(finding.ok for finding in findings), [f.text for f in findings if not f.ok]
    assert any("is prebuilt" in f.text and "build-module" in f.text for f in findings)


def test_doctor_notes_another_package_version() -> None:
    text = " ".join(f.text for f in diagnose(_facts(python_package_version="0.0.9")))
    assert f"pymod_push 0.0.9 (this pymod-push is {__version__})" in text


# ---------------------------------------------------------------- where ejabberd is


def _executable(path: Path, text: str = "#!/bin/sh\n") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)
    return path


def test_ejabberdctl_found_in_processone_and_container_layouts(tmp_path: Path) -> None:
    def nowhere(name: str) -> str | None:
        raise AssertionError("the PATH is only searched for the real root")

    with pytest.raises(InstallError,
                       match="(?s)ejabberdctl not found.*/opt/ejabberd-\\*/bin.*--ctl PATH"):
        find_ctl(None, tmp_path, nowhere)
    _executable(tmp_path / "home/ejabberd/bin/ejabberdctl")  # a container image
    assert find_ctl(None, tmp_path, nowhere) == str(tmp_path / "home/ejabberd/bin/ejabberdctl")
    _executable(tmp_path / "opt/ejabberd/bin/ejabberdctl")
    assert find_ctl(None, tmp_path, nowhere) == str(tmp_path / "opt/ejabberd/bin/ejabberdctl")
    # ProcessOne's installers: /opt/ejabberd-VSN/bin, the newest version first (not by name).
    for version in ("9.0", "23.01", "24.12", "24.2"):
        _executable(tmp_path / f"opt/ejabberd-{version}/bin/ejabberdctl")
    (tmp_path / "opt/ejabberd-25.01/bin").mkdir(parents=True)
    (tmp_path / "opt/ejabberd-25.01/bin/ejabberdctl").write_text("")  # not executable
    assert find_ctl(None, tmp_path, nowhere) == \
        str(tmp_path / "opt/ejabberd-24.12/bin/ejabberdctl")
    _executable(tmp_path / "usr/sbin/ejabberdctl")
    assert find_ctl(None, tmp_path, nowhere) == str(tmp_path / "usr/sbin/ejabberdctl")
    assert find_ctl("/my/ejabberdctl", tmp_path, nowhere) == "/my/ejabberdctl"
    # The real root: the PATH first.
    assert find_ctl(None, Path("/"), lambda name: "/usr/local/bin/" + name) == \
        "/usr/local/bin/ejabberdctl"


DEBIAN_CTL = """\
INSTALLUSER=ejabberd
: "${CONFIG_DIR:="/etc/ejabberd"}"
: "${EJABBERD_CONFIG_PATH:="$CONFIG_DIR/ejabberd.yml"}"
: "${EJABBERDCTL_CONFIG_PATH:="$CONFIG_DIR/ejabberdctl.cfg"}"
: "${SPOOL_DIR:="/var/lib/ejabberd"}"
SCRIPT_DIR="$(cd "$(dirname "$SCRIPT")" && pwd -P)"
"""
PROCESSONE_CTL = """\
INSTALLUSER="ejabberd"
: "${ETC_DIR:="/opt/ejabberd/conf"}"
: "${SPOOL_DIR:="/opt/ejabberd/database/$ERLANG_NODE"}"
: "${EJABBERD_CONFIG_PATH:="$ETC_DIR/ejabberd.yml"}"
"""


def _reader(files: dict[str, str]) -> Callable[[Path], str | None]:
    return lambda path: files.get(str(path))


def test_layout_from_ejabberdctl_and_its_cfg() -> None:
    files = {"/usr/sbin/ejabberdctl": DEBIAN_CTL, "/etc/ejabberd/ejabberd.yml": "",
             "/etc/ejabberd/ejabberdctl.cfg": "CONTRIB_MODULES_PATH=/srv/mods\n"
                                              "INSTALLUSER=xmpp\nSPOOL_DIR=/srv/spool\n"}
    layout = find_layout("/usr/sbin/ejabberdctl", None, _reader(files))
    assert (layout.config_dir, layout.ctl_cfg) == (Path("/etc/ejabberd"),
                                                   Path("/etc/ejabberd/ejabberdctl.cfg"))
    assert layout.config_file == Path("/etc/ejabberd/ejabberd.yml")
    assert (layout.user, layout.spool) == ("xmpp", Path("/srv/spool"))
    assert modules_dir(layout.settings, "/home") == Path("/srv/mods")
    # --config-dir wins over ejabberdctl's default, as in ejabberdctl itself.
    files["/x/ejabberdctl.cfg"] = "EJABBERD_CONFIG_PATH=/x/main.yml\n"
    files["/x/main.yml"] = ""
    layout = find_layout("/usr/sbin/ejabberdctl", Path("/x"), _reader(files))
    assert (layout.config_file, layout.user) == (Path("/x/main.yml"), "ejabberd")
    assert layout.spool == Path("/var/lib/ejabberd")


def test_layout_of_processone_installers_and_of_a_wrapper(tmp_path: Path) -> None:
    files = {"/opt/ejabberd-24.12/bin/ejabberdctl": PROCESSONE_CTL,
             "/opt/ejabberd/conf/ejabberd.yml": "", "/opt/ejabberd/conf/ejabberdctl.cfg":
             "ERLANG_NODE=ejabberd@host\n"}
    layout = find_layout("/opt/ejabberd-24.12/bin/ejabberdctl", None,
                         _reader(files))
    assert layout.config_file == Path("/opt/ejabberd/conf/ejabberd.yml")
    assert layout.config_dir == Path("/opt/ejabberd/conf")
    # The spool named after the node: ejabberdctl.cfg is read after the defaults.
    assert layout.spool == Path("/opt/ejabberd/database/ejabberd@host")
    # A script that says nothing: the usual directories below the root, in order; the
    # environment's EJABBERD_MACRO_* are no settings, its CONTRIB_MODULES_PATH is.
    root = str(tmp_path)
    files = {"/w/ejabberdctl": "exec /usr/sbin/ejabberdctl \"$@\"\n",
             f"{root}/home/ejabberd/conf/ejabberd.yml": "",
             f"{root}/usr/local/etc/ejabberd/ejabberd.yml": ""}
    layout = find_layout("/w/ejabberdctl", None, _reader(files), tmp_path,
                         {"CONTRIB_MODULES_PATH": "/mods", "EJABBERD_MACRO_X": "1"})
    assert layout.config_file == tmp_path / "home/ejabberd/conf/ejabberd.yml"
    assert layout.settings["CONTRIB_MODULES_PATH"] == "/mods"
    assert "EJABBERD_MACRO_X" not in layout.settings
    assert find_layout("/w/ejabberdctl", None, _reader({}), tmp_path).config_file is None


def test_switching_to_the_ejabberd_user() -> None:
    command = ["python", "-c", "print('a b')"]
    everything = {"runuser", "setpriv", "su"}

    def having(*tools: str) -> Callable[[str], str | None]:
        return lambda name: f"/usr/bin/{name}" if name in tools else None

    # As the ejabberd user itself (the containers, uid 9000): directly.
    assert switch_user(command, "ejabberd", 9000, "ejabberd", having()) == command
    assert switch_user(command, "ejabberd", 0, "root", having(*everything))[:4] == \
        ["runuser", "-u", "ejabberd", "--"]
    assert switch_user(command, "xmpp", 0, "root", having("setpriv", "su")) == \
        ["setpriv", "--reuid=xmpp", "--regid=xmpp", "--init-groups", "--", *command]
    assert switch_user(command, "xmpp", 0, "root", having("setpriv"), group="106")[2] == \
        "--regid=106"
    su = switch_user(command, "ejabberd", 0, "root", having("su"))
    assert su[:5] == ["su", "-s", "/bin/sh", "ejabberd", "-c"]
    assert shlex.split(su[5]) == command  # one shell command line, quoted
    with pytest.raises(InstallError, match="none of runuser, setpriv, su"):
        switch_user(command, "ejabberd", 0, "root", having())
    with pytest.raises(InstallError, match="as root or as the user 'ejabberd'.*not as 'bob'"):
        switch_user(command, "ejabberd", 1000, "bob", having(*everything))


# ---------------------------------------------------------- the configuration's files


MAIN_YML = """\
hosts: [example.org]
define_macro:
  RT: 600
  PUSH_MODULES:
    mod_push_keepalive: {}
sql_password: "very secret"
include_config_file:
  conf.d/push.yml:
    allow_only: [modules, append_host_config]
  conf.d/ignored.yml:
    disallow: [modules]
modules:
  mod_stream_mgmt:
    resume_timeout: RT
host_config:
  b.example: {modules: {mod_push: {}}}
  c.example:
    modules: PUSH_MODULES
"""
PUSH_YML = """\
# push, as the old setup had it
modules:
  mod_push:
    include_body: false
    # a comment inside

  mod_push_keepalive:
    resume_timeout: 72h
    wake_on_timeout: true
append_host_config:
  d.example:
    modules:
      mod_mam: {}
      mod_push: {}
acl: {}  # not allowed: left out
"""
IGNORED_YML = "modules:\n  mod_push: {}\nloglevel: debug\n"


def _config_tree(tmp_path: Path) -> Path:
    (tmp_path / "conf.d").mkdir()
    (tmp_path / "ejabberd.yml").write_text(MAIN_YML)
    (tmp_path / "conf.d/push.yml").write_text(PUSH_YML)
    (tmp_path / "conf.d/ignored.yml").write_text(IGNORED_YML)
    return tmp_path / "ejabberd.yml"


def _read(path: Path) -> str | None:
    return path.read_text() if path.is_file() else None


def test_included_files_and_macros_count(tmp_path: Path) -> None:
    view = read_config(_config_tree(tmp_path), _read, {"EJABBERD_MACRO_RT": "900"})
    assert view.files == [tmp_path / "ejabberd.yml", tmp_path / "conf.d/push.yml",
                          tmp_path / "conf.d/ignored.yml"]
    config = view.config
    assert config["modules"]["mod_stream_mgmt"]["resume_timeout"] == 900  # the environment's
    assert config["loglevel"] == "debug" and "acl" not in config  # allow_only, disallow
    assert set(config["modules"]) == {"mod_stream_mgmt", "mod_push", "mod_push_keepalive"}
    assert config["host_config"]["c.example"]["modules"] == {"mod_push_keepalive": {}}
    assert enabled_modules(config) >= {"mod_push", "mod_push_keepalive", "mod_mam"}
    assert module_options({"modules": {"mod_push_py": []}, "host_config": {
        "h": {"modules": {"mod_push_py": {"db_file": "/x"}}}}}) == [{}, {"db_file": "/x"}]
    where = {(entry.file.name, entry.module, entry.first, entry.last,
              entry.why_not_editable is None) for entry in view.entries}
    assert where == {
        ("ejabberd.yml", "mod_push", 16, 16, False),  # flow style: by hand
        ("ejabberd.yml", "mod_push_keepalive", 18, 18, False),  # the macro PUSH_MODULES
        ("push.yml", "mod_push", 3, 4, True),  # its options, not the comment after them
        ("push.yml", "mod_push_keepalive", 7, 9, True),
        ("push.yml", "mod_push", 14, 14, True),
    }  # and nothing from ignored.yml, whose modules are disallowed
    macro = next(e for e in view.entries if e.module == "mod_push_keepalive"
                 and e.file.name == "ejabberd.yml")
    assert macro.why_not_editable == "it comes from the macro PUSH_MODULES"
    text = removal_text(view.entries, ["mod_push", "mod_push_keepalive"])
    assert f"{tmp_path / 'conf.d/push.yml'}, lines 7-9 (mod_push_keepalive):\n" \
           "        7 |   mod_push_keepalive:\n" in text
    assert "ejabberd.yml, line 16 (mod_push): it shares its line" in text
    assert "not in a file" not in text
    assert "mod_foo: enabled in the running configuration, not in a file" in \
        removal_text([], ["mod_foo"])
    broken = tmp_path / "broken.yml"
    broken.write_text("modules: [\ninclude_config_file: nowhere.yml\n")
    assert read_config(broken, _read).problems[0].startswith(f"{broken} is not valid YAML")
    broken.write_text("include_config_file: [nowhere.yml, broken.yml]\n")  # and itself
    assert read_config(broken, _read).problems == [f"cannot read {tmp_path / 'nowhere.yml'}"]


def test_replace_builtin_comments_out_in_an_included_file(tmp_path: Path) -> None:
    view = read_config(_config_tree(tmp_path), _read)
    included = tmp_path / "conf.d/push.yml"
    edited = comment_out(included.read_text(),
                         [e for e in view.entries if e.file == included])
    config = yaml.safe_load(edited)
    assert config["modules"] == {}  # emptied: 'modules: {}', not null
    assert config["append_host_config"]["d.example"]["modules"] == {"mod_mam": {}}
    assert "  # mod_push_keepalive:\n  #   resume_timeout: 72h\n" in edited
    assert "    # a comment inside\n" in edited  # was a comment already: untouched
    assert edited.count("\n") == PUSH_YML.count("\n")  # the same lines, numbers kept
    assert read_config(tmp_path / "ejabberd.yml", lambda p: edited if p == included
                       else _read(p)).entries[0].file == tmp_path / "ejabberd.yml"
    # What cannot be edited stays as it is.
    main = tmp_path / "ejabberd.yml"
    assert comment_out(main.read_text(), [e for e in view.entries if e.file == main]) == \
        main.read_text()
    diff = secret_free_diff(MAIN_YML, MAIN_YML.replace("  b.example: {modules: {mod_push: {}}}",
                                                       "  b.example: {}"), main)
    assert diff.startswith(f"--- {main}\n+++ {main}\n")
    assert "-  b.example: {modules: {mod_push: {}}}\n+  b.example: {}\n" in diff
    diff = secret_free_diff(MAIN_YML, MAIN_YML.replace("include_config_file:", "#x"), main)
    assert "very secret" not in diff and ' sql_password: <hidden>' in diff
    backup = backup_name(main, 0)
    assert backup == tmp_path / "ejabberd.yml.bak-pymod_push-19700101T000000"


def test_a_module_entry_on_the_last_line_and_a_flow_modules_map(tmp_path: Path) -> None:
    path = tmp_path / "e.yml"
    path.write_text("modules:\n  mod_mam: {}\n  mod_push: {}")  # no final newline
    entries = read_config(path, _read).entries
    assert [(e.first, e.last, e.why_not_editable) for e in entries] == [(3, 3, None)]
    assert comment_out(path.read_text(), entries) == "modules:\n  mod_mam: {}\n  # mod_push: {}"
    path.write_text("modules: {mod_push: {}}\n")
    assert read_config(path, _read).entries[0].why_not_editable is not None
    path.write_text("modules:\n  mod_push: {}\n  mod_push_keepalive: {}\n")
    edited = comment_out(path.read_text(), read_config(path, _read).entries)
    assert yaml.safe_load(edited) == {"modules": {}}


# ---------------------------------------------------------------- the doctor's checks


def test_the_shims_version_is_the_python_packages() -> None:
    source = (shim_source() / "src" / "mod_push_py.erl").read_text()
    assert re.findall(r'^-vsn\("([^"]*)"\)\.', source, re.MULTILINE) == [__version__]


@pytest.mark.skipif(shutil.which("erlc") is None, reason="erlc (Erlang's compiler) not here")
def test_the_version_a_beam_was_built_from(tmp_path: Path) -> None:
    (tmp_path / "m.erl").write_text('-module(m).\n-vsn("1.2.3").\n-export([f/0]).\nf() -> ok.\n')
    (tmp_path / "n.erl").write_text("-module(n).\n-export([f/0]).\nf() -> ok.\n")
    subprocess.run(["erlc", "-o", str(tmp_path), str(tmp_path / "m.erl"),
                    str(tmp_path / "n.erl")], check=True)
    assert beam_version((tmp_path / "m.beam").read_bytes()) == "1.2.3"
    assert beam_version((tmp_path / "n.beam").read_bytes()) is None  # the compiler's MD5
    with pytest.raises(ValueError, match="not a BEAM file"):
        beam_version(b"FOR1\0\0\0\4ABCD")


def test_database_files_and_loopback() -> None:
    def glob(directory: Path, pattern: str) -> list[Path]:
        return [directory / "pymod_push_a.example.sqlite3"]

    spool = Path("/var/lib/ejabberd")
    assert database_files([], spool, glob) == [spool / "pymod_push_a.example.sqlite3"]
    assert database_files([{"db_file": "/srv/push.db"}, {"db_file": "auto"}], spool, glob) \
        == [Path("/srv/push.db"), spool / "pymod_push_a.example.sqlite3"]
    assert database_files([{"db_url": "postgresql://x"}], spool, glob) == []
    assert all(map(is_loopback, ["127.0.0.1:9101", "[::1]:9101", "localhost:1", "127.8.0.1:1"]))
    assert not any(map(is_loopback, ["0.0.0.0:9101", "[::]:1", "192.0.2.7:1", "metrics:1"]))


def test_doctor_warns_and_fails_on_exposure_and_versions() -> None:
    findings = diagnose(_facts(
        access_all=True, metrics_listen=["0.0.0.0:9101", "127.0.0.1:9102"],
        databases={Path("/s/a.sqlite3"): stat.S_IFREG | 0o644,
                   Path("/s/b.sqlite3"): stat.S_IFREG | 0o600},
        beam=Path("/m/mod_push_py/ebin/mod_push_py.beam"), beam_version=__version__))
    assert all(f.ok for f in findings)  # warnings: no failure, doctor exits 0
    warned = [f.text for f in findings if f.warn]
    assert len(warned) == 3, warned
    assert any("access_backends: all" in t and "remote users" in t for t in warned)
    assert any("/s/a.sqlite3 is mode 0644" in t and "chmod 600 /s/a.sqlite3" in t
               for t in warned)
    assert any("metrics_listen 0.0.0.0:9101 is not a loopback address" in t for t in warned)
    assert any(f.text == "database /s/b.sqlite3: mode 0600" and not f.warn for f in findings)
    assert any(f.text.endswith(f"built from pymod_push {__version__}") for f in findings)
    for built, shown in (("0.0.9", "0.0.9"), (None, "an older pymod_push")):
        failed = [f.text for f in diagnose(_facts(beam=Path("/m/b.beam"), beam_version=built))
                  if not f.ok]
        assert failed == [f"/m/b.beam built from {shown}" + ("" if built else
                          " (no version in it)") + f", Python package {__version__}: "
                          "run pymod-push upgrade"]
    places = "  /etc/ejabberd/ejabberd.yml, line 9 (mod_push):\n        9 |   mod_push: {}"
    failed = [f.text for f in diagnose(_facts(conflicts=["mod_push"], conflict_places=places))
              if not f.ok]
    assert any("--replace-builtin" in t for t in failed)
    assert any(t.endswith(places) for t in failed)


def test_replace_builtin_keeps_a_backup_and_puts_it_back_on_a_failed_reload(
        tmp_path: Path) -> None:
    main = _config_tree(tmp_path)
    included = tmp_path / "conf.d/push.yml"
    included.chmod(0o640)
    view = read_config(main, _read)
    mine = [e for e in view.entries if e.file == included]
    said: list[str] = []
    ok = Ejabberd(str(_executable(tmp_path / "ok", "#!/bin/sh\nexit 0\n")), None, tmp_path)
    replace_builtin(ok, mine, ["mod_push", "mod_push_keepalive"], said.append)
    assert yaml.safe_load(included.read_text())["modules"] == {}
    (backup,) = tmp_path.glob("conf.d/push.yml.bak-pymod_push-*")
    assert backup.read_text() == PUSH_YML and stat.S_IMODE(backup.stat().st_mode) == 0o640
    assert stat.S_IMODE(included.stat().st_mode) == 0o640
    assert said[0].startswith(f"commented out in {included} (backup: {backup}):\n--- ")
    assert said[-1] == "ejabberdctl reload_config: done"

    included.write_text(PUSH_YML)
    backup.unlink()
    failing = Ejabberd(str(_executable(tmp_path / "no", "#!/bin/sh\necho bad >&2\nexit 1\n")),
                       None, tmp_path)
    with pytest.raises(InstallError, match="(?s)bad.*back as they were"):
        replace_builtin(failing, mine, ["mod_push"], said.append)
    assert included.read_text() == PUSH_YML
    # Nothing is touched when one entry cannot be edited, or is nowhere in the files.
    for entries, conflicts in ((view.entries, ["mod_push"]), (mine, ["mod_push", "mod_x"])):
        with pytest.raises(InstallError, match="nothing was changed"):
            replace_builtin(failing, entries, conflicts, said.append)
        assert included.read_text() == PUSH_YML and main.read_text() == MAIN_YML
