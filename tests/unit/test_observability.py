"""The metrics the observability bundle needs: build info, the shim's counters (brought by
its counters frame, so monotonic across restarts of Python), the APNs certificates' expiry,
registrations at the built-in app server without a device."""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from pymod_push import __version__, etf, metrics
from pymod_push.etf import Atom
from pymod_push.metrics import Snapshot, certificate_not_after, render
from pymod_push.protocol import ShimCounters, parse_counters
from pymod_push.records import RegisteredDevice, Registration
from pymod_push.store import Store
from tests.port_harness import PortUnderTest, batch, counters, hello


def certificate(path: Path, not_after: datetime) -> Path:
    """A self-signed certificate and its key, as an APNs certfile holds them."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.USER_ID, "org.example.app")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(not_after - timedelta(days=365)).not_valid_after(not_after)
            .sign(key, hashes.SHA256()))
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM) + key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    path.chmod(0o600)
    return path


def snapshot(**about: object) -> Snapshot:
    return Snapshot("example.org", Counter(), Counter(), Counter(), {}, {}, **about)  # type: ignore[arg-type]


def test_the_counters_frame_is_read_and_anything_else_is_not() -> None:
    assert parse_counters(etf.decode(counters(3, 40, 2))) == ShimCounters(3, 40, 2)
    assert parse_counters((Atom("counters"), {Atom("held"): 5})) == ShimCounters(0, 5, 0)
    odd = (Atom("counters"), {Atom("restarts"): -1, Atom("held"): b"7", Atom("dropped"): True})
    assert parse_counters(odd) == ShimCounters(0, 0, 0)
    assert parse_counters(etf.decode(batch(1))) is None
    assert parse_counters((Atom("counters"), [])) is None
    assert parse_counters("counters") is None


def test_build_info_and_the_shims_counters_are_exposed() -> None:
    lines = render(snapshot(version="1.2.3", shim={"restarts": 2, "held": 9, "dropped": 1}))
    assert 'pymod_push_build_info{host="example.org",version="1.2.3"} 1' in lines.splitlines()
    for name, value in (("python_restarts", 2), ("shim_held_events", 9),
                        ("shim_dropped_events", 1)):
        assert f"# TYPE pymod_push_{name}_total counter" in lines
        assert f'pymod_push_{name}_total{{host="example.org"}} {value}' in lines.splitlines()


def test_the_shims_counters_are_left_out_until_it_sent_them() -> None:
    """A 0 before the first counters frame would read as a counter reset in Prometheus."""
    text = render(snapshot())
    assert "pymod_push_build_info" in text
    assert "pymod_push_python_restarts_total" not in text
    assert "pymod_push_apns_certificate_expiry_seconds" not in text  # no certificate backend
    assert "pymod_push_app_server_registrations_without_device" not in text  # no app server


def test_a_certificates_expiry_is_read_once_per_change(tmp_path: Path) -> None:
    not_after = datetime.now(UTC).replace(microsecond=0) + timedelta(days=10)
    path = certificate(tmp_path / "apns.pem", not_after)
    assert certificate_not_after(str(path)) == not_after.timestamp()
    later = not_after + timedelta(days=300)
    certificate(path, later)  # renewed: a new file, a new mtime
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert certificate_not_after(str(path)) == later.timestamp()
    path.write_text("not a certificate")
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 2 * 10**9))
    assert certificate_not_after(str(path)) is None
    assert certificate_not_after(str(tmp_path / "missing.pem")) is None
    text = render(snapshot(certificates={("certapp", "push.example.org"):
                                         time.time() + 5 * 86400}))
    (line,) = [line for line in text.splitlines()
               if line.startswith("pymod_push_apns_certificate_expiry_seconds{")]
    assert 'app_name="certapp",pubsub_host="push.example.org"' in line
    assert 5 * 86400 - 60 < float(line.rsplit(" ", 1)[1]) <= 5 * 86400


def test_registrations_at_the_app_server_without_a_device_are_counted(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "push.sqlite3"))
    try:
        def registration(node: str, push_jid: str = "push.example.org") -> Registration:
            return Registration("alice", "example.org", node, push_jid, node, None)

        store.add_device(RegisteredDevice("n1", "s", "alice@example.org", "d1", "", "apns",
                                          "app", "push.example.org", "ab" * 32))
        store.enable(registration("n1"))  # has its device
        store.enable(registration("n2"))  # has none
        store.enable(registration("n3", "push.elsewhere.net"))  # another app server's
        store.commit()
        assert store.registrations_without_device(["push.example.org"]) == 1
        assert store.registrations_without_device(["push.example.org",
                                                   "push.elsewhere.net"]) == 2
    finally:
        store.close()


def test_the_port_takes_the_counters_frame_between_batches(tmp_path: Path) -> None:
    """Not a batch: nothing acknowledged for it; the metrics show the latest counters, the
    certificate backends' expiry, and the app server's registrations without a device."""
    cert = certificate(tmp_path / "apns.pem", datetime.now(UTC) + timedelta(days=20))
    backend = {Atom("type"): b"apns", Atom("app_name"): b"certapp",
               Atom("register_host"): b"example.org", Atom("pubsub_host"): b"push.example.org",
               Atom("topic"): b"org.example.app", Atom("certfile"): str(cert).encode()}

    async def main() -> None:
        port = PortUnderTest()
        try:
            port.app.on_frames([hello(tmp_path / "push.sqlite3", backends=[backend])])
            assert port.app.runtime is not None
            assert "pymod_push_python_restarts_total" not in render(port.app.runtime.snapshot())
            port.app.on_frames([counters(1, 5, 0), batch(1), counters(2, 7, 1)])
            assert port.app.runtime.shim == ShimCounters(2, 7, 1)
            text = render(port.app.runtime.snapshot())
        finally:
            await port.app.aclose()
        assert [f for f in port.written if isinstance(f, tuple) and f[0] == "counters"] == []
        lines = text.splitlines()
        assert f'pymod_push_build_info{{host="example.org",version="{__version__}"}} 1' in lines
        assert 'pymod_push_python_restarts_total{host="example.org"} 2' in lines
        assert 'pymod_push_shim_dropped_events_total{host="example.org"} 1' in lines
        assert 'pymod_push_app_server_registrations_without_device{host="example.org"} 0' \
            in lines
        (expiry,) = [line for line in lines
                     if line.startswith("pymod_push_apns_certificate_expiry_seconds{")]
        assert 19 * 86400 < float(expiry.rsplit(" ", 1)[1]) <= 20 * 86400

    asyncio.run(main())


def test_token_auth_has_no_expiry_gauge(tmp_path: Path) -> None:
    """A .p8 key does not expire: no certificate, no gauge."""
    key = ec.generate_private_key(ec.SECP256R1())
    p8 = tmp_path / "AuthKey_K.p8"
    p8.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                     serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption()))
    backend = {Atom("type"): b"apns", Atom("app_name"): b"app",
               Atom("register_host"): b"example.org", Atom("pubsub_host"): b"push.example.org",
               Atom("topic"): b"org.example.app", Atom("key_file"): str(p8).encode(),
               Atom("key_id"): b"K", Atom("team_id"): b"T"}

    async def main() -> str:
        port = PortUnderTest()
        try:
            port.app.on_frames([hello(tmp_path / "push.sqlite3", backends=[backend])])
            assert port.app.runtime is not None
            return render(port.app.runtime.snapshot())
        finally:
            await port.app.aclose()

    assert "pymod_push_apns_certificate_expiry_seconds" not in asyncio.run(main())
    assert metrics.certificate_not_after(str(p8)) is None  # no certificate in it
