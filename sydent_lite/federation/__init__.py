"""Outbound server-to-server requests: name resolution, the SSRF-safe client, OpenID."""

from sydent_lite.federation.client import (
    FederationClient,
    FederationError,
    OutboundPolicyError,
)
from sydent_lite.federation.openid import OpenIdError, exchange_openid_token
from sydent_lite.federation.resolver import (
    ResolvedServer,
    dns_srv_lookup,
    parse_server_name,
    resolve_server_name,
)

__all__ = [
    "FederationClient",
    "FederationError",
    "OpenIdError",
    "OutboundPolicyError",
    "ResolvedServer",
    "dns_srv_lookup",
    "exchange_openid_token",
    "parse_server_name",
    "resolve_server_name",
]
