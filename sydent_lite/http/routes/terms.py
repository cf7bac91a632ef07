"""Terms of service (v2 only)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from sydent_lite.context import AppContext
from sydent_lite.errors import invalid_param, missing_params
from sydent_lite.http.auth import require_user
from sydent_lite.http.json_codec import JSONResponse
from sydent_lite.http.request import read_body
from sydent_lite.http.routes import Route, versioned


async def get_terms(request: Request, ctx: AppContext, v2: bool) -> Response:
    return JSONResponse({"policies": ctx.terms.terms.policies()})


async def accept_terms(request: Request, ctx: AppContext, v2: bool) -> Response:
    # The spec asks servers not to answer M_TERMS_NOT_SIGNED here: acceptance may come piecemeal.
    user_id = await require_user(request, ctx, terms=False)
    body = await read_body(request, allow_form=False)
    urls = body.get("user_accepts")
    if urls is None:
        raise missing_params("user_accepts")
    if not isinstance(urls, list) or not all(isinstance(u, str) for u in urls) or len(urls) > 1000:
        raise invalid_param("'user_accepts' must be a list of URLs")
    await ctx.terms.accept(user_id, urls)
    return JSONResponse({})


async def terms(request: Request, ctx: AppContext, v2: bool) -> Response:
    if request.method == "GET":
        return await get_terms(request, ctx, v2)
    return await accept_terms(request, ctx, v2)


def routes() -> list[Route]:
    return versioned("/terms", terms, ["GET", "POST"], v1=False)
