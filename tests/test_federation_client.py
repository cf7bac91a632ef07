"""Outbound federation: server-name parsing/resolution, the SSRF-safe client, OpenID exchange.

Everything network-related uses real TLS sockets on 127.0.0.1 only (a tiny HTTPS server in a
background thread with trustme certificates); there is no other network.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import ssl
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any, cast
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
import trustme

from sydent_lite.config import FederationConfig
from sydent_lite.federation.client import FederationClient, FederationError, OutboundPolicyError
from sydent_lite.federation.openid import OpenIdError, exchange_openid_token
from sydent_lite.federation.resolver import (
    ResolvedServer,
    parse_server_name,
    resolve_server_name,
)

# ---------------------------------------------------------------------------------------------
# Helpers: a minimal HTTPS/1.1 server on loopback


@dataclass
class Seen:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]


@dataclass
class HttpsServer:
    port: int = 0
    requests: list[Seen] = field(default_factory=list)
    connections: int = 0
    snis: list[str | None] = field(default_factory=list)
    loop: asyncio.AbstractEventLoop | None = None
    server: asyncio.Server | None = None

    @property
    def paths(self) -> list[str]:
        return [r.path for r in self.requests]


def _route(srv: HttpsServer, seen: Seen) -> tuple[int, dict[str, str], bytes, bool]:
    """(status, headers, body, send_content_length) for a request."""

    def js(status: int, obj: object) -> tuple[int, dict[str, str], bytes, bool]:
        return status, {"Content-Type": "application/json"}, json.dumps(obj).encode(), True

    if seen.path == "/json":
        return js(200, {"ok": True})
    if seen.path == "/text":
        return 200, {"Content-Type": "text/plain"}, b"hello, not json", True
    if seen.path == "/big":  # no Content-Length: the client must count while streaming
        return 200, {}, b"x" * 50_000, False
    if seen.path == "/big-declared":
        return 200, {}, b"x" * 50_000, True
    if seen.path == "/redirect":
        return 302, {"Location": "/json"}, b"", True
    if seen.path == "/.well-known/matrix/server":
        return js(200, {"m.server": f"localhost:{srv.port}"})
    if seen.path == "/_matrix/federation/v1/openid/userinfo":
        token = seen.query.get("access_token", [""])[0]
        answers = {
            "good": {"sub": f"@alice:127.0.0.1:{srv.port}"},
            "good-localhost": {"sub": f"@alice:localhost:{srv.port}"},
            "wrong-server": {"sub": "@alice:evil.example"},
            "no-sub": {"user": "@alice:127.0.0.1"},
            "bad-sub": {"sub": "alice"},
        }
        if token in answers:
            return js(200, answers[token])
        return js(401, {"errcode": "M_UNKNOWN_TOKEN", "error": "Access token unknown"})
    return js(404, {"errcode": "M_NOT_FOUND"})


async def _handle(srv: HttpsServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    srv.connections += 1
    try:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        method, target, _ = lines[0].split(" ", 2)
        headers = {}
        for line in lines[1:]:
            if line:
                k, v = line.split(":", 1)
                headers[k.strip().lower()] = v.strip()
        if int(headers.get("content-length", "0")):
            await reader.readexactly(int(headers["content-length"]))
        parts = urlsplit(target)
        seen = Seen(method, parts.path, parse_qs(parts.query), headers)
        srv.requests.append(seen)
        if seen.path == "/slow":
            await asyncio.sleep(3)
        status, extra, body, with_length = _route(srv, seen)
        out = [f"HTTP/1.1 {status} X", "Connection: close"]
        out += [f"{k}: {v}" for k, v in extra.items()]
        if with_length:
            out.append(f"Content-Length: {len(body)}")
        writer.write(("\r\n".join(out) + "\r\n\r\n").encode() + body)
        await writer.drain()
    except Exception:
        pass  # client went away (timeouts, aborted large bodies, failed handshakes)
    finally:
        writer.close()


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def ca_file(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


def _serve(cert: trustme.LeafCert, handle: Any = None) -> Iterator[HttpsServer]:
    srv = HttpsServer()
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(ctx)
    ctx.sni_callback = lambda sslobj, name, _ctx: srv.snis.append(name)
    ready = threading.Event()

    def run() -> None:
        loop = asyncio.new_event_loop()
        srv.loop = loop

        async def start() -> None:
            serve = handle or _handle
            srv.server = await asyncio.start_server(lambda r, w: serve(srv, r, w), "127.0.0.1", 0, ssl=ctx)
            srv.port = srv.server.sockets[0].getsockname()[1]
            ready.set()

        loop.run_until_complete(start())
        loop.run_forever()
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert ready.wait(10)
    yield srv
    assert srv.loop is not None and srv.server is not None
    srv.loop.call_soon_threadsafe(srv.server.close)
    srv.loop.call_soon_threadsafe(srv.loop.stop)
    thread.join(10)


@pytest.fixture(scope="module")
def server_module(ca: trustme.CA) -> Iterator[HttpsServer]:
    # Certificate valid for both the IP literal and "localhost".
    yield from _serve(ca.issue_cert("127.0.0.1", "localhost"))


@pytest.fixture(scope="module")
def localhost_only_module(ca: trustme.CA) -> Iterator[HttpsServer]:
    yield from _serve(ca.issue_cert("localhost"))


@pytest.fixture
def server(server_module: HttpsServer) -> HttpsServer:
    server_module.requests.clear()
    server_module.snis.clear()
    server_module.connections = 0
    return server_module


@pytest.fixture
def localhost_only(localhost_only_module: HttpsServer) -> HttpsServer:
    localhost_only_module.requests.clear()
    localhost_only_module.snis.clear()
    return localhost_only_module


def loopback_config(**kwargs: object) -> FederationConfig:
    """Default policy (blocklist on) plus an allow-list exception for 127.0.0.1."""
    kwargs.setdefault("ip_allowlist", ["127.0.0.1/32"])
    return FederationConfig(**kwargs)  # type: ignore[arg-type]


async def resolve_to_loopback(host: str) -> list[str]:
    return ["127.0.0.1"]


async def no_srv(qname: str) -> list[tuple[str, int]]:
    return []


def forbid_network(monkeypatch: pytest.MonkeyPatch) -> None:
    async def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("a connection was attempted")

    monkeypatch.setattr(httpx.AsyncClient, "send", fail)


# ---------------------------------------------------------------------------------------------
# parse_server_name


@pytest.mark.parametrize(
    "name, expected",
    [
        ("matrix.org", ("matrix.org", None)),
        ("matrix.org:8888", ("matrix.org", 8888)),
        ("localhost", ("localhost", None)),
        ("1.2.3.4", ("1.2.3.4", None)),
        ("1.2.3.4:1234", ("1.2.3.4", 1234)),
        ("[1234:5678::abcd]", ("1234:5678::abcd", None)),
        ("[1234:5678::abcd]:5678", ("1234:5678::abcd", 5678)),
        ("[::ffff:1.2.3.4]:1", ("::ffff:1.2.3.4", 1)),
        ("MATRIX.org:65535", ("MATRIX.org", 65535)),
        ("a" * 255, ("a" * 255, None)),
    ],
)
def test_parse_server_name_valid(name: str, expected: tuple[str, int | None]) -> None:
    assert parse_server_name(name) == expected


@pytest.mark.parametrize(
    "name",
    [
        "",
        ":8448",
        "matrix.org:",
        "matrix.org:0",
        "matrix.org:65536",
        "matrix.org:123456",
        "matrix.org:+80",
        "matrix.org:８０",  # noqa: RUF001 - fullwidth digits are the point
        "matrix.org:80\n",
        "matrix.org\n",
        "ex ample.org",
        "exa_mple.org",
        "ex@mple.org",
        "é.org",
        "matrix.org/path",
        "::1",
        "[::1",
        "[::1]x",
        "[::1]:",
        "[zz::1]",
        "[1.2.3.4]",
        "1.2.3.256",
        "01.2.3.4",
        "a" * 256,
        "a" * 251 + ":8448",
    ],
)
def test_parse_server_name_invalid(name: str) -> None:
    with pytest.raises(ValueError):
        parse_server_name(name)


# ---------------------------------------------------------------------------------------------
# resolve_server_name with injected .well-known and SRV


class FakeDns:
    def __init__(self, well_known: dict[str, Any] | None = None, srv: dict[str, Any] | None = None) -> None:
        self.well_known = well_known or {}
        self.srv = srv or {}
        self.calls: list[str] = []

    async def fetch_well_known(self, host: str) -> dict[str, Any] | None:
        self.calls.append(f"wk:{host}")
        return self.well_known.get(host)

    async def srv_lookup(self, qname: str) -> list[tuple[str, int]]:
        self.calls.append(f"srv:{qname}")
        return cast("list[tuple[str, int]]", self.srv.get(qname, []))

    async def resolve(self, name: str) -> ResolvedServer:
        return await resolve_server_name(name, fetch_well_known=self.fetch_well_known, srv_lookup=self.srv_lookup)


async def test_resolve_ip_literals() -> None:
    dns = FakeDns()
    assert await dns.resolve("1.2.3.4") == ResolvedServer("1.2.3.4", 8448, "1.2.3.4", "1.2.3.4")
    assert await dns.resolve("1.2.3.4:99") == ResolvedServer("1.2.3.4", 99, "1.2.3.4", "1.2.3.4:99")
    assert await dns.resolve("[::1]:8443") == ResolvedServer("::1", 8443, "::1", "[::1]:8443")
    assert await dns.resolve("[::1]") == ResolvedServer("::1", 8448, "::1", "[::1]")
    assert dns.calls == []  # no .well-known, no SRV for IP literals


async def test_resolve_hostname_with_port_is_direct() -> None:
    dns = FakeDns(well_known={"example.org": {"m.server": "other.example"}})
    assert await dns.resolve("example.org:8443") == ResolvedServer(
        "example.org", 8443, "example.org", "example.org:8443"
    )
    assert dns.calls == []


async def test_resolve_well_known_ip_literal() -> None:
    dns = FakeDns(well_known={"example.org": {"m.server": "5.6.7.8:9000"}})
    assert await dns.resolve("example.org") == ResolvedServer("5.6.7.8", 9000, "5.6.7.8", "5.6.7.8:9000")
    dns = FakeDns(well_known={"example.org": {"m.server": "[2001:db8::1]"}})
    assert await dns.resolve("example.org") == ResolvedServer("2001:db8::1", 8448, "2001:db8::1", "[2001:db8::1]")
    assert dns.calls == ["wk:example.org"]


async def test_resolve_well_known_hostname_with_port() -> None:
    dns = FakeDns(well_known={"example.org": {"m.server": "deleg.example:1234"}})
    assert await dns.resolve("example.org") == ResolvedServer(
        "deleg.example", 1234, "deleg.example", "deleg.example:1234"
    )
    assert dns.calls == ["wk:example.org"]


async def test_resolve_well_known_then_matrix_fed_srv() -> None:
    dns = FakeDns(
        well_known={"example.org": {"m.server": "deleg.example"}},
        srv={
            "_matrix-fed._tcp.deleg.example": [("fed.target", 8450), ("second", 1)],
            "_matrix._tcp.deleg.example": [("legacy.target", 1)],
        },
    )
    # Connect to the SRV target; certificate and Host are the delegated name.
    assert await dns.resolve("example.org") == ResolvedServer("fed.target", 8450, "deleg.example", "deleg.example")
    assert dns.calls == ["wk:example.org", "srv:_matrix-fed._tcp.deleg.example"]


async def test_resolve_well_known_then_legacy_srv() -> None:
    dns = FakeDns(
        well_known={"example.org": {"m.server": "deleg.example"}},
        srv={"_matrix._tcp.deleg.example": [("legacy.target", 8451)]},
    )
    assert await dns.resolve("example.org") == ResolvedServer("legacy.target", 8451, "deleg.example", "deleg.example")
    assert dns.calls == [
        "wk:example.org",
        "srv:_matrix-fed._tcp.deleg.example",
        "srv:_matrix._tcp.deleg.example",
    ]


async def test_resolve_well_known_without_srv() -> None:
    dns = FakeDns(well_known={"example.org": {"m.server": "deleg.example"}})
    assert await dns.resolve("example.org") == ResolvedServer("deleg.example", 8448, "deleg.example", "deleg.example")


async def test_resolve_no_well_known_matrix_fed_srv() -> None:
    dns = FakeDns(srv={"_matrix-fed._tcp.example.org": [("fed.target", 443)]})
    # SRV delegation: the target must prove it serves <hostname> via TLS.
    assert await dns.resolve("example.org") == ResolvedServer("fed.target", 443, "example.org", "example.org")
    assert dns.calls == ["wk:example.org", "srv:_matrix-fed._tcp.example.org"]


async def test_resolve_no_well_known_legacy_srv() -> None:
    dns = FakeDns(srv={"_matrix._tcp.example.org": [("legacy.target", 8449)]})
    assert await dns.resolve("example.org") == ResolvedServer("legacy.target", 8449, "example.org", "example.org")


async def test_resolve_fallback_8448() -> None:
    dns = FakeDns()
    assert await dns.resolve("example.org") == ResolvedServer("example.org", 8448, "example.org", "example.org")
    assert dns.calls == [
        "wk:example.org",
        "srv:_matrix-fed._tcp.example.org",
        "srv:_matrix._tcp.example.org",
    ]


@pytest.mark.parametrize("body", [{"m.server": 42}, {"m.server": "bad name!"}, {"other": "x"}, {"m.server": ""}])
async def test_resolve_invalid_well_known_skips_to_srv(body: dict[str, Any]) -> None:
    dns = FakeDns(
        well_known={"example.org": body},
        srv={"_matrix-fed._tcp.example.org": [("fed.target", 443)]},
    )
    assert await dns.resolve("example.org") == ResolvedServer("fed.target", 443, "example.org", "example.org")


async def test_resolve_invalid_name_raises() -> None:
    dns = FakeDns()
    with pytest.raises(ValueError):
        await dns.resolve("bad name")
    assert dns.calls == []


# ---------------------------------------------------------------------------------------------
# FederationClient: IP policy


async def test_blocklist_refuses_loopback_without_connecting(server: HttpsServer) -> None:
    client = FederationClient(FederationConfig(verify_tls=False))
    try:
        with pytest.raises(OutboundPolicyError):
            await client.request_json("GET", f"127.0.0.1:{server.port}", "/json")
        # "127.1" is a valid DNS name per the grammar, but the OS reads it as 127.0.0.1.
        with pytest.raises(OutboundPolicyError):
            await client.request_json("GET", f"127.1:{server.port}", "/json")
    finally:
        await client.aclose()
    assert server.connections == 0


async def test_blocklist_checks_resolved_addresses(monkeypatch: pytest.MonkeyPatch) -> None:
    forbid_network(monkeypatch)
    asked: list[str] = []

    async def resolve(host: str) -> list[str]:
        asked.append(host)
        return {"evil.example": ["10.1.2.3"], "mixed.example": ["8.8.8.8", "10.1.2.3"]}[host]

    client = FederationClient(FederationConfig(), resolve_host=resolve, srv_lookup=no_srv)
    try:
        with pytest.raises(OutboundPolicyError):
            await client.request_json("GET", "evil.example:8448", "/json")
        # Every address counts, not just the first.
        with pytest.raises(OutboundPolicyError):
            await client.request_json("GET", "mixed.example:8448", "/json")
    finally:
        await client.aclose()
    assert asked == ["evil.example", "mixed.example"]


async def test_ipv4_mapped_ipv6_is_checked_as_ipv4(monkeypatch: pytest.MonkeyPatch) -> None:
    forbid_network(monkeypatch)

    async def resolve(host: str) -> list[str]:
        return ["::ffff:127.0.0.1"]

    # Blocklist without the ::ffff:0:0/96 range: the mapped address must still be refused.
    client = FederationClient(FederationConfig(ip_blocklist=["127.0.0.0/8"]), resolve_host=resolve)
    try:
        with pytest.raises(OutboundPolicyError):
            await client.request_json("GET", "sneaky.example:8448", "/json")
        with pytest.raises(OutboundPolicyError):
            await client.request_json("GET", "[::ffff:7f00:1]:8448", "/json")
    finally:
        await client.aclose()


# IPv6 ranges the default block-list must refuse: each leads to an IPv4 address (which may be
# internal) or to no public host at all.
@pytest.mark.parametrize(
    "address",
    [
        "::7f00:1",  # IPv4-compatible ::127.0.0.1
        "::808:808",  # IPv4-compatible, even of a public IPv4 address (deprecated, never routed)
        "2002:7f00:1::1",  # 6to4 of 127.0.0.1
        "2002:808:808::1",  # 6to4 of 8.8.8.8: reached through whatever relay is nearest
        "fec0::1",  # site-local (deprecated)
        "64:ff9b:1::a00:1",  # local-use NAT64 (RFC 8215)
        "2001:20::1",  # ORCHIDv2
        "3fff::1",  # documentation (RFC 9637)
        "5f00::1",  # SRv6 SIDs
        "100:0:0:1::1",  # dummy prefix
        "::ffff:0:a00:1",  # IPv4-translated (RFC 2765)
    ],
)
async def test_default_blocklist_refuses_ipv6_ranges_that_lead_elsewhere(
    monkeypatch: pytest.MonkeyPatch, address: str
) -> None:
    forbid_network(monkeypatch)

    async def resolve(host: str) -> list[str]:
        return [address]

    client = FederationClient(FederationConfig(), resolve_host=resolve, srv_lookup=no_srv)
    try:
        with pytest.raises(OutboundPolicyError):
            await client.request_json("GET", "sneaky.example:8448", "/json")
        with pytest.raises(OutboundPolicyError):
            await client.request_json("GET", f"[{address}]:8448", "/json")
    finally:
        await client.aclose()


def teredo(server: str, client: str) -> str:
    """A Teredo address (2001::/32) for a server and a client IPv4 address (RFC 4380)."""
    obfuscated_client = ~int(ipaddress.IPv4Address(client)) & 0xFFFFFFFF
    value = (0x20010000 << 96) | (int(ipaddress.IPv4Address(server)) << 64) | obfuscated_client
    return str(ipaddress.IPv6Address(value))


@pytest.mark.parametrize(
    "address",
    [
        "2002:7f00:1::1",  # 6to4 of 127.0.0.1
        "2002:a9fe:a9fe::",  # 6to4 of 169.254.169.254 (cloud metadata)
        "::a00:1",  # IPv4-compatible 10.0.0.1
        "64:ff9b::a9fe:a9fe",  # NAT64 of 169.254.169.254
        "64:ff9b::c0a8:101",  # NAT64 of 192.168.1.1
        teredo("8.8.8.8", "10.0.0.1"),
    ],
)
async def test_allow_listed_ipv6_is_judged_by_the_ipv4_inside(monkeypatch: pytest.MonkeyPatch, address: str) -> None:
    # An operator on a NAT64 network must allow-list 64:ff9b::/96; one may allow 6to4 or
    # Teredo too. That must not open the way to the IPv4 addresses the block-list refuses.
    forbid_network(monkeypatch)

    async def resolve(host: str) -> list[str]:
        return [address]

    allow = ["2002::/16", "::/96", "64:ff9b::/96", "2001::/32"]
    client = FederationClient(FederationConfig(ip_allowlist=allow), resolve_host=resolve, srv_lookup=no_srv)
    try:
        with pytest.raises(OutboundPolicyError):
            await client.request_json("GET", "sneaky.example:8448", "/json")
        with pytest.raises(OutboundPolicyError):
            await client.request_json("GET", f"[{address}]:8448", "/json")
    finally:
        await client.aclose()


@pytest.mark.parametrize("address", ["2002:808:808::1", "64:ff9b::808:808", teredo("8.8.4.4", "8.8.8.8")])
async def test_allow_listed_ipv6_with_a_public_ipv4_inside_is_allowed(
    monkeypatch: pytest.MonkeyPatch, address: str
) -> None:
    forbid_network(monkeypatch)  # getting as far as connecting is what "allowed" means here
    allow = ["2002::/16", "64:ff9b::/96", "2001::/32"]
    client = FederationClient(FederationConfig(ip_allowlist=allow), srv_lookup=no_srv)
    try:
        with pytest.raises(AssertionError, match="a connection was attempted"):
            await client.request_json("GET", f"[{address}]:8448", "/json")
    finally:
        await client.aclose()


async def test_allowlist_exception(server: HttpsServer, ca_file: str) -> None:
    client = FederationClient(loopback_config(ca_file=ca_file))
    try:
        status, body = await client.request_json("POST", f"127.0.0.1:{server.port}", "/json", json_body={"a": 1})
    finally:
        await client.aclose()
    assert (status, body) == (200, {"ok": True})
    (seen,) = server.requests
    assert seen.method == "POST"
    assert seen.headers["host"] == f"127.0.0.1:{server.port}"


# ---------------------------------------------------------------------------------------------
# FederationClient: TLS


async def test_tls_verified_against_original_name(localhost_only: HttpsServer, ca_file: str) -> None:
    # Connect to 127.0.0.1 but verify the certificate (and send SNI) for "localhost".
    client = FederationClient(loopback_config(ca_file=ca_file), resolve_host=resolve_to_loopback)
    try:
        name = f"localhost:{localhost_only.port}"
        status, body = await client.request_json("GET", name, "/json")
        assert (status, body) == (200, {"ok": True})
        assert localhost_only.snis == ["localhost"]
        assert localhost_only.requests[0].headers["host"] == f"localhost:{localhost_only.port}"
        # Same server, reached by IP literal: its certificate does not cover the IP.
        with pytest.raises(FederationError):
            await client.request_json("GET", f"127.0.0.1:{localhost_only.port}", "/json")
    finally:
        await client.aclose()


async def test_tls_fails_without_ca_file(server: HttpsServer) -> None:
    client = FederationClient(loopback_config())
    try:
        with pytest.raises(FederationError):
            await client.request_json("GET", f"127.0.0.1:{server.port}", "/json")
    finally:
        await client.aclose()
    assert server.requests == []


async def test_verify_tls_false(localhost_only: HttpsServer) -> None:
    client = FederationClient(loopback_config(verify_tls=False))
    try:
        name = f"127.0.0.1:{localhost_only.port}"
        status, body = await client.request_json("GET", name, "/json")
    finally:
        await client.aclose()
    assert (status, body) == (200, {"ok": True})


# ---------------------------------------------------------------------------------------------
# FederationClient: responses


@pytest.fixture
async def fed(ca_file: str) -> AsyncIterator[FederationClient]:
    client = FederationClient(
        loopback_config(ca_file=ca_file, max_response_bytes=10_000, timeout_seconds=1.0),
        resolve_host=resolve_to_loopback,
        srv_lookup=no_srv,
    )
    yield client
    await client.aclose()


@pytest.mark.parametrize("path", ["/big", "/big-declared"])
async def test_response_too_large(server: HttpsServer, fed: FederationClient, path: str) -> None:
    with pytest.raises(FederationError, match="too large"):
        await fed.request_json("GET", f"127.0.0.1:{server.port}", path)


async def test_redirect_not_followed(server: HttpsServer, fed: FederationClient) -> None:
    status, body = await fed.request_json("GET", f"127.0.0.1:{server.port}", "/redirect")
    assert (status, body) == (302, None)
    assert server.paths == ["/redirect"]


async def test_not_json_and_errors(server: HttpsServer, fed: FederationClient) -> None:
    assert await fed.request_json("GET", f"127.0.0.1:{server.port}", "/text") == (200, None)
    status, body = await fed.request_json("GET", f"127.0.0.1:{server.port}", "/nope")
    assert (status, body) == (404, {"errcode": "M_NOT_FOUND"})


async def test_timeout(server: HttpsServer, fed: FederationClient) -> None:
    with pytest.raises(FederationError, match="timed out"):
        await fed.request_json("GET", f"127.0.0.1:{server.port}", "/slow")


async def test_unreachable(fed: FederationClient) -> None:
    with pytest.raises(FederationError):
        await fed.request_json("GET", "127.0.0.1:1", "/json")


async def test_well_known_delegation_end_to_end(server: HttpsServer, fed: FederationClient) -> None:
    fed.WELL_KNOWN_PORT = server.port
    status, body = await fed.request_json("GET", "localhost", "/json")
    assert (status, body) == (200, {"ok": True})
    assert server.paths == ["/.well-known/matrix/server", "/json"]
    assert server.requests[0].headers["host"] == "localhost"
    assert server.requests[1].headers["host"] == f"localhost:{server.port}"
    assert server.snis == ["localhost", "localhost"]


async def test_pools_per_name_are_bounded(
    server: HttpsServer, fed: FederationClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("sydent_lite.federation.client._MAX_POOLS", 1)
    for host in ("127.0.0.1", "localhost", "127.0.0.1"):
        assert (await fed.request_json("GET", f"{host}:{server.port}", "/json"))[0] == 200
    # The idle 127.0.0.1 pool was closed when the cap was exceeded, then recreated.
    assert list(fed._pools) == ["localhost", "127.0.0.1"]


# ---------------------------------------------------------------------------------------------
# OpenID exchange


async def test_openid_success(server: HttpsServer, fed: FederationClient, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    name = f"127.0.0.1:{server.port}"
    assert await exchange_openid_token(fed, name, "good") == f"@alice:{name}"
    (seen,) = server.requests
    assert seen.query == {"access_token": ["good"]}
    assert "access_token=good" not in caplog.text

    name = f"localhost:{server.port}"
    assert await exchange_openid_token(fed, name, "good-localhost") == f"@alice:{name}"


@pytest.mark.parametrize(
    "token, message",
    [
        ("secret-unknown-token", "refused"),
        ("wrong-server", "another server"),
        ("no-sub", "no user ID"),
        ("bad-sub", "invalid user ID"),
    ],
)
async def test_openid_rejections(server: HttpsServer, fed: FederationClient, token: str, message: str) -> None:
    with pytest.raises(OpenIdError, match=message) as info:
        await exchange_openid_token(fed, f"127.0.0.1:{server.port}", token)
    assert token not in str(info.value)


async def test_openid_server_name_must_match_exactly(server: HttpsServer, fed: FederationClient) -> None:
    # The user is @alice:127.0.0.1:<port>; asking "localhost:<port>" must not accept it.
    with pytest.raises(OpenIdError, match="another server"):
        await exchange_openid_token(fed, f"localhost:{server.port}", "good")


async def test_openid_invalid_server_name(monkeypatch: pytest.MonkeyPatch, fed: FederationClient) -> None:
    forbid_network(monkeypatch)
    with pytest.raises(ValueError):
        await exchange_openid_token(fed, "not a server/", "tok")


async def test_openid_unreachable_and_refused(fed: FederationClient) -> None:
    with pytest.raises(OpenIdError, match="could not be reached"):
        await exchange_openid_token(fed, "127.0.0.1:1", "tok")
    with pytest.raises(OpenIdError, match="not allowed"):
        await exchange_openid_token(fed, "10.0.0.1:8448", "tok")


# --- a kept connection the server drops -------------------------------------------------------


async def _keep_then_drop(srv: HttpsServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answers a connection's first request and keeps the connection; drops the second one
    unanswered, as a server does whose idle timeout ends just as the request arrives."""
    srv.connections += 1
    try:
        for n in (1, 2):
            head = await reader.readuntil(b"\r\n\r\n")
            method, target, _ = head.decode("latin-1").split(" ", 2)
            length = next(
                (
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                ),
                0,
            )
            if length:
                await reader.readexactly(length)
            srv.requests.append(Seen(method, urlsplit(target).path, {}, {}))
            if n == 2:
                return  # closed without an answer
            body = b'{"ok": true}'
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
            )
            await writer.drain()
    except Exception:
        pass
    finally:
        writer.close()


@pytest.fixture
def dropping(ca: trustme.CA) -> Iterator[HttpsServer]:
    yield from _serve(ca.issue_cert("127.0.0.1"), _keep_then_drop)


async def test_a_get_the_server_drops_on_a_kept_connection_is_sent_again(dropping: HttpsServer, ca_file: str) -> None:
    client = FederationClient(loopback_config(ca_file=ca_file))
    try:
        for _ in range(3):
            assert await client.request_json("GET", f"127.0.0.1:{dropping.port}", "/json") == (200, {"ok": True})
        # Each GET after the first went out on the kept connection, was dropped there, and was
        # sent again on a new one: five requests, three connections.
        assert [r.method for r in dropping.requests] == ["GET"] * 5
        assert dropping.connections == 3
        # Not a POST: the server may have acted on it before the connection dropped.
        with pytest.raises(FederationError):
            await client.request_json("POST", f"127.0.0.1:{dropping.port}", "/json", json_body={})
        assert [r.method for r in dropping.requests][5:] == ["POST"] and dropping.connections == 3
    finally:
        await client.aclose()
