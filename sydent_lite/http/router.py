"""Starlette's router, with a dictionary in front of its linear scan.

Every identity-server path is static, and Starlette tries each route's regular expression in
turn (37 routes: the v1 lookup was the 26th). Exact paths are looked up in a dict first; any
request that does not match fully there (wrong method, unknown path, trailing slash) goes
through Starlette's own logic unchanged, so 405s, 404s and redirects behave as before.
"""

from __future__ import annotations

from starlette.routing import BaseRoute, Match, Route, Router
from starlette.types import Receive, Scope, Send


class ExactPathRouter(Router):
    def __init__(self, routes: list[BaseRoute], **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(routes, **kwargs)
        self._by_path: dict[str, list[Route]] = {}
        for route in self.routes:
            if isinstance(route, Route) and not route.param_convertors:
                self._by_path.setdefault(route.path, []).append(route)

    async def app(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not scope.get("root_path"):
            for route in self._by_path.get(scope["path"], ()):
                match, child_scope = route.matches(scope)
                if match is Match.FULL:
                    scope.setdefault("router", self)
                    scope["route"] = route
                    scope.update(child_scope)
                    await route.handle(scope, receive, send)
                    return
        await super().app(scope, receive, send)
