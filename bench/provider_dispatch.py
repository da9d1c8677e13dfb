"""Provider dispatch benchmark: the real APNs provider code and HTTP/2 client of one Python
process pushing into a fake APNs (another process, TLS with a test CA, token auth).

    python -m bench.provider_dispatch [--pushes N]
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from devtools.instance import free_port
from pymod_push.appserver.requests import Iq
from pymod_push.appserver.server import Delivery
from pymod_push.core.config import Backend, Config
from pymod_push.delivery.dispatcher import Dispatcher
from pymod_push.records import RegisteredDevice
from pymod_push.store import Store
from tests.fake_providers import LoopbackCA


async def run(pushes: int, folder: Path, port: int) -> tuple[float, float, int]:
    key_file = folder / "key.p8"
    backend = Backend(0, "apns", "bench", "localhost", "pubsub.localhost", {
        "topic": "org.example.bench", "key_file": str(key_file), "key_id": "K",
        "team_id": "T", "endpoint": f"https://127.0.0.1:{port}",
        "cafile": str(folder / "tls" / "ca.pem")})
    answered = 0

    def route(xml: str) -> None:
        nonlocal answered
        answered += 1

    dispatcher = Dispatcher(Config("localhost", backends=(backend,)), Store(":memory:"),
                            lambda node: None, route)
    summary = {"message-count": "1", "pending-subscription-count": "0"}
    deliveries = [Delivery(backend, RegisteredDevice(
        f"node{i}", "s", "user@localhost", "d", "", "apns",
                                           "bench", "pubsub.localhost", f"{i:064x}"),
                           summary, Iq(str(i), "set", "localhost", "pubsub.localhost", None))
                  for i in range(pushes)]
    # One push first, so that the connection and the token exist before the clock starts.
    dispatcher.submit(deliveries[0])
    while answered < 1:
        await asyncio.sleep(0.01)
    wall, cpu = time.perf_counter(), time.process_time()
    for delivery in deliveries[1:]:
        dispatcher.submit(delivery)
    while sum(dispatcher.counters.values()) - dispatcher.counters[("apns", "retried")] < pushes:
        await asyncio.sleep(0.005)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    delivered = dispatcher.counters[("apns", "delivered")]
    await dispatcher.close()
    return wall, cpu, delivered


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pushes", type=int, default=10_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        LoopbackCA(folder / "tls")
        (folder / "key.p8").write_bytes(ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
        port = free_port()
        # The raw h2 fake of bench/fake_apns.py, checking the token as APNs does.
        fake = subprocess.Popen([sys.executable, "-m", "bench.fake_apns", str(port),
                                 str(folder / "tls"), str(folder / "key.p8"), "T", "K",
                                 "org.example.bench"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True)
        assert fake.stdout is not None and fake.stdin is not None
        if fake.stdout.readline().strip() != "listening":
            raise RuntimeError("the fake APNs did not start")
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(fake.stdout or ()), daemon=True)
        reader.start()
        wall, cpu, delivered = asyncio.run(run(args.pushes, folder, port))
        fake.stdin.close()
        fake.wait(30)
        reader.join(30)
        received = sum(1 for line in lines if line.split()[-1] == "200")
    measured = args.pushes - 1
    print(f"provider dispatch: {measured} APNs pushes (token auth, HTTP/2, TLS) in {wall:.2f} s "
          f"= {measured / wall:,.0f} pushes/s; {cpu / measured * 1e6:.0f} us CPU per push in "
          f"the sending process")
    print(f"  delivered {delivered} of {args.pushes}, the fake received {received}: "
          f"{'none lost' if delivered == received == args.pushes else 'MISMATCH'}")
    return 0 if delivered == received == args.pushes else 1


if __name__ == "__main__":
    sys.exit(main())
