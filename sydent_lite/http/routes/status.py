"""Version discovery and status checks."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from sydent_lite.context import AppContext
from sydent_lite.http.routes import versioned

SUPPORTED_VERSIONS = ["r0.1.0", "r0.2.0", "r0.2.1", "r0.3.0"] + [f"v1.{i}" for i in range(1, 17)]


async def versions(request: Request) -> Response:
    return JSONResponse({"versions": SUPPORTED_VERSIONS})


async def status(request: Request, ctx: AppContext, v2: bool) -> Response:
    return JSONResponse({})


def routes() -> list[Route]:
    return [Route("/_matrix/identity/versions", versions, methods=["GET"]), *versioned("", status, ["GET"])]
