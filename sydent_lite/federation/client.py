"""The one way this server talks to other servers (homeservers, key fetches, OpenID).

Every destination comes from user input, so every request is an SSRF risk. The client
therefore resolves host names itself, checks *every* resolved IP against the configured
allow/block lists, and connects to the chosen IP while still verifying TLS against the
original name (httpx's `sni_hostname` extension plus an explicit Host header). Letting httpx
resolve the name would re-resolve it after our check (DNS rebinding).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import socket
import ssl
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

import httpx

from sydent_lite.config import FederationConfig
from sydent_lite.federation.resolver import (
    ResolvedServer,
    SrvLookup,
    dns_srv_lookup,
    is_ip_literal,
    resolve_server_name,
)
from sydent_lite.observability.logs import redact_every_record

logger = logging.getLogger(__name__)

ResolveHost = Callable[[str], Awaitable[list[str]]]

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Upper bound on idle per-destination pools kept around; destinations are user-controlled.
_MAX_POOLS = 100
# Sent once more when a kept connection drops them unanswered.
_IDEMPOTENT = frozenset({"GET", "HEAD"})


class OutboundPolicyError(Exception):
    """The destination resolves to an address the IP policy refuses."""


class FederationError(Exception):
    """The destination could not be reached or answered unusably (timeout, TLS, too large)."""


# httpx logs full request URLs (at INFO); OpenID tokens travel in the query string.
redact_every_record("httpx")


_NAT64_WELL_KNOWN = ipaddress.ip_network("64:ff9b::/96")


def embedded_ipv4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address carries traffic to: 6to4 (2002::/16), IPv4-compatible
    (::a.b.c.d), NAT64's well-known prefix (64:ff9b::/96), Teredo (server and client)."""
    found: list[ipaddress.IPv4Address] = []
    if ip.sixtofour is not None:
        found.append(ip.sixtofour)
    if int(ip) >> 32 == 0 or ip in _NAT64_WELL_KNOWN:
        found.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    if ip.teredo is not None:
        found.extend(ip.teredo)
    return found


async def system_resolve_host(host: str) -> list[str]:
    """All addresses the OS resolver returns for `host`, in its order, de-duplicated."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


class _Pool:
    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client
        self.busy = 0  # requests in flight; a busy pool is never closed by eviction


class FederationClient:
    # Port of the `.well-known/matrix/server` fetch (RFC 8615: plain https). Tests override it.
    WELL_KNOWN_PORT = 443

    def __init__(
        self,
        config: FederationConfig,
        *,
        resolve_host: ResolveHost | None = None,
        srv_lookup: SrvLookup | None = None,
    ) -> None:
        self._config = config
        self._allow = [ipaddress.ip_network(n, strict=False) for n in config.ip_allowlist]
        self._block = [ipaddress.ip_network(n, strict=False) for n in config.ip_blocklist]
        self._resolve_host = resolve_host or system_resolve_host
        self._srv_lookup = srv_lookup or dns_srv_lookup
        self._ssl = self._ssl_context()
        # Keyed by TLS server name: httpx pools connections per (scheme, IP, port), so sharing
        # one client between names could reuse a connection verified for a different name.
        self._pools: OrderedDict[str, _Pool] = OrderedDict()

    def _ssl_context(self) -> ssl.SSLContext:
        if not self._config.verify_tls:
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            return ctx
        ctx = ssl.create_default_context()  # system trust store
        if self._config.ca_file:
            ctx.load_verify_locations(cafile=self._config.ca_file)
        return ctx

    # -- public API ---------------------------------------------------------------------------

    async def request_json(
        self,
        method: str,
        server_name: str,
        path: str,
        *,
        params: dict[str, Any] | None = None,
        json_body: Any = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, object]:
        """Send a request to a Matrix server; returns (status, JSON body or None).

        ValueError: invalid server name. OutboundPolicyError / FederationError as documented.
        """
        target = await resolve_server_name(
            server_name, fetch_well_known=self._fetch_well_known, srv_lookup=self._srv_lookup
        )
        return await self._request(method, target, path, params=params, json_body=json_body, headers=headers)

    async def aclose(self) -> None:
        pools, self._pools = list(self._pools.values()), OrderedDict()
        for pool in pools:
            await pool.client.aclose()

    # -- internals ----------------------------------------------------------------------------

    async def _fetch_well_known(self, hostname: str) -> dict[str, Any] | None:
        # Same safe path as any request. Redirects are not followed (policy: never follow
        # redirects), so a redirecting .well-known counts as "no delegation".
        target = ResolvedServer(hostname, self.WELL_KNOWN_PORT, hostname, hostname)
        try:
            status, body = await self._request("GET", target, "/.well-known/matrix/server")
        except (FederationError, OutboundPolicyError) as exc:
            logger.info("no usable .well-known for %s: %s", hostname, exc)
            return None
        return body if status == 200 and isinstance(body, dict) else None

    def _allowed(self, ip: IPAddress) -> bool:
        # An IPv4-mapped IPv6 address reaches the IPv4 host, so judge it as that host.
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if not self._listed_allowed(ip):
            return False
        # 6to4, IPv4-compatible, NAT64 and Teredo addresses lead to the IPv4 address inside
        # them: allow-listing the IPv6 range (a NAT64 network needs 64:ff9b::/96) must not
        # open the way to the IPv4 addresses the block-list refuses.
        if isinstance(ip, ipaddress.IPv6Address):
            return all(self._listed_allowed(v4) for v4 in embedded_ipv4(ip))
        return True

    def _listed_allowed(self, ip: IPAddress) -> bool:
        if any(ip in net for net in self._allow):
            return True
        return not any(ip in net for net in self._block)

    async def _pick_ip(self, host: str) -> str:
        """Resolve `host` and return the address to connect to, enforcing the IP policy."""
        if is_ip_literal(host):
            candidates = [host]
        else:
            try:
                async with asyncio.timeout(self._config.timeout_seconds):
                    candidates = await self._resolve_host(host)
            except (OSError, TimeoutError) as exc:
                raise FederationError(f"cannot resolve {host}") from exc
        if not candidates:
            raise FederationError(f"cannot resolve {host}")
        # Refuse if ANY address is blocked: a name mixing public and internal addresses is
        # suspicious, and it keeps the decision independent of address order.
        for candidate in candidates:
            try:
                allowed = self._allowed(ipaddress.ip_address(candidate))
            except ValueError:  # not an address we can judge: refuse rather than guess
                allowed = False
            if not allowed:
                raise OutboundPolicyError(f"destination {host} is not allowed")
        return candidates[0]

    def _pool_for(self, tls_name: str) -> _Pool:
        pool = self._pools.pop(tls_name, None)
        if pool is None:
            pool = _Pool(
                httpx.AsyncClient(
                    verify=self._ssl,
                    timeout=httpx.Timeout(self._config.timeout_seconds),
                    follow_redirects=False,
                    trust_env=False,  # an env proxy would bypass the IP policy
                    limits=httpx.Limits(max_keepalive_connections=4, keepalive_expiry=30.0),
                )
            )
        self._pools[tls_name] = pool  # most recently used goes last
        return pool

    async def _evict_idle_pools(self) -> None:
        for name in list(self._pools):
            if len(self._pools) <= _MAX_POOLS:
                return
            if self._pools[name].busy == 0:
                await self._pools.pop(name).client.aclose()

    async def _request(
        self,
        method: str,
        target: ResolvedServer,
        path: str,
        *,
        params: dict[str, Any] | None = None,
        json_body: Any = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, object]:
        if not path.startswith("/"):
            raise ValueError("path must start with '/'")
        ip = await self._pick_ip(target.host)
        netloc = f"[{ip}]" if ":" in ip else ip
        url = f"https://{netloc}:{target.port}{path}"
        # The Host header is ours to decide (resolution rules), whatever the caller passed.
        request_headers = {k: v for k, v in (headers or {}).items() if k.lower() != "host"}
        request_headers["Host"] = target.host_header
        # Log the path only: query strings may carry access tokens.
        log_target = f"{method} {target.host_header}{path.split('?', 1)[0]}"
        logger.debug("federation request %s via %s:%s", log_target, ip, target.port)

        await self._evict_idle_pools()
        pool = self._pool_for(target.tls_server_name)
        pool.busy += 1
        try:
            # httpx timeouts are per read; the outer bound stops a server that drips bytes.
            async with asyncio.timeout(self._config.timeout_seconds):
                for attempt in (1, 2):
                    try:
                        async with pool.client.stream(
                            method,
                            url,
                            params=params,
                            json=json_body,
                            headers=request_headers,
                            extensions={"sni_hostname": target.tls_server_name},
                        ) as response:
                            status = response.status_code
                            body = await self._read_capped(response)
                        break
                    except httpx.RemoteProtocolError:
                        # A kept connection that the server closed as we sent on it (its idle
                        # timeout, 5 s on uvicorn and Apache, below our pool's 30 s) drops the
                        # request unanswered: an idempotent one goes once more, on a new
                        # connection (an OpenID check failing so was a user's failed sign-up).
                        if attempt == 2 or method not in _IDEMPOTENT:
                            raise
                        logger.debug("federation request %s: connection dropped, sending again", log_target)
        except TimeoutError:
            raise FederationError(f"{log_target}: timed out") from None
        except (httpx.HTTPError, ssl.SSLError, OSError) as exc:
            raise FederationError(f"{log_target}: {type(exc).__name__}: {exc}") from exc
        finally:
            pool.busy -= 1
        return status, _parse_json(body)

    async def _read_capped(self, response: httpx.Response) -> bytes:
        limit = self._config.max_response_bytes
        declared = response.headers.get("Content-Length", "")
        if declared.isdigit() and int(declared) > limit:
            raise FederationError("response too large")
        chunks: list[bytes] = []
        size = 0
        # aiter_bytes yields decoded bytes, so a compressed bomb is caught too.
        async for chunk in response.aiter_bytes():
            size += len(chunk)
            if size > limit:
                raise FederationError("response too large")
            chunks.append(chunk)
        return b"".join(chunks)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _parse_json(body: bytes) -> object:
    try:
        return json.loads(body, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        return None
