"""The spec's ``url`` and ``home`` in the module sources pymod-push stages for ext_mod.

The repository's erl_shim/mod_push_py.spec has them empty: the module comes with this
package, not from a repository ext_mod could download. Once ``pymod-push install`` /
``upgrade`` (and the test instances, devtools/instance.py) have staged the sources in
``$CONTRIB_MODULES_PATH/sources/mod_push_py``, ``seal`` gives that copy

- ``url``: the absolute path of ``$CONTRIB_MODULES_PATH/mod_push_py.tgz``, a tarball of
  exactly these sources (this spec included), written beside ``sources/``;
- ``home``: the ``file:`` URI of this Python package's folder, where the module comes from
  (the WebAdmin puts ``home`` in a link, where a bare path would point into the WebAdmin).

ext_mod reads a local ``url`` ending in ``gz`` with ``erl_tar:extract(Path, [compressed,
{cwd, SourcesDir}])`` (``add_sources/2``, 23.01 to 26.07), after deleting
``sources/<basename of the url without its last extension>`` (23.01) or ``sources/NAME``
(24.12+): both ``sources/mod_push_py`` with this name. So ``ejabberdctl
modules_update_specs`` puts back the same sources (instead of ``{error,no_url}``),
``module_upgrade`` finds them, and ``module_check`` finds a ``home`` and a ``url``. The
tarball is no module to ext_mod: ``installed()`` and ``available()`` look for
``*/*.spec`` and ``*/*/*.spec``, the configuration for ``*/conf/*.yml``.

Decisions (``spec_text``, ``members``, ``spec_value``) are plain functions; ``seal`` and
``write_archive`` do the I/O.
"""

from __future__ import annotations

import io
import json
import os
import re
import stat
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

MODULE = "mod_push_py"
ARCHIVE = f"{MODULE}.tgz"  # ext_mod: module_name(Url) = "mod_push_py", and it ends in "gz"
PACKAGE_DIR = Path(__file__).resolve().parent.parent  # pymod_push/, where the module comes from

_KEY = re.compile(r"^(home|url):.*$", re.MULTILINE)


def archive_path(sources: Path) -> Path:
    """``$CONTRIB_MODULES_PATH/mod_push_py.tgz`` for ``$CONTRIB_MODULES_PATH/sources/
    mod_push_py``: outside sources/, which ext_mod deletes before extracting."""
    return sources.parent.parent / ARCHIVE


def spec_value(value: str) -> str | None:
    """``value`` as a YAML double-quoted scalar, or None when ext_mod could not use it:
    it reads the spec's strings as bytes (binary_to_list), so only printable ASCII is
    the path it means."""
    if not value or not all(" " <= char <= "~" for char in value):
        return None
    return json.dumps(value)  # a JSON string of printable ASCII is a YAML one


def spec_text(template: str, url: str, home: str) -> str:
    """The spec with its ``home:`` and ``url:`` lines (the repository's: ``""``) set."""
    values = {"url": spec_value(url), "home": spec_value(home)}
    found = _KEY.findall(template)
    if sorted(found) != ["home", "url"]:
        raise ValueError(f"the spec has not exactly one home and one url line: {found}")
    if None in values.values():
        raise ValueError(f"not a path ext_mod can read from its spec: {url!r} / {home!r}")
    return _KEY.sub(lambda match: f"{match.group(1)}: {values[match.group(1)]}",
                          template)


@dataclass(frozen=True)
class Member:
    """One entry of the tarball."""

    path: Path  # on disk
    name: str  # in the tarball: mod_push_py/...
    is_dir: bool
    mode: int
    mtime: int


def members(sources: Path, entries: list[tuple[Path, os.stat_result]]) -> list[Member]:
    """The tarball's entries for ``sources`` and the files and folders under it (with
    their lstat): names relative, ``mod_push_py`` and under it, sorted; modes as staged,
    without group/other write; anything but a file or a folder (a link...) refused."""
    result = []
    for path, info in sorted(entries, key=lambda entry: entry[0].relative_to(sources).parts):
        relative = PurePosixPath(MODULE, *path.relative_to(sources).parts)
        if ".." in relative.parts:
            raise ValueError(f"not under {sources}: {path}")
        if not (stat.S_ISREG(info.st_mode) or stat.S_ISDIR(info.st_mode)):
            raise ValueError(f"neither a file nor a folder: {path}")
        result.append(Member(path, str(relative), stat.S_ISDIR(info.st_mode),
                             stat.S_IMODE(info.st_mode) & 0o755, int(info.st_mtime)))
    return result


def write_archive(sources: Path, archive: Path) -> None:
    """A gzipped ustar of ``sources`` as ``mod_push_py/...``, mode 0600 (its conf file may
    hold options an admin set), replaced atomically."""
    entries = [(path, path.lstat()) for path in [sources, *sources.rglob("*")]]
    handle, temporary = tempfile.mkstemp(prefix=f".{ARCHIVE}-", dir=archive.parent)
    try:
        with os.fdopen(handle, "wb") as raw, \
                tarfile.open(fileobj=raw, mode="w:gz", format=tarfile.USTAR_FORMAT) as tar:
            for member in members(sources, entries):
                info = tarfile.TarInfo(member.name)
                info.mode = member.mode
                info.mtime = member.mtime
                if member.is_dir:
                    info.type = tarfile.DIRTYPE
                    tar.addfile(info)
                else:
                    data = member.path.read_bytes()
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        os.chmod(temporary, 0o600)
        os.replace(temporary, archive)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def seal(sources: Path, home: Path = PACKAGE_DIR) -> Path | None:
    """Set the staged spec's ``url`` (a tarball of these sources, written beside
    sources/) and ``home`` (``home``'s file: URI); returns the tarball. Where its path
    is no printable ASCII, the spec keeps its empty values (``modules_update_specs``
    then skips the module: ``{error,no_url}``), no tarball is left, and None is
    returned. OSError when a file cannot be written."""
    archive = archive_path(sources.resolve())
    spec = sources / f"{MODULE}.spec"
    if spec_value(str(archive)) is None:
        archive.unlink(missing_ok=True)
        return None
    spec.write_text(spec_text(spec.read_text(), str(archive), home.resolve().as_uri()))
    try:
        write_archive(sources, archive)
    except ValueError as exc:  # a link or a name too long for ustar in the sources
        raise OSError(0, str(exc)) from None
    return archive
