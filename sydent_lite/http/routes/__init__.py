"""All HTTP routes. Each module lists its endpoints; v1 and v2 share one handler."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import Response

from sydent_lite.config import AccessConfig
from sydent_lite.context import AppContext

V1_PREFIX = "/_matrix/identity/api/v1"
V2_PREFIX = "/_matrix/identity/v2"

Endpoint = Callable[[Request], Awaitable[Response]]
Handler = Callable[[Request, AppContext, bool], Awaitable[Response]]


@dataclass(frozen=True)
class Route:
    """`methods` of `path` answered by `endpoint` (sydent_lite.http.app dispatches them).

    A path is static, or ends in one `{name}` segment (`/pubkey/{key_id}`: any non-empty text
    without a `/`, as `request.path_params["key_id"]`).
    """

    path: str
    endpoint: Endpoint
    methods: Sequence[str]


def _bound(handler: Handler, v2: bool) -> Endpoint:
    async def endpoint(request: Request) -> Response:
        return await handler(request, request.app.state.ctx, v2)

    endpoint.__name__ = f"{handler.__name__}_{'v2' if v2 else 'v1'}"
    return endpoint


def versioned(path: str, handler: Handler, methods: list[str], *, v1: bool = True, v2: bool = True) -> list[Route]:
    """Routes for `path` under the v2 and/or v1 prefix; the handler learns which one via `v2`."""
    routes = []
    if v2:
        routes.append(Route(V2_PREFIX + path, _bound(handler, True), methods))
    if v1:
        routes.append(Route(V1_PREFIX + path, _bound(handler, False), methods))
    return routes


def enabled(routes: list[Route], access: AccessConfig) -> list[Route]:
    """The routes the config leaves on, as Sydent mounts them: access.v1_enabled false drops
    every /_matrix/identity/api/v1 path, access.v1_associations_enabled false v1 /3pid/bind.
    A dropped path is an unknown one (404 M_UNRECOGNIZED)."""

    def on(route: Route) -> bool:
        if route.path == V1_PREFIX or route.path.startswith(V1_PREFIX + "/"):
            return access.v1_enabled and (route.path != V1_PREFIX + "/3pid/bind" or access.v1_bind_enabled)
        return True

    return [route for route in routes if on(route)]


def all_routes(access: AccessConfig | None = None) -> list[Route]:
    from sydent_lite.http.routes import (
        account,
        invites,
        lookup,
        pubkey,
        status,
        terms,
        threepid,
        validation,
    )

    routes: list[Route] = []
    for module in (status, account, terms, validation, threepid, lookup, pubkey, invites):
        routes.extend(module.routes())
    return enabled(routes, access) if access is not None else routes
