"""The outbound address policy (pure) and deliveries to a real server on loopback."""

from __future__ import annotations

import ipaddress
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from shared.config import Settings
from shared.outbound import (
    OutboundPolicy,
    OutboundRefused,
    UnresolvableHost,
    address_refusal,
    post_to_vetted_address,
    resolve_host,
)


@pytest.mark.parametrize(("address", "reason"), [
    ("127.0.0.1", "loopback"), ("127.255.0.9", "loopback"), ("::1", "loopback"),
    ("169.254.169.254", "link-local"), ("fe80::1", "link-local"), ("febf::1", "link-local"),
    ("10.0.0.1", "private"), ("172.16.0.1", "private"), ("172.31.255.255", "private"),
    ("192.168.1.1", "private"), ("100.64.0.1", "private"), ("fc00::1", "private"), ("fd12:3456::1", "private"),
    ("0.0.0.0", "unspecified"), ("0.1.2.3", "unspecified"), ("::", "unspecified"),
    ("224.0.0.1", "multicast"), ("239.255.255.250", "multicast"), ("ff02::1", "multicast"),
    ("240.0.0.1", "reserved"), ("255.255.255.255", "reserved"), ("192.0.2.10", "reserved"),
    ("198.18.0.1", "reserved"), ("2001:db8::1", "reserved"), ("100::1", "reserved"), ("::127.0.0.1", "reserved"),
    ("4000::1", "reserved"),
    ("::ffff:127.0.0.1", "IPv4-mapped loopback"), ("::ffff:169.254.169.254", "IPv4-mapped link-local"),
    ("::ffff:10.1.2.3", "IPv4-mapped private"), ("::ffff:0.0.0.0", "IPv4-mapped unspecified"),
    ("64:ff9b::7f00:1", "NAT64 loopback"), ("2002:a00:1::", "6to4 private"),
])
def test_internal_addresses_are_refused_with_their_reason(address: str, reason: str) -> None:
    assert address_refusal(ipaddress.ip_address(address)) == reason


@pytest.mark.parametrize("address", ["93.184.216.34", "8.8.8.8", "172.32.0.1", "2606:4700::1111",
                                     "::ffff:93.184.216.34", "64:ff9b::808:808"])
def test_public_addresses_pass(address: str) -> None:
    assert address_refusal(ipaddress.ip_address(address)) is None


def resolver(table: dict[str, list[str]]):  # type: ignore[no-untyped-def]
    """A fake DNS (pure logic): host -> addresses."""
    def resolve(host: str, _port: int) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
        if host not in table:
            raise UnresolvableHost(f"{host} does not resolve")
        return [ipaddress.ip_address(a) for a in table[host]]
    return resolve


DNS = resolver({"bank.example": ["93.184.216.34"], "split.example": ["93.184.216.34", "10.0.0.5"],
                "metadata.example": ["169.254.169.254"], "internal.example": ["10.20.0.7"],
                "mapped.example": ["::ffff:127.0.0.1"]})


def test_every_address_a_name_resolves_to_must_be_public() -> None:
    policy = OutboundPolicy()
    assert policy.vet("https://bank.example/hooks", DNS).addresses == (ipaddress.ip_address("93.184.216.34"),)
    with pytest.raises(OutboundRefused, match="split.example resolves to 10.0.0.5, which is a private address"):
        policy.vet("https://split.example/hooks", DNS)
    with pytest.raises(OutboundRefused, match="link-local") as caught:
        policy.vet("http://metadata.example/latest/meta-data/", DNS)
    assert caught.value.reason == "link-local"
    with pytest.raises(OutboundRefused, match="IPv4-mapped loopback"):
        policy.vet("http://mapped.example/", DNS)
    for literal in ("http://127.0.0.1:8000/x", "http://[::1]/x", "http://[::ffff:7f00:1]/", "http://0.0.0.0:80/"):
        with pytest.raises(OutboundRefused):
            policy.vet(literal, resolve_host)
    with pytest.raises(UnresolvableHost):
        policy.vet("https://nowhere.example/", DNS)


def test_odd_spellings_of_loopback_are_resolved_then_refused() -> None:
    for url in ("http://2130706433/", "http://0x7f000001/", "http://127.1/", "http://localhost/",
                "http://LOCALHOST./"):
        with pytest.raises(OutboundRefused, match="loopback"):
            OutboundPolicy().vet(url, resolve_host)


def test_the_operator_allow_list_admits_hosts_addresses_and_networks() -> None:
    policy = OutboundPolicy.parse(["internal.example", "127.0.0.1", "10.20.0.0/16", ""])
    assert policy.vet("http://Internal.Example./hook", DNS).host == "internal.example"
    assert policy.vet("http://127.0.0.1:9000/hook", resolve_host)
    assert policy.vet("http://[::ffff:127.0.0.1]:9000/hook", resolve_host)  # the same address, IPv6 form
    with pytest.raises(OutboundRefused, match="loopback"):
        policy.vet("http://127.0.0.2:9000/hook", resolve_host)
    with pytest.raises(OutboundRefused, match="link-local"):
        policy.vet("http://metadata.example/", DNS)
    with pytest.raises(ValueError, match="neither a host name nor a network"):
        OutboundPolicy.parse(["10.0.0.0/40"])


def test_https_is_required_in_production_and_only_http_urls_are_accepted() -> None:
    production = OutboundPolicy.from_settings(Settings(environment="production", secret_key="s" * 32))
    with pytest.raises(OutboundRefused, match="https in production") as caught:
        production.vet("http://bank.example/hooks", DNS)
    assert caught.value.reason == "not-https"
    assert production.vet("https://bank.example/hooks", DNS)
    for url in ("ftp://bank.example/", "file:///etc/passwd", "gopher://127.0.0.1:6379/_", "http:///nohost"):
        with pytest.raises(OutboundRefused):
            OutboundPolicy().vet(url, DNS)
    for port in (0, 65536, 99999):
        with pytest.raises(OutboundRefused, match="not a TCP port") as caught:
            OutboundPolicy().vet(f"http://bank.example:{port}/hooks", DNS)
        assert caught.value.reason == "invalid"


def test_the_allow_list_setting_is_comma_separated_and_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TESSERA_CALLBACK_ALLOWED_HOSTS", "127.0.0.1, 10.0.0.0/8,hooks.internal")
    policy = OutboundPolicy.from_settings(Settings())
    assert policy.allowed_hosts == {"hooks.internal"} and len(policy.allowed_networks) == 2
    monkeypatch.setenv("TESSERA_CALLBACK_ALLOWED_HOSTS", "10.0.0.0/33")
    with pytest.raises(ValueError, match="10.0.0.0/33"):
        Settings()


class _Receiver(BaseHTTPRequestHandler):
    seen: list[tuple[str, str, bytes]] = []  # (server address, Host header, body)
    status = 200

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).seen.append((self.server.server_address[0], self.headers["Host"], body))  # type: ignore[index]
        self.send_response(type(self).status)
        if type(self).status == 302:
            self.send_header("Location", "http://127.0.0.1:9/elsewhere")
        self.end_headers()
        self.wfile.write(b"x" * 100_000)

    def log_message(self, *_args: object) -> None:
        pass


@pytest.fixture
def receiver_on_127_0_0_2() -> Iterator[int]:
    _Receiver.seen, _Receiver.status = [], 200
    server = ThreadingHTTPServer(("127.0.0.2", 0), _Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield int(server.server_address[1])
    server.shutdown()


def test_delivery_connects_to_the_vetted_address_and_keeps_the_host_name(receiver_on_127_0_0_2: int,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    port = receiver_on_127_0_0_2
    lookups: list[str] = []

    def rebinding_dns(host: str, _port: int) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
        lookups.append(host)  # the first answer is vetted and used; a second lookup would get another one
        return [ipaddress.ip_address("127.0.0.2" if len(lookups) == 1 else "169.254.169.254")]

    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")  # a proxy from the environment is not used
    policy = OutboundPolicy.parse(["127.0.0.2"])
    status = post_to_vetted_address(f"http://hooks.bank.test:{port}/cb", content=b"{}", headers={},
                                    timeout_s=5, policy=policy, resolve=rebinding_dns)
    assert status == 200 and lookups == ["hooks.bank.test"]  # resolved once; system DNS never asked
    assert _Receiver.seen == [("127.0.0.2", f"hooks.bank.test:{port}", b"{}")]


def test_delivery_refuses_before_connecting_and_follows_no_redirect(receiver_on_127_0_0_2: int) -> None:
    port = receiver_on_127_0_0_2
    with pytest.raises(OutboundRefused, match="loopback"):
        post_to_vetted_address(f"http://127.0.0.2:{port}/cb", content=b"{}", headers={}, timeout_s=5,
                               policy=OutboundPolicy())
    assert _Receiver.seen == []
    _Receiver.status = 302
    status = post_to_vetted_address(f"http://127.0.0.2:{port}/cb", content=b"{}", headers={}, timeout_s=5,
                                    policy=OutboundPolicy.parse(["127.0.0.2"]))
    assert status == 302 and len(_Receiver.seen) == 1
