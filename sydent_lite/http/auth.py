"""Who is calling: identity-server bearer tokens and the terms-of-service gate."""

from __future__ import annotations

from starlette.requests import Request

from sydent_lite.context import AppContext
from sydent_lite.errors import ErrorCode, MatrixError, unauthorized
from sydent_lite.federation.xmatrix import XMatrixError, verify_request


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
        raise MatrixError(
            403, ErrorCode.TERMS_NOT_SIGNED, "Please accept our updated terms of service before continuing"
        )
    return user_id


async def require_homeserver(request: Request, ctx: AppContext, body: object) -> str:
    """The homeserver that signed this request (Authorization: X-Matrix ...), or 403."""
    raw_path = request.scope.get("raw_path") or request.url.path.encode()
    query = request.scope.get("query_string", b"")
    uri = (raw_path + (b"?" + query if query else b"")).decode("latin-1")
    try:
        return await verify_request(
            ctx.server_keys,
            authorization=request.headers.get("authorization"),
            method=request.method,
            uri=uri,
            content=body,
            our_server_name=ctx.config.effective_server_name,
        )
    except XMatrixError as e:
        raise MatrixError(403, ErrorCode.FORBIDDEN, f"Invalid homeserver signature: {e}") from None
