"""The spec's url and home and the sources' tarball that pymod-push stages for ext_mod
(pymod_push/install/module_source.py); ext_mod itself re-extracting it:
tests/e2e/test_module_specs.py."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest
import yaml

import pymod_push
from pymod_push.install import module_source, shim
from pymod_push.install.module_source import (
    ARCHIVE,
    MODULE,
    archive_path,
    members,
    seal,
    spec_text,
    spec_value,
)

REPO_SPEC = (shim.shim_source() / f"{MODULE}.spec").read_text()


def stage(modules: Path) -> Path:
    """The shim copied as commands.stage_sources does, a conf file only its owner reads."""
    sources = modules / "sources" / MODULE
    shutil.copytree(shim.shim_source(), sources)
    conf = sources / "conf" / f"{MODULE}.yml"
    conf.write_text("modules:\n  mod_push_py:\n    python: /opt/venv/bin/python\n")
    conf.chmod(0o600)
    return sources


def tree(root: Path) -> dict[str, tuple[bytes | None, int]]:
    """Every file (bytes) and folder (None) under root, with its mode."""
    return {str(path.relative_to(root)): (path.read_bytes() if path.is_file() else None,
                                          stat.S_IMODE(path.stat().st_mode))
            for path in root.rglob("*")}


def test_the_repository_spec_names_nothing() -> None:
    spec = yaml.safe_load(REPO_SPEC)
    assert spec["home"] == "" and spec["url"] == ""
    assert module_source.MODULE == shim.MODULE


def test_home_is_the_python_package_folder() -> None:
    """The spec's home, and where the shim's sources are looked for: pymod_push/, not the
    install/ folder these modules are in."""
    package = Path(pymod_push.__file__).resolve().parent
    assert module_source.PACKAGE_DIR == shim.PACKAGE_DIR == package
    assert shim.shim_source() in (package / "erl_shim", package.parent / "erl_shim")


def test_spec_text_sets_home_and_url_and_keeps_the_rest() -> None:
    text = spec_text(REPO_SPEC, "/var/lib/ejabberd/.ejabberd-modules/mod_push_py.tgz",
                     "file:///opt/venv/lib/python3.11/site-packages/pymod_push")
    spec = yaml.safe_load(text)
    assert spec["url"] == "/var/lib/ejabberd/.ejabberd-modules/mod_push_py.tgz"
    assert spec["home"] == "file:///opt/venv/lib/python3.11/site-packages/pymod_push"
    original = yaml.safe_load(REPO_SPEC)
    assert {key: spec[key] for key in ("author", "category", "summary")} == {
        key: original[key] for key in ("author", "category", "summary")}
    # Only the two lines changed; setting them again gives the same text.
    changed = [(old, new) for old, new in zip(REPO_SPEC.splitlines(), text.splitlines(),
                                              strict=True) if old != new]
    assert [old for old, _ in changed] == ['home: ""', 'url: ""']
    assert spec_text(text, spec["url"], spec["home"]) == text


def test_spec_values_are_quoted_and_only_what_ext_mod_reads_back() -> None:
    for value in ("/a b/x: #y.tgz", '/a"b\\c.tgz', "/x'y"):
        assert yaml.safe_load(f"url: {spec_value(value)}") == {"url": value}
    # ext_mod turns the spec's strings into lists of bytes: non-ASCII is not the path.
    assert spec_value("/srv/modulé/mod_push_py.tgz") is None
    assert spec_value("/srv/a\nb") is None
    assert spec_value("") is None
    with pytest.raises(ValueError):
        spec_text(REPO_SPEC, "/srv/modulé/mod_push_py.tgz", "file:///x")
    with pytest.raises(ValueError, match="exactly one"):
        spec_text(REPO_SPEC.replace('url: ""', ""), "/x.tgz", "file:///x")


def test_the_archive_is_outside_sources_and_named_for_ext_mod() -> None:
    sources = Path("/var/lib/ejabberd/.ejabberd-modules/sources/mod_push_py")
    archive = archive_path(sources)
    assert archive == Path("/var/lib/ejabberd/.ejabberd-modules/mod_push_py.tgz")
    # ext_mod: local file ending in "gz" -> erl_tar; module_name = basename(rootname(Url))
    # is the folder 23.01 deletes first: the module's own sources folder.
    assert archive.name.endswith("gz") and Path(archive.stem).name == MODULE == ARCHIVE[:-4]
    # Not a module to ext_mod: installed()/available() look for */*.spec, */*/*.spec.
    assert not archive.match("*/*.spec") and archive.parent != sources.parent


def test_members_refuse_links_and_keep_modes(tmp_path: Path) -> None:
    sources = stage(tmp_path)
    (sources / "link").symlink_to(sources / "COPYING")
    entries = [(path, path.lstat()) for path in [sources, *sources.rglob("*")]]
    with pytest.raises(ValueError, match="neither a file nor a folder"):
        members(sources, entries)
    (sources / "link").unlink()
    (sources / "README.txt").chmod(0o666)
    entries = [(path, path.lstat()) for path in [sources, *sources.rglob("*")]]
    found = {member.name: member for member in members(sources, entries)}
    assert found[MODULE].is_dir
    assert found[f"{MODULE}/README.txt"].mode == 0o644  # no group/other write
    assert found[f"{MODULE}/conf/{MODULE}.yml"].mode == 0o600


def test_seal_writes_the_spec_and_a_tarball_of_exactly_the_sources(tmp_path: Path) -> None:
    modules = tmp_path / "modules"
    sources = stage(modules)
    archive = seal(sources, home=tmp_path)
    assert archive == modules / ARCHIVE
    spec = yaml.safe_load((sources / f"{MODULE}.spec").read_text())
    assert spec["url"] == str(modules / ARCHIVE)
    assert spec["home"] == tmp_path.as_uri()
    assert stat.S_IMODE(archive.stat().st_mode) == 0o600
    with tarfile.open(archive) as tar:
        names = tar.getnames()
        assert tar.getmembers()[0].name == MODULE and tar.getmembers()[0].isdir()
        for member in tar.getmembers():
            assert not member.name.startswith("/") and ".." not in member.name.split("/")
            assert member.name.split("/")[0] == MODULE
            assert member.isfile() or member.isdir()
            assert member.uid == 0 and member.gid == 0
        assert tar.getmember(f"{MODULE}/conf/{MODULE}.yml").mode == 0o600
        assert tar.getmember(f"{MODULE}/src").mode == 0o755
        extracted = tmp_path / "extracted"
        tar.extractall(extracted)  # its names were checked above
    assert sorted(names) == sorted([MODULE] + [f"{MODULE}/{name}" for name in tree(sources)])
    assert tree(extracted / MODULE) == tree(sources)  # the spec with its url included
    # Sealed again (an upgrade): the same spec, the tarball replaced, nothing left over.
    (sources / "src" / "extra.erl").write_text("-module(extra).\n")
    seal(sources, home=tmp_path)
    with tarfile.open(archive) as tar:
        assert f"{MODULE}/src/extra.erl" in tar.getnames()
    assert sorted(path.name for path in modules.iterdir()) == [ARCHIVE, "sources"]


def test_seal_leaves_the_spec_empty_where_ext_mod_could_not_read_the_path(
        tmp_path: Path) -> None:
    modules = tmp_path / "modulé"
    sources = stage(modules)
    (modules / ARCHIVE).write_bytes(b"old")
    assert seal(sources) is None
    assert (sources / f"{MODULE}.spec").read_text() == REPO_SPEC
    assert not (modules / ARCHIVE).exists()


@pytest.mark.skipif(shutil.which("erl") is None, reason="no erl: Erlang is not installed")
def test_erl_tar_extracts_it_as_ext_mod_does(tmp_path: Path) -> None:
    """ext_mod:add_sources/2 on a local *gz url: erl_tar:extract(Url, [compressed, {cwd,
    SourcesDir}])."""
    modules = tmp_path / "modules"
    sources = stage(modules)
    archive = seal(sources)
    assert archive is not None
    staged = tree(sources)
    shutil.rmtree(sources)  # as ext_mod's delete_path does first
    result = subprocess.run(
        ["erl", "-noshell", "-eval",
         f'io:format("~p~n", [erl_tar:extract("{archive}", [compressed, '
         f'{{cwd, "{modules / "sources"}"}}])]), halt().'],
        capture_output=True, text=True, timeout=60, env={**os.environ,
                                                         "ERL_CRASH_DUMP_SECONDS": "0"})
    assert result.stdout.strip() == "ok", result.stdout + result.stderr
    assert tree(sources) == staged
