"""Public keys: ours (long-term) and, later, ephemeral invitation keys."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from sydent_lite.context import AppContext
from sydent_lite.errors import ErrorCode, MatrixError
from sydent_lite.http.json_codec import JSONResponse
from sydent_lite.http.request import query_params, require_str
from sydent_lite.http.routes import Route, versioned
from sydent_lite.secrets_util import secrets_equal


async def get_pubkey(request: Request, ctx: AppContext, v2: bool) -> Response:
    if request.path_params["key_id"] != ctx.signer.key_id:
        raise MatrixError(404, ErrorCode.NOT_FOUND, "The public key was not found")
    return JSONResponse({"public_key": ctx.signer.public_key_base64})


async def pubkey_isvalid(request: Request, ctx: AppContext, v2: bool) -> Response:
    public_key = require_str(query_params(request), "public_key")
    return JSONResponse({"valid": secrets_equal(public_key, ctx.signer.public_key_base64)})


async def ephemeral_isvalid(request: Request, ctx: AppContext, v2: bool) -> Response:
    public_key = require_str(query_params(request), "public_key", max_length=128)
    return JSONResponse({"valid": await ctx.invites.ephemeral_key_is_valid(public_key)})


def routes() -> list[Route]:
    return [
        # Static paths win over "/pubkey/{key_id}" (sydent_lite.http.app), whatever the order.
        *versioned("/pubkey/isvalid", pubkey_isvalid, ["GET"]),
        *versioned("/pubkey/ephemeral/isvalid", ephemeral_isvalid, ["GET"]),
        *versioned("/pubkey/{key_id}", get_pubkey, ["GET"]),
    ]
