"""The ASGI application: routes, Matrix errors, CORS, request ids and request metrics."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Match, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sydent_lite.config import Config
from sydent_lite.context import AppContext, build_context
from sydent_lite.errors import MatrixError
from sydent_lite.http.routes import all_routes
from sydent_lite.memory import release_free_memory
from sydent_lite.observability import metrics
from sydent_lite.observability.logs import (
    REQUEST_ID,
    access_lane,
    request_id_from_header,
)

logger = logging.getLogger(__name__)
access_logger = logging.getLogger("sydent_lite.access")

CORS_HEADERS = [
    (b"access-control-allow-origin", b"*"),
    (b"access-control-allow-methods", b"GET, POST, PUT, DELETE, OPTIONS"),
    (b"access-control-allow-headers", b"Origin, X-Requested-With, Content-Type, Accept, Authorization"),
    (b"access-control-expose-headers", b"X-Request-Id"),
]
# On every answer, with the CORS headers: no browser may read a JSON answer as HTML or script.
# (HTML pages add their own: sydent_lite.http.pages.)
RESPONSE_HEADERS = [*CORS_HEADERS, (b"x-content-type-options", b"nosniff")]


# Load balancer probes: neither counted in the request metrics nor logged at INFO (a probe is
# not client traffic, and a 503 there is the database's problem, reported by the probe itself).
HEALTH_PATH = "/_sydent_lite/health"
UNMATCHED_ROUTE = "unmatched"
_KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})
ACCESS_LOGGER_NAME = access_logger.name


def _is_plain_function(endpoint: object) -> bool:
    # Starlette's own test for "wrap this in request_response" (not an ASGI app or endpoint class).
    while isinstance(endpoint, functools.partial):
        endpoint = endpoint.func
    return inspect.isfunction(endpoint) or inspect.ismethod(endpoint)


class FrontDoor:
    """The outermost ASGI app. Per request: a request id (logs, X-Request-Id header), the CORS
    headers, the request metrics and an access line.

    Every identity-server path is static. A request for one of them, with one of its methods,
    goes straight to the endpoint, with the application's error handlers around it; Starlette's
    middleware, router and endpoint wrappers (seven layers, each wrapping `send` again) were a
    third of the CPU of a small request. Everything else (OPTIONS aside: unknown paths, wrong
    methods, trailing slashes) goes through the Starlette application, whose router answers
    404 and 405 (with `Allow`); it redirects no trailing slash (see `starlette_app`).

    Metrics and the access line name the matched route *template*
    (`/_matrix/identity/v2/3pid/bind`) or "unmatched", never the raw path or query string, so
    they carry no tokens or addresses and the number of series stays bounded.
    """

    def __init__(self, app: Starlette) -> None:
        self.app = app
        self.routes: list[BaseRoute] = app.routes
        self._exact: dict[tuple[str, str], Route] = {}
        for route in self.routes:
            if isinstance(route, Route) and not route.param_convertors and _is_plain_function(route.endpoint):
                for method in route.methods or ():
                    self._exact.setdefault((route.path, method), route)

    def _route_template(self, scope: Scope) -> str:
        # Starlette's router records the route it matched; requests that never reached it
        # (OPTIONS) are matched here.
        path = getattr(scope.get("route"), "path", None)
        if isinstance(path, str):
            return path
        for route in self.routes:
            try:
                match, _ = route.matches(scope)
            except (KeyError, TypeError, ValueError, UnicodeError):  # a path no route can parse
                continue
            if match != Match.NONE:
                return str(getattr(route, "path", UNMATCHED_ROUTE))
        return UNMATCHED_ROUTE

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = None
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                incoming = value.decode("latin-1")
                break
        request_id = request_id_from_header(incoming)
        reset_token = REQUEST_ID.set(request_id)
        start = time.perf_counter()
        status = 500  # unless a response starts: an exception escaped every handler

        async def send_with_headers(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                request_id_header = (b"x-request-id", request_id.encode("ascii"))
                message["headers"] = [*message.get("headers", ()), *RESPONSE_HEADERS, request_id_header]
            await send(message)

        try:
            method = scope["method"]
            if method == "OPTIONS":
                # Spec "Web browser clients": OPTIONS is answered on every path (CORS preflight).
                await JSONResponse({})(scope, receive, send_with_headers)
                return
            route = None if scope.get("root_path") else self._exact.get((scope["path"], method))
            if route is None:
                await self.app(scope, receive, send_with_headers)
            else:
                await self._call_endpoint(route, scope, receive, send_with_headers)
        finally:
            elapsed = time.perf_counter() - start
            try:
                self._observe(scope, status, elapsed, request_id)
            finally:
                REQUEST_ID.reset(reset_token)

    async def _call_endpoint(self, route: Route, scope: Scope, receive: Receive, send: Send) -> None:
        """What Starlette's stack does for a matched route, without its layers."""
        scope["app"] = self.app  # endpoints find the context at request.app.state
        scope["route"] = route
        request = Request(scope, receive, send)
        try:
            response = await route.endpoint(request)
        except Exception as exc:
            # The handler Starlette would pick: the one for the nearest class in the MRO.
            handler = next(EXCEPTION_HANDLERS[c] for c in type(exc).__mro__ if c in EXCEPTION_HANDLERS)
            response = await handler(request, exc)
        await response(scope, receive, send)

    def _observe(self, scope: Scope, status: int, elapsed: float, request_id: str) -> None:
        route = self._route_template(scope)
        method = scope["method"] if scope["method"] in _KNOWN_METHODS else "other"
        if route == HEALTH_PATH:
            access_logger.debug("%s %s %d %.1fms", method, route, status, elapsed * 1000)
            return
        metrics.observe_request(route, method, status, elapsed)
        lane = access_lane(access_logger)
        if lane is not None:
            lane.access(ACCESS_LOGGER_NAME, request_id, f"{method} {route} {status} {elapsed * 1000:.1f}ms")
        elif access_logger.isEnabledFor(logging.INFO):
            # Built only from the route template, method and status: nothing to redact.
            access_logger.info("%s %s %d %.1fms", method, route, status, elapsed * 1000, extra=_PRE_REDACTED)


_PRE_REDACTED = {"_sydent_redacted": True}

CLEANUP_INTERVAL_SECONDS = 600


async def _periodic_cleanup(ctx: AppContext) -> None:
    while True:
        await asyncio.sleep(CLEANUP_INTERVAL_SECONDS)
        try:
            removed = await ctx.sessions.delete_expired()
            if removed:
                logger.info("removed %d expired validation sessions", removed)
            pruned = await ctx.lookup_index.prune()
            if pruned:
                logger.debug("pruned %d association change-log rows", pruned)
            invites, callbacks = await ctx.invites.expire()
            if invites or callbacks:
                logger.info("expired %d invitations and %d undelivered onbind callbacks", invites, callbacks)
            # An invite stored while its address was being bound (store-invite checks first,
            # mails, then stores) is queued here rather than at the next start.
            await ctx.onbind_queue.repair()
        except Exception:
            logger.exception("expired-session clean-up failed; will retry")


async def _deliver_onbind(ctx: AppContext) -> None:
    # Binds an older version stored without their callback (a crash between its two
    # transactions) are queued first, from the signed associations as stored.
    try:
        await ctx.onbind_queue.repair()
    except Exception:
        logger.exception("could not queue the onbind callbacks earlier binds left unqueued; retried in a while")
    await ctx.onbind.run()


async def _matrix_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, MatrixError)
    return JSONResponse(exc.to_json(), status_code=exc.status)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        return JSONResponse({"errcode": "M_UNRECOGNIZED", "error": "Unrecognized request"}, status_code=404)
    if exc.status_code == 405:
        # RFC 9110: a 405 names the methods the resource has (OPTIONS too: answered on every path).
        return JSONResponse(
            {"errcode": "M_UNRECOGNIZED", "error": "Method not allowed"},
            status_code=405,
            headers={"Allow": _allowed_methods(request)},
        )
    return JSONResponse({"errcode": "M_UNKNOWN", "error": str(exc.detail)}, status_code=exc.status_code)


def _allowed_methods(request: Request) -> str:
    # Every route of this path, not only the one Starlette's router picked (a path may have
    # one route per method). Only wrong methods come here: not a hot path.
    methods = {"OPTIONS"}
    for route in request.app.routes:
        if isinstance(route, Route) and route.methods:
            match, _ = route.matches(request.scope)
            if match != Match.NONE:
                methods |= route.methods
    return ", ".join(sorted(methods))


async def _unexpected_error(request: Request, exc: Exception) -> Response:
    logger.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return JSONResponse({"errcode": "M_UNKNOWN", "error": "Internal server error"}, status_code=500)


EXCEPTION_HANDLERS: dict[type[Exception], Callable[[Request, Exception], Awaitable[Response]]] = {
    MatrixError: _matrix_error,
    HTTPException: _http_error,
    Exception: _unexpected_error,
}


def _metrics_server(config: Config, ctx: AppContext) -> metrics.MetricsServer | None:
    """The Prometheus listener of `metrics.*` in the config, if enabled.

    With several workers (prometheus_client multiprocess mode, see sydent_lite.observability)
    every worker listens on the metrics port with SO_REUSEPORT and answers for all of them.
    """
    cfg = config.metrics
    if not cfg.enabled:
        return None

    async def before_scrape() -> None:
        await metrics.refresh_onbind_pending(ctx.database)

    return metrics.MetricsServer(cfg.host, cfg.port, cfg.path, before_scrape=before_scrape)


def create_app(config: Config, context_factory: Callable[[Config], object] = build_context) -> ASGIApp:
    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        ctx: AppContext = await context_factory(config)  # type: ignore[misc]
        app.state.ctx = ctx
        # Everything alive now (modules, the app, the lookup index) lives as long as the
        # process: keep it out of the collector's full passes, which otherwise walk it all and
        # showed up as tail latency.
        gc.collect()
        gc.freeze()
        release_free_memory()
        metrics_server = _metrics_server(config, ctx)
        if metrics_server is not None:
            try:
                await metrics_server.start()
            except BaseException:
                await ctx.aclose()
                raise
        internal_api = None
        if config.internal_api.enabled:
            from sydent_lite.http.internal_api import InternalApiServer

            internal_api = InternalApiServer(config.internal_api, ctx)
            try:
                await internal_api.start()
            except BaseException:
                if metrics_server is not None:
                    await metrics_server.stop()
                await ctx.aclose()
                raise
        # Pending callbacks live in the database: a restarted server picks them up here.
        tasks = [
            asyncio.create_task(_periodic_cleanup(ctx)),
            asyncio.create_task(_deliver_onbind(ctx)),
            asyncio.create_task(ctx.lookup_index.run()),
        ]
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            if internal_api is not None:
                await internal_api.stop()
            if metrics_server is not None:
                await metrics_server.stop()
            await ctx.aclose()

    routes: list[BaseRoute] = [*all_routes(config.access)]  # the ones config.access leaves on
    return FrontDoor(starlette_app(routes, lifespan=lifespan))


def starlette_app(routes: list[BaseRoute], lifespan: Callable[[Starlette], Any] | None = None) -> Starlette:
    """Starlette with our routes and Matrix error handlers (wrap it in a FrontDoor to serve)."""
    app = Starlette(
        routes=routes,
        exception_handlers=EXCEPTION_HANDLERS,
        lifespan=lifespan,
    )
    # A trailing slash on a known path is an unknown path (404 M_UNRECOGNIZED), not a bodiless
    # 307 to the path without it: no identity-server path ends in a slash, and a redirected POST
    # is one more round trip that some clients do not follow.
    app.router.redirect_slashes = False
    return app
