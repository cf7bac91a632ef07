"""Version discovery and status checks."""

from __future__ import annotations

import asyncio
import logging

from sqlalchemy import text
from starlette.requests import Request
from starlette.responses import Response

from sydent_lite.context import AppContext
from sydent_lite.errors import ErrorCode
from sydent_lite.http.json_codec import JSONResponse
from sydent_lite.http.pages import html_page
from sydent_lite.http.routes import Route, versioned
from sydent_lite.templating import LANDING_TEMPLATE

logger = logging.getLogger(__name__)

# Every version whose identity-service behaviour we implement (v1.18's M_TOKEN_INCORRECT, ...).
# Not v1.20: it drops the ?access_token= query parameter, which Synapse still sends to
# hash_details and which we keep accepting (docs/api-behaviour.md, "Versions").
SUPPORTED_VERSIONS = ["r0.1.0", "r0.2.0", "r0.2.1", "r0.3.0"] + [f"v1.{i}" for i in range(1, 20)]


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
    return html_page(page)


async def health(request: Request) -> Response:
    """For load balancers: 200 while the database answers, 503 otherwise. No auth, cheap."""
    ctx: AppContext = request.app.state.ctx
    try:
        async with asyncio.timeout(2):
            async with ctx.database.connect() as conn:
                await conn.execute(text("SELECT 1"))
    except Exception:
        logger.warning("health check: the database did not answer")
        return JSONResponse(
            {"status": "unavailable", "errcode": ErrorCode.UNKNOWN, "error": "The database is not reachable"},
            status_code=503,
        )
    return JSONResponse({"status": "ok"})


async def status(request: Request, ctx: AppContext, v2: bool) -> Response:
    return JSONResponse({})


def routes() -> list[Route]:
    return [
        Route("/", landing_page, ["GET"]),
        Route("/_sydent_lite/health", health, ["GET"]),
        Route("/_matrix/identity/versions", versions, ["GET"]),
        *versioned("", status, ["GET"]),
    ]
