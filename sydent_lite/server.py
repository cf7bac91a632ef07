"""Running the HTTP server with uvicorn."""

from __future__ import annotations

import asyncio
import logging

import uvicorn

from sydent_lite.config import Config
from sydent_lite.context import load_static_parts
from sydent_lite.http.app import create_app

logger = logging.getLogger(__name__)


class _Server(uvicorn.Server):
    """uvicorn.Server that announces itself once the socket is bound and the app started."""

    def __init__(self, config: uvicorn.Config, announce: str) -> None:
        super().__init__(config)
        self._announce = announce

    async def startup(self, sockets=None) -> None:  # type: ignore[no-untyped-def]
        await super().startup(sockets=sockets)
        if self.started:
            print(f"sydent-lite listening on {self._announce}", flush=True)


def serve(config: Config) -> int:
    # Fail on a bad key, terms or templates file before binding the port.
    load_static_parts(config)
    listen = config.listen
    scheme = "https" if listen.tls_certificate else "http"
    host = f"[{listen.host}]" if ":" in listen.host else listen.host
    uv_config = uvicorn.Config(
        create_app(config),
        host=listen.host,
        port=listen.port,
        ssl_certfile=listen.tls_certificate,
        ssl_keyfile=listen.tls_private_key,
        lifespan="on",
        log_config=None,  # our logging setup, not uvicorn's
        access_log=False,  # access lines would carry ?access_token= query strings
        proxy_headers=False,
        server_header=False,
        timeout_graceful_shutdown=10,
    )
    server = _Server(uv_config, f"{scheme}://{host}:{listen.port}")
    asyncio.run(server.serve())
    return 0 if server.started else 1
