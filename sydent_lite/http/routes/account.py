"""Accounts (v2 only): OpenID registration, account info, logout."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from sydent_lite.context import AppContext
from sydent_lite.errors import unauthorized
from sydent_lite.http.auth import access_token, require_user
from sydent_lite.http.client_ip import client_ip
from sydent_lite.http.json_codec import JSONResponse
from sydent_lite.http.request import read_body, require_fields, require_str
from sydent_lite.http.routes import Route, versioned


async def register(request: Request, ctx: AppContext, v2: bool) -> Response:
    body = await read_body(request, allow_form=False)
    require_fields(body, "access_token", "matrix_server_name")
    openid_token = require_str(body, "access_token")
    server_name = require_str(body, "matrix_server_name", max_length=255)
    ip = client_ip(request, ctx.config.listen.trusted_proxies)
    token = await ctx.accounts.register(server_name, openid_token, ip)
    # `access_token` too, for clients written against Sydent's early answer.
    return JSONResponse({"token": token, "access_token": token})


async def account(request: Request, ctx: AppContext, v2: bool) -> Response:
    user_id = await require_user(request, ctx)
    return JSONResponse({"user_id": user_id})


async def logout(request: Request, ctx: AppContext, v2: bool) -> Response:
    token = access_token(request)
    if token is None:
        raise unauthorized("Missing access token")
    await ctx.accounts.logout(token)
    return JSONResponse({})


def routes() -> list[Route]:
    return [
        *versioned("/account/register", register, ["POST"], v1=False),
        *versioned("/account", account, ["GET"], v1=False),
        *versioned("/account/logout", logout, ["POST"], v1=False),
    ]
