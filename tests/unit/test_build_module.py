"""pymod-push build-module's decisions (pymod_push/install/build_module.py) and its file layout with
a stand-in erlc, without ejabberd; ejabberd loading the real build from a read-only
CONTRIB_MODULES_PATH: tests/e2e/test_prebuilt.py."""

from __future__ import annotations

import shlex
import stat
from pathlib import Path

import pytest
import yaml

from pymod_push.install import build_module
from pymod_push.install import main as cli_main
from pymod_push.install.build_module import (
    ERLC_MISSING,
    LIB_ROOTS,
    CompileFacts,
    Plan,
    app_name,
    apps_of_includes,
    candidate_app_folders,
    erlc_command,
    missing_apps,
    not_found_message,
    parse_ext_mod_facts,
    pick_apps,
    plan,
)
from pymod_push.install.shim import shim_source

DEBIAN_EJABBERD = Path("/usr/lib/x86_64-linux-gnu/ejabberd-23.01-1")
DEBIAN_XMPP = Path("/usr/lib/erlang/lib/p1_xmpp-1.6.1")


def test_ext_mod_facts_from_its_compile_options() -> None:
    facts = parse_ext_mod_facts("otp 25\ndefine SIP\ndefine STUN\ndefine X=\"y\"\n"
                                "feature maybe_expr\ndefine SIP\n")
    assert facts == CompileFacts(("SIP", "STUN", 'X="y"'), ("maybe_expr",), 25, True)


def test_ext_mod_facts_lager_before_otp_22_and_a_beam_without_debug_info() -> None:
    # ext_mod:maybe_define_lager_macro/0
    assert parse_ext_mod_facts("otp 21\ndefine SIP\n").defines == ("SIP", "LAGER")
    assert parse_ext_mod_facts("otp 26\nno_abstract_code\n") == CompileFacts(otp_release=26)
    assert parse_ext_mod_facts("") == CompileFacts()


def test_app_names_on_each_layout() -> None:
    assert app_name(DEBIAN_EJABBERD) == "ejabberd"
    assert app_name(DEBIAN_XMPP) == "xmpp"
    assert app_name(Path("/opt/ejabberd-24.12/lib/xmpp-1.9.4")) == "xmpp"
    assert app_name(Path("/usr/lib/erlang/lib/p1_xml-1.1.49")) == "fast_xml"
    assert app_name(Path("/opt/ejabberd-24.12/lib/fast_xml-1.1.55")) == "fast_xml"
    assert app_name(Path("/opt/ejabberd-24.12/lib/p1_utils-1.0.26")) == "p1_utils"
    assert app_name(Path("/usr/lib/erlang/lib/stdlib-4.3")) is None
    assert app_name(Path("/usr/lib/ejabberd-contrib")) is None


def test_pick_apps_needs_the_header_and_takes_the_newest() -> None:
    old = Path("/opt/ejabberd-24.12/lib/ejabberd-24.12")
    new = Path("/opt/ejabberd-26.07/lib/ejabberd-26.07")
    headerless = Path("/usr/lib/ejabberd-27.01")  # no include/ (a runtime-only package)
    present = {old / "include/logger.hrl", new / "include/logger.hrl",
               DEBIAN_XMPP / "include/xmpp.hrl"}
    apps = pick_apps([headerless, old, new, DEBIAN_XMPP, Path("/usr/lib/erlang/lib/kernel")],
                     lambda path: path in present)
    assert apps == {"ejabberd": new, "xmpp": DEBIAN_XMPP}
    assert missing_apps(apps) == []
    assert missing_apps({"xmpp": DEBIAN_XMPP}) == ["ejabberd"]


def test_pick_apps_compares_versions_as_numbers() -> None:
    folders = [Path("/usr/lib/erlang/lib/p1_xmpp-1.10.0"),
               Path("/usr/lib/erlang/lib/p1_xmpp-1.9.4")]
    assert pick_apps(folders, lambda _: True)["xmpp"] == folders[0]
    assert pick_apps(reversed(folders), lambda _: True)["xmpp"] == folders[0]


def test_candidate_folders_come_from_every_layout() -> None:
    tree = {"/usr/lib/*/ejabberd-*": [str(DEBIAN_EJABBERD)],
            "/usr/lib/erlang/lib/p1_xmpp-*": [str(DEBIAN_XMPP)],
            "/opt/ejabberd-*/lib/xmpp-*": ["/opt/ejabberd-24.12/lib/xmpp-1.9.4"]}
    asked: list[str] = []

    def expand(pattern: str) -> list[str]:
        asked.append(pattern)
        return tree.get(pattern, [])

    assert candidate_app_folders(LIB_ROOTS, expand) == [
        DEBIAN_EJABBERD, DEBIAN_XMPP, Path("/opt/ejabberd-24.12/lib/xmpp-1.9.4")]
    # Debian's multiarch folder, ProcessOne's installers, the ecs image, FreeBSD.
    for pattern in ("/usr/lib/*/ejabberd-*", "/opt/ejabberd-*/lib/ejabberd-*",
                    "/home/ejabberd/lib/ejabberd-*", "/usr/local/lib/ejabberd-*",
                    "/usr/lib/erlang/lib/p1_xml-*", "/opt/ejabberd/lib/fast_xml-*"):
        assert pattern in asked


def test_apps_of_given_include_folders(tmp_path: Path) -> None:
    ejabberd = tmp_path / "ejabberd-26.07" / "include"
    xmpp = tmp_path / "xmpp-1.11.0" / "include"
    other = tmp_path / "headers"
    for folder, header in ((ejabberd, "logger.hrl"), (xmpp, "xmpp.hrl"), (other, "x.hrl")):
        folder.mkdir(parents=True)
        (folder / header).write_text("")
    apps = apps_of_includes([other, ejabberd, xmpp])
    assert apps == {"ejabberd": ejabberd.parent, "xmpp": xmpp.parent}
    assert missing_apps(apps_of_includes([other])) == ["ejabberd", "xmpp"]


def test_plan_and_erlc_command_follow_ext_mod() -> None:
    shim = Path("/src/erl_shim")
    apps = {"ejabberd": DEBIAN_EJABBERD, "xmpp": DEBIAN_XMPP}
    facts = CompileFacts(("SIP", 'X="y"'), ("maybe_expr",), 25, True)
    dirs = {shim / "include", DEBIAN_EJABBERD / "ebin", DEBIAN_XMPP / "ebin"}
    the_plan = plan(Path("/out"), [DEBIAN_XMPP / "include"], apps, shim, facts,
                    lambda path: path in dirs)
    assert the_plan == Plan(
        Path("/out/mod_push_py"),
        (shim / "include", DEBIAN_XMPP / "include", DEBIAN_EJABBERD / "include"),
        (DEBIAN_EJABBERD / "ebin", DEBIAN_XMPP / "ebin"), facts)
    command = erlc_command("/usr/bin/erlc", the_plan, Path("/tmp/b/ebin"),
                           [shim / "src/mod_push_py.erl"])
    assert shlex.join(command) == (
        "/usr/bin/erlc -o /tmp/b/ebin +debug_info -DSIP '-DX=\"y\"' -enable-feature maybe_expr"
        " -I /src/erl_shim/include -I /usr/lib/erlang/lib/p1_xmpp-1.6.1/include"
        " -I /usr/lib/x86_64-linux-gnu/ejabberd-23.01-1/include"
        " -pa /usr/lib/x86_64-linux-gnu/ejabberd-23.01-1/ebin"
        " -pa /usr/lib/erlang/lib/p1_xmpp-1.6.1/ebin /src/erl_shim/src/mod_push_py.erl")
    # Without a shim include/ nor ebin folders: only the apps' include folders.
    bare = plan(Path("/out"), [], apps, shim, CompileFacts(), lambda _: False)
    assert bare.include_dirs == (DEBIAN_EJABBERD / "include", DEBIAN_XMPP / "include")
    assert bare.code_paths == ()
    assert erlc_command("erlc", bare, Path("e"), [])[:4] == ["erlc", "-o", "e", "+debug_info"]


def test_not_found_message_names_the_headers_and_the_way_out() -> None:
    text = not_found_message(["ejabberd", "xmpp"], ["/usr/lib/*", "/opt/ejabberd-*/lib"])
    assert "logger.hrl (ejabberd), xmpp.hrl (xmpp)" in text
    assert "/usr/lib/*, /opt/ejabberd-*/lib" in text
    assert "--include" in text and "apt-get install ejabberd" in text


# ---------------------------------------------------------------------- the command


def fake_erlc(folder: Path, exit_code: int = 0) -> Path:
    """An erlc that records its arguments and writes a .beam for each source."""
    script = folder / "erlc"
    script.write_text(
        "#!/bin/sh\n"
        f'printf "%s\\n" "$@" > {folder}/erlc.args\n'
        f"[ {exit_code} = 0 ] || {{ echo 'mod_push_py.erl:1: syntax error' >&2; exit 1; }}\n"
        'out=$2; shift 2\n'
        'for a in "$@"; do case $a in *.erl) b=${a##*/}; b=${b%.erl}; '
        'echo beam > "$out/$b.beam";; esac; done\n')
    script.chmod(0o755)
    return script


@pytest.fixture
def includes(tmp_path: Path) -> list[Path]:
    ejabberd = tmp_path / "target" / "ejabberd-26.07" / "include"
    xmpp = tmp_path / "target" / "xmpp-1.11.0" / "include"
    for folder, header in ((ejabberd, "logger.hrl"), (xmpp, "xmpp.hrl")):
        folder.mkdir(parents=True)
        (folder / header).write_text("")
    return [ejabberd, xmpp]


def test_build_writes_a_module_folder(tmp_path: Path, includes: list[Path],
                                      monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake_erlc(bin_dir)
    monkeypatch.setenv("PATH", str(bin_dir))  # no erl: no ext_mod.beam facts either
    out = tmp_path / "out"
    (out / "mod_push_py" / "ebin").mkdir(parents=True)
    (out / "mod_push_py" / "ebin" / "stale.beam").write_text("old")  # replaced whole
    (out / "mod_push_py" / "conf").mkdir()
    (out / "mod_push_py" / "conf" / "mod_push_py.yml").write_text(  # its options are kept
        "modules:\n  mod_push_py:\n    python: /old/python\n    include_senders: true\n")
    assert cli_main(["build-module", "--out", str(out), "--python", "/opt/venv/bin/python",
                     *[arg for include in includes for arg in ("--include", str(include))]
                     ]) == 0
    module = out / "mod_push_py"
    shim = shim_source()
    assert sorted(p.name for p in module.iterdir()) == sorted(
        ["COPYING", "README.txt", "conf", "ebin", "mod_push_py.spec"]
        + (["include"] if (shim / "include").is_dir() else []))
    assert sorted(p.name for p in (module / "ebin").iterdir()) == sorted(
        f"{source.stem}.beam" for source in (shim / "src").glob("*.erl"))
    assert (module / "mod_push_py.spec").read_text() == (shim / "mod_push_py.spec").read_text()
    conf = yaml.safe_load((module / "conf" / "mod_push_py.yml").read_text())
    assert conf == {"modules": {"mod_push_py": {"python": "/opt/venv/bin/python",
                                                "include_senders": True}}}
    for path in [module, *module.rglob("*")]:  # readable by the ejabberd user
        assert stat.S_IMODE(path.stat().st_mode) == (0o755 if path.is_dir() else 0o644)
    assert [p.name for p in out.iterdir()] == ["mod_push_py"]  # no staging folder left
    args = (bin_dir / "erlc.args").read_text().splitlines()
    assert args[2] == "+debug_info"
    assert ["-I", str(includes[0])] == args[args.index(str(includes[0])) - 1:][:2]
    assert str(includes[1]) in args
    printed = capsys.readouterr().out
    assert f"wrote {module} (python: /opt/venv/bin/python)" in printed
    assert f"CONTRIB_MODULES_PATH is {out}" in printed
    assert "ext_mod's defines not read" in printed  # said, not silently different


def test_failed_build_keeps_the_previous_module(tmp_path: Path, includes: list[Path],
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake_erlc(bin_dir, exit_code=1)
    monkeypatch.setenv("PATH", str(bin_dir))
    out = tmp_path / "out"
    (out / "mod_push_py").mkdir(parents=True)
    (out / "mod_push_py" / "mod_push_py.spec").write_text("previous")
    assert build_module.main(["--out", str(out), "--include", str(includes[0]),
                              "--include", str(includes[1])]) == 1
    err = capsys.readouterr().err
    assert "pymod-push build-module: erlc failed (1):" in err
    assert "syntax error" in err
    assert (out / "mod_push_py" / "mod_push_py.spec").read_text() == "previous"
    assert [p.name for p in out.iterdir()] == ["mod_push_py"]


def test_no_erlc_says_which_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    assert build_module.main(["--out", str(tmp_path / "out")]) == 1
    assert capsys.readouterr().err == f"pymod-push build-module: {ERLC_MISSING}\n"
    assert "erlang-base" in ERLC_MISSING and "erlang-dev" in ERLC_MISSING
    assert not (tmp_path / "out").exists()


def test_includes_without_ejabberd_headers_are_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    fake_erlc(tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path))
    headers = tmp_path / "headers"
    headers.mkdir()
    assert build_module.main(["--out", str(tmp_path / "out"), "--include", str(headers)]) == 1
    err = capsys.readouterr().err
    assert "ejabberd's include files not found: no logger.hrl (ejabberd), xmpp.hrl (xmpp) " \
           f"under {headers}" in err
    assert build_module.main(["--out", str(tmp_path / "out"),
                              "--include", str(tmp_path / "nowhere")]) == 1
    assert f"--include: no such folder: {tmp_path / 'nowhere'}" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
