"""Sydent's internal HTTP API: bind and unbind any 3PID, for the operator's automation.

`POST /_matrix/identity/internal/bind` and `/unbind`, each with `{"medium", "address", "mxid"}`,
answer as Sydent's (authenticated_bind_threepid_servlet.py, authenticated_unbind_...): the
signed association, and `{}`. There is no authentication at all, as in Sydent ("it is assumed
that authentication happens out of band"): the listener is off by default and only ever bound
to a loopback address (config `internal_api.*`, checked when the config is loaded). Binds go
through the service /3pid/bind uses: the address's pending invites are queued for the
homeserver with it; `sydent-lite bind` does the same from the command line.
"""

from __future__ import annotations

import contextlib
import logging
import socket

import uvicorn
from starlette.requests import Request
from starlette.responses import Response

from sydent_lite.config import InternalApiConfig
from sydent_lite.context import AppContext
from sydent_lite.errors import invalid_param
from sydent_lite.http.json_codec import JSONResponse
from sydent_lite.http.request import read_body, require_fields, require_str
from sydent_lite.http.routes import Route
from sydent_lite.observability import multiprocess_dir
from sydent_lite.threepids import is_valid_user_id, normalise_address, stored_address

logger = logging.getLogger(__name__)

PREFIX = "/_matrix/identity/internal"


async def _threepid_and_mxid(request: Request) -> tuple[str, str, str]:
    body = await read_body(request)
    require_fields(body, "medium", "address", "mxid")
    medium = require_str(body, "medium", max_length=16)
    address = require_str(body, "address", max_length=512)
    mxid = require_str(body, "mxid", max_length=255)
    if not is_valid_user_id(mxid):
        raise invalid_param("'mxid' is not a valid Matrix user ID")
    return medium, address, mxid


async def bind(request: Request) -> Response:
    ctx: AppContext = request.app.state.ctx
    medium, address, mxid = await _threepid_and_mxid(request)
    # Checked and in its stored form (400 for an address that is none); Sydent binds anything.
    signed = await ctx.associations.bind(medium, normalise_address(medium, address), mxid)
    logger.info("bound an %s address through the internal API", medium)
    return JSONResponse(signed)


async def unbind(request: Request) -> Response:
    ctx: AppContext = request.app.state.ctx
    medium, address, mxid = await _threepid_and_mxid(request)
    if medium not in ("email", "msisdn"):
        raise invalid_param(f"unknown medium {medium!r}")
    # Only case-folded, not validated: whatever got bound (an import's too) can be removed.
    # As Sydent: {} whether or not that binding existed.
    await ctx.associations.unbind(medium, stored_address(medium, address), mxid)
    return JSONResponse({})


def routes() -> list[Route]:
    return [
        Route(f"{PREFIX}/bind", bind, ["POST"]),
        Route(f"{PREFIX}/unbind", unbind, ["POST"]),
    ]


class InternalApiServer:
    """The internal API's own listener, on the main server's event loop, sharing its context.

    With several workers each one listens on the port (SO_REUSEPORT), like the metrics one.
    """

    def __init__(self, config: InternalApiConfig, ctx: AppContext) -> None:
        from sydent_lite.http.app import Dispatcher  # the app module starts us

        # The same dispatcher as the public API's: request ids, access lines (the caller's
        # address: the loopback one of the automation) and metrics under its own routes.
        app = Dispatcher(routes())
        app.state.ctx = ctx
        self.host = config.host
        self.port = config.port
        self._uvicorn = uvicorn.Config(
            app,
            lifespan="off",
            log_config=None,
            access_log=False,
            proxy_headers=False,
            server_header=False,
            ws="none",
            timeout_graceful_shutdown=5,
        )
        self._server: uvicorn.Server | None = None
        self._socket: socket.socket | None = None

    async def start(self) -> None:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        reuse_port = bool(multiprocess_dir()) and hasattr(socket, "SO_REUSEPORT")
        sock = socket.create_server((self.host, self.port), family=family, reuse_port=reuse_port)
        sock.setblocking(False)
        if self.port == 0:  # tests: an ephemeral port
            self.port = sock.getsockname()[1]
        self._uvicorn.load()
        server = uvicorn.Server(self._uvicorn)
        server.lifespan = self._uvicorn.lifespan_class(self._uvicorn)
        try:
            await server.startup(sockets=[sock])
        except BaseException:
            sock.close()
            raise
        self._server, self._socket = server, sock
        host = f"[{self.host}]" if ":" in self.host else self.host
        logger.info("internal API listening on http://%s:%d%s/", host, self.port, PREFIX)

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            with contextlib.suppress(Exception):
                await server.shutdown(sockets=[self._socket] if self._socket else None)
        self._socket = None
