"""Fake push providers of our own: HTTP/2 over TLS on 127.0.0.1, certificates from a test CA."""

from __future__ import annotations

import asyncio
import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trustme
from hypercorn.asyncio import serve
from hypercorn.config import Config as HypercornConfig


@dataclass
class Received:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    http_version: str

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class LoopbackCA:
    """A CA and a server certificate for 127.0.0.1, as files an ejabberd user can read."""

    folder: Path
    ca: trustme.CA = field(default_factory=trustme.CA)

    def __post_init__(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        server = self.ca.issue_cert("127.0.0.1", "localhost")
        self.cafile = self.folder / "ca.pem"
        self.ca.cert_pem.write_to_path(str(self.cafile))
        self.certfile = self.folder / "server.pem"
        self.keyfile = self.folder / "server.key"
        server.cert_chain_pems[0].write_to_path(str(self.certfile))
        server.private_key_pem.write_to_path(str(self.keyfile))


class FakeProvider:
    """An ASGI app that records every request and answers as told (200 by default).

    It runs in a thread with its own event loop (see :func:`serve_in_thread`); tests
    wait for requests with :meth:`wait_for` from theirs.
    """

    def __init__(self) -> None:
        self.received: list[Received] = []
        self.answers: dict[str, tuple[int, dict[str, Any]]] = {}  # path -> (status, json)
        self._arrived = threading.Condition()

    def reset(self) -> None:
        with self._arrived:
            self.received.clear()
            self.answers.clear()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        status, answer = self.answers.get(scope["path"], (200, {}))
        payload = json.dumps(answer).encode() if answer else b""
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": payload})
        with self._arrived:
            self.received.append(Received(scope["method"], scope["path"], headers, body,
                                          scope["http_version"]))
            self._arrived.notify_all()

    def _wait(self, count: int, timeout: float) -> list[Received]:
        with self._arrived:
            if not self._arrived.wait_for(lambda: len(self.received) >= count, timeout):
                raise TimeoutError(f"{len(self.received)} requests, not {count}, "
                                   f"within {timeout} s")
            return list(self.received)

    async def wait_for(self, count: int, timeout: float = 20) -> list[Received]:
        return await asyncio.to_thread(self._wait, count, timeout)


def serve_in_thread(provider: FakeProvider, ca: LoopbackCA, port: int) -> None:
    """Serve ``provider`` on 127.0.0.1:port (TLS, HTTP/2) until the interpreter exits.

    The module keeps its HTTP/2 connection open for good, and asyncio would wait
    30 s for a TLS close_notify at shutdown: so the fake is never shut down.
    """
    config = HypercornConfig()
    config.bind = [f"127.0.0.1:{port}"]
    config.certfile = str(ca.certfile)
    config.keyfile = str(ca.keyfile)
    config.alpn_protocols = ["h2"]
    config.accesslog = None
    config.errorlog = None
    started = threading.Event()

    async def main() -> None:
        async def serve_forever() -> None:
            await serve(provider, config, shutdown_trigger=asyncio.Future)  # type: ignore[arg-type]
        task = asyncio.get_running_loop().create_task(serve_forever())
        while not started.is_set():
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.close()
                started.set()
            except OSError:
                await asyncio.sleep(0.02)
        await task

    threading.Thread(target=asyncio.run, args=(main(),), daemon=True,
                     name=f"fake-provider-{port}").start()
    if not started.wait(20):
        raise RuntimeError(f"the fake provider did not listen on port {port}")
