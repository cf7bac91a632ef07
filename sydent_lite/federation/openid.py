"""Exchange a client's OpenID token with its homeserver for a Matrix user ID (/account/register).

Error messages are returned to clients, so they never contain the token.
"""

from __future__ import annotations

import re

from sydent_lite.federation.client import (
    FederationClient,
    FederationError,
    OutboundPolicyError,
)
from sydent_lite.federation.resolver import parse_server_name

USERINFO_PATH = "/_matrix/federation/v1/openid/userinfo"

# Localparts: the current grammar plus the historical one still found in the wild, restricted
# to printable ASCII (the spec calls anything else non-compliant); never ':'.
_LOCALPART = re.compile(r"[\x21-\x39\x3b-\x7e]+")


class OpenIdError(Exception):
    """The token could not be exchanged; the message is safe to show to the client."""


def _split_user_id(user_id: str) -> tuple[str, str] | None:
    """(localpart, server_name) of a valid user ID, else None."""
    if len(user_id.encode("utf-8")) > 255 or not user_id.startswith("@"):
        return None
    localpart, sep, server_name = user_id[1:].partition(":")
    if not sep or not _LOCALPART.fullmatch(localpart):
        return None
    try:
        parse_server_name(server_name)
    except ValueError:
        return None
    return localpart, server_name


async def exchange_openid_token(
    client: FederationClient, matrix_server_name: str, access_token: str
) -> str:
    """Return the user ID owning `access_token` on `matrix_server_name`.

    ValueError (before any network access) if `matrix_server_name` is not a server name.
    """
    parse_server_name(matrix_server_name)
    try:
        status, body = await client.request_json(
            "GET", matrix_server_name, USERINFO_PATH, params={"access_token": access_token}
        )
    except OutboundPolicyError:
        raise OpenIdError("The homeserver is not allowed as a destination") from None
    except FederationError:
        raise OpenIdError("The homeserver could not be reached") from None
    if status != 200:
        raise OpenIdError(f"The homeserver refused the OpenID token (HTTP {status})")
    sub = body.get("sub") if isinstance(body, dict) else None
    if not isinstance(sub, str):
        raise OpenIdError("The homeserver's answer has no user ID")
    parts = _split_user_id(sub)
    if parts is None:
        raise OpenIdError("The homeserver returned an invalid user ID")
    # Spec: the user must belong to the server we asked, compared exactly (case-sensitive).
    if parts[1] != matrix_server_name:
        raise OpenIdError("The homeserver returned a user ID from another server")
    return sub
