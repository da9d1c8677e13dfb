"""Fake push providers of our own: HTTP/2 over TLS on 127.0.0.1, certificates from a test CA."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import http_ece  # type: ignore[import-untyped]
import httpx
import jwt
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypercorn.asyncio import serve
from hypercorn.config import Config as HypercornConfig

from devtools.instance import free_port


@dataclass
class Received:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    http_version: str
    refused: str = ""  # why the fake refused it, as the real service would
    status: int = 0  # what the fake answered
    decrypted: bytes = b""

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

    def __init__(self, check: Check | None = None) -> None:
        self.received: list[Received] = []
        self.answers: dict[str, tuple[int, dict[str, Any]]] = {}  # path -> (status, json)
        # path -> answers to give once each, in order, before the usual one
        self.next_answers: dict[str, list[tuple[int, dict[str, str]]]] = {}
        self.check = check
        # When set: each request is recorded, then answered only once this event is set.
        self.answer_when: threading.Event | None = None
        self._arrived = threading.Condition()

    def reset(self) -> None:
        with self._arrived:
            self.received.clear()
            self.answers.clear()
            self.next_answers.clear()

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
        host, port = scope["server"]
        headers.setdefault("host", f"{host}:{port}")
        request = Received(scope["method"], scope["path"], headers, body, scope["http_version"])
        refusal = self.check(request) if self.check else None  # or the fake's own answer
        if refusal is not None and refusal[0] >= 400:
            request.refused = json.dumps(refusal[1])
        status, answer = refusal or self.answers.get(scope["path"], (200, {}))
        extra: dict[str, str] = {}
        if refusal is None and self.next_answers.get(scope["path"]):
            status, extra = self.next_answers[scope["path"]].pop(0)
            answer = {}
        payload = json.dumps(answer).encode() if answer else b""
        request.status = status
        with self._arrived:  # recorded before the client can see the answer
            self.received.append(request)
            self._arrived.notify_all()
        if self.answer_when is not None:
            await asyncio.to_thread(self.answer_when.wait)
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"),
                                *((k.encode(), v.encode()) for k, v in extra.items())]})
        await send({"type": "http.response.body", "body": payload})

    def _wait(self, count: int, timeout: float) -> list[Received]:
        with self._arrived:
            if not self._arrived.wait_for(lambda: len(self.received) >= count, timeout):
                raise TimeoutError(f"{len(self.received)} requests, not {count}, "
                                   f"within {timeout} s")
            return list(self.received)

    async def wait_for(self, count: int, timeout: float = 20) -> list[Received]:
        return await asyncio.to_thread(self._wait, count, timeout)


def client_certificate(ca: LoopbackCA, uid: str, path: Path) -> Path:
    """A client certificate as Apple issues them: the app's bundle id as the subject's UID."""
    ca_key = serialization.load_pem_private_key(ca.ca.private_key_pem.bytes(), None)
    ca_cert = x509.load_pem_x509_certificate(ca.ca.cert_pem.bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.USER_ID, uid),
                                 x509.NameAttribute(NameOID.COMMON_NAME, f"Apple Push: {uid}")]))
        .issuer_name(ca_cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1)).not_valid_after(now + timedelta(days=30))
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        # What Python 3.13+'s strict verification (VERIFY_X509_STRICT) requires of a leaf.
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, key_cert_sign=False, crl_sign=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
            ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value),
            critical=False)
        .sign(ca_key, hashes.SHA256()))  # type: ignore[arg-type]
    path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM) + key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    return path


def _import_everything_first() -> None:
    """Import in this thread what the fake's thread would import lazily.

    CPython 3.11.2 keeps AST recursion bookkeeping per interpreter, not per thread:
    two threads compiling at once (an import, a dataclass being made) can leave it
    broken ("AST constructor recursion depth mismatch"). So the fake's thread must
    never be the first to import anything.
    """
    import h2.config  # noqa: F401
    import h2.connection  # noqa: F401
    import h2.events  # noqa: F401
    import hypercorn.asyncio.run  # noqa: F401
    import hypercorn.asyncio.task_group  # noqa: F401
    import hypercorn.asyncio.tcp_server  # noqa: F401
    import hypercorn.protocol  # noqa: F401
    import hypercorn.protocol.h2  # noqa: F401
    import hypercorn.protocol.h11  # noqa: F401
    import hypercorn.protocol.http_stream  # noqa: F401


def serve_in_thread(provider: FakeProvider, ca: LoopbackCA, port: int,
                    require_client_certificate: bool = False) -> None:
    """Serve ``provider`` on 127.0.0.1:port (TLS, HTTP/2) until the interpreter exits.

    The module keeps its HTTP/2 connection open for good, and asyncio would wait
    30 s for a TLS close_notify at shutdown: so the fake is never shut down.
    """
    _import_everything_first()
    config = HypercornConfig()
    config.bind = [f"127.0.0.1:{port}"]
    config.certfile = str(ca.certfile)
    config.keyfile = str(ca.keyfile)
    config.alpn_protocols = ["h2"]
    config.accesslog = None
    config.errorlog = None
    config.keep_alive_max_requests = 10**9  # real providers keep connections for hours
    if require_client_certificate:  # as APNs with certificate auth: no certificate, no TLS
        config.ca_certs = str(ca.cafile)
        config.verify_mode = ssl.CERT_REQUIRED
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
    # One request through every code path of the fake, while this thread only waits.
    context = ssl.create_default_context(cafile=str(ca.cafile))
    if require_client_certificate:
        context.load_cert_chain(client_certificate(ca, "warm.up", ca.folder / "warm-up.pem"))
    with httpx.Client(http2=True, verify=context) as client:
        client.post(f"https://127.0.0.1:{port}/warm-up", content=b"{}")
    provider.reset()


# ------------------------------------------------------------------ what real ones check
# A check returns None to accept a request (the fake then answers as told), or the
# answer a real service would give: an error, or a token endpoint's answer.
Check = Callable[[Received], "tuple[int, dict[str, Any]] | None"]


def apns_check(public_key: Any, team_id: str, key_id: str, topic: str) -> Check:
    """APNs: a valid ES256 provider token of that team and key, the topic, a push type."""
    def check(request: Received) -> tuple[int, dict[str, Any]] | None:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        try:
            claims = jwt.decode(token, public_key, algorithms=["ES256"])
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            return 403, {"reason": "InvalidProviderToken"}
        if scheme != "bearer" or claims.get("iss") != team_id or header.get("kid") != key_id:
            return 403, {"reason": "InvalidProviderToken"}
        push_type = request.headers.get("apns-push-type")
        if push_type not in ("alert", "background", "voip"):
            return 400, {"reason": "InvalidPushType"}
        wanted_topic = f"{topic}.voip" if push_type == "voip" else topic
        if request.headers.get("apns-topic") != wanted_topic:
            return 400, {"reason": "TopicDisallowed"}
        if push_type == "background" and request.headers.get("apns-priority") != "5":
            return 400, {"reason": "BadPriority"}  # Apple's rule for background pushes
        if len(request.body) > (5120 if push_type == "voip" else 4096):
            return 413, {"reason": "PayloadTooLarge"}
        return None
    return check


def fcm_check(public_key: Any, client_email: str, project_id: str, port: int) -> Check:
    """FCM: the token endpoint takes a service-account JWT and gives a bearer token; the send
    endpoint wants that token and a message with a device token."""
    issued = "fake-access-token"

    def check(request: Received) -> tuple[int, dict[str, Any]] | None:
        if request.path == "/token":
            form = parse_qs(request.body.decode())
            try:
                claims = jwt.decode(form["assertion"][0], public_key, algorithms=["RS256"],
                                    audience=f"https://127.0.0.1:{port}/token")
            except (jwt.PyJWTError, KeyError):
                return 400, {"error": "invalid_grant"}
            if claims.get("iss") != client_email or "firebase.messaging" not in claims["scope"]:
                return 400, {"error": "invalid_grant"}
            return 200, {"access_token": issued, "expires_in": 3600}
        if request.path != f"/v1/projects/{project_id}/messages:send":
            return 404, {"error": {"status": "NOT_FOUND"}}
        if request.headers.get("authorization") != f"Bearer {issued}":
            return 401, {"error": {"status": "UNAUTHENTICATED"}}
        message = request.json().get("message", {})
        if not message.get("token"):
            return 400, {"error": {"status": "INVALID_ARGUMENT"}}
        if len(json.dumps(message.get("data", {}), separators=(",", ":")).encode()) > 4096:
            return 400, {"error": {"status": "INVALID_ARGUMENT", "message": "too big"}}
        return None
    return check


def webpush_check(receiver_keys: dict[str, tuple[Any, bytes]]) -> Check:
    """Web Push: a VAPID JWT signed by the key it names, for this origin; a body that
    decrypts (RFC 8291) with the subscription's keys. receiver_keys: path -> (key, auth)."""
    def check(request: Received) -> tuple[int, dict[str, Any]] | None:
        match = re.fullmatch(r"vapid t=([^,]+), k=(\S+)", request.headers.get("authorization", ""))
        if match is None:
            return 401, {"reason": "no VAPID"}
        raw = base64.urlsafe_b64decode(match[2] + "=" * (-len(match[2]) % 4))
        key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), raw)
        try:
            jwt.decode(match[1], key, algorithms=["ES256"],
                       audience=f"https://{request.headers.get('host', '')}")
        except jwt.PyJWTError:
            return 403, {"reason": "bad VAPID"}
        if request.headers.get("content-encoding") != "aes128gcm" or "ttl" not in request.headers:
            return 400, {"reason": "headers"}
        if len(request.body) > 4096:  # what RFC 8030 lets a push service refuse
            return 413, {}
        if request.path not in receiver_keys:
            return 410, {}
        private, auth = receiver_keys[request.path]
        try:
            request.decrypted = http_ece.decrypt(request.body, private_key=private,
                                                 auth_secret=auth, version="aes128gcm")
        except Exception:  # noqa: BLE001 - any failure to decrypt is the sender's fault
            return 400, {"reason": "does not decrypt"}
        return None
    return check


def main() -> None:
    """``python -m tests.fake_providers PORT CA_FOLDER``: serve a fake provider that answers
    200 until its stdin closes, then print how many requests it received (for benchmarks)."""
    import sys
    from types import SimpleNamespace

    port, folder = int(sys.argv[1]), Path(sys.argv[2])
    ca = SimpleNamespace(cafile=folder / "ca.pem", certfile=folder / "server.pem",
                         keyfile=folder / "server.key")
    provider = FakeProvider()
    serve_in_thread(provider, ca, port)  # type: ignore[arg-type]
    print("listening", flush=True)
    sys.stdin.read()
    print(len(provider.received), flush=True)


if __name__ == "__main__":
    main()


def wns_check(package_sid: str, secret: str) -> Check:
    """WNS: client credentials give a token; a raw notification needs it and its headers."""
    issued = "wns-token-1"

    def check(request: Received) -> tuple[int, dict[str, Any]] | None:
        if request.path == "/accesstoken.srf":
            form = {k: v[0] for k, v in parse_qs(request.body.decode()).items()}
            if form.get("client_id") != package_sid or form.get("client_secret") != secret \
                    or form.get("scope") != "notify.windows.com":
                return 400, {"error": "invalid_client"}
            return 200, {"access_token": issued, "token_type": "bearer", "expires_in": 86400}
        if request.headers.get("authorization") != f"Bearer {issued}":
            return 401, {}
        if request.headers.get("x-wns-type") != "wns/raw":
            return 400, {}
        if len(request.body) > 5120:
            return 413, {}
        return None
    return check


def ubuntu_check(request: Received) -> tuple[int, dict[str, Any]] | None:
    """Ubuntu Push: POST /notify with appid, token, expire_on and data."""
    try:
        body = request.json()
    except ValueError:
        return 400, {"error": "invalid-request"}
    if request.path != "/notify" or not {"appid", "token", "expire_on", "data"} <= set(body):
        return 400, {"error": "invalid-request"}
    if len(request.body) > 4096:
        return 413, {"error": "too-large"}
    return None


def fake_apns(folder: Path, app_name: str, topic: str) -> tuple[FakeProvider, dict[str, Any]]:
    """A fake APNs (token auth, its own test CA) serving on a free port of 127.0.0.1, and
    the mod_push_py backend that uses it, registered at localhost."""
    ca = LoopbackCA(folder / "tls")
    key = ec.generate_private_key(ec.SECP256R1())
    key_file = folder / f"apns-{app_name}.p8"
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_file.chmod(0o644)  # read by the ejabberd user
    port = free_port()
    provider = FakeProvider(apns_check(key.public_key(), "TEAM", "KEY", topic))
    serve_in_thread(provider, ca, port)
    backend = {"type": "apns", "app_name": app_name, "register_host": "localhost",
               "pubsub_host": "pubsub.localhost", "topic": topic, "key_file": str(key_file),
               "key_id": "KEY", "team_id": "TEAM", "endpoint": f"https://127.0.0.1:{port}",
               "cafile": str(ca.cafile)}
    return provider, backend


class H2Peer:
    """An HTTP/2 server over TLS on 127.0.0.1 or ::1, in the test's own event loop (h2's
    server side), for what hypercorn cannot be told to do: grant no stream at all
    (SETTINGS_MAX_CONCURRENT_STREAMS 0, written only once the first request came, which
    is refused: both ways a client may learn of it), or answer with a redirect. It
    records each connection's name (TLS SNI) and each request, and says when they change
    (:meth:`wait_until`)."""

    def __init__(self, ca: trustme.CA, *names: str, max_streams: int | None = None,
                 status: int = 200, headers: tuple[tuple[str, str], ...] = ()) -> None:
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert(*(names or ("127.0.0.1", "::1"))).configure_cert(self.context)
        self.context.set_alpn_protocols(["h2"])
        self.context.sni_callback = self._named
        self.max_streams, self.status, self.headers = max_streams, status, headers
        self.connected: list[str | None] = []  # the name each connection asked for
        self.ended: list[str | None] = []  # those of the connections that ended
        self.requests: list[tuple[str | None, str]] = []  # (name, path)
        self._names: dict[int, str | None] = {}  # id(ssl object) -> SNI name
        self._changed: asyncio.Condition | None = None
        self._writers: list[asyncio.StreamWriter] = []  # kept: collected, they close
        self.server: asyncio.Server | None = None

    def _named(self, ssl_object: Any, name: str | None, _: ssl.SSLContext) -> None:
        self._names[id(ssl_object)] = name

    async def start(self, host: str = "127.0.0.1") -> int:
        """Listening on host (a loopback address); its port."""
        self._changed = asyncio.Condition()
        self.server = await asyncio.start_server(self._serve, host, 0, ssl=self.context)
        return int(self.server.sockets[0].getsockname()[1])

    async def _note(self, change: Callable[[], None]) -> None:
        assert self._changed is not None
        async with self._changed:
            change()
            self._changed.notify_all()

    async def wait_until(self, condition: Callable[[], bool], timeout: float = 20) -> None:
        assert self._changed is not None
        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(condition), timeout)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        import h2.config
        import h2.connection
        import h2.errors
        import h2.events
        import h2.exceptions
        import h2.settings

        self._writers.append(writer)
        name = self._names.pop(id(writer.get_extra_info("ssl_object")), None)
        await self._note(lambda: self.connected.append(name))
        server = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=False, header_encoding="utf-8"))
        server.initiate_connection()
        if self.max_streams is not None:
            server.update_settings(
                {h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: self.max_streams})
        silent = self.max_streams == 0  # until the first request: not a word
        if not silent:
            writer.write(server.data_to_send())
        try:
            while data := await reader.read(65536):
                for event in server.receive_data(data):
                    if isinstance(event, h2.events.RequestReceived):
                        path = dict(event.headers)[":path"]
                        await self._note(lambda p=path: self.requests.append((name, p)))  # type: ignore[misc]
                        if self.max_streams == 0:
                            silent = False
                            server.reset_stream(event.stream_id,
                                                h2.errors.ErrorCodes.REFUSED_STREAM)
                    elif isinstance(event, h2.events.StreamEnded) and self.max_streams != 0:
                        server.send_headers(event.stream_id, [
                            (":status", str(self.status)), *self.headers], end_stream=True)
                if not silent:
                    writer.write(server.data_to_send())
        except (ConnectionError, h2.exceptions.ProtocolError, ssl.SSLError):
            pass
        finally:
            writer.close()
            await self._note(lambda: self.ended.append(name))

    async def close(self) -> None:
        for writer in self._writers:
            writer.close()
        if self.server is not None:
            self.server.close()
