"""Where the server may send for its users: the destination policy for every URL a user
supplies (Web Push and UnifiedPush endpoints, WNS channel URIs). Sans-IO: URLs and
addresses in, verdicts out. providers/http2.py resolves a host once per connection,
has every address checked here and connects to a checked one (no second lookup).

Denied by default: what is not on the public internet (loopback, private, link-local,
shared/CGNAT, unique local), multicast, unspecified, reserved and documentation ranges,
and the IPv6 forms that carry an IPv4 address (mapped, compatible, NAT64, 6to4) of them.
The admin allows some with the module option endpoint_allow_ips.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from pymod_push.core.config import Backend, IpNetwork

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# The backends whose devices register URLs of their own choosing.
class DestinationDenied(Exception):
    """The destination policy refuses where a request would go: no retry can succeed, the
    device's pushes fail for good."""


USER_URL_GROUPS = frozenset({"webpush", "wns"})
# Where WNS channel URIs live (Microsoft: https://*.notify.windows.com/...); the backend
# option channel_domains replaces it (tests, private deployments).
WNS_CHANNEL_DOMAINS = ("notify.windows.com",)


class UrlRefused(ValueError):
    """The policy refuses this destination; the text says why, for the user and the log."""


def _networks(table: Iterable[tuple[str, str]]) -> tuple[tuple[IpNetwork, str], ...]:
    return tuple((ipaddress.ip_network(cidr), why) for cidr, why in table)


# IANA's IPv4 special-purpose registry, the parts not to be sent to (RFC 6890 and after)
_DENIED_V4 = _networks((
    ("0.0.0.0/8", "unspecified ('this network')"),
    ("10.0.0.0/8", "private"),
    ("100.64.0.0/10", "shared (carrier-grade NAT)"),
    ("127.0.0.0/8", "loopback"),
    ("169.254.0.0/16", "link-local"),
    ("172.16.0.0/12", "private"),
    ("192.0.0.0/24", "IETF protocol assignments"),
    ("192.0.2.0/24", "documentation"),
    ("192.88.99.0/24", "6to4 relay anycast (deprecated)"),
    ("192.168.0.0/16", "private"),
    ("198.18.0.0/15", "benchmarking"),
    ("198.51.100.0/24", "documentation"),
    ("203.0.113.0/24", "documentation"),
    ("224.0.0.0/4", "multicast"),
    ("240.0.0.0/4", "reserved"),  # with the broadcast address 255.255.255.255
))
# IPv6: only global unicast (2000::/3) is public, less these; what carries an IPv4
# address is judged by that address (see address_refusal).
_DENIED_V6 = _networks((
    ("2001::/23", "IETF protocol assignments (Teredo, benchmarking, ORCHID)"),
    ("2001:db8::/32", "documentation"),
    ("3fff::/20", "documentation"),
))
_DENIED_V6_OUTSIDE = _networks((
    ("::/128", "unspecified"),
    ("::1/128", "loopback"),
    ("64:ff9b:1::/48", "local-use NAT64"),
    ("100::/64", "discard-only"),
    ("fc00::/7", "unique local (ULA)"),
    ("fe80::/10", "link-local"),
    ("fec0::/10", "site-local (deprecated)"),
    ("ff00::/8", "multicast"),
))
_GLOBAL_UNICAST_V6 = ipaddress.IPv6Network("2000::/3")
_COMPATIBLE_V6 = ipaddress.IPv6Network("::/96")
_NAT64_V6 = ipaddress.IPv6Network("64:ff9b::/96")


def _allowed(address: IpAddress, allowed: Sequence[IpNetwork]) -> bool:
    return any(address.version == network.version and address in network
               for network in allowed)


def address_refusal(address: IpAddress, allowed: Sequence[IpNetwork] = ()) -> str | None:
    """Why the server may not connect to ``address`` (e.g. "loopback"), or None if it
    may: a public address, or one in an ``allowed`` network (endpoint_allow_ips)."""
    if _allowed(address, allowed):
        return None
    if isinstance(address, ipaddress.IPv4Address):
        for network, why in _DENIED_V4:
            if address in network:
                return why
        return None
    embedded = _embedded_v4(address)
    if embedded is not None:
        form, inner = embedded
        inner_refusal = address_refusal(inner, allowed)
        return None if inner_refusal is None else f"{inner_refusal} ({form})"
    if address in _COMPATIBLE_V6:
        for network, why in _DENIED_V6_OUTSIDE[:2]:
            if address in network:
                return why
        return "IPv4-compatible (deprecated)"
    if address not in _GLOBAL_UNICAST_V6:
        for network, why in _DENIED_V6_OUTSIDE:
            if address in network:
                return why
        return "reserved"
    for network, why in _DENIED_V6:
        if address in network:
            return why
    return None


def _embedded_v4(address: ipaddress.IPv6Address) -> tuple[str, ipaddress.IPv4Address] | None:
    """The IPv4 address that the connection would reach in the end, for the forms that
    carry one: mapped (the socket connects to it itself), NAT64 and 6to4 (a gateway or
    relay forwards to it)."""
    if address.ipv4_mapped is not None:
        return "IPv4-mapped", address.ipv4_mapped
    if address in _NAT64_V6:
        return "NAT64", ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    if address.sixtofour is not None:
        return "6to4", address.sixtofour
    return None


# ------------------------------------------------------------------------- URLs

@dataclass(frozen=True, slots=True)
class Target:
    """Where a URL goes: its host (lower case, without brackets or a final dot), port, and
    the address if the host is one."""

    host: str
    port: int
    address: IpAddress | None


_LABEL = re.compile(r"(?!-)[a-z0-9_-]{1,63}(?<!-)")
_LEGACY_V4 = re.compile(r"[0-9a-fx.]+")  # 0x7f.1, 2130706433, 017700000001: inet_aton's


def parse_url(url: str) -> Target:
    """The target of an https URL a user gave; UrlRefused if it is none (another scheme,
    user information, no valid host name or address, a bad port)."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:  # an unbalanced bracket, a port out of range
        raise UrlRefused("it is not a valid URL") from None
    if port == 0:
        raise UrlRefused("it is not a valid URL (port 0)")
    if parts.scheme.lower() != "https":
        raise UrlRefused("only https URLs are allowed")
    if "@" in parts.netloc:
        raise UrlRefused("a URL with user information (user:password@) is not allowed")
    host = (parts.hostname or "").rstrip(".")
    if not host:
        raise UrlRefused("the URL has no host")
    address = _literal(host, bracketed=parts.netloc.startswith("["))
    if address is None and not _is_name(host):
        raise UrlRefused("the URL's host is not a valid host name")
    return Target(host, port or 443, address)


def _literal(host: str, bracketed: bool) -> IpAddress | None:
    """The address a host is, written as an address (IPv4 in any form the C library's
    parser reads), or None if it is a name."""
    if bracketed:
        if "%" in host:  # a zone: only for link-local addresses, never a push service
            raise UrlRefused("the URL's host is not a valid address")
        try:
            return ipaddress.IPv6Address(host)
        except ValueError:
            raise UrlRefused("the URL's host is not a valid address") from None
    try:
        return ipaddress.IPv4Address(host)
    except ValueError:
        pass
    if _LEGACY_V4.fullmatch(host):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            pass
    return None


def _is_name(host: str) -> bool:
    return host.isascii() and len(host) <= 253 and all(
        _LABEL.fullmatch(label) for label in host.split("."))


def is_localhost(host: str) -> bool:
    """A name that always means this machine (RFC 6761: localhost and *.localhost)."""
    host = host.lower().rstrip(".")
    return host == "localhost" or host.endswith(".localhost")


_LOCALHOST_ADDRESSES = (ipaddress.IPv4Address("127.0.0.1"), ipaddress.IPv6Address("::1"))


def check_url(url: str, allowed: Sequence[IpNetwork] = ()) -> Target:
    """What registration checks of a URL a user gives: parse_url, and a host that is an
    address (or a localhost name, taken as the loopback addresses it must resolve to) may
    be reached. A name is checked when sending (resolved_addresses). UrlRefused if not."""
    target = parse_url(url)
    if target.address is not None:
        why = address_refusal(target.address, allowed)
        if why is not None:
            raise UrlRefused(f"{target.address} is not on the public internet ({why})")
    elif is_localhost(target.host):
        if any(address_refusal(a, allowed) for a in _LOCALHOST_ADDRESSES):
            raise UrlRefused(f"{target.host} is this server itself")
    return target


def resolved_addresses(host: str, addresses: Sequence[IpAddress],
                       allowed: Sequence[IpNetwork] = ()) -> Sequence[IpAddress]:
    """The addresses a host resolved to, if every one of them may be reached (one
    that may not is what a rebinding or split answer would use); UrlRefused if not."""
    if not addresses:
        raise UrlRefused(f"{host} has no address")
    for address in addresses:
        why = address_refusal(address, allowed)
        if why is not None:
            raise UrlRefused(f"{host} resolves to {address}, not on the public internet "
                          f"({why})")
    return addresses


# ------------------------------------------------------------------------- WNS

def channel_domains(backend: Backend) -> tuple[str, ...]:
    """The domains a WNS backend's channel URIs must be on (its channel_domains option)."""
    configured = backend.options.get("channel_domains")
    if isinstance(configured, str):
        configured = [configured]
    if not configured:
        return WNS_CHANNEL_DOMAINS
    return tuple(str(domain).lower().strip(".") for domain in configured)


def under_domains(host: str, domains: Iterable[str]) -> bool:
    """The host is one of the domains or a name under one (on a label boundary)."""
    host = host.lower().rstrip(".")
    return any(host == domain or host.endswith("." + domain) for domain in domains)


def check_channel(url: str, domains: Sequence[str],
                  allowed: Sequence[IpNetwork] | None = None) -> Target:
    """A WNS channel URI: https on a host under one of the domains (the app's bearer
    token goes there), and with allowed (at registration) check_url's rules; without,
    parse_url's (when sending, the HTTP client checks the addresses). UrlRefused if not."""
    try:
        target = parse_url(url) if allowed is None else check_url(url, allowed)
    except UrlRefused as refused:
        raise UrlRefused(f"{refused}; a WNS channel URI is https on {_listed(domains)}") \
            from None
    if not under_domains(target.host, domains):
        raise UrlRefused(f"a WNS channel URI must be https on {_listed(domains)}")
    return target


def _listed(domains: Sequence[str]) -> str:
    return " or ".join(f"a host under {domain}" for domain in domains)
