"""Who is calling: identity-server bearer tokens and the terms-of-service gate."""

from __future__ import annotations

from starlette.requests import Request

from sydent_lite.context import AppContext
from sydent_lite.errors import MatrixError, unauthorized


def access_token(request: Request) -> str | None:
    """Bearer token from the Authorization header, else from ?access_token= (Synapse's hash_details)."""
    header = request.headers.get("authorization")
    if header:
        scheme, _, token = header.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    return request.query_params.get("access_token") or None


async def require_user(request: Request, ctx: AppContext, *, terms: bool = True) -> str:
    token = access_token(request)
    if token is None:
        raise unauthorized("Missing access token")
    user_id = await ctx.accounts.user_for_token(token)
    if user_id is None:
        raise unauthorized()
    if terms and not await ctx.terms.has_accepted_all(user_id):
        raise MatrixError(403, "M_TERMS_NOT_SIGNED", "Please accept our updated terms of service before continuing")
    return user_id
