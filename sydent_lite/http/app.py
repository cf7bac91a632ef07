"""The ASGI application: routes, Matrix errors, CORS."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sydent_lite.config import Config
from sydent_lite.context import AppContext, build_context
from sydent_lite.errors import MatrixError
from sydent_lite.http.routes import all_routes

logger = logging.getLogger(__name__)

CORS_HEADERS = [
    (b"access-control-allow-origin", b"*"),
    (b"access-control-allow-methods", b"GET, POST, PUT, DELETE, OPTIONS"),
    (b"access-control-allow-headers", b"Origin, X-Requested-With, Content-Type, Accept, Authorization"),
]


class CorsMiddleware:
    """Spec "Web browser clients": CORS headers on every response, and OPTIONS answered everywhere."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope["method"] == "OPTIONS":
            await JSONResponse({}, headers={k.decode(): v.decode() for k, v in CORS_HEADERS})(scope, receive, send)
            return

        async def send_with_cors(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = list(message.get("headers", [])) + CORS_HEADERS
            await send(message)

        await self.app(scope, receive, send_with_cors)


CLEANUP_INTERVAL_SECONDS = 600


async def _periodic_cleanup(ctx: AppContext) -> None:
    while True:
        await asyncio.sleep(CLEANUP_INTERVAL_SECONDS)
        try:
            removed = await ctx.sessions.delete_expired()
            if removed:
                logger.info("removed %d expired validation sessions", removed)
            invites, callbacks = await ctx.invites.expire()
            if invites or callbacks:
                logger.info("expired %d invitations and %d undelivered onbind callbacks", invites, callbacks)
        except Exception:
            logger.exception("expired-session clean-up failed; will retry")


async def _matrix_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, MatrixError)
    return JSONResponse(exc.to_json(), status_code=exc.status)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        return JSONResponse({"errcode": "M_UNRECOGNIZED", "error": "Unrecognized request"}, status_code=404)
    if exc.status_code == 405:
        return JSONResponse({"errcode": "M_UNRECOGNIZED", "error": "Method not allowed"}, status_code=405)
    return JSONResponse({"errcode": "M_UNKNOWN", "error": str(exc.detail)}, status_code=exc.status_code)


async def _unexpected_error(request: Request, exc: Exception) -> Response:
    logger.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return JSONResponse({"errcode": "M_UNKNOWN", "error": "Internal server error"}, status_code=500)


def create_app(config: Config, context_factory: Callable[[Config], object] = build_context) -> ASGIApp:
    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        ctx: AppContext = await context_factory(config)  # type: ignore[misc]
        app.state.ctx = ctx
        # Pending callbacks live in the database: a restarted server picks them up here.
        tasks = [asyncio.create_task(_periodic_cleanup(ctx)), asyncio.create_task(ctx.onbind.run())]
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await ctx.aclose()

    app = Starlette(
        routes=all_routes(),
        exception_handlers={MatrixError: _matrix_error, HTTPException: _http_error, Exception: _unexpected_error},
        lifespan=lifespan,
    )
    return CorsMiddleware(app)
