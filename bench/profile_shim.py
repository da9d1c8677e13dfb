"""Profile of the beam side of a push: mod_push_py against ejabberd's built-in mod_push.

The load of bench/versus_builtin.py (pending push sessions, an app-server client that
answers every publish, messages round-robin at a fixed rate), one module at a time,
alternating. After a warm-up phase, a measured phase: the ejabberd VM's and the Python
process's CPU per push (from /proc), and, unless --no-perf, a CPU profile of the VM for
the duration of that phase with `perf record -g` (the JIT writes a perf map and keeps
frame pointers: the VM runs with `+JPperf true`, OTP 25 or later). The profile is printed
as shares of the VM's samples: by function (self), by Erlang module or native library
(self), and the share of the samples with a given module anywhere on the stack (inclusive:
mod_push_py and what it calls, or mod_push and mod_push_keepalive).

Each mod_push_py side can be a version of its own: `--ours REV` (several allowed) takes
erl_shim/ and pymod_push/ from that commit (`git archive`), `--ours worktree` from the
working tree as it is when the script starts. Snapshots keep a run stable while the tree
changes; the Python process imports the snapshot (PYTHONPATH set by a wrapper script).

    sudo python -m bench.profile_shim [--sessions 1000] [--rate 8000] [--messages 40000]
        [--warmup 20000] [--rounds 1] [--builtin/--no-builtin] [--ours worktree ...]
        [--no-perf] [--frequency 1999] [--top 30] [--keep DIR]

Runs as root (ejabberdctl, perf). Other work on the machine's cores changes the absolute
figures: compare shares, and versions only within one run (alternating rounds).
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import os
import re
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.versus_builtin import NS_PUSH, Phase, cpu_seconds, send_phase
from devtools.instance import EJABBERD_USER, ROOT, Instance, free_port
from devtools.xmpp_light import Xmpp

NS_DATA = "jabber:x:data"
# Erlang modules of each side: the share of samples with one of them on the stack.
OURS_MODULES = ("mod_push_py", "mod_push_py_port", "mod_push_py_opt")
BUILTIN_MODULES = ("mod_push", "mod_push_keepalive")


@dataclass
class Side:
    """One module under load: the built-in, or mod_push_py from a tree (None: this one)."""
    name: str
    ours: bool
    tree: Path | None = None
    python: str | None = None  # a wrapper running the tree's pymod_push
    pushes: bool = True  # False: no push module at all (what both sides share)


@dataclass
class ProfiledInstance(Instance):
    shim: Path = ROOT / "erl_shim"
    perf: bool = True
    spin: bool = True  # False: schedulers do not spin while they wait for work

    def write_config(self) -> None:
        super().write_config()
        flags = (["+JPperf true"] if self.perf else []) + (
            [] if self.spin else ["+sbwt none +sbwtdcpu none +sbwtdio none"])
        if flags:
            # Sourced by ejabberdctl with its arguments: only the node gets the flags, not
            # the short-lived nodes of ctl commands (each would leave a perf map in /tmp).
            with open(self.folder / "ejabberdctl.cfg", "a") as cfg:
                cfg.write(f'case "$1" in start|foreground) ERL_OPTIONS="{" ".join(flags)}";; '
                          'esac\n')

    def _stage_module_sources(self) -> None:
        super()._stage_module_sources()
        if self.shim != ROOT / "erl_shim":
            target = self.folder / "modules" / "sources" / "mod_push_py"
            conf = (target / "conf" / "mod_push_py.yml").read_text()
            shutil.rmtree(target)
            shutil.copytree(self.shim, target)
            (target / "conf" / "mod_push_py.yml").write_text(conf)


def snapshot(rev: str, folder: Path) -> Side:
    """erl_shim/ and pymod_push/ of a commit (or of the working tree now) in folder, and a
    wrapper that runs the project's Python with that pymod_push first on its path."""
    tree = folder / rev.replace("/", "_")
    tree.mkdir(parents=True)
    if rev == "worktree":
        for part in ("erl_shim", "pymod_push"):
            shutil.copytree(ROOT / part, tree / part,
                            ignore=shutil.ignore_patterns("__pycache__"))
    else:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "erl_shim",
                                  "pymod_push"], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    wrapper = tree / "python"
    wrapper.write_text(f"#!/bin/sh\nPYTHONPATH={tree} exec {ROOT / '.venv' / 'bin' / 'python'}"
                       ' "$@"\n')
    wrapper.chmod(0o755)
    return Side(f"mod_push_py@{rev}", True, tree, str(wrapper))


async def pending_sessions(instance: Instance, ours: bool, sessions: int
                           ) -> tuple[Xmpp, dict[int, list[float]], asyncio.Task[None]]:
    """As versus_builtin: the app server that answers every publish, and `sessions`
    accounts with push enabled whose sessions are pending. Returns the app server's
    client, the arrival times by message number, and its reader task."""
    port = instance.c2s_port
    app = Xmpp(port, "app", "secret", "srv")
    await app.connect()
    arrivals: dict[int, list[float]] = {}

    def on_publish(element: ET.Element) -> None:
        if element.get("type") != "set":
            return
        body = next((f.findtext(f"{{{NS_DATA}}}value") for f in element.iter(f"{{{NS_DATA}}}field")
                     if f.get("var") == "last-message-body"), None)
        if body is not None and body.isdigit():
            arrivals.setdefault(int(body), []).append(time.perf_counter())
        app.send(f"<iq type='result' id='{element.get('id')}' to='{element.get('from')}'/>")

    app.on_stanza = on_publish
    reader = asyncio.create_task(app.run())
    options = ("<x xmlns='jabber:x:data' type='submit'><field var='FORM_TYPE'><value>"
               "urn:xmpp:push:options</value></field><field var='include-message-bodies'>"
               "<value>1</value></field></x>") if ours else ""

    async def push_session(i: int) -> None:
        client = Xmpp(port, f"push{i}", "secret", "phone")
        await client.connect(register=True)
        client.send("<enable xmlns='urn:xmpp:sm:3' resume='true'/>")
        await client._until(lambda e: e.tag.endswith("enabled"))
        await client.request(f"<iq type='set' id='e'><enable xmlns='{NS_PUSH}' "
                             f"jid='app@localhost/srv' node='n{i}'>{options}</enable></iq>", "e")
        client.abort()

    for start in range(0, sessions, 50):
        await asyncio.gather(*(push_session(i) for i in range(start, min(start + 50, sessions))))
    await asyncio.to_thread(wait_pending, instance, sessions)
    return app, arrivals, reader


# Sessions whose stream management state is pending (ejabberd's log line for each can be
# dropped by its logger's burst limit when a thousand go pending at once).
PENDING = ("length([P || P <- processes(), proc_lib:translate_initial_call(P) == "
           "{xmpp_stream_in, init, 1}, case catch sys:get_state(P, 1000) of "
           "#{mgmt_state := pending} -> true; _ -> false end])")


def wait_pending(instance: Instance, count: int) -> None:
    deadline = time.monotonic() + 120
    while int(instance.erl(PENDING)) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"fewer than {count} sessions became pending")
        time.sleep(1)


async def load(instance: Instance, side: Side, args: argparse.Namespace,
               perf_data: Path | None) -> dict[str, Any]:
    """Warm-up, then the measured phase: profiled with perf when perf_data is given, with
    eprof when args.eprof, and the reductions of each process over it."""
    app, arrivals, reader = await pending_sessions(instance, side.ours, args.sessions)
    sender = Xmpp(instance.c2s_port, "sender", "secret", "s")
    await sender.connect()
    beam = instance.vm_pid()
    assert beam is not None
    python = instance.python_pid() if side.ours else None
    await measure(sender, args.sessions, Phase("warm-up", args.warmup, args.rate), 0,
                  arrivals, beam, python, side.pushes)
    recorder = None
    if perf_data is not None:
        recorder = subprocess.Popen(
            ["perf", "record", "-q", "-F", str(args.frequency), "-g", "-p", str(beam),
             "-o", str(perf_data)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        await asyncio.sleep(0.5)  # attached before the first message
    before = await asyncio.to_thread(process_reductions, instance)
    calltime = None
    if args.calltime:
        seconds = args.messages / args.rate
        modules = OURS_MODULES if side.ours else BUILTIN_MODULES
        calltime = asyncio.create_task(asyncio.to_thread(
            run_calltime, instance, seconds, modules, args.calltime_extra))
        await asyncio.sleep(1)
    gctrace = None
    if args.gc:
        gctrace = asyncio.create_task(asyncio.to_thread(
            run_gctrace, instance, args.messages / args.rate))
        await asyncio.sleep(1)
    eprof = None
    if args.eprof:
        seconds = args.messages / args.rate
        eprof = asyncio.create_task(asyncio.to_thread(run_eprof, instance, seconds))
        await asyncio.sleep(1)  # started before the first message
    try:
        result = await measure(sender, args.sessions,
                               Phase("measured", args.messages, args.rate), args.warmup,
                               arrivals, beam, python, side.pushes)
    finally:
        if recorder is not None:
            recorder.send_signal(signal.SIGINT)
            recorder.wait(timeout=60)
    after = await asyncio.to_thread(process_reductions, instance)
    result["reductions"] = {key: after[key][1] - before.get(key, ("", 0))[1]
                            for key in after}
    result["process_names"] = {key: name for key, (name, _) in after.items()}
    if eprof is not None:
        result["eprof"] = await eprof
    offset = time.time() - time.perf_counter()

    def pushes_between(start_us: int, end_us: int) -> int:
        """Pushes that arrived in a window given in the VM's wall clock (microseconds)."""
        start, end = start_us / 1e6 - offset, end_us / 1e6 - offset
        return sum(1 for times in arrivals.values() if start <= times[0] <= end)

    if gctrace is not None:
        gc_rows = await gctrace
        window = next(row for row in gc_rows if row[1] == "window")
        result["gc"] = [row for row in gc_rows if row[1] != "window"]
        result["gc_pushes"] = pushes_between(window[3], window[4])
    if calltime is not None:
        rows = await calltime
        start_us, end_us = next((calls, us) for name, calls, us in rows if name == "window")
        result["calltime"] = [row for row in rows if row[0] != "window"]
        result["calltime_pushes"] = pushes_between(start_us, end_us)
    reader.cancel()
    return result


async def measure(sender: Xmpp, sessions: int, phase: Phase, first: int,
                  arrivals: dict[int, list[float]], beam: int, python: int | None,
                  pushes: bool) -> dict[str, Any]:
    """versus_builtin's phase (CPU per push); without a push module, the VM's CPU per
    message once it is done with them."""
    if pushes:
        return await send_phase(sender, sessions, phase, first, arrivals, beam, python)
    cpu0 = cpu_seconds(beam)
    started = time.perf_counter()
    count = 0
    while count < phase.messages:
        due = min(phase.messages, int((time.perf_counter() - started) * phase.rate) + 1)
        while count < due:
            sender.send(f"<message to='push{(first + count) % sessions}@localhost/phone' "
                        f"type='chat'><body>{first + count}</body></message>")
            count += 1
        await sender.writer.drain()
        await asyncio.sleep(0.001)
    await asyncio.sleep(1)  # the VM's work on the last messages
    return {"messages": phase.messages, "received": phase.messages,
            "pushes_per_s": phase.messages / (time.perf_counter() - started - 1),
            "cpu_beam_ms": (cpu_seconds(beam) - cpu0) * 1000 / phase.messages,
            "cpu_python_ms": 0.0}


# Reductions of every process, keyed by pid, named by registered name or initial call.
SNAPSHOT = (
    "[{pid_to_list(P), case erlang:process_info(P, registered_name) of "
    "{registered_name, N} -> atom_to_list(N); _ -> case proc_lib:translate_initial_call(P) of "
    "{M, F, A} -> lists:flatten(io_lib:format(\"~s:~s/~B\", [M, F, A])) end end, R} "
    "|| P <- processes(), {reductions, R} <- [erlang:process_info(P, reductions)]]")


def process_reductions(instance: Instance) -> dict[str, tuple[str, int]]:
    text = instance.erl(SNAPSHOT)
    return {pid: (name, int(reds)) for pid, name, reds in
            re.findall(r'\{"(<[\d.]+>)",\s*"([^"]*)",\s*(\d+)\}', text)}


def run_calltime(instance: Instance, seconds: float, modules: tuple[str, ...],
                 extra: list[str]) -> list[tuple[str, int, int]]:
    """Call-time tracing (no trace messages) of every function of the push modules and of
    the extra functions (Module:Function/Arity), in every process, for that long:
    (function, calls, microseconds) of each. A function's time is its own plus that of
    the untraced functions it calls: with only the push modules traced, what each of
    their functions costs with the library calls it makes."""
    mfas = ", ".join("{" + e.replace(":", ", ").replace("/", ", ") + "}" for e in extra)
    text = instance.erl(
        f"Ms = [M || M <- [{', '.join(modules)}], code:is_loaded(M) /= false], "
        f"Xs = [{mfas}], "
        "[erlang:trace_pattern({M, '_', '_'}, true, [call_time]) || M <- Ms], "
        "[erlang:trace_pattern(X, true, [call_time]) || X <- Xs], "
        "T0 = os:system_time(microsecond), erlang:trace(all, true, [call]), "
        f"timer:sleep({int(seconds * 1000)}), "
        "erlang:trace(all, false, [call]), T1 = os:system_time(microsecond), "
        "All = [{M, F, A} || M <- Ms, {F, A} <- M:module_info(functions)] ++ Xs, "
        "R = [lists:flatten(io_lib:format(\"~s:~s/~B ~B ~B\", [M, F, A, "
        "lists:sum([C || {_, C, _, _} <- L]), "
        "lists:sum([S * 1000000 + U || {_, _, S, U} <- L])])) "
        "|| {M, F, A} <- All, {call_time, L} <- [erlang:trace_info({M, F, A}, call_time)], "
        "is_list(L), L /= []], "
        "[erlang:trace_pattern({M, '_', '_'}, false, [call_time]) || M <- Ms], "
        "[erlang:trace_pattern(X, false, [call_time]) || X <- Xs], "
        "[lists:flatten(io_lib:format(\"window ~B ~B\", [T0, T1])) | R]",
        timeout=seconds + 120)
    return [(name, int(calls), int(us)) for name, calls, us in
            re.findall(r'"(\S+) (\d+) (\d+)"', text)]  # and ("window", start, end)


# Garbage collections of every process for a while, counted by a tracer of its own:
# "Pid Name minor|major Count Microseconds" for each process and kind.
GC_TRACE = """
Name = fun(P) -> case erlang:process_info(P, registered_name) of
    {registered_name, N} -> atom_to_list(N);
    _ -> case proc_lib:translate_initial_call(P) of
             {M, F, A} -> lists:flatten(io_lib:format("~s:~s/~B", [M, F, A])) end end end,
Tracer = spawn(fun() ->
    Loop = fun Loop(Acc, Open) -> receive
        {trace_ts, P, Ev, _, T} when Ev == gc_minor_start; Ev == gc_major_start ->
            Loop(Acc, Open#{P => {Ev, T}});
        {trace_ts, P, Ev, _, T} when Ev == gc_minor_end; Ev == gc_major_end ->
            case maps:take(P, Open) of
                {{Start, T0}, Open1} ->
                    {C, D} = maps:get({P, Start}, Acc, {0, 0}),
                    Loop(Acc#{{P, Start} => {C + 1, D + T - T0}}, Open1);
                error -> Loop(Acc, Open)
            end;
        {done, From} -> From ! {gc, Acc}
    end end,
    Loop(#{}, #{}) end),
T0 = os:system_time(microsecond),
erlang:trace(all, true, [garbage_collection, {tracer, Tracer}, monotonic_timestamp]),
erlang:trace(Tracer, false, [garbage_collection]),
timer:sleep(MILLISECONDS),
erlang:trace(all, false, [garbage_collection]),
T1 = os:system_time(microsecond),
Tracer ! {done, self()},
Acc = receive {gc, A} -> A end,
[lists:flatten(io_lib:format("<0.0.0> window minor ~B ~B", [T0, T1])) |
 [lists:flatten(io_lib:format("~s ~s ~s ~B ~B", [pid_to_list(P),
     case is_process_alive(P) of true -> Name(P); false -> "(ended)" end,
     case K of gc_minor_start -> minor; gc_major_start -> major end, C,
     erlang:convert_time_unit(D, native, microsecond)]))
 || {{P, K}, {C, D}} <- maps:to_list(Acc)]]
"""


def run_gctrace(instance: Instance, seconds: float) -> list[tuple[str, str, str, int, int]]:
    """(pid, process, minor|major, collections, microseconds) over that long."""
    text = instance.erl(" ".join(GC_TRACE.replace("MILLISECONDS", str(int(seconds * 1000)))
                                 .split()).rstrip("."), timeout=seconds + 120)
    return [(pid, name, kind, int(count), int(us)) for pid, name, kind, count, us in
            re.findall(r'"(<[\d.]+>) (\S+) (minor|major) (\d+) (\d+)"', text)]


def run_eprof(instance: Instance, seconds: float) -> str:
    """eprof on every process (and those they start) for that long: its analysis by
    total time (own time of each function, BIFs included, garbage collection not)."""
    log = instance.folder / "eprof.txt"
    instance.erl(f'eprof:start(), eprof:start_profiling(processes()), '
                 f'timer:sleep({int(seconds * 1000)}), eprof:stop_profiling(), '
                 f'eprof:log("{log}"), eprof:analyze(total, [{{sort, time}}]), eprof:stop()',
                 timeout=seconds + 300)
    return log.read_text()


def one_run(side: Side, args: argparse.Namespace, keep: Path) -> dict[str, Any]:
    common = {"mod_mam": None, "mod_register": {"access": "all", "ip_access": "all"}}
    config = {"registration_timeout": "infinity"}
    folder = Path(tempfile.mkdtemp(prefix="pymod_push-profile-"))
    folder.chmod(0o755)
    shim = side.tree / "erl_shim" if side.tree else ROOT / "erl_shim"
    if side.ours:
        options: dict[str, Any] = {"resume_timeout": 259200,
                                   "metrics_listen": f"127.0.0.1:{free_port()}"}
        instance = ProfiledInstance(folder, options=options, modules=common,
                                    extra_config=config, shim=shim, perf=not args.no_perf,
                                    spin=not args.no_spin)
        if side.python:
            instance.python = side.python
    elif side.pushes:
        instance = ProfiledInstance(folder, modules={
            **common, "mod_push": {"include_body": True},
            "mod_push_keepalive": {"resume_timeout": 259200}}, extra_config=config,
            perf=not args.no_perf, spin=not args.no_spin)
    else:
        instance = ProfiledInstance(folder, modules={
            **common, "mod_stream_mgmt": {"resume_timeout": 259200}},
            extra_config=config, perf=not args.no_perf, spin=not args.no_spin)
    instance.write_config()
    perf_data = None if args.no_perf else keep / f"{side.name}-{time.strftime('%H%M%S')}.data"
    beam = None
    try:
        instance.start(install=side.ours)
        beam = instance.vm_pid()
        for user in ("app", "sender"):
            instance.register(user, "localhost", "secret")
        result = asyncio.run(load(instance, side, args, perf_data))
        if perf_data is not None and beam is not None:
            result["profile"] = read_profile(perf_data, beam)
        return result
    finally:
        instance.stop()
        shutil.rmtree(folder, ignore_errors=True)
        if beam is not None:  # what +JPperf true leaves behind
            Path(f"/tmp/perf-{beam}.map").unlink(missing_ok=True)
            Path(f"/tmp/jit-{beam}.dump").unlink(missing_ok=True)
        if perf_data is not None and not args.keep:
            perf_data.unlink(missing_ok=True)


@dataclass
class Profile:
    samples: int = 0
    self_by_symbol: Counter[str] = field(default_factory=Counter)
    self_by_module: Counter[str] = field(default_factory=Counter)
    self_by_area: Counter[str] = field(default_factory=Counter)
    inclusive_by_module: Counter[str] = field(default_factory=Counter)
    inclusive_by_symbol: Counter[str] = field(default_factory=Counter)
    by_thread: Counter[str] = field(default_factory=Counter)


class NativeSymbols:
    """Names for the VM's own code: beam.smp is stripped, so that perf names only its
    exported functions; an address in a static function is named by the exported ones
    around it ("static in A..B", the object file's statics lie between them)."""

    def __init__(self) -> None:
        self.tables: dict[str, tuple[list[int], list[str]]] = {}

    def name(self, address: int, binary: str) -> str:
        if binary not in self.tables:
            listing = subprocess.run(["nm", "-D", "--defined-only", binary],
                                     capture_output=True, text=True).stdout
            symbols = sorted((int(parts[0], 16), parts[2]) for parts in map(str.split,
                             listing.splitlines()) if len(parts) == 3 and parts[1] in "Tt")
            self.tables[binary] = ([a for a, _ in symbols], [n for _, n in symbols])
        addresses, names = self.tables[binary]
        index = bisect.bisect_right(addresses, address) - 1
        if index < 0 or index + 1 >= len(names):
            return "[unknown]"
        return f"static in {names[index]}..{names[index + 1]}"


# Areas of the VM's native code, by function name or, for statics, the exported function
# before them (found with the dirty schedulers, which only run garbage collections).
AREAS = (
    ("garbage collection", re.compile(
        r"^(erts_garbage_collect|erts_gc_|static in (driver_async|erts_garbage_collect_"
        r"hibernate|erts_sub_binary_to_heap_binary|erts_process_gc_info)\.\.)")),
    ("memory allocation", re.compile(
        r"^(erts_alcu|erts_alloc|erts_alc|erts_free|static in (binary_decode_unsigned_2|"
        r"erts_alcu_try_set_dyn_param|erts_alc_test)\.\.)")),
    ("ETS", re.compile(r"^(db_|ets_|erts_db_|static in (db_|ets_|erts_db_|split_binary_2))")),
    ("copying terms", re.compile(r"^(copy_|size_object|erts_copy|erts_decode_ext|"
                                 r"erts_encode_ext|enc_term|dec_term)")),
    ("locks and atomics", re.compile(r"^(ethr_|erts_thr_|static in ethr_)")),
    ("scheduling and signals", re.compile(r"^(erts_schedule|erts_proc_sig|erts_sched|"
                                          r"static in erts_sched|erts_alloc_message)")),
)


def area(function: str, library: str) -> str:
    if library == "beam.smp":
        for name, pattern in AREAS:
            if pattern.match(function):
                return f"VM: {name}"
        return "VM: other native code"
    if library == "[kernel.kallsyms]":
        return "kernel"
    if library.endswith(".so") or ".so." in library:
        return f"library {library}"
    return "Erlang code (JIT)"


def frame_name(symbol: str, dso: str, address: int, native: NativeSymbols) -> tuple[str, str]:
    """(function, module) of a frame: Erlang functions from the JIT's map ($mod:fun/arity),
    native functions by their library."""
    if symbol.startswith("$"):
        symbol = symbol[1:]
    if ":" in symbol and "/" in symbol and not symbol.startswith("["):
        return symbol, symbol.split(":", 1)[0]
    path = dso.strip("()")
    library = Path(path).name
    if library.startswith("perf-") and library.endswith(".map"):
        library = "JIT (other)"
    elif library == "beam.smp" and symbol == "[unknown]":
        symbol = native.name(address, path)
    if library in ("[kernel.kallsyms]", "[unknown]", ""):
        library = library or "[unknown]"
    return f"{symbol} [{library}]", library


def read_profile(perf_data: Path, beam: int) -> Profile:
    """Samples of the VM from `perf script`: self and inclusive counts."""
    text = subprocess.run(
        ["perf", "script", "-f", "-i", str(perf_data), "-F", "comm,tid,ip,sym,dso"],
        check=True, capture_output=True, text=True, errors="replace").stdout
    profile = Profile()
    native = NativeSymbols()

    def add(thread: str, frames: list[tuple[str, str]]) -> None:
        if not frames:
            return
        profile.samples += 1
        profile.by_thread[thread.rstrip("0123456789_").lstrip("0123456789_") or thread] += 1
        leaf, module = frames[0]
        profile.self_by_symbol[leaf] += 1
        profile.self_by_module[module] += 1
        profile.self_by_area[area(leaf.rsplit(" [", 1)[0], module)] += 1
        for name in {name for name, _ in frames}:
            profile.inclusive_by_symbol[name] += 1
        for module in {module for _, module in frames}:
            profile.inclusive_by_module[module] += 1

    thread, frames = "", list[tuple[str, str]]()
    for line in text.splitlines():
        if not line.strip():
            add(thread, frames)
            thread, frames = "", []
        elif line[0].isspace():
            rest = line.strip()
            symbol, _, dso = rest.partition(" ")[2].rpartition(" (")
            symbol = symbol.rsplit("+0x", 1)[0]
            address = int(rest.split(None, 1)[0], 16) if rest else 0
            frames.append(frame_name(symbol, "(" + dso, address, native))
        else:
            thread = line.split()[0]
    add(thread, frames)
    return profile


def print_profile(name: str, result: dict[str, Any], top: int) -> None:
    profile: Profile = result["profile"]
    total = max(profile.samples, 1)
    cpu = result["cpu_beam_ms"]

    def line(label: str, count: int) -> str:
        share = count / total
        return f"    {share * 100:5.1f} %  {share * cpu * 1000:6.1f} us/push  {label}"

    print(f"{name}: {profile.samples} samples; VM {cpu:.3f} ms CPU per push in the phase")
    print("  by thread:")
    for thread, count in profile.by_thread.most_common(6):
        print(line(thread, count))
    print("  inclusive, by module (the samples with it on the stack):")
    for module in (*OURS_MODULES, *BUILTIN_MODULES):
        if profile.inclusive_by_module[module]:
            print(line(module, profile.inclusive_by_module[module]))
    print("  self, by area:")
    for name, count in profile.self_by_area.most_common():
        print(line(name, count))
    print("  self, by module or library:")
    for module, count in profile.self_by_module.most_common(top):
        print(line(module, count))
    print("  self, by function:")
    for symbol, count in profile.self_by_symbol.most_common(top):
        print(line(symbol, count))
    print("  inclusive, by Erlang function of the push modules:")
    mine = [(s, c) for s, c in profile.inclusive_by_symbol.items()
            if s.split(":", 1)[0] in (*OURS_MODULES, *BUILTIN_MODULES)]
    for symbol, count in sorted(mine, key=lambda item: -item[1])[:top]:
        print(line(symbol, count))


def print_reductions(name: str, result: dict[str, Any], top: int) -> None:
    """Reductions per push over the measured phase: by kind of process, and the busiest."""
    pushes = max(result["received"], 1)
    names: dict[str, str] = result["process_names"]
    reductions: dict[str, int] = result["reductions"]
    total = max(sum(reductions.values()), 1)
    by_name: Counter[str] = Counter()
    for pid, count in reductions.items():
        by_name[names[pid]] += count
    print(f"{name}: {total / pushes:,.0f} reductions per push; by kind of process:")
    for kind, count in by_name.most_common(6):
        if count >= pushes:  # at least one reduction per push
            print(f"    {count * 100 / total:5.1f} %  {count / pushes:7,.0f} per push  {kind}")
    print("  busiest processes:")
    for pid, count in sorted(reductions.items(), key=lambda item: -item[1])[:5]:
        print(f"    {count * 100 / total:5.1f} %  {count / pushes:7,.0f} per push  "
              f"{names[pid]} {pid}")


EPROF_LINE = re.compile(r"^(\S+)\s+(\d+)\s+([\d.]+)\s+(\d+)\s+\[\s*([\d.]+)\]")


def print_eprof(name: str, result: dict[str, Any], top: int) -> None:
    """eprof's own time per function, and summed by module."""
    rows = [(m.group(1), int(m.group(2)), int(m.group(4)))
            for m in map(EPROF_LINE.match, result["eprof"].splitlines()) if m]
    total = max(sum(time for _, _, time in rows), 1)
    pushes = max(result["received"], 1)
    by_module: Counter[str] = Counter()
    for function, _, time_us in rows:
        by_module[function.split(":", 1)[0]] += time_us
    print(f"{name}: eprof, {total / 1e6:.2f} s of traced own time; by module:")
    for module, time_us in by_module.most_common(top):
        print(f"    {time_us * 100 / total:5.1f} %  {module}")
    print("  by function (own time; calls per push):")
    for function, calls, time_us in sorted(rows, key=lambda row: -row[2])[:top]:
        print(f"    {time_us * 100 / total:5.1f} %  {calls / pushes:6.2f}  {function}")


def print_calltime(name: str, result: dict[str, Any], top: int) -> None:
    rows: list[tuple[str, int, int]] = result["calltime"]
    pushes = max(result["calltime_pushes"], 1)
    total = sum(us for _, _, us in rows)
    print(f"{name}: call time of the push modules' functions (with the untraced calls they "
          f"make), {total / pushes:.1f} us per push in all ({pushes} pushes traced):")
    for function, calls, us in sorted(rows, key=lambda row: -row[2])[:top]:
        print(f"    {us / pushes:6.2f} us/push  {calls / pushes:6.2f} calls/push  "
              f"{us / max(calls, 1):6.2f} us/call  {function}")


def print_gc(name: str, result: dict[str, Any], top: int) -> None:
    """Garbage collection time by kind of process (a window of the measured phase)."""
    rows: list[tuple[str, str, str, int, int]] = result["gc"]
    total = max(sum(row[4] for row in rows), 1)
    pushes = max(result["gc_pushes"], 1)
    by_kind: Counter[tuple[str, str]] = Counter()
    counts: Counter[tuple[str, str]] = Counter()
    for _, process, kind, count, us in rows:
        by_kind[process, kind] += us
        counts[process, kind] += count
    print(f"{name}: garbage collections, {total / pushes:.1f} us per push ({pushes} pushes "
          "in the window); by process:")
    for (process, kind), us in by_kind.most_common(top // 2):
        print(f"    {us / pushes:6.2f} us/push  {counts[process, kind] / pushes:6.3f} {kind:5}"
              f"/push  {us / max(counts[process, kind], 1):8.1f} us each  {process}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=8000)
    parser.add_argument("--messages", type=int, default=40_000, help="of the measured phase")
    parser.add_argument("--warmup", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--builtin", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--ours", nargs="*", default=["worktree"],
                        help="mod_push_py versions: commits, or 'worktree'")
    parser.add_argument("--none", action="store_true",
                        help="also a side without any push module: what both share")
    parser.add_argument("--no-perf", action="store_true", help="CPU per push only")
    parser.add_argument("--no-spin", action="store_true",
                        help="the VM's schedulers do not spin while waiting for work (+sbwt "
                             "none): less of the CPU per push is idle spinning, which a "
                             "cheaper version would do more of; steadier for comparing versions")
    parser.add_argument("--eprof", action="store_true",
                        help="eprof on every process over the measured phase (slows the VM: "
                             "use a lower --rate)")
    parser.add_argument("--calltime", action="store_true",
                        help="call-time tracing of the push modules' functions (and of "
                             "--calltime-extra) over the measured phase")
    parser.add_argument("--calltime-extra", nargs="*", default=[], metavar="M:F/A",
                        help="library functions traced too (their time then leaves the "
                             "callers'), e.g. xmpp:encode/1 fxml:element_to_binary/1")
    parser.add_argument("--gc", action="store_true",
                        help="trace garbage collections of every process over the phase")
    parser.add_argument("--frequency", type=int, default=1999, help="perf samples per second")
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--keep", type=Path, help="keep the perf data files here")
    args = parser.parse_args()
    if args.gc and args.calltime:
        parser.error("--gc and --calltime each need the processes' one tracer: one at a time")
    if os.geteuid() != 0:
        parser.error("run as root (ejabberdctl as the ejabberd user, perf)")
    work = Path(tempfile.mkdtemp(prefix="pymod_push-profile-trees-"))
    work.chmod(0o755)
    keep = args.keep or work
    keep.mkdir(parents=True, exist_ok=True)
    sides = ([Side("none", False, pushes=False)] if args.none else []) + (
        [Side("built-in", False)] if args.builtin else []) + [
        snapshot(rev, work) for rev in args.ours]
    subprocess.run(["chown", "-R", f"{EJABBERD_USER}:{EJABBERD_USER}", str(work)], check=True)
    runs: dict[str, list[dict[str, Any]]] = {side.name: [] for side in sides}
    print(f"{args.sessions} pending sessions; {args.warmup} messages of warm-up then "
          f"{args.messages} measured, at {args.rate:.0f}/s; {args.rounds} round(s), alternating")
    try:
        for round_number in range(1, args.rounds + 1):
            for side in sides:
                result = one_run(side, args, keep)
                runs[side.name].append(result)
                print(f"  round {round_number} {side.name}: {result['received']}/"
                      f"{result['messages']} pushed, {result['pushes_per_s']:,.0f}/s, CPU per "
                      f"push: VM {result['cpu_beam_ms']:.3f} ms, Python "
                      f"{result['cpu_python_ms']:.3f} ms", flush=True)
                label = f"  {side.name} (round {round_number})"
                if "profile" in result:
                    print_profile(label, result, args.top)
                print_reductions(label, result, args.top)
                if "eprof" in result:
                    print_eprof(label, result, args.top)
                if "gc" in result:
                    print_gc(label, result, args.top)
                if "calltime" in result:
                    print_calltime(label, result, args.top)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("medians:")
    for name, name_runs in runs.items():
        beam = statistics.median(r["cpu_beam_ms"] for r in name_runs)
        python = statistics.median(r["cpu_python_ms"] for r in name_runs)
        rounds = ", ".join(f"{r['cpu_beam_ms']:.3f}" for r in name_runs)
        print(f"  {name:30} VM {beam:.3f} ms + Python {python:.3f} ms per push "
              f"(rounds: VM {rounds})")


if __name__ == "__main__":
    main()
