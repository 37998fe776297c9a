"""Outbound HTTP to URLs that tenants choose: fraud callbacks now, IIoT and nodule webhooks later.

A tenant's URL must not make a worker reach inside the deployment (SSRF). Every address its host
resolves to must be public: not loopback, link-local (cloud metadata lives at 169.254.169.254),
private, unspecified, multicast or reserved, in IPv4 or in IPv6 form (IPv4-mapped, NAT64 and 6to4
addresses are judged by the IPv4 address they carry), unless the operator allow-lists the host
name, the address or its network (``TESSERA_CALLBACK_ALLOWED_HOSTS``). ``https`` is required when
``TESSERA_ENVIRONMENT=production``.

The check runs when a URL is saved (:meth:`OutboundPolicy.vet`) and again at each delivery
(:func:`post_to_vetted_address`), which connects to the very address it checked, so a DNS answer
that changes in between (rebinding) cannot redirect it; the URL's host name stays in the Host
header and in TLS (SNI and the certificate check). Redirects are not followed and no proxy is taken
from the environment.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import httpx

from shared.config import Settings, get_settings

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolver = Callable[[str, int], list[IPAddress]]

_NOT_PUBLIC: tuple[tuple[IPNetwork, str], ...] = tuple(
    (ipaddress.ip_network(network), reason) for network, reason in (
        ("0.0.0.0/8", "unspecified"),  # "this network"; 0.0.0.0 reaches the local host on Linux
        ("10.0.0.0/8", "private"),
        ("100.64.0.0/10", "private"),  # shared address space (carrier-grade NAT)
        ("127.0.0.0/8", "loopback"),
        ("169.254.0.0/16", "link-local"),
        ("172.16.0.0/12", "private"),
        ("192.0.0.0/24", "reserved"),
        ("192.0.2.0/24", "reserved"),  # documentation, as are the two /24 below
        ("192.88.99.0/24", "reserved"),
        ("192.168.0.0/16", "private"),
        ("198.18.0.0/15", "reserved"),  # benchmarking
        ("198.51.100.0/24", "reserved"),
        ("203.0.113.0/24", "reserved"),
        ("224.0.0.0/4", "multicast"),
        ("240.0.0.0/4", "reserved"),  # and 255.255.255.255, broadcast
        ("::/128", "unspecified"),
        ("::1/128", "loopback"),
        ("::/96", "reserved"),  # IPv4-compatible, deprecated
        ("64:ff9b:1::/48", "private"),  # local-use NAT64
        ("100::/64", "reserved"),  # discard-only
        ("2001::/23", "reserved"),  # IETF protocol assignments (Teredo, ORCHID, ...)
        ("2001:db8::/32", "reserved"),  # documentation
        ("fc00::/7", "private"),  # unique local
        ("fe80::/10", "link-local"),
        ("fec0::/10", "private"),  # site-local, deprecated
        ("ff00::/8", "multicast"),
    )
)
_IPV6_GLOBAL_UNICAST = ipaddress.IPv6Network("2000::/3")
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


class OutboundRefused(ValueError):
    """A URL the outbound policy refuses; retrying will not help. ``reason``: e.g. ``loopback``."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class UnresolvableHost(OSError):
    """The URL's host name has no address right now (DNS may recover: worth a retry at delivery)."""


def address_refusal(address: IPAddress) -> str | None:
    """Why ``address`` is not a public one (``loopback``, ``private``, ``link-local``,
    ``unspecified``, ``multicast``, ``reserved``, or e.g. ``IPv4-mapped loopback``), or None."""
    embedded = _embedded_ipv4(address)
    if embedded is not None:
        form, inner = embedded
        reason = address_refusal(inner)
        return f"{form} {reason}" if reason else None
    for network, reason in _NOT_PUBLIC:
        if address.version == network.version and address in network:
            return reason
    if address.version == 6 and address not in _IPV6_GLOBAL_UNICAST:
        return "reserved"
    return None if address.is_global else "reserved"


def _embedded_ipv4(address: IPAddress) -> tuple[str, ipaddress.IPv4Address] | None:
    """The IPv4 address an IPv6 one stands for (IPv4-mapped, NAT64, 6to4), with the form's name."""
    if not isinstance(address, ipaddress.IPv6Address):
        return None
    if address.ipv4_mapped is not None:
        return "IPv4-mapped", address.ipv4_mapped
    if address in _NAT64:
        return "NAT64", ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    if address.sixtofour is not None:
        return "6to4", address.sixtofour
    return None


def resolve_host(host: str, port: int) -> list[IPAddress]:
    """Every address ``host`` resolves to (an IP literal: itself), in the resolver's order."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise UnresolvableHost(f"{host} does not resolve: {exc}") from exc
    addresses: list[IPAddress] = []
    for *_, sockaddr in infos:
        address = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])  # drop an IPv6 zone
        if address not in addresses:
            addresses.append(address)
    if not addresses:
        raise UnresolvableHost(f"{host} has no address")
    return addresses


@dataclass(frozen=True, slots=True)
class VettedTarget:
    """A URL whose every address was found allowed; deliveries connect to ``addresses`` only."""

    url: httpx.URL
    host: str
    port: int
    addresses: tuple[IPAddress, ...]


@dataclass(frozen=True, slots=True)
class OutboundPolicy:
    """Which destinations tenant-chosen URLs may reach (public addresses, plus the allow-list)."""

    allowed_hosts: frozenset[str] = frozenset()
    allowed_networks: tuple[IPNetwork, ...] = ()
    require_https: bool = False

    @classmethod
    def parse(cls, entries: Iterable[str], *, require_https: bool = False) -> OutboundPolicy:
        """From allow-list entries: host names, IP addresses or CIDR networks (``10.0.0.0/8``)."""
        hosts: set[str] = set()
        networks: list[IPNetwork] = []
        for entry in (e.strip() for e in entries):
            if not entry:
                continue
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                if "/" in entry or ":" in entry:
                    raise ValueError(f"allow-list entry {entry!r} is neither a host name nor a network") from None
                hosts.add(_normal_host(entry))
        return cls(frozenset(hosts), tuple(networks), require_https)

    @classmethod
    def from_settings(cls, settings: Settings | None = None) -> OutboundPolicy:
        """The deployment's policy: ``TESSERA_CALLBACK_ALLOWED_HOSTS``; https in production."""
        settings = settings or get_settings()
        return cls.parse(settings.callback_allowed_hosts, require_https=settings.environment == "production")

    def allows(self, host: str, address: IPAddress) -> bool:
        """True when ``host`` or ``address`` is allow-listed, or ``address`` is public."""
        if _normal_host(host) in self.allowed_hosts or self._allow_listed(address):
            return True
        embedded = _embedded_ipv4(address)
        if embedded is not None and self._allow_listed(embedded[1]):
            return True
        return address_refusal(address) is None

    def _allow_listed(self, address: IPAddress) -> bool:
        return any(address.version == network.version and address in network for network in self.allowed_networks)

    def vet(self, url: str, resolve: Resolver = resolve_host) -> VettedTarget:
        """Check ``url`` and every address its host resolves to now.

        Raises :class:`OutboundRefused` (a wrong scheme, no host, a refused address) or
        :class:`UnresolvableHost`.
        """
        parsed = self._parsed(url)
        host, port = _normal_host(parsed.host), parsed.port or (443 if parsed.scheme == "https" else 80)
        addresses = resolve(host, port)
        for address in addresses:
            if not self.allows(host, address):
                reason = address_refusal(address) or "refused"
                shown = host if host == str(address) else f"{host} resolves to {address}, which"
                raise OutboundRefused(f"{shown} is a {reason} address; callbacks go to public addresses only "
                                      "unless the operator allow-lists them (TESSERA_CALLBACK_ALLOWED_HOSTS)",
                                      reason)
        return VettedTarget(parsed, host, port, tuple(addresses))

    def _parsed(self, url: str) -> httpx.URL:
        try:
            parsed = httpx.URL(url)
        except httpx.InvalidURL as exc:
            raise OutboundRefused(f"not a valid URL: {exc}", "invalid") from None
        if parsed.scheme not in ("http", "https") or not _normal_host(parsed.host):
            raise OutboundRefused("the URL must be http(s)://host/...", "invalid")
        if parsed.port is not None and not 1 <= parsed.port <= 65535:
            raise OutboundRefused(f"port {parsed.port} is not a TCP port (1-65535)", "invalid")
        if self.require_https and parsed.scheme != "https":
            raise OutboundRefused("the URL must use https in production", "not-https")
        return parsed


def _normal_host(host: str) -> str:
    return host.strip().rstrip(".").lower()


def post_to_vetted_address(url: str, *, content: bytes, headers: Mapping[str, str], timeout_s: float,
                           policy: OutboundPolicy | None = None, resolve: Resolver = resolve_host) -> int:
    """POST ``content`` to ``url`` after vetting it now; returns the status code (the body is not read).

    Connects only to an address just vetted (the next one if a connection is refused), with the
    URL's host name in the Host header and TLS; no redirect is followed, no proxy used.
    Raises :class:`OutboundRefused`, :class:`UnresolvableHost` or ``httpx.HTTPError``.
    """
    target = (policy or OutboundPolicy.from_settings()).vet(url, resolve)
    extensions = {} if _is_ip_literal(target.host) or target.url.scheme != "https" else {"sni_hostname": target.host}
    request_headers = {**headers, "Host": target.url.netloc.decode("ascii")}
    with httpx.Client(trust_env=False, follow_redirects=False, timeout=timeout_s) as client:
        for attempt, address in enumerate(target.addresses, start=1):
            request = client.build_request("POST", target.url.copy_with(host=str(address)), content=content,
                                           headers=request_headers, extensions=extensions)
            try:
                response = client.send(request, stream=True)
            except httpx.ConnectError:
                if attempt == len(target.addresses):
                    raise
                continue
            response.close()
            return response.status_code
    raise AssertionError("unreachable: a target has at least one address")


def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
