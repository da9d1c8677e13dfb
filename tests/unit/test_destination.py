"""Where the server may send for its users (issue 29, rows 1, 2, 4 and 5): the destination
policy (core/destination.py) on its own and by property, the registration checks, and the
HTTP/2 client that keeps to it against real TLS listeners on 127.0.0.1 and ::1. Names resolve
through an injected resolver: no lookup, and nothing is ever sent to a denied range (a guard
refuses any connection to an address other than the loopback listeners')."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
import ssl
import threading
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any

import pytest
import trustme
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given
from hypothesis import strategies as st

from pymod_push.appserver import requests as app
from pymod_push.appserver.requests import Iq
from pymod_push.appserver.server import Delivery
from pymod_push.core import destination
from pymod_push.core.config import Backend, Config
from pymod_push.core.destination import IpAddress, UrlRefused, address_refusal
from pymod_push.core.xmpp import RequestError
from pymod_push.delivery import http2
from pymod_push.delivery.dispatcher import Dispatcher
from pymod_push.delivery.http2 import Denied, Http2Client, HttpError, UserDestinations
from pymod_push.providers import b64url_encode
from pymod_push.providers.wns import Wns
from pymod_push.records import RegisteredDevice
from pymod_push.store import Store
from tests.fake_providers import H2Peer

LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))
V4 = ipaddress.IPv4Address
V6 = ipaddress.IPv6Address


# ------------------------------------------------------------- the address classification
@pytest.mark.parametrize(("address", "why"), [
    ("127.0.0.1", "loopback"), ("127.255.255.254", "loopback"), ("10.0.0.1", "private"),
    ("172.16.0.1", "private"), ("172.31.255.255", "private"), ("192.168.1.1", "private"),
    ("169.254.169.254", "link-local"), ("100.64.0.1", "carrier-grade NAT"),
    ("100.127.255.255", "carrier-grade NAT"), ("0.0.0.0", "unspecified"),
    ("0.1.2.3", "unspecified"), ("224.0.0.1", "multicast"), ("239.255.255.250", "multicast"),
    ("240.0.0.1", "reserved"), ("255.255.255.255", "reserved"),
    ("192.0.2.1", "documentation"), ("198.51.100.1", "documentation"),
    ("203.0.113.1", "documentation"), ("198.18.0.1", "benchmarking"),
    ("192.0.0.8", "IETF"), ("192.88.99.1", "6to4"),
    ("::", "unspecified"), ("::1", "loopback"), ("fe80::1", "link-local"),
    ("fc00::1", "unique local"), ("fd12:3456::1", "unique local"), ("ff02::1", "multicast"),
    ("fec0::1", "site-local"), ("2001:db8::1", "documentation"), ("3fff::1", "documentation"),
    ("100::1", "discard"), ("2001::1", "Teredo"), ("64:ff9b:1::1", "NAT64"),
    ("4000::1", "reserved"), ("::ffff:127.0.0.1", "loopback (IPv4-mapped)"),
    ("::ffff:10.1.2.3", "private (IPv4-mapped)"), ("::ffff:169.254.169.254", "link-local"),
    ("::127.0.0.1", "IPv4-compatible"), ("::8.8.8.8", "IPv4-compatible"),
    ("64:ff9b::7f00:1", "loopback (NAT64)"), ("64:ff9b::a9fe:a9fe", "link-local (NAT64)"),
    ("2002:7f00:1::1", "loopback (6to4)"), ("2002:c0a8:101::1", "private (6to4)"),
])
def test_addresses_not_on_the_public_internet_are_denied_saying_why(address: str,
                                                                    why: str) -> None:
    refusal = address_refusal(ipaddress.ip_address(address))
    assert refusal is not None and why in refusal, (address, refusal)


@pytest.mark.parametrize("address", [
    "8.8.8.8", "1.1.1.1", "93.184.216.34", "100.63.255.255", "100.128.0.0", "172.15.255.255",
    "172.32.0.0", "192.167.255.255", "223.255.255.255", "2606:4700:4700::1111",
    "2a00:1450:4001::200e", "::ffff:8.8.8.8", "64:ff9b::808:808", "2002:808:808::1"])
def test_public_addresses_may_be_reached(address: str) -> None:
    assert address_refusal(ipaddress.ip_address(address)) is None


_DENIED_V4 = [network for network, _ in destination._DENIED_V4]
_PUBLIC_V4 = st.integers(0, 2**32 - 1).map(V4).filter(
    lambda a: not any(a in network for network in _DENIED_V4))


@st.composite
def denied_v4(draw: st.DrawFn) -> V4:
    network = draw(st.sampled_from(_DENIED_V4))
    return V4(int(network.network_address) + draw(st.integers(0, network.num_addresses - 1)))


def _v6_forms(address: V4) -> list[V6]:
    """The IPv6 addresses that carry address: mapped, compatible, NAT64, 6to4."""
    value = int(address)
    return [V6(0xFFFF << 32 | value), V6(value), V6(0x64FF9B << 96 | value),
            V6(0x2002 << 112 | value << 80 | 1)]


@given(denied_v4())
def test_every_ipv6_form_of_a_denied_ipv4_address_is_denied(address: V4) -> None:
    assert address_refusal(address) is not None
    for form in _v6_forms(address):
        assert address_refusal(form) is not None, form


@given(_PUBLIC_V4)
def test_a_public_ipv4_address_is_allowed_mapped_nat64_and_6to4_too(address: V4) -> None:
    mapped, compatible, nat64, six_to_four = _v6_forms(address)
    assert address_refusal(address) is None
    assert address_refusal(mapped) is None and address_refusal(nat64) is None
    assert address_refusal(six_to_four) is None
    assert address_refusal(compatible) is not None  # deprecated form: never


@given(st.integers(0, 2**128 - 1).map(V6))
def test_ipv6_outside_global_unicast_is_denied(address: V6) -> None:
    carries_v4 = address.ipv4_mapped is not None or address.sixtofour is not None \
        or address in ipaddress.ip_network("64:ff9b::/96")
    if not carries_v4 and address not in ipaddress.ip_network("2000::/3"):
        assert address_refusal(address) is not None


@given(denied_v4(), st.integers(8, 32))
def test_what_the_admin_allows_may_be_reached_in_any_form(address: V4, bits: int) -> None:
    allowed = (ipaddress.ip_network(f"{address}/{bits}", strict=False),)
    assert address_refusal(address, allowed) is None
    mapped = _v6_forms(address)[0]
    assert address_refusal(mapped, allowed) is None  # the socket reaches the IPv4 address


# ------------------------------------------------------------------ URLs at registration
@pytest.mark.parametrize(("url", "why"), [
    ("http://push.example.net/x", "only https"),
    ("https://user:pw@push.example.net/x", "user information"),
    ("https://@push.example.net/x", "user information"),
    ("https://127.0.0.1/x", "127.0.0.1 is not on the public internet (loopback)"),
    ("https://127.0.0.2:8443/x", "loopback"),
    ("https://[::1]/x", "loopback"),
    ("https://[::ffff:127.0.0.1]/x", "IPv4-mapped"),
    ("https://[::ffff:7f00:1]/x", "IPv4-mapped"),
    ("https://localhost/x", "this server itself"),
    ("https://LOCALHOST./x", "this server itself"),
    ("https://push.localhost/x", "this server itself"),
    ("https://169.254.169.254/latest/meta-data", "link-local"),
    ("https://10.0.0.1:6379/", "private"),
    ("https://0x7f.1/", "loopback"),  # what inet_aton, and so getaddrinfo, reads
    ("https://2130706433/", "loopback"),
    ("https://0177.0.0.1/", "loopback"),
    ("https://127.000.000.001/", "loopback"),
    ("https://100.64.1.1/", "carrier-grade NAT"),
    ("https://[fd00::1]/", "unique local"),
    ("https://[fe80::1%25eth0]/", "not a valid address"),
    ("https:///x", "no host"),
    ("https://exa mple.net/", "not a valid host name"),
    ("https://bücher.example/", "not a valid host name"),
    ("https://-bad.example/", "not a valid host name"),
    ("https://push.example.net:0/x", "not a valid URL"),
    ("https://push.example.net:99999/x", "not a valid URL"),
    ("https://[::1/x", "not a valid URL"),
    ("ftp://push.example.net/", "only https"),
    ("push.example.net/x", "only https"),
])
def test_urls_a_user_may_not_register_are_refused_saying_why(url: str, why: str) -> None:
    with pytest.raises(UrlRefused) as refused:
        destination.check_url(url)
    assert why in str(refused.value), str(refused.value)


@pytest.mark.parametrize(("url", "host", "port"), [
    ("https://fcm.googleapis.com/fcm/send/abc", "fcm.googleapis.com", 443),
    ("https://updates.push.services.mozilla.com/wpush/v2/x", "updates.push.services.mozilla.com",
     443),
    ("https://ntfy.example.org:8443/up?x=1", "ntfy.example.org", 8443),
    ("HTTPS://Push.Example.NET./x", "push.example.net", 443),
    ("https://8.8.8.8/x", "8.8.8.8", 443),
    ("https://[2606:4700::1]:444/x", "2606:4700::1", 444),
])
def test_public_https_urls_are_accepted(url: str, host: str, port: int) -> None:
    target = destination.check_url(url)
    assert (target.host, target.port) == (host, port)


def test_endpoint_allow_ips_lets_a_url_reach_what_it_names() -> None:
    lan = (ipaddress.ip_network("192.168.1.0/24"),)
    assert destination.check_url("https://192.168.1.20:8443/up", lan).port == 8443
    with pytest.raises(UrlRefused):
        destination.check_url("https://192.168.2.20/up", lan)
    with pytest.raises(UrlRefused):  # localhost is both loopback addresses
        destination.check_url("https://localhost/", (LOOPBACK[0],))
    assert destination.check_url("https://localhost:1/", LOOPBACK).host == "localhost"


def test_a_name_resolving_to_any_denied_address_is_refused() -> None:
    public, loopback = V4("93.184.216.34"), V4("127.0.0.1")
    assert destination.resolved_addresses("p.example", [public]) == [public]
    for answer in ([public, loopback], [loopback], [V6("::ffff:10.0.0.1")], []):
        with pytest.raises(UrlRefused):
            destination.resolved_addresses("p.example", answer)
    assert destination.resolved_addresses("p.example", [public, loopback], LOOPBACK)


# ---------------------------------------------------------------------- WNS channels
@pytest.mark.parametrize("url", [
    "https://attacker.example/x", "https://notify.windows.com.attacker.example/x",
    "https://evilnotify.windows.com/x", "http://db5.notify.windows.com/?token=x",
    "https://u:p@db5.notify.windows.com/?token=x", "https://127.0.0.1/x",
    "https://windows.com/x"])
def test_a_wns_channel_must_be_https_under_notify_windows_com(url: str) -> None:
    with pytest.raises(UrlRefused) as refused:
        destination.check_channel(url, destination.WNS_CHANNEL_DOMAINS, ())
    assert "notify.windows.com" in str(refused.value)


def test_wns_channel_domains_come_from_the_backend_option() -> None:
    default = Backend(0, "wns", "app", "h", "p", {})
    assert destination.channel_domains(default) == ("notify.windows.com",)
    own = Backend(0, "wns", "app", "h", "p", {"channel_domains": ["WNS.Example.", "x.test"]})
    assert destination.channel_domains(own) == ("wns.example", "x.test")
    assert destination.check_channel("https://a.wns.example/c", ("wns.example",), ())
    assert destination.check_channel("https://db5.notify.windows.com/?token=x",
                                     destination.WNS_CHANNEL_DOMAINS, ())


# ------------------------------------------------------------------ registration (IQ)
def _register(backend: Backend, fields: dict[str, str],
              allowed: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network] = ()
              ) -> app.DeviceRegistration:
    command = app.Command(f"register-push-{backend.group}", "s", "execute",
                          {k: (v,) for k, v in fields.items()})
    return app.parse_registration(command, Iq("i", "set", "a@example.org/phone",
                                              "example.org", None), backend, (), allowed)


KEYS = {"p256dh": b64url_encode(ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
    serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)),
    "auth": b64url_encode(b"0123456789abcdef")}


def test_registration_refuses_what_the_policy_refuses_with_bad_request() -> None:
    webpush = Backend(0, "webpush", "any", "example.org", "pubsub.example.org", {})
    for endpoint in ("http://push.example.net/x", "https://127.0.0.1:6379/",
                     "https://user:pw@push.example.net/"):
        with pytest.raises(RequestError) as error:
            _register(webpush, {"endpoint": endpoint, **KEYS})
        assert error.value.condition == "bad-request"
        assert error.value.text.startswith("field 'endpoint' is refused: ")
    assert _register(webpush, {"endpoint": "https://127.0.0.1:6379/", **KEYS},
                     LOOPBACK).token == "https://127.0.0.1:6379/"
    wns = Backend(1, "wns", "app", "example.org", "pubsub.example.org", {})
    with pytest.raises(RequestError) as error:
        _register(wns, {"token": "https://attacker.example/x"})
    assert error.value.condition == "bad-request" and "notify.windows.com" in error.value.text
    channel = "https://db5.notify.windows.com/?token=AwYAAAB"
    assert _register(wns, {"token": channel}).token == channel


# ------------------------------------------------ the client that keeps to the policy
@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def _client_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


class FakeResolver:
    """Answers from a table, counting lookups; a name not in it does not resolve."""

    def __init__(self, answers: dict[str, list[list[str]]]) -> None:
        self.answers = answers  # name -> successive answers (the last one repeats)
        self.lookups: list[str] = []

    async def __call__(self, host: str, port: int) -> list[IpAddress]:
        self.lookups.append(host)
        answers = self.answers.get(host)
        if not answers:
            raise OSError(f"{host} does not resolve (test)")
        answer = answers.pop(0) if len(answers) > 1 else answers[0]
        return [ipaddress.ip_address(a) for a in answer]


@pytest.fixture
def only_loopback(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Connections may go to 127.0.0.1 and ::1 only: any other fails the test before a
    packet is sent. Yields the hosts connected to."""
    connected: list[str] = []
    original = asyncio.BaseEventLoop.create_connection

    async def guarded(self: asyncio.BaseEventLoop, factory: Any, host: Any = None,
                      *args: Any, **kwargs: Any) -> Any:
        assert host in ("127.0.0.1", "::1"), f"a connection to {host} was attempted"
        connected.append(host)
        return await original(self, factory, host, *args, **kwargs)
    monkeypatch.setattr(asyncio.BaseEventLoop, "create_connection", guarded)
    yield connected


def _run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(scenario(), 60))


def test_a_name_is_resolved_once_per_connection_and_rebinding_is_denied(
        ca: trustme.CA, only_loopback: list[str]) -> None:
    """push.test resolves to 127.0.0.1 (allowed), then to 10.0.0.1: the connection is
    made to the address checked, TLS is for the name (SNI, certificate), requests on it
    look nothing up again; the next connection's lookup gives 10.0.0.1: denied, and
    nothing is sent there."""
    async def scenario() -> None:
        peer = H2Peer(ca, "push.test")
        port = await peer.start()
        resolver = FakeResolver({"push.test": [["127.0.0.1"], ["10.0.0.1"]]})
        client = Http2Client(_client_context(ca), timeout=5, destinations=UserDestinations(
            LOOPBACK, resolve=resolver))
        url = f"https://push.test:{port}/wpush/"
        for n in range(3):
            answer = await client.request("POST", f"{url}{n}", {}, b"x")
            assert answer.status_code == 200
        assert resolver.lookups == ["push.test"]
        assert peer.connected == ["push.test"]  # the name went as SNI
        assert [path for _, path in peer.requests] == ["/wpush/0", "/wpush/1", "/wpush/2"]
        await peer.close()  # the server ends the connection: the next one looks up again
        await peer.wait_until(lambda: len(peer.ended) == 1)
        while client.open_connections():
            await asyncio.sleep(0.01)
        with pytest.raises(Denied) as denied:
            await client.request("POST", f"{url}3", {}, b"x")
        assert str(denied.value) == ("push.test resolves to 10.0.0.1, not on the public "
                                     "internet (private)")
        assert resolver.lookups == ["push.test", "push.test"]
        await client.aclose()

    _run(scenario)
    assert only_loopback == ["127.0.0.1"]


@pytest.mark.parametrize("answer", [
    ["10.0.0.1"], ["127.0.0.1", "169.254.169.254"], ["::ffff:192.168.0.1"], ["::1", "fd00::1"],
    ["64:ff9b::a9fe:a9fe"], []])
def test_a_name_with_any_denied_address_is_denied_before_any_connection(
        ca: trustme.CA, only_loopback: list[str], answer: list[str]) -> None:
    async def scenario() -> None:
        resolver = FakeResolver({"push.test": [answer]})
        client = Http2Client(_client_context(ca), timeout=5, destinations=UserDestinations(
            LOOPBACK, resolve=resolver))
        with pytest.raises(Denied):
            await client.request("POST", "https://push.test/x", {}, b"x")
        await client.aclose()

    _run(scenario)
    assert only_loopback == []


@pytest.mark.parametrize("url", [
    "https://127.0.0.2:1/x", "https://[::1]:1/x", "https://169.254.169.254/latest",
    "https://[::ffff:127.0.0.2]:1/x", "http://push.example.net/x",
    "https://user:pw@push.example.net/x"])
def test_what_registration_would_refuse_is_denied_when_sending_too(
        ca: trustme.CA, only_loopback: list[str], url: str) -> None:
    """A row stored before the policy: denied (for good) without a lookup or a packet,
    whether the request goes by request or by request_now (an open connection's)."""
    async def scenario() -> None:
        resolver = FakeResolver({})
        client = Http2Client(_client_context(ca), timeout=5, destinations=UserDestinations(
            (ipaddress.ip_network("127.0.0.1/32"),), resolve=resolver))
        with pytest.raises(Denied):
            await client.request("POST", url, {}, b"x")
        assert resolver.lookups == []

    _run(scenario)
    assert only_loopback == []


def test_the_admins_own_endpoints_are_not_checked(ca: trustme.CA,
                                                  only_loopback: list[str]) -> None:
    """APNs, FCM: no destinations, no check (their endpoints are the admin's): the same
    loopback listener is reached by the plain client, denied to the user one."""
    async def scenario() -> None:
        peer = H2Peer(ca)
        port = await peer.start()
        plain = Http2Client(_client_context(ca), timeout=5)
        checked = Http2Client(_client_context(ca), timeout=5,
                              destinations=UserDestinations(resolve=FakeResolver({})))
        url = f"https://127.0.0.1:{port}/3/device/x"
        assert (await plain.request("POST", url, {}, b"{}")).status_code == 200
        with pytest.raises(Denied):
            await checked.request("POST", url, {}, b"{}")
        await plain.aclose()
        await peer.close()

    _run(scenario)
    assert only_loopback == ["127.0.0.1"]


# ----------------------------------------- with the dispatcher: redirects, the WNS token
SUMMARY = {"FORM_TYPE": "urn:xmpp:push:summary", "message-count": "1"}


async def _push(config: Config, device: RegisteredDevice, provider: Any = None) -> list[str]:
    """One delivery through a dispatcher (its provider replaced, if given); the
    publish's answer, once there."""
    answers: list[str] = []
    dispatcher = Dispatcher(config, Store(":memory:"), lambda node: None, answers.append)
    if provider is not None:
        dispatcher._providers[0] = provider
    dispatcher.submit(Delivery(config.backends[0], device, SUMMARY,
                               Iq("p1", "set", "localhost", "pubsub.localhost", None)))
    while not answers:
        await asyncio.sleep(0.01)
    await dispatcher.close()
    return answers


def _webpush_device(endpoint: str) -> RegisteredDevice:
    public = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
    return RegisteredDevice("node-1", "s", "alice@localhost", "d1", "", "webpush", "any",
                  "pubsub.localhost", endpoint, p256dh=b64url_encode(public),
                  auth=b64url_encode(b"0123456789abcdef"))


def test_a_redirect_is_not_followed(ca: trustme.CA, tmp_path: Any,
                                    only_loopback: list[str]) -> None:
    """A Web Push endpoint answering 301 to another server: the push goes no further
    (and is answered); the other server gets nothing."""
    (tmp_path / "ca.pem").write_bytes(ca.cert_pem.bytes())

    async def scenario() -> None:
        elsewhere = H2Peer(ca)
        other_port = await elsewhere.start()
        redirecting = H2Peer(ca, status=301,
                             headers=(("location", f"https://127.0.0.1:{other_port}/x"),))
        port = await redirecting.start()
        backend = Backend(0, "webpush", "any", "localhost", "pubsub.localhost",
                          {"cafile": str(tmp_path / "ca.pem")})
        config = Config("localhost", backends=(backend,), endpoint_allow_ips=LOOPBACK)
        answers = await _push(config, _webpush_device(f"https://127.0.0.1:{port}/sub/1"))
        assert len(answers) == 1
        assert [path for _, path in redirecting.requests] == ["/sub/1"]
        assert elsewhere.requests == [] and elsewhere.connected == []
        await redirecting.close()
        await elsewhere.close()

    _run(scenario)


def test_the_wns_token_goes_to_no_host_outside_the_channel_domains(
        ca: trustme.CA, tmp_path: Any, only_loopback: list[str]) -> None:
    """A WNS device stored before channel URIs were checked, its channel on another
    (allowed) address: the app's bearer token is not sent there, nor anything else."""
    (tmp_path / "ca.pem").write_bytes(ca.cert_pem.bytes())

    async def scenario() -> None:
        elsewhere = H2Peer(ca)
        port = await elsewhere.start("::1")
        backend = Backend(0, "wns", "app", "localhost", "pubsub.localhost", {
            "package_sid": "ms-app://sid", "auth_key": "s3cret",
            "endpoint": "https://127.0.0.1:1", "cafile": str(tmp_path / "ca.pem"),
            "channel_domains": ["127.0.0.1"]})
        config = Config("localhost", backends=(backend,), endpoint_allow_ips=LOOPBACK)
        wns = Wns(backend)  # holding a token already: no login
        wns.token.store(200, b'{"access_token": "the-apps-bearer-token"}', 0.0)
        wns.token._expires = float("inf")
        device = RegisteredDevice("node-1", "s", "alice@localhost", "d1", "", "wns", "app",
                        "pubsub.localhost", f"https://[::1]:{port}/channel/1")
        answers = await _push(config, device, wns)
        assert len(answers) == 1
        assert elsewhere.connected == [] and elsewhere.requests == []
        await elsewhere.close()

    _run(scenario)
    assert "::1" not in only_loopback


# ------------------------------------------------------------ names users give, looked up
@pytest.mark.parametrize("host", ["a..b.test", "x" * 64 + ".test", "-a.test", "a_b-.test",
                                  "é.test"])
def test_a_stored_host_that_is_no_valid_name_is_denied_without_a_lookup(
        ca: trustme.CA, only_loopback: list[str], monkeypatch: pytest.MonkeyPatch,
        host: str) -> None:
    """A row stored before the policy whose host is no name registration would take (an
    empty label, one over 63 characters, ...): denied for good when sending, neither
    looked up nor an unexpected error (the system resolver's UnicodeError)."""
    looked_up: list[str] = []

    def getaddrinfo(name: str, *args: Any, **kwargs: Any) -> Any:
        looked_up.append(name)
        name.encode("idna")  # what the real one does first: UnicodeError for a..b
        raise AssertionError("no lookup may be made")
    monkeypatch.setattr(http2.socket, "getaddrinfo", getaddrinfo)

    async def scenario() -> None:
        client = Http2Client(_client_context(ca), timeout=5, destinations=UserDestinations(
            LOOPBACK))  # the system resolver's lookups
        with pytest.raises(Denied, match="not a valid host name"):
            await client.request("POST", f"https://{host}/x", {}, b"x")
        await client.aclose()

    _run(scenario)
    assert looked_up == [] and only_loopback == []


def test_the_system_resolvers_unicode_error_is_a_denial(
        monkeypatch: pytest.MonkeyPatch) -> None:
    def getaddrinfo(name: str, *args: Any, **kwargs: Any) -> Any:
        raise UnicodeError("label empty or too long")
    monkeypatch.setattr(http2.socket, "getaddrinfo", getaddrinfo)
    with pytest.raises(Denied):
        asyncio.run(http2.resolve("push.test", 443))


def test_slow_lookups_of_user_names_take_their_own_threads_and_fail_fast_beyond(
        ca: trustme.CA, only_loopback: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Names whose lookups never end (an endpoint's own slow DNS server): at most
    MAX_LOOKUPS of them are looked up at once, on threads of their own; the others fail at
    once, to be tried again (HttpError, not Denied), and the loop's default executor, where
    APNs' and FCM's hosts are looked up, stays free."""
    release = threading.Event()
    looking_up: list[str] = []
    default_threads = min(32, (os.cpu_count() or 1) + 4)  # asyncio's default executor
    names = [f"slow{n}.test" for n in range(max(8, default_threads + 2))]

    def hanging(name: str, *args: Any, **kwargs: Any) -> Any:
        looking_up.append(name)
        release.wait(60)
        raise socket.gaierror(socket.EAI_NONAME, "no such name (test)")
    monkeypatch.setattr(http2.socket, "getaddrinfo", hanging)

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        client = Http2Client(_client_context(ca), timeout=30, destinations=UserDestinations(
            LOOPBACK))
        requests = {name: loop.create_task(client.request("POST", f"https://{name}/x", {},
                                                          b"x")) for name in names}
        try:
            while len(looking_up) < http2.MAX_LOOKUPS:
                await asyncio.sleep(0.01)
            beyond = [requests[name] for name in names if name not in looking_up]
            assert len(beyond) == len(names) - http2.MAX_LOOKUPS
            await asyncio.wait_for(asyncio.wait(beyond), 10)
            for task in beyond:
                failure = task.exception()
                assert isinstance(failure, HttpError) and not isinstance(failure, Denied)
                assert "lookups are under way" in str(failure)
            assert await asyncio.wait_for(loop.run_in_executor(None, lambda: "free"), 10) \
                == "free"
            assert len(looking_up) == http2.MAX_LOOKUPS
        finally:
            release.set()
            answers = await asyncio.gather(*requests.values(), return_exceptions=True)
        assert all(isinstance(answer, HttpError) for answer in answers)
        # their threads are free again: the next lookups go ahead
        release.clear()
        again = [loop.create_task(client.request("POST", f"https://{name}/y", {}, b"x"))
                 for name in names[:http2.MAX_LOOKUPS]]
        while len(looking_up) < 2 * http2.MAX_LOOKUPS:
            await asyncio.sleep(0.01)
        release.set()
        await asyncio.gather(*again, return_exceptions=True)
        await client.aclose()

    _run(scenario)
    assert only_loopback == []
