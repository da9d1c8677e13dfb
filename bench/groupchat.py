"""What pushes for absent room members (groupchat_pushes) cost a busy room.

One ejabberd with mod_muc and mod_push_py, pushing to an app server on the XMPP side (a
client that answers and counts every publish); a members-only, non-anonymous room with
--members affiliated members, none of them in the room: --absent-push of them enabled push
and then closed their stream (gone, no session), the others never had push. The room's
owner, joined, sends --rate groupchat messages per second for --seconds. Phases alternate
`groupchat_pushes: true` and `false`, a fresh ejabberd each, for --rounds rounds.

Per phase: CPU ms per message of the ejabberd VM and of the Python process (/proc, utime +
stime), over the same window on both sides (sending, then until the last coalesced push is
due, plus a margin), and the pushes the app server got, checked against the coalescing:
each push member gets a push at the first message, then one per --interval
(groupchat_push_interval) while messages come. Printed: medians of the rounds per side and
their difference per message (the feature's cost).

    python -m bench.groupchat [--members 1000] [--absent-push 100] [--rate 50]
        [--seconds 60] [--interval 30] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import shutil
import statistics
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from devtools.instance import Instance
from devtools.xmpp_light import Xmpp

TICKS = os.sysconf("SC_CLK_TCK")
HOST = "localhost"
ROOM = f"bench@conference.{HOST}"
APP = f"app@{HOST}/srv"
NS_PUSH = "urn:xmpp:push:0"
NS_DATA = "jabber:x:data"
MUC_OWNER = "http://jabber.org/protocol/muc#owner"
MUC_ADMIN = "http://jabber.org/protocol/muc#admin"
MARGIN = 3.0  # seconds after the last coalesced push is due, inside the CPU window
BODIES = ("<x xmlns='jabber:x:data' type='submit'><field var='FORM_TYPE'><value>"
          "urn:xmpp:push:options</value></field><field var='include-message-bodies'>"
          "<value>1</value></field></x>")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


@dataclass(frozen=True)
class Load:
    members: int
    absent_push: int
    rate: float
    seconds: float
    interval: int

    @property
    def messages(self) -> int:
        return round(self.rate * self.seconds)

    def pushes_each(self) -> int:
        """Pushes per push member with pushes on: the first message's at once, then one
        at the end of each interval that held messages."""
        return 1 + math.ceil(self.seconds / self.interval)


@dataclass
class Result:
    beam_ms: float  # CPU per message
    python_ms: float
    pushes: int
    per_member: Counter[int]  # pushes -> push members that got that many
    sending_s: float


def register_all(instance: Instance, users: list[str]) -> None:
    """All accounts in one call into the node (not one ejabberdctl call each)."""
    names = ",".join(f'<<"{user}">>' for user in users)
    out = instance.erl(f'length([U || U <- [{names}], '
                       f'case ejabberd_auth:try_register(U, <<"{HOST}">>, <<"secret">>) of '
                       'ok -> true; {ok, _} -> true; _ -> false end])')
    if out != str(len(users)):
        raise RuntimeError(f"registered {out} of {len(users)} accounts")


async def make_room(owner: Xmpp, members: list[str]) -> None:
    """Create the room as its owner (joined), configure it members-only and
    non-anonymous, and affiliate every member in one admin request."""
    owner.send(f"<presence to='{ROOM}/owner'><x xmlns='http://jabber.org/protocol/muc'/>"
               "</presence>")
    await owner._until(lambda e: e.tag.endswith("presence") and e.get("from") == f"{ROOM}/owner")
    fields = {"FORM_TYPE": "http://jabber.org/protocol/muc#roomconfig",
              "muc#roomconfig_membersonly": "1", "muc#roomconfig_whois": "anyone",
              "muc#roomconfig_persistentroom": "1"}
    form = "".join(f"<field var='{var}'><value>{value}</value></field>"
                   for var, value in fields.items())
    answer = await owner.request(
        f"<iq type='set' id='cfg' to='{ROOM}'><query xmlns='{MUC_OWNER}'>"
        f"<x xmlns='{NS_DATA}' type='submit'>{form}</x></query></iq>", "cfg")
    if answer.get("type") != "result":
        raise RuntimeError(f"room configuration refused: {ET.tostring(answer).decode()}")
    items = "".join(f"<item affiliation='member' jid='{user}@{HOST}'/>" for user in members)
    answer = await owner.request(f"<iq type='set' id='aff' to='{ROOM}'>"
                                 f"<query xmlns='{MUC_ADMIN}'>{items}</query></iq>", "aff")
    if answer.get("type") != "result":
        raise RuntimeError(f"affiliations refused: {ET.tostring(answer).decode()}")


async def enable_and_leave(port: int, user: str) -> None:
    """A push member: log in, enable push (node = the user name), close the stream."""
    client = Xmpp(port, user, "secret", "phone")
    await client.connect()
    answer = await client.request(f"<iq type='set' id='e'><enable xmlns='{NS_PUSH}' "
                                  f"jid='{APP}' node='{user}'>{BODIES}</enable></iq>", "e")
    if answer.get("type") != "result":
        raise RuntimeError(f"push enable refused for {user}")
    client.send("</stream:stream>")
    await client.writer.drain()
    client.writer.close()


async def wait_until(condition: Callable[[], bool], what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(condition):
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        await asyncio.sleep(0.2)


async def run_phase(instance: Instance, load: Load) -> Result:
    port = instance.c2s_port
    members = [f"m{i}" for i in range(load.members)]
    push_members = members[:load.absent_push]
    await asyncio.to_thread(register_all, instance, ["app", "owner", *members])
    app = Xmpp(port, "app", "secret", "srv")
    await app.connect()
    pushes: Counter[str] = Counter()

    def on_publish(element: ET.Element) -> None:
        if element.tag.endswith("iq") and element.get("type") == "set":
            node = next((e.get("node") for e in element.iter() if e.get("node")), None)
            pushes[node or "?"] += 1
            app.send(f"<iq type='result' id='{element.get('id')}' to='{element.get('from')}'/>")

    app.on_stanza = on_publish
    reader = asyncio.create_task(app.run())
    owner = Xmpp(port, "owner", "secret", "s")
    await owner.connect()
    await make_room(owner, members)
    for start in range(0, len(push_members), 50):
        await asyncio.gather(*(enable_and_leave(port, user)
                               for user in push_members[start:start + 50]))
    # Everyone gone but the app server and the owner: the push members are absent.
    await wait_until(lambda: instance.ctl("connected_users_number").strip() == "2",
                     "push members' sessions did not end", 60)
    beam, python = instance.vm_pid(), instance.python_pid()
    assert beam is not None and python is not None
    echoes = asyncio.create_task(owner.run())  # the room's copies of our own messages
    cpu0 = cpu_seconds(beam), cpu_seconds(python)
    started = time.perf_counter()
    count = 0
    while count < load.messages:
        due = min(load.messages, int((time.perf_counter() - started) * load.rate) + 1)
        while count < due:
            owner.send(f"<message to='{ROOM}' type='groupchat'><body>message {count}</body>"
                       "</message>")
            count += 1
        await owner.writer.drain()
        await asyncio.sleep(0.005)
    sending = time.perf_counter() - started
    # The last coalesced push is due at the last interval's end after the first message.
    window = load.interval * math.ceil(load.seconds / load.interval) + MARGIN
    await asyncio.sleep(max(0.0, started + window - time.perf_counter()))
    cpu1 = cpu_seconds(beam), cpu_seconds(python)
    expected = load.absent_push * load.pushes_each()
    deadline = time.monotonic() + 10  # late ones counted, outside the CPU window
    while pushes.total() < expected and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    await asyncio.sleep(0.5)
    reader.cancel()
    echoes.cancel()
    per_member = Counter(pushes.get(user, 0) for user in push_members)
    return Result(beam_ms=(cpu1[0] - cpu0[0]) * 1000 / load.messages,
                  python_ms=(cpu1[1] - cpu0[1]) * 1000 / load.messages,
                  pushes=pushes.total(), per_member=per_member, sending_s=sending)


def one_phase(load: Load, on: bool) -> Result:
    folder = Path(tempfile.mkdtemp(prefix="pymod_push-bench-"))
    folder.chmod(0o755)
    instance = Instance(folder, options={"groupchat_pushes": on,
                                         "groupchat_push_interval": load.interval},
                        modules={"mod_mam": None})
    instance.write_config()
    try:
        instance.start()
        return asyncio.run(run_phase(instance, load))
    finally:
        instance.discard()
        shutil.rmtree(folder, ignore_errors=True)


def check(result: Result, load: Load, on: bool) -> None:
    """Pushes on: every push member got the coalesced count (one either way for a
    boundary falling just before or after a message). Off: none at all."""
    if not on:
        if result.pushes:
            raise AssertionError(f"groupchat_pushes false, yet {result.pushes} pushes")
        return
    each = load.pushes_each()
    if not set(result.per_member) <= {each - 1, each, each + 1}:
        raise AssertionError(f"pushes per push member {dict(result.per_member)}, "
                             f"expected about {each}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=1000)
    parser.add_argument("--absent-push", type=int, default=100)
    parser.add_argument("--rate", type=float, default=50, help="messages per second")
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--interval", type=int, default=30, help="groupchat_push_interval")
    parser.add_argument("--rounds", type=int, default=3, help="figures are medians of rounds")
    args = parser.parse_args()
    load = Load(args.members, args.absent_push, args.rate, args.seconds, args.interval)
    print(f"group chat: a members-only room of {load.members} members, none in the room, "
          f"{load.absent_push} of them with push; {load.messages} messages at "
          f"{load.rate:g}/s; groupchat_push_interval {load.interval} s; {args.rounds} "
          f"round(s) alternating groupchat_pushes true/false, a fresh ejabberd each; medians")
    sides = {"true": True, "false": False}
    results: dict[str, list[Result]] = {name: [] for name in sides}
    for round_number in range(1, args.rounds + 1):
        for name, on in sides.items():
            result = one_phase(load, on)
            check(result, load, on)
            results[name].append(result)
            print(f"  round {round_number} groupchat_pushes {name:5}: CPU/message ejabberd "
                  f"{result.beam_ms:.3f} ms + Python {result.python_ms:.3f} ms; "
                  f"{result.pushes} pushes (per push member {dict(result.per_member)}); "
                  f"sent in {result.sending_s:.1f} s")

    def median(name: str, key: str) -> float:
        return float(statistics.median(getattr(r, key) for r in results[name]))

    print(f"{'groupchat_pushes':18} {'ejabberd ms/msg':>16} {'Python ms/msg':>14} "
          f"{'total ms/msg':>13} {'pushes':>7}")
    for name in sides:
        print(f"{name:18} {median(name, 'beam_ms'):16.3f} {median(name, 'python_ms'):14.3f} "
              f"{median(name, 'beam_ms') + median(name, 'python_ms'):13.3f} "
              f"{median(name, 'pushes'):7.0f}")
    beam = median("true", "beam_ms") - median("false", "beam_ms")
    python = median("true", "python_ms") - median("false", "python_ms")
    print(f"{'cost (true-false)':18} {beam:16.3f} {python:14.3f} {beam + python:13.3f}"
          f"   = {(beam + python) * load.rate / 10:.2f} % of one core at {load.rate:g} msg/s "
          f"(expected pushes with true: {load.absent_push * load.pushes_each()})")


if __name__ == "__main__":
    main()
