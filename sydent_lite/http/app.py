"""The ASGI application: one dispatcher for every route, Matrix errors, CORS, request ids,
request metrics and access lines; the lifespan that builds the context and its background tasks."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
import traceback
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field

from starlette.datastructures import State
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from sydent_lite.config import Config
from sydent_lite.context import AppContext, build_context
from sydent_lite.errors import ErrorCode, MatrixError
from sydent_lite.http.client_ip import scope_client_ip
from sydent_lite.http.json_codec import JSONResponse
from sydent_lite.http.routes import Endpoint, Route, all_routes
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

Lifespan = Callable[["Dispatcher"], AbstractAsyncContextManager[None]]


@dataclass
class _Resource:
    """One path (or `prefix{name}` template): its endpoint per method, and its `Allow` header."""

    template: str
    param: str | None = None
    endpoints: dict[str, Endpoint] = field(default_factory=dict)
    allow: str = ""


class Dispatcher:
    """The ASGI app. Per request: a request id (logs, X-Request-Id header), the CORS headers,
    the request metrics and an access line; the endpoint for the path and method, or the
    answer for none.

    Every path is static (but `/pubkey/{key_id}`, one trailing segment), so dispatch is a dict
    lookup on the path, then on the method: unknown path 404, known path with another method
    405 with `Allow`, OPTIONS on any path the CORS preflight. A trailing slash is another path
    (404): no identity-server path ends in one, and a redirected POST is one more round trip
    that some clients do not follow. GET routes answer HEAD (uvicorn drops the body).
    Starlette's middleware, router and endpoint wrappers (seven layers, each wrapping `send`
    again) were a third of the CPU of a small request; here there is one wrapper.

    Endpoints raise MatrixError for a Matrix error answer; any other exception is logged and
    answered 500 M_UNKNOWN, without its text.

    Metrics and the access line name the matched route *template*
    (`/_matrix/identity/v2/3pid/bind`) or "unmatched", never the raw path or query string, so
    they carry no tokens or addresses and the number of series stays bounded. The access line
    starts with the client's address (`scope_client_ip`: `trusted_proxies` honoured), as
    nginx and Sydent write it, unless `log_client_address` is off.
    """

    def __init__(
        self,
        routes: Iterable[Route],
        *,
        lifespan: Lifespan | None = None,
        trusted_proxies: Sequence[str] = (),
        log_client_address: bool = True,
    ) -> None:
        self.state = State()  # endpoints find the context at request.app.state.ctx
        self._lifespan_context = lifespan
        self._trusted_proxies = tuple(trusted_proxies)
        self._log_client_address = log_client_address
        self._static: dict[str, _Resource] = {}
        self._templated: list[tuple[str, _Resource]] = []  # (prefix, resource)
        by_template: dict[str, _Resource] = {}
        for route in routes:
            resource = by_template.get(route.path)
            if resource is None:
                resource = by_template[route.path] = self._add_resource(route.path)
            for method in route.methods:
                resource.endpoints.setdefault(method, route.endpoint)
                if method == "GET":
                    resource.endpoints.setdefault("HEAD", route.endpoint)
        for resource in by_template.values():
            # RFC 9110: a 405 names the methods the resource has (OPTIONS too: answered on every path).
            resource.allow = ", ".join(sorted({*resource.endpoints, "OPTIONS"}))

    def _add_resource(self, path: str) -> _Resource:
        if "{" not in path:
            resource = self._static[path] = _Resource(path)
            return resource
        prefix, _, name = path.rpartition("{")
        if not (prefix.endswith("/") and name.endswith("}") and "{" not in prefix and name[:-1].isidentifier()):
            raise ValueError(f"route {path!r}: only a last segment `{{name}}` may be a parameter")
        resource = _Resource(path, param=name[:-1])
        self._templated.append((prefix, resource))
        return resource

    def _resolve_templated(self, path: str) -> tuple[_Resource | None, dict[str, str]]:
        for prefix, resource in self._templated:
            if path.startswith(prefix):
                value = path[len(prefix) :]
                if value and "/" not in value and resource.param is not None:
                    return resource, {resource.param: value}
        return None, {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self._http(scope, receive, send)
        elif scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        else:  # uvicorn runs with ws="none"
            raise RuntimeError(f"unsupported ASGI scope type {scope['type']!r}")

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        incoming = None
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                incoming = value.decode("latin-1")
                break
        request_id = request_id_from_header(incoming)
        reset_token = REQUEST_ID.set(request_id)
        start = time.perf_counter()
        status = 500  # unless a response starts: an exception escaped

        async def send_with_headers(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                request_id_header = (b"x-request-id", request_id.encode("ascii"))
                message["headers"] = [*message.get("headers", ()), *RESPONSE_HEADERS, request_id_header]
            await send(message)

        path: str = scope["path"]
        root_path: str = scope.get("root_path", "")
        if root_path and path.startswith(root_path):
            path = path[len(root_path) :]
        resource = self._static.get(path)
        path_params: dict[str, str] = {}
        if resource is None:
            resource, path_params = self._resolve_templated(path)
        try:
            method = scope["method"]
            endpoint = resource.endpoints.get(method) if resource is not None else None
            if endpoint is not None:
                response: Response = await self._call_endpoint(endpoint, path_params, scope, receive, send_with_headers)
            elif method == "OPTIONS":
                # Spec "Web browser clients": OPTIONS is answered on every path (CORS preflight).
                response = JSONResponse({})
            elif resource is None:
                response = JSONResponse(
                    {"errcode": ErrorCode.UNRECOGNIZED, "error": "Unrecognized request"}, status_code=404
                )
            else:
                response = JSONResponse(
                    {"errcode": ErrorCode.UNRECOGNIZED, "error": "Method not allowed"},
                    status_code=405,
                    headers={"Allow": resource.allow},
                )
            await response(scope, receive, send_with_headers)
        finally:
            elapsed = time.perf_counter() - start
            try:
                self._observe(scope, resource.template if resource else UNMATCHED_ROUTE, status, elapsed, request_id)
            finally:
                REQUEST_ID.reset(reset_token)

    async def _call_endpoint(
        self, endpoint: Endpoint, path_params: dict[str, str], scope: Scope, receive: Receive, send: Send
    ) -> Response:
        scope["app"] = self
        if path_params:
            scope["path_params"] = path_params
        try:
            return await endpoint(Request(scope, receive, send))
        except MatrixError as exc:
            return JSONResponse(exc.to_json(), status_code=exc.status)
        except Exception as exc:
            logger.error("unhandled error on %s %s", scope["method"], scope["path"], exc_info=exc)
            return JSONResponse({"errcode": ErrorCode.UNKNOWN, "error": "Internal server error"}, status_code=500)

    def _observe(self, scope: Scope, route: str, status: int, elapsed: float, request_id: str) -> None:
        method = scope["method"] if scope["method"] in _KNOWN_METHODS else "other"
        if route == HEALTH_PATH:
            if access_logger.isEnabledFor(logging.DEBUG):
                access_logger.debug("%s%s %s %d %.1fms", self._client(scope), method, route, status, elapsed * 1000)
            return
        metrics.observe_request(route, method, status, elapsed)
        lane = access_lane(access_logger)
        if lane is not None:
            line = f"{self._client(scope)}{method} {route} {status} {elapsed * 1000:.1f}ms"
            lane.access(ACCESS_LOGGER_NAME, request_id, line)
        elif access_logger.isEnabledFor(logging.INFO):
            # Built only from the client address, route template, method and status: nothing to redact.
            access_logger.info(
                "%s%s %s %d %.1fms", self._client(scope), method, route, status, elapsed * 1000, extra=_PRE_REDACTED
            )

    def _client(self, scope: Scope) -> str:
        """The access line's first field: the client address and a space, or nothing."""
        if not self._log_client_address:
            return ""
        return scope_client_ip(scope, self._trusted_proxies) + " "

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        """The ASGI lifespan protocol around `lifespan(self)`, as Starlette's router runs it:
        a failed start-up or shutdown is reported with its traceback, then raised."""
        started = False
        await receive()  # lifespan.startup
        context = self._lifespan_context(self) if self._lifespan_context else contextlib.nullcontext()
        try:
            async with context:
                await send({"type": "lifespan.startup.complete"})
                started = True
                await receive()  # lifespan.shutdown
        except BaseException:
            failed = "lifespan.shutdown.failed" if started else "lifespan.startup.failed"
            await send({"type": failed, "message": traceback.format_exc()})
            raise
        await send({"type": "lifespan.shutdown.complete"})


_PRE_REDACTED = {"_sydent_redacted": True}

CLEANUP_INTERVAL_SECONDS = 600


async def _periodic_cleanup(ctx: AppContext) -> None:
    while True:
        await asyncio.sleep(CLEANUP_INTERVAL_SECONDS)
        try:
            removed = await ctx.sessions.delete_expired()
            if removed:
                logger.info("removed %d expired validation sessions", removed)
            pruned = await ctx.peppers.prune()
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


def create_app(config: Config, context_factory: Callable[[Config], object] = build_context) -> Dispatcher:
    @asynccontextmanager
    async def lifespan(app: Dispatcher) -> AsyncIterator[None]:
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
            asyncio.create_task(ctx.peppers.run()),
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

    return Dispatcher(
        all_routes(config.access),  # the ones config.access leaves on
        lifespan=lifespan,
        trusted_proxies=config.listen.trusted_proxies,
        log_client_address=config.log_client_address,
    )
