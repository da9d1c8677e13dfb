"""The built-in app server end to end: ejabberd + mod_push_py with one APNs backend, pushing
into a fake APNs (bench/fake_apns.py: HTTP/2 framed by hand over TLS with a loopback test
CA, token auth, in its own process, printing its CPU per request).

N push users register a device with the app server's ad-hoc command (register-push-apns),
enable push at its pubsub host with the node and secret it answered, enable stream
management and lose their connection, so that their sessions are pending. A sender then
sends M messages round-robin at a set rate. Each message body is its number, and the users
turn message bodies on, so every APNs request names the message that caused it. Printed:
APNs requests per message (must be exactly 1), pushes/s from the first send to the last
APNs request, send->APNs request latency p50/p99, CPU ms per push of the ejabberd VM and of
the Python process, and of the load side (this process, the fake APNs process).

Only 127.0.0.1: the APNs backend's endpoint is the fake; nothing reaches a real service.

    python -m bench.appserver_apns [--users 1000] [--messages 20000] [--rate 4000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from bench.versus_builtin import (
    NS_DATA,
    NS_PUSH,
    TICKS,
    cpu_seconds,
    wait_log_count,
)
from devtools.instance import ROOT, Instance, default_python, free_port
from devtools.xmpp_light import Xmpp
from pymod_push.appserver.server import PUBLISH_BURST, PUBLISH_REFILL_PER_SECOND

NS_COMMANDS = "http://jabber.org/protocol/commands"
PUBLISH_OPTIONS = "http://jabber.org/protocol/pubsub#publish-options"
TOPIC = "org.example.bench"
TEAM_ID, KEY_ID = "TEAM", "KEY"
PUBSUB_HOST = "pubsub.localhost"
# Arrival times cross a process boundary: time.monotonic() is CLOCK_MONOTONIC, one clock
# for every process of the machine.
clock = time.monotonic


@dataclass
class FakeApns:
    """The parent's side of the fake APNs process: arrivals by message number."""

    process: asyncio.subprocess.Process
    expected: int
    arrivals: dict[int, list[float]] = field(default_factory=dict)
    requests: int = 0
    refused: int = 0
    unmarked: int = 0
    all_arrived: asyncio.Event = field(default_factory=asyncio.Event)
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    total_reported: int = -1
    cpu_reported: float = 0.0  # its own CPU seconds, start-up included
    reader: asyncio.Task[None] | None = None

    @classmethod
    async def start(cls, port: int, tls: Path, key_file: Path, expected: int) -> FakeApns:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bench.fake_apns", str(port), str(tls), str(key_file),
            TEAM_ID, KEY_ID, TOPIC, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), 60)
        if line.strip() != b"listening":
            process.kill()
            raise RuntimeError(f"the fake APNs did not start: {line!r}")
        fake = cls(process, expected)
        fake.reader = asyncio.create_task(fake._read())
        return fake

    async def _read(self) -> None:
        assert self.process.stdout is not None
        while line := await self.process.stdout.readline():
            parts = line.split()
            if parts[0] == b"end":
                self.total_reported = int(parts[1])
                self.cpu_reported = float(parts[2])
                self.ended.set()
                return
            self.requests += 1
            if parts[2] != b"200":
                self.refused += 1
            if parts[1] == b"-":
                self.unmarked += 1
                continue
            self.arrivals.setdefault(int(parts[1]), []).append(float(parts[0]))
            if len(self.arrivals) >= self.expected:
                self.all_arrived.set()
        self.ended.set()

    async def stop(self) -> None:
        """Close its stdin; every request it answered is read once it says "end"."""
        assert self.process.stdin is not None
        self.process.stdin.close()
        await asyncio.wait_for(self.ended.wait(), 30)
        await asyncio.wait_for(self.process.wait(), 30)


# ------------------------------------------------------------------ XMPP
async def ask(client: Xmpp, text: str, stanza_id: str) -> ET.Element:
    """Xmpp.request, and the answer must be a result."""
    answer = await client.request(text, stanza_id)
    if answer.get("type") != "result":
        raise RuntimeError(f"IQ {stanza_id} failed: {ET.tostring(answer).decode()}")
    return answer


def result_fields(answer: ET.Element) -> dict[str, str]:
    form = answer.find(f"{{{NS_COMMANDS}}}command/{{{NS_DATA}}}x")
    if form is None:
        raise RuntimeError(f"no form in the command's answer: {ET.tostring(answer).decode()}")
    return {f.get("var", ""): f.findtext(f"{{{NS_DATA}}}value") or ""
            for f in form.findall(f"{{{NS_DATA}}}field")}


async def push_user(port: int, i: int) -> None:
    """Register push{i}, register a device at the app server, enable push with what it
    answered (bodies on), enable stream management, drop the connection."""
    client = Xmpp(port, f"push{i}", "secret", "phone")
    await client.connect(register=True)
    client.send("<enable xmlns='urn:xmpp:sm:3' resume='true'/>")
    await client._until(lambda e: e.tag.endswith("enabled"))
    registered = result_fields(await ask(
        client, f"<iq type='set' id='c' to='localhost'><command xmlns='{NS_COMMANDS}' "
        f"node='register-push-apns' action='execute'><x xmlns='{NS_DATA}' type='submit'>"
        f"<field var='token'><value>{i:064x}</value></field>"
        f"<field var='device-name'><value>bench {i}</value></field></x></command></iq>", "c"))
    if registered.get("jid") != PUBSUB_HOST or not registered.get("node"):
        raise RuntimeError(f"unexpected registration answer: {registered}")
    await ask(client, f"<iq type='set' id='e'><enable xmlns='{NS_PUSH}' jid='{registered['jid']}'"
              f" node='{registered['node']}'><x xmlns='{NS_DATA}' type='submit'>"
              "<field var='FORM_TYPE'><value>urn:xmpp:push:options</value></field>"
              "<field var='include-message-bodies'><value>1</value></field></x>"
              f"<x xmlns='{NS_DATA}' type='submit'><field var='FORM_TYPE'><value>"
              f"{PUBLISH_OPTIONS}</value></field><field var='secret'><value>"
              f"{registered['secret']}</value></field></x></enable></iq>", "e")
    client.abort()


# ------------------------------------------------------------------ processes
def machine_jiffies() -> tuple[int, int]:
    """(all, idle + iowait) jiffies of all CPUs, from /proc/stat."""
    with open("/proc/stat") as handle:
        values = [int(v) for v in handle.readline().split()[1:]]
    return sum(values), values[3] + values[4]


def status_quiet(instance: Instance) -> str:
    """push_status once nothing waits for an app server or a provider any more."""
    deadline = time.monotonic() + 60
    while True:
        status = instance.ctl("push_status", instance.host)
        if re.search(r"answer: 0, deferred by providers: 0\b", status) or \
                time.monotonic() > deadline:
            return status
        time.sleep(0.5)


# ------------------------------------------------------------------ the run
def profiled_python(folder: Path, output: Path) -> str:
    """An interpreter for the shim (it runs ``PYTHON -P -m pymod_push``) that profiles the
    port program with cProfile into ``output`` (written when the port closes)."""
    wrapper = folder / "python-profiled"
    python = default_python()
    # The shim runs PYTHON -P -m pymod_push: -P kept, cProfile put before the module.
    wrapper.write_text(f"#!/bin/sh\n[ \"$1\" = -P ] || exec {python} \"$@\"\nshift\n"
                       f"exec {python} -P -m cProfile -o {output} \"$@\"\n")
    wrapper.chmod(0o755)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.parent.chmod(0o777)
    return str(wrapper)


def fake_apns_files(folder: Path) -> tuple[Path, Path]:
    """A loopback test CA (folder/tls) and an APNs token key, for the fake and the backend."""
    from tests.fake_providers import LoopbackCA
    tls = folder / "tls"
    LoopbackCA(tls)
    key_file = folder / "AuthKey_KEY.p8"
    key_file.write_bytes(ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    return tls, key_file


def apns_backend(tls: Path, key_file: Path, port: int) -> dict[str, str]:
    """The app server's APNs backend (option backends), pushing into the fake on port."""
    return {"type": "apns", "app_name": "bench", "register_host": "localhost",
            "pubsub_host": PUBSUB_HOST, "topic": TOPIC, "key_file": str(key_file),
            "key_id": KEY_ID, "team_id": TEAM_ID, "endpoint": f"https://127.0.0.1:{port}",
            "cafile": str(tls / "ca.pem")}


async def run(users: int, messages: int, rate: float,
              profile: Path | None = None) -> dict[str, Any]:
    folder = Path(tempfile.mkdtemp(prefix="pymod_push-bench-apns-"))
    folder.chmod(0o755)
    tls, key_file = fake_apns_files(folder)
    apns_port = free_port()
    backend = apns_backend(tls, key_file, apns_port)
    # As versus_builtin: no archive, accounts registered in band without ejabberd's pause.
    instance = Instance(folder, options={"resume_timeout": 259200, "backends": [backend]},
                        modules={"mod_mam": None,
                                 "mod_register": {"access": "all", "ip_access": "all"}},
                        extra_config={"registration_timeout": "infinity"},
                        **({"python": profiled_python(folder, profile)} if profile else {}))
    instance.write_config()  # also gives the key and the CA to the ejabberd user
    fake = await FakeApns.start(apns_port, tls, key_file, messages)
    try:
        await asyncio.to_thread(instance.start)
        await asyncio.to_thread(instance.register, "sender", "localhost", "secret")
        return await load(instance, fake, users, messages, rate)
    finally:
        if not fake.ended.is_set():
            fake.process.kill()
        await asyncio.to_thread(instance.stop)
        shutil.rmtree(folder, ignore_errors=True)


async def load(instance: Instance, fake: FakeApns, users: int, messages: int,
               rate: float) -> dict[str, Any]:
    port = instance.c2s_port
    mark = instance.log_mark()
    set_up = time.monotonic()
    for start in range(0, users, 50):
        await asyncio.gather(*(push_user(port, i) for i in range(start, min(start + 50, users))))
    await asyncio.to_thread(wait_log_count, instance, "waiting .* for stream resumption",
                            users, mark)
    set_up = time.monotonic() - set_up
    sender = Xmpp(port, "sender", "secret", "s")
    await sender.connect()
    beam, python = instance.vm_pid(), instance.python_pid()
    if beam is None or python is None:
        raise RuntimeError("no ejabberd VM with a pymod_push process under it")
    fake_pid = fake.process.pid

    def cpu() -> dict[str, float]:
        total, idle = machine_jiffies()
        return {"beam": cpu_seconds(beam), "python": cpu_seconds(python),
                "fake": cpu_seconds(fake_pid), "load": time.process_time(),
                "machine": (total - idle) / TICKS, "wall": clock()}

    cpu0 = cpu()
    sent_at: list[float] = []
    started = clock()
    while len(sent_at) < messages:
        due = min(messages, int((clock() - started) * rate) + 1)
        while len(sent_at) < due:
            n = len(sent_at)
            sent_at.append(clock())
            sender.send(f"<message to='push{n % users}@localhost/phone' type='chat'>"
                        f"<body>{n}</body></message>")
        await sender.writer.drain()
        await asyncio.sleep(0.001)  # pacing
    sent = clock() - started
    try:
        await asyncio.wait_for(fake.all_arrived.wait(), max(30.0, messages / rate))
    except TimeoutError:
        pass  # reported as fewer messages received
    cpu1 = cpu()
    # Late duplicates would come from pushes still in flight: wait until none is, then
    # stop the fake, which gives every request it answered before it ends.
    status = await asyncio.to_thread(status_quiet, instance)
    await fake.stop()
    sender.abort()
    log = instance.log_file.read_bytes()[mark:].decode(errors="replace").splitlines()
    problems = [line for line in log if re.search(r"\[(warning|error|critical)\]", line)]
    arrivals = fake.arrivals
    last = max((t for ts in arrivals.values() for t in ts), default=clock())
    latencies = sorted((ts[0] - sent_at[n]) * 1000 for n, ts in arrivals.items()
                       if n < len(sent_at))
    pushes = max(sum(len(ts) for ts in arrivals.values()), 1)
    used = {key: cpu1[key] - cpu0[key] for key in cpu0}
    ours = used["beam"] + used["python"] + used["fake"] + used["load"]
    return {
        "set_up": set_up, "sent_rate": messages / max(sent, 1e-9),
        "per_message": dict(sorted(Counter(len(ts) for ts in arrivals.values()).items())),
        "received": len(arrivals), "requests": fake.requests,
        "reported": fake.total_reported, "refused": fake.refused, "unmarked": fake.unmarked,
        "pushes_per_s": len(arrivals) / max(last - started, 1e-9),
        "p50": statistics.median(latencies) if latencies else float("nan"),
        "p99": latencies[int(len(latencies) * 0.99) - 1] if latencies else float("nan"),
        "cpu_beam_ms": (cpu1["beam"] - cpu0["beam"]) * 1000 / pushes,
        "cpu_python_ms": (cpu1["python"] - cpu0["python"]) * 1000 / pushes,
        "cpu_fake_ms": (cpu1["fake"] - cpu0["fake"]) * 1000 / pushes,
        "cpu_load_ms": (cpu1["load"] - cpu0["load"]) * 1000 / max(messages, 1),
        "busy_cores": used["machine"] / used["wall"],
        "other_cores": max(used["machine"] - ours, 0.0) / used["wall"],
        "provider_line": next((line for line in status.splitlines()
                               if line.startswith("pushes via apns")), "pushes via apns: none"),
        "problems": problems,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--rate", type=float, default=4000)
    parser.add_argument("--rounds", type=int, default=3, help="each with a fresh ejabberd; "
                        "the medians are printed")
    parser.add_argument("--profile", type=Path, metavar="FILE",
                        help="profile the Python process with cProfile into FILE")
    args = parser.parse_args()
    print(f"app server end to end: {args.users} pending push users with an APNs device, "
          f"{args.messages} messages at {args.rate:.0f}/s, fake APNs (HTTP/2 framed by hand, "
          "TLS) in its own process")
    per_node = args.messages / args.users
    if per_node > PUBLISH_BURST + args.messages / args.rate * PUBLISH_REFILL_PER_SECOND:
        print(f"  note: {per_node:.0f} messages per device is beyond the app server's rate "
              f"limit ({PUBLISH_BURST} at once, then {PUBLISH_REFILL_PER_SECOND:g}/s): the "
              "excess is refused with 'wait' and retried later")
    rounds = []
    for number in range(1, args.rounds + 1):
        if args.rounds > 1:
            print(f"round {number}:")
        r = asyncio.run(run(args.users, args.messages, args.rate,
                            args.profile.resolve() if args.profile else None))
        r["exact"] = print_round(r, args.messages)
        rounds.append(r)
    if args.rounds > 1:
        def median(key: str) -> float:
            return float(statistics.median(r[key] for r in rounds))
        print(f"median of {args.rounds} rounds: {median('pushes_per_s'):,.0f} pushes/s; "
              f"p99 {median('p99'):.1f} ms; CPU per push: ejabberd {median('cpu_beam_ms'):.3f} "
              f"ms, Python {median('cpu_python_ms'):.3f} ms (target 0.15), fake APNs "
              f"{median('cpu_fake_ms'):.3f} ms/request; every round exact: "
              f"{all(r['exact'] for r in rounds)}")
    return 0 if all(r["exact"] for r in rounds) else 1


def print_round(r: dict[str, Any], messages: int) -> bool:
    """Print one round's figures; whether every message made exactly one APNs request."""
    exact: bool = (r["per_message"] == {1: messages} and r["refused"] == 0
                   and r["unmarked"] == 0 and r["requests"] == r["reported"] == messages)
    print(f"  set-up {r['set_up']:.0f} s; sent at {r['sent_rate']:,.0f}/s")
    print(f"  APNs requests per message {r['per_message']} ({r['received']} of "
          f"{messages} messages, {r['requests']} requests, {r['refused']} refused, "
          f"{r['unmarked']} without a message number): {'exact' if exact else 'MISMATCH'}")
    print(f"  {r['pushes_per_s']:,.0f} pushes/s end to end; latency send->APNs p50 "
          f"{r['p50']:.1f} ms p99 {r['p99']:.1f} ms")
    print(f"  CPU per push: ejabberd {r['cpu_beam_ms']:.3f} ms + Python "
          f"{r['cpu_python_ms']:.3f} ms = {r['cpu_beam_ms'] + r['cpu_python_ms']:.3f} ms; "
          f"load side: fake APNs {r['cpu_fake_ms']:.3f} ms/request, sender "
          f"{r['cpu_load_ms']:.3f} ms/message")
    print(f"  machine: {r['busy_cores']:.2f} of {os.cpu_count()} cores busy from the first send "
          f"to the last request ({r['other_cores']:.2f} of them other processes)")
    problems = r["problems"]
    print(f"  pymod_push: {r['provider_line']}; ejabberd log: {len(problems)} warning/error "
          "lines" + (f", first: {problems[0][:200]}" if problems else ""))
    return exact


if __name__ == "__main__":
    sys.exit(main())
