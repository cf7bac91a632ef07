"""Matrix server-name parsing and resolution (server-server API, "Resolving server names").

Resolution only decides *where* to connect and *which name* the TLS certificate and Host
header must carry. It never connects by itself: the `.well-known` fetch and the SRV lookup are
injected, so the caller (FederationClient) keeps every network access behind its IP policy.
"""

from __future__ import annotations

import ipaddress
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import dns.asyncresolver
import dns.exception

logger = logging.getLogger(__name__)

DEFAULT_FEDERATION_PORT = 8448

# Appendices, "Server Name" grammar. fullmatch() is used everywhere so that a trailing
# newline or other junk can never sneak past the character classes.
_DNS_NAME = re.compile(r"[A-Za-z0-9.-]{1,255}")
_IPV4_SHAPE = re.compile(r"[0-9]{1,3}(?:\.[0-9]{1,3}){3}")
_IPV6_CHARS = re.compile(r"[0-9A-Fa-f:.]{2,45}")
_PORT = re.compile(r"[0-9]{1,5}")

FetchWellKnown = Callable[[str], Awaitable["dict[str, Any] | None"]]
SrvLookup = Callable[[str], Awaitable["list[tuple[str, int]]"]]


def parse_server_name(name: str) -> tuple[str, int | None]:
    """Split a server name into (host, port). IPv6 literals are returned without brackets.

    Raises ValueError for anything outside the grammar: callers use this to reject user input
    before any network access happens.
    """
    if not isinstance(name, str) or not name or len(name) > 255:
        raise ValueError("invalid server name")
    if name.startswith("["):
        end = name.find("]")
        if end < 0:
            raise ValueError("invalid server name: unterminated IPv6 literal")
        host, rest = name[1:end], name[end + 1 :]
        if not _IPV6_CHARS.fullmatch(host):
            raise ValueError("invalid server name: bad IPv6 literal")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError("invalid server name: bad IPv6 literal") from None
        if rest and not rest.startswith(":"):
            raise ValueError("invalid server name")
        port_str = rest[1:] if rest else None
    else:
        host, sep, port_str_raw = name.partition(":")
        port_str = port_str_raw if sep else None
        if not _DNS_NAME.fullmatch(host):
            raise ValueError("invalid server name: bad hostname")
        # Something shaped like a dotted quad must be a real IPv4 address (each part 0-255,
        # no leading zeros that some resolvers would read as octal).
        if _IPV4_SHAPE.fullmatch(host):
            try:
                ipaddress.IPv4Address(host)
            except ValueError:
                raise ValueError("invalid server name: bad IPv4 literal") from None
    port: int | None = None
    if port_str is not None:
        if not _PORT.fullmatch(port_str) or not 1 <= int(port_str) <= 65535:
            raise ValueError("invalid server name: bad port")
        port = int(port_str)
    return host, port


def is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class ResolvedServer:
    host: str  # where to connect: hostname (still to be resolved) or IP literal, no brackets
    port: int
    tls_server_name: str  # name the certificate must match, also sent as SNI
    host_header: str  # value of the HTTP Host header


async def resolve_server_name(
    server_name: str, *, fetch_well_known: FetchWellKnown, srv_lookup: SrvLookup
) -> ResolvedServer:
    """Apply the spec's resolution steps to `server_name` (ValueError if it is invalid)."""
    host, port = parse_server_name(server_name)
    # Step 1: IP literal. Certificate for the IP, Host = server name as given (with port).
    if is_ip_literal(host):
        return ResolvedServer(host, port or DEFAULT_FEDERATION_PORT, host, server_name)
    # Step 2: hostname with explicit port.
    if port is not None:
        return ResolvedServer(host, port, host, server_name)

    # Step 3: .well-known delegation. Anything invalid falls through to step 4.
    delegated = _delegated_name(await fetch_well_known(host))
    if delegated is not None:
        d_name, (d_host, d_port) = delegated
        if is_ip_literal(d_host):  # 3.1: Host = the IP (with port if given), as written
            return ResolvedServer(d_host, d_port or DEFAULT_FEDERATION_PORT, d_host, d_name)
        if d_port is not None:  # 3.2
            return ResolvedServer(d_host, d_port, d_host, f"{d_host}:{d_port}")
        # 3.3 / 3.4: SRV of the delegated name; certificate and Host stay the delegated name.
        srv = await _srv(d_host, srv_lookup)
        if srv is not None:
            return ResolvedServer(srv[0], srv[1], d_host, d_host)
        return ResolvedServer(d_host, DEFAULT_FEDERATION_PORT, d_host, d_host)  # 3.5

    # Steps 4 / 5: SRV of the server name itself; certificate and Host are <hostname>.
    srv = await _srv(host, srv_lookup)
    if srv is not None:
        return ResolvedServer(srv[0], srv[1], host, host)
    return ResolvedServer(host, DEFAULT_FEDERATION_PORT, host, host)  # step 6


def _delegated_name(body: object) -> tuple[str, tuple[str, int | None]] | None:
    if not isinstance(body, dict):
        return None
    m_server = body.get("m.server")
    if not isinstance(m_server, str):
        return None
    try:
        return m_server, parse_server_name(m_server)
    except ValueError:
        logger.info("ignoring invalid m.server in .well-known")
        return None


async def _srv(name: str, srv_lookup: SrvLookup) -> tuple[str, int] | None:
    # _matrix-fed first (v1.8); the deprecated _matrix service only when it has no records.
    for service in ("_matrix-fed._tcp.", "_matrix._tcp."):
        records = await srv_lookup(service + name)
        if records:
            return records[0]
    return None


async def dns_srv_lookup(qname: str) -> list[tuple[str, int]]:
    """SRV lookup with dnspython; any DNS failure means "no record" (the spec then falls back)."""
    try:
        answer = await dns.asyncresolver.resolve(qname, "SRV", lifetime=10.0)
    except dns.exception.DNSException:
        return []
    # Lowest priority first, then heaviest weight: a deterministic reading of RFC 2782 that is
    # good enough for picking one target. A target of "." means "no service here".
    records = sorted(answer, key=lambda r: (r.priority, -r.weight))
    result = []
    for r in records:
        target = r.target.to_text(omit_final_dot=True)
        if target and target != ".":
            result.append((target, int(r.port)))
    return result
