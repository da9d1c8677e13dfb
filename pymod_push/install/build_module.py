"""``pymod-push build-module``: a ready mod_push_py folder, for images and read-only roots.

    pymod-push build-module --out DIR [--include DIR ...] [--python PATH]

writes DIR/mod_push_py/ (the spec, conf/mod_push_py.yml, ebin/*.beam, COPYING,
README.txt; a rebuild keeps the other options of the conf file there). ejabberd loads it
at start from any CONTRIB_MODULES_PATH that holds it, without ``module_install`` and
without writing there: ext_mod:installed() lists every
``$CONTRIB_MODULES_PATH/*/*.spec``, ejabberd_config:beams(external) and ext_mod:add_paths()
put their ebin/ on the code path, and ejabberd_config:read_file/2 merges every
``$CONTRIB_MODULES_PATH/*/conf/*.yml`` (ext_mod:modules_configs()) into the configuration.

The beams are compiled with ``erlc`` and ext_mod's own compile options (debug_info, the
defines ejabberd was built with, read from its ext_mod.beam when it has debug_info)
against ejabberd's and xmpp's include files: those of ``--include`` DIRs (another
ejabberd's, e.g. copied out of the target image), else the local ejabberd's, found by
their usual places (Debian's /usr/lib/<arch>/ejabberd-VSN and /usr/lib/erlang/lib,
ProcessOne's /opt/ejabberd-VSN/lib, /usr/local/lib). Build with the Erlang/OTP release
the target runs, or an older one: a beam from a newer OTP may not load.

The decisions (where to look, which app directory wins, the erlc command line) are
plain functions; ``build`` and ``main`` do the I/O.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pymod_push.core.limits import ascii_number
from pymod_push.install.errors import InstallError
from pymod_push.install.layout import version_key
from pymod_push.install.shim import MODULE, module_conf, shim_source

# The header each app must have to count, by the names its folder has on each layout
# (Debian names xmpp and fast_xml p1_xmpp and p1_xml).
APPS: dict[str, tuple[tuple[str, ...], str]] = {
    "ejabberd": (("ejabberd",), "logger.hrl"),
    "xmpp": (("xmpp", "p1_xmpp"), "xmpp.hrl"),
    "fast_xml": (("fast_xml", "p1_xml"), "fxml.hrl"),
    "p1_utils": (("p1_utils",), ""),
}
REQUIRED_APPS = ("ejabberd", "xmpp")

# Where the Erlang applications of an ejabberd are, by layout (globs).
LIB_ROOTS = (
    "/usr/lib/*",  # Debian, Ubuntu: /usr/lib/x86_64-linux-gnu/ejabberd-23.01-1
    "/usr/lib",  # Alpine, Fedora: /usr/lib/ejabberd-VSN
    "/usr/lib/erlang/lib",  # Debian's p1_xmpp-*, p1_xml-*, p1_utils-*
    "/usr/lib64/erlang/lib",
    "/usr/local/lib",  # FreeBSD, source installs
    "/usr/local/lib/erlang/lib",
    "/opt/ejabberd-*/lib",  # ProcessOne's .deb/.rpm/.run installers
    "/opt/ejabberd/lib",
    "/home/ejabberd/lib",  # the ejabberd/ecs container image
)

ERLC_MISSING = ("erlc not found: install Erlang's compiler (Debian, Ubuntu: apt-get install "
                "erlang-base erlang-dev; Alpine: apk add erlang-dev; or the erlc of the "
                "Erlang/OTP ejabberd runs on, on the PATH)")

# Prints what ext_mod passes to compile:file besides the include paths: its
# compile_options/0's {d, Name[, Value]} defines (ejabberd's ALL_DEFS) and features,
# read from the abstract code of ext_mod.beam (argument), and this OTP's release.
_EXT_MOD_FACTS = r"""
[Beam | _] = init:get_plain_arguments(),
io:format("otp ~s~n", [erlang:system_info(otp_release)]),
Walk = fun W({tuple, _, [{atom, _, d}, {atom, _, N}]}) -> io:format("define ~s~n", [N]);
           W({tuple, _, [{atom, _, d}, {atom, _, N}, V]}) ->
               io:format("define ~s=~s~n", [N, erl_pp:expr(V)]);
           W({tuple, _, [{atom, _, feature}, {atom, _, F}, {atom, _, enable}]}) ->
               io:format("feature ~s~n", [F]);
           W(T) when is_tuple(T) -> [W(E) || E <- tuple_to_list(T)];
           W(L) when is_list(L) -> [W(E) || E <- L];
           W(_) -> ok
       end,
case beam_lib:chunks(Beam, [abstract_code]) of
    {ok, {_, [{abstract_code, {_, Forms}}]}} ->
        [Walk(Body) || {function, _, compile_options, 0, Body} <- Forms];
    _ -> io:format("no_abstract_code~n")
end,
halt().
"""


# ---------------------------------------------------------------------- decisions


@dataclass(frozen=True)
class CompileFacts:
    """What ext_mod adds to compile:file's options on the target ejabberd."""

    defines: tuple[str, ...] = ()  # NAME or NAME=VALUE, as erlc's -D takes them
    features: tuple[str, ...] = ()  # enabled with erlc's -enable-feature
    otp_release: int | None = None  # of the erl that read them (the erlc's)
    read: bool = False  # False: no ext_mod.beam with debug_info was found


def parse_ext_mod_facts(text: str) -> CompileFacts:
    """The output of _EXT_MOD_FACTS."""
    defines: list[str] = []
    features: list[str] = []
    otp: int | None = None
    read = False
    for line in text.splitlines():
        kind, _, value = line.strip().partition(" ")
        if kind == "otp":
            otp = ascii_number(value, max_digits=3)
        elif kind == "define" and value:
            defines.append(value)
            read = True
        elif kind == "feature" and value:
            features.append(value)
            read = True
    # ext_mod:maybe_define_lager_macro(): logger.hrl uses lager before OTP 22.
    if otp is not None and otp < 22 and "LAGER" not in defines:
        defines.append("LAGER")
    return CompileFacts(tuple(dict.fromkeys(defines)), tuple(dict.fromkeys(features)),
                        otp, read)


def _version_key(folder: Path) -> tuple[int, ...]:
    """ejabberd-23.01-1 -> (23, 1, 1); a folder without a version sorts first."""
    return version_key(folder.name.partition("-")[2])


def app_name(folder: Path) -> str | None:
    """Which of APPS an application folder (NAME or NAME-VSN) is, if any."""
    name, dash, version = folder.name.partition("-")
    if dash and ascii_number(version[:1]) is None:  # ejabberd-contrib, p1_utils-src...
        return None
    for app, (names, _) in APPS.items():
        if name in names:
            return app
    return None


def pick_apps(folders: Iterable[Path], has_file: Callable[[Path], bool]) -> dict[str, Path]:
    """The application folder of each of APPS among ``folders``: one whose include/ has the
    app's header; of several, the newest version (then the first given)."""
    found: dict[str, list[Path]] = {}
    for folder in folders:
        app = app_name(folder)
        if app is None:
            continue
        header = APPS[app][1]
        if not has_file(folder / "include" / header if header else folder / "include"):
            continue
        found.setdefault(app, []).append(folder)
    return {app: max(candidates, key=_version_key)
            for app, candidates in found.items()}


def missing_apps(apps: dict[str, Path]) -> list[str]:
    return [app for app in REQUIRED_APPS if app not in apps]


def not_found_message(missing: Sequence[str], searched: Sequence[str]) -> str:
    headers = ", ".join(f"{APPS[app][1]} ({app})" for app in missing)
    return (f"ejabberd's include files not found: no {headers} under "
            f"{', '.join(searched)}.\nInstall ejabberd here (Debian: apt-get install "
            "ejabberd), or give the target ejabberd's include folders: --include "
            ".../ejabberd-VSN/include --include .../xmpp-VSN/include")


def apps_of_includes(includes: Sequence[Path]) -> dict[str, Path]:
    """--include DIRs: the application folder each belongs to (its parent), by the header
    it holds; an include folder of no known app counts as ejabberd's when it holds
    logger.hrl (e.g. a copy of just the headers)."""
    apps: dict[str, Path] = {}
    for include in includes:
        for app, (_, header) in APPS.items():
            if header and (include / header).is_file() and app not in apps:
                apps[app] = include.parent
    return apps


@dataclass(frozen=True)
class Plan:
    """What build-module writes and runs."""

    target: Path  # OUT/mod_push_py
    include_dirs: tuple[Path, ...]
    code_paths: tuple[Path, ...]  # ebin folders, so that -include_lib finds the apps
    facts: CompileFacts = field(default_factory=CompileFacts)


def plan(out: Path, includes: Sequence[Path], apps: dict[str, Path], shim: Path,
         facts: CompileFacts, is_dir: Callable[[Path], bool]) -> Plan:
    """Include folders: the shim's own include/ first (as ext_mod's {i, LibDir/include}),
    then the given ones, then the found apps'; code paths: the apps' ebin/."""
    dirs: list[Path] = []
    if is_dir(shim / "include"):
        dirs.append(shim / "include")
    dirs += list(includes)
    dirs += [folder / "include" for folder in apps.values()]
    paths = [folder / "ebin" for folder in apps.values() if is_dir(folder / "ebin")]
    return Plan(out / MODULE, tuple(dict.fromkeys(dirs)), tuple(dict.fromkeys(paths)), facts)


def erlc_command(erlc: str, the_plan: Plan, ebin: Path, sources: Sequence[Path]) -> list[str]:
    """ext_mod:compile/2's options as erlc arguments: debug_info, the defines and features
    of its compile_options/0, the include folders; warnings reported, not errors."""
    command = [erlc, "-o", str(ebin), "+debug_info"]
    for define in the_plan.facts.defines:
        command.append(f"-D{define}")
    for feature in the_plan.facts.features:
        command += ["-enable-feature", feature]
    for include in the_plan.include_dirs:
        command += ["-I", str(include)]
    for path in the_plan.code_paths:
        command += ["-pa", str(path)]
    return command + [str(source) for source in sources]


def candidate_app_folders(roots: Sequence[str],
                          expand: Callable[[str], list[str]]) -> list[Path]:
    """Every folder NAME[-VSN] of an app of APPS under the roots (``expand`` globs)."""
    names = sorted({name for names, _ in APPS.values() for name in names})
    folders: list[Path] = []
    for root in roots:
        for name in names:
            for pattern in (f"{root}/{name}-*", f"{root}/{name}"):
                folders += [Path(found) for found in sorted(expand(pattern))]
    return list(dict.fromkeys(folders))


# ---------------------------------------------------------------------- the edges


def read_compile_facts(apps: dict[str, Path], erl: str | None) -> CompileFacts:
    """ext_mod's defines and features, from the ejabberd app's ext_mod.beam."""
    beam = apps["ejabberd"] / "ebin" / "ext_mod.beam" if "ejabberd" in apps else None
    if erl is None or beam is None or not beam.is_file():
        return CompileFacts()
    # ERL_CRASH_DUMP_SECONDS=0: a beam this erl cannot read (a newer OTP's) leaves no
    # erl_crash.dump in the admin's working directory.
    result = subprocess.run([erl, "-noshell", "-eval", _EXT_MOD_FACTS, "-extra", str(beam)],
                            capture_output=True, text=True, timeout=120,
                            env={**os.environ, "ERL_CRASH_DUMP_SECONDS": "0"})
    return parse_ext_mod_facts(result.stdout) if result.returncode == 0 else CompileFacts()


def build(out: Path, includes: Sequence[Path], python: str,
          out_line: Callable[[str], None]) -> Path:
    erlc = shutil.which("erlc")
    if erlc is None:
        raise InstallError(ERLC_MISSING)
    shim = shim_source()
    if includes:
        missing_dirs = [str(include) for include in includes if not include.is_dir()]
        if missing_dirs:
            raise InstallError(f"--include: no such folder: {', '.join(missing_dirs)}")
        apps = apps_of_includes(includes)
        searched = [str(include) for include in includes]
    else:
        apps = pick_apps(candidate_app_folders(LIB_ROOTS, glob.glob), Path.exists)
        searched = list(LIB_ROOTS)
    missing = missing_apps(apps)
    if missing:
        raise InstallError(not_found_message(missing, searched))
    facts = read_compile_facts(apps, shutil.which("erl"))
    the_plan = plan(out, includes, apps, shim, facts, Path.is_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Built next to the target, then moved in place: a failed build leaves the old one.
    staging = Path(tempfile.mkdtemp(prefix=f".{MODULE}-", dir=out))
    try:
        ebin = staging / "ebin"
        ebin.mkdir()
        sources = sorted((shim / "src").glob("*.erl"))
        command = erlc_command(erlc, the_plan, ebin, sources)
        result = subprocess.run(command, capture_output=True, text=True, timeout=600)
        if result.returncode != 0:
            raise InstallError(f"erlc failed ({result.returncode}):\n"
                               f"{result.stdout}{result.stderr}".rstrip())
        for name in (f"{MODULE}.spec", "COPYING", "README.txt"):
            shutil.copyfile(shim / name, staging / name)
        if (shim / "include").is_dir():
            shutil.copytree(shim / "include", staging / "include")
        (staging / "conf").mkdir()
        # A rebuild keeps the options set in the previous build's conf file.
        previous = the_plan.target / "conf" / f"{MODULE}.yml"
        existing = previous.read_text() if previous.is_file() else None
        (staging / "conf" / f"{MODULE}.yml").write_text(module_conf(python, existing))
        for path in [staging, *staging.rglob("*")]:  # the ejabberd user reads it all
            path.chmod(0o755 if path.is_dir() else 0o644)
        if the_plan.target.exists():
            shutil.rmtree(the_plan.target)
        staging.rename(the_plan.target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    where = ", ".join(f"{app} {folder}" for app, folder in sorted(apps.items()))
    out_line(f"compiled {len(sources)} modules against {where}"
             + ("" if facts.read else " (ext_mod's defines not read: no ext_mod.beam with "
                                      "debug_info next to them, or one of a newer Erlang/OTP "
                                      "than this erl; none passed)"))
    out_line(f"wrote {the_plan.target} (python: {python})\n"
             f"ejabberd loads it at start when its CONTRIB_MODULES_PATH is {out} "
             "(ejabberdctl.cfg, or the environment): no module_install, and the folder may "
             "be read-only. Remove mod_push and mod_push_keepalive from ejabberd's modules.")
    return the_plan.target


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pymod-push build-module",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True,
                        help="the folder to write mod_push_py/ into (the future "
                        "CONTRIB_MODULES_PATH)")
    parser.add_argument("--include", type=Path, action="append", default=[],
                        help="an include folder of the target ejabberd (its ejabberd-VSN/"
                        "include, xmpp-VSN/include...); repeat it; default: the local "
                        "ejabberd's")
    parser.add_argument("--python", default=sys.executable,
                        help="the interpreter ejabberd runs (default: this one)")
    args = parser.parse_args(argv)
    try:
        build(args.out.resolve(), [include.resolve() for include in args.include],
              args.python, print)
    except InstallError as exc:
        print(f"pymod-push build-module: {exc}", file=sys.stderr)
        return 1
    return 0
