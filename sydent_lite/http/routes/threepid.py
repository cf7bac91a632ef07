"""3PID sessions to associations: getValidated3pid, bind, unbind."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from sydent_lite.context import AppContext
from sydent_lite.errors import ErrorCode, MatrixError, invalid_param
from sydent_lite.http.auth import require_homeserver, require_user
from sydent_lite.http.json_codec import JSONResponse
from sydent_lite.http.request import (
    query_params,
    read_body,
    require_fields,
    require_opaque_id,
    require_str,
)
from sydent_lite.http.routes import Route, versioned
from sydent_lite.threepids import is_valid_user_id, user_id_server


async def get_validated_3pid(request: Request, ctx: AppContext, v2: bool) -> Response:
    if v2:
        await require_user(request, ctx)
    params = query_params(request)
    require_fields(params, "sid", "client_secret")
    session = await ctx.sessions.validated_session(
        require_opaque_id(params, "sid"), require_opaque_id(params, "client_secret")
    )
    return JSONResponse({"medium": session.medium, "address": session.address, "validated_at": session.validated_at})


async def bind(request: Request, ctx: AppContext, v2: bool) -> Response:
    user_id = await require_user(request, ctx) if v2 else None
    body = await read_body(request)
    require_fields(body, "sid", "client_secret", "mxid")
    sid = require_opaque_id(body, "sid")
    client_secret = require_opaque_id(body, "client_secret")
    mxid = require_str(body, "mxid", max_length=255)
    if not is_valid_user_id(mxid):
        raise invalid_param("'mxid' is not a valid Matrix user ID")
    if user_id is not None and mxid != user_id:
        raise MatrixError(403, ErrorCode.UNAUTHORIZED, "This user is prohibited from binding to the mxid")
    ctx.access.check_user(mxid)
    session = await ctx.sessions.validated_session(sid, client_secret)
    return JSONResponse(await ctx.associations.bind(session.medium, session.address, mxid))


async def unbind(request: Request, ctx: AppContext, v2: bool) -> Response:
    body = await read_body(request)
    require_fields(body, "mxid", "threepid")
    mxid = require_str(body, "mxid", max_length=255)
    threepid = body["threepid"]
    if not isinstance(threepid, dict):
        raise invalid_param("'threepid' must be an object with 'medium' and 'address'")
    require_fields(threepid, "medium", "address")
    medium = require_str(threepid, "medium", max_length=16)
    address = require_str(threepid, "address", max_length=512)
    if medium == "email":
        address = address.casefold()
    if body.get("sid") is None and body.get("client_secret") is None:
        # No session: the homeserver of `mxid` must have signed the request (X-Matrix).
        origin = await require_homeserver(request, ctx, body)
        if not is_valid_user_id(mxid) or user_id_server(mxid) != origin:
            raise MatrixError(403, ErrorCode.FORBIDDEN, "The homeserver may only unbind its own users")
        await ctx.associations.unbind(medium, address, mxid)
        return JSONResponse({})
    require_fields(body, "sid", "client_secret")
    try:
        session = await ctx.sessions.validated_session(
            require_opaque_id(body, "sid"), require_opaque_id(body, "client_secret")
        )
    except MatrixError as e:
        if e.status >= 500 or e.errcode in (ErrorCode.MISSING_PARAMS, ErrorCode.INVALID_PARAM):
            raise
        # The session is this request's credential: any fault in it is a 403 (spec), which
        # homeservers pass on to the user rather than reading as "unbind not supported".
        raise MatrixError(403, ErrorCode.FORBIDDEN, f"Cannot unbind with this session: {e.error}") from None
    if (session.medium, session.address) != (medium, address):
        raise MatrixError(403, ErrorCode.FORBIDDEN, "This session was not for the 3PID being unbound")
    await ctx.associations.unbind(medium, address, mxid)
    return JSONResponse({})


def routes() -> list[Route]:
    return [
        *versioned("/3pid/getValidated3pid", get_validated_3pid, ["GET"]),
        *versioned("/3pid/bind", bind, ["POST"]),
        *versioned("/3pid/unbind", unbind, ["POST"]),
    ]
