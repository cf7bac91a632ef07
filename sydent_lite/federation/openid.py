"""Exchange a client's OpenID token with its homeserver for a Matrix user ID (/account/register).

Error messages are returned to clients, so they never contain the token.
"""

from __future__ import annotations

from sydent_lite.federation.client import (
    FederationClient,
    FederationError,
    OutboundPolicyError,
)
from sydent_lite.federation.resolver import parse_server_name
from sydent_lite.threepids import UserId, parse_user_id

USERINFO_PATH = "/_matrix/federation/v1/openid/userinfo"


class OpenIdError(Exception):
    """The token could not be exchanged; the message is safe to show to the client."""


def _user_id_of_server(user_id: str) -> UserId | None:
    """The parts of a valid user ID whose server name is one we could contact, else None."""
    parsed = parse_user_id(user_id)
    if parsed is None:
        return None
    try:
        parse_server_name(parsed.server_name)
    except ValueError:
        return None
    return parsed


async def exchange_openid_token(client: FederationClient, matrix_server_name: str, access_token: str) -> str:
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
    user = _user_id_of_server(sub)
    if user is None:
        raise OpenIdError("The homeserver returned an invalid user ID")
    # Spec: the user must belong to the server we asked, compared exactly (case-sensitive).
    if user.server_name != matrix_server_name:
        raise OpenIdError("The homeserver returned a user ID from another server")
    return sub
