"""Version discovery and status checks."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from sydent_lite.context import AppContext
from sydent_lite.http.routes import versioned
from sydent_lite.templating import LANDING_TEMPLATE

SUPPORTED_VERSIONS = ["r0.1.0", "r0.2.0", "r0.2.1", "r0.3.0"] + [f"v1.{i}" for i in range(1, 17)]


async def versions(request: Request) -> Response:
    return JSONResponse({"versions": SUPPORTED_VERSIONS})


async def landing_page(request: Request) -> Response:
    """What this server is, its terms, and its public key: for a person who opens its URL."""
    ctx: AppContext = request.app.state.ctx
    page = ctx.templates.render_html(
        LANDING_TEMPLATE,
        None,
        {
            "server_name": ctx.config.effective_server_name,
            "policies": ctx.terms.terms.listing(),
            "key_id": ctx.signer.key_id,
            "public_key": ctx.signer.public_key_base64,
        },
    )
    return HTMLResponse(page)


async def status(request: Request, ctx: AppContext, v2: bool) -> Response:
    return JSONResponse({})


def routes() -> list[Route]:
    return [
        Route("/", landing_page, methods=["GET"]),
        Route("/_matrix/identity/versions", versions, methods=["GET"]),
        *versioned("", status, ["GET"]),
    ]
