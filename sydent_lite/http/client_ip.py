"""The client's address: the peer's, or X-Forwarded-For's when the peer is a trusted proxy.

Anyone can send an X-Forwarded-For header, so it is read only when the connection comes from
one of `listen.trusted_proxies`. It is then read right to left (each proxy appends the address
it got the request from): the first entry that is not one of our proxies is the client. An
entry that is not an IP address means the chain cannot be trusted: the peer is used instead.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from functools import lru_cache

from starlette.requests import Request
from starlette.types import Scope

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


@lru_cache(maxsize=16)
def _networks(trusted: tuple[str, ...]) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(n, strict=False) for n in trusted)


def _parse(address: str) -> Address | None:
    try:
        ip = ipaddress.ip_address(address.strip())
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped  # ::ffff:10.0.0.1 (a dual-stack socket) is 10.0.0.1
    return ip


def _is_trusted(ip: Address, networks: Sequence[Network]) -> bool:
    return any(ip in net for net in networks)


def client_ip(request: Request, trusted_proxies: Sequence[str]) -> str:
    return scope_client_ip(request.scope, trusted_proxies)


def scope_client_ip(scope: Scope, trusted_proxies: Sequence[str]) -> str:
    """`client_ip` from the ASGI scope alone (the access line has no Request to hand)."""
    client = scope.get("client")
    peer: str = client[0] if client else "unknown"
    if not trusted_proxies:
        return peer  # the common case, without parsing anything
    networks = _networks(tuple(trusted_proxies))
    peer_ip = _parse(peer)
    if peer_ip is None or not networks or not _is_trusted(peer_ip, networks):
        return peer  # anyone can write X-Forwarded-For: only our own proxies are believed
    forwarded = ",".join(value.decode("latin-1") for name, value in scope["headers"] if name == b"x-forwarded-for")
    hops = [h for h in (h.strip() for h in forwarded.split(",")) if h]
    # Right to left: the first hop that is not one of our proxies is the client. What lies
    # left of it was written by the client and means nothing.
    last: Address = peer_ip
    for hop in reversed(hops):
        ip = _parse(hop)
        if ip is None:
            return str(peer_ip)  # malformed where our proxies wrote: fall back to what we know
        if not _is_trusted(ip, networks):
            return str(ip)
        last = ip
    return str(last)  # every hop is one of ours: the request started at a proxy
