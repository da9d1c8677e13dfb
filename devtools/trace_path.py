"""Which of pymod_push's files one push crosses, measured: docs/architecture.md lists them.

The port program runs as ejabberd runs it (``python -m pymod_push`` on pipes, here through
``devtools.trace_path child``, which records calls between a SIGUSR1 and a SIGUSR2). One
user registers an APNs device at the built-in app server (the fake APNs of bench/) and
enables push there, a few messages warm the caches, then one traced message goes in:

- ``app-server`` (default): an offline message (what ejabberd's offline hook sends),
  taken in-process by the built-in app server and pushed to the fake APNs; traced until
  the fake APNs answered and the acknowledgement is out.
- ``publish``: a message to a pending session whose registration is at a remote app
  server: traced until the publish action is written to ejabberd.

Printed: the files in the order first entered and how many times each was entered (a file
is entered when a call reaches it while none of its functions is running: from the event
loop, or back from another file after it was left). ``etf.py`` (the term codec) and
``core/limits.py``-like leaves count like any other file.

    python -m devtools.trace_path [app-server|publish]
"""

from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from types import FrameType
from typing import Any

PACKAGE = str(Path(__file__).resolve().parent.parent / "pymod_push") + os.sep


def child() -> int:
    """The port program, recording which of its files run between SIGUSR1 and SIGUSR2."""
    out = os.environ["TRACE_PATH_OUT"]
    order: list[str] = []
    entries: Counter[str] = Counter()
    running: Counter[str] = Counter()

    def profile(frame: FrameType, event: str, _arg: Any) -> None:
        name = frame.f_code.co_filename
        if not name.startswith(PACKAGE):
            return
        if event == "call":
            if running[name] == 0:
                entries[name] += 1
                if name not in order:
                    order.append(name)
            running[name] += 1
        elif event == "return" and running[name] > 0:
            running[name] -= 1

    def start(*_: Any) -> None:
        sys.setprofile(profile)

    def stop(*_: Any) -> None:
        sys.setprofile(None)
        Path(out).write_text(json.dumps(
            [(name[len(PACKAGE):], entries[name]) for name in order]))

    signal.signal(signal.SIGUSR1, start)
    signal.signal(signal.SIGUSR2, stop)
    try:  # after the handlers
        from pymod_push.port.app import main  # noqa: PLC0415
    except ImportError:  # the layout before docs/architecture.md, traced for comparison
        from pymod_push.port import main  # type: ignore[attr-defined,no-redef]  # noqa: PLC0415
    return main()


def trace(kind: str) -> list[tuple[str, int]]:
    from bench.appserver_apns import (  # noqa: PLC0415
        KEY_ID,
        TEAM_ID,
        TOPIC,
        apns_backend,
        fake_apns_files,
    )
    from bench.appserver_port import Requests, set_up  # noqa: PLC0415
    from bench.port_events import PortProcess, enable_all, stanza_event  # noqa: PLC0415
    from devtools.instance import ROOT, free_port  # noqa: PLC0415
    from pymod_push.etf import Atom  # noqa: PLC0415

    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "trace.json"
        os.environ["TRACE_PATH_OUT"] = str(out)
        tls, key_file = fake_apns_files(Path(folder))
        apns_port = free_port()
        fake = __import__("subprocess").Popen(
            [sys.executable, "-m", "bench.fake_apns", str(apns_port), str(tls), str(key_file),
             TEAM_ID, KEY_ID, TOPIC],
            cwd=ROOT, stdin=-1, stdout=-1)
        assert fake.stdout is not None and fake.stdout.readline().strip() == b"listening"
        requests = Requests(fake)
        backend = {Atom(k): v.encode() for k, v in apns_backend(tls, key_file, apns_port).items()}
        port = PortProcess(folder, options={Atom("backends"): [backend]},
                           command=["-m", "devtools.trace_path", "child"])
        try:
            if kind == "app-server":
                set_up(port, 1)
            else:
                enable_all(port, 1)  # at a remote app server: publishes go out as actions
            for n in range(20):  # warm: caches, connections, the first commit
                port.send_events([_offline(n) if kind == "app-server" else stanza_event(0, n)])
                _until_acknowledged(port)
            if kind == "app-server":
                requests.wait(lambda: requests.count >= 20, 30)
            time.sleep(0.1)  # the last answers and commits settle before the trace starts
            os.kill(port.proc.pid, signal.SIGUSR1)
            time.sleep(0.05)
            count = requests.count
            port.send_events([_offline(99) if kind == "app-server" else stanza_event(0, 99)])
            _until_acknowledged(port)
            if kind == "app-server":
                assert requests.wait(lambda: requests.count > count, 30), "no APNs request"
                time.sleep(0.1)  # its answer handled
            os.kill(port.proc.pid, signal.SIGUSR2)
            for _ in range(100):
                if out.exists():
                    break
                time.sleep(0.05)
            return [tuple(row) for row in json.loads(out.read_text())]
        finally:
            port.close()
            assert fake.stdin is not None
            fake.stdin.close()
            fake.wait(30)


def _offline(n: int) -> Any:
    from bench.port_events import stanza_event  # noqa: PLC0415
    from pymod_push.etf import Atom  # noqa: PLC0415

    _, session, stanza = stanza_event(0, n)
    return (Atom("offline"), session[:2], stanza)


def _until_acknowledged(port: Any) -> None:
    while not any(action[0] == "ack" for action in port.read_actions()):
        pass


def main() -> int:
    if sys.argv[1:2] == ["child"]:
        return child()
    kind = sys.argv[1] if len(sys.argv) > 1 else "app-server"
    rows = trace(kind)
    print(f"{kind}: {len(rows)} files, {sum(n for _, n in rows)} entries")
    for name, entries in rows:
        print(f"  {name}" + (f"  (entered {entries} times)" if entries > 1 else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
