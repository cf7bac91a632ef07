"""Running the HTTP server with uvicorn: one process, or a supervisor and N worker processes.

With `--workers N` (N > 1) the parent binds the socket, applies the migrations once, and starts
N uvicorn workers that share the socket. Each worker builds its own application from
`app_from_env`: the configuration the parent validated travels in an environment variable, as
the JSON of its model (the file's key names), and is validated again there. Workers share
nothing but the database (and Redis, when configured): that is where every piece of state
that matters lives. "listening on" is printed once, by the parent, when every worker serves.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import sys
from typing import Any

import uvicorn
from uvicorn.supervisors.multiprocess import Multiprocess

from sydent_lite.config import Config, config_from_dict
from sydent_lite.context import load_static_parts
from sydent_lite.http.app import create_app
from sydent_lite.http.file_limit import backlog_for, raise_file_limit
from sydent_lite.http.protocol import PROTOCOL, configure, limits_from_config
from sydent_lite.memory import limit_malloc_arenas
from sydent_lite.observability import cleanup_multiprocess, prepare_multiprocess
from sydent_lite.observability.logs import setup_from_config
from sydent_lite.observability.sentry import setup_sentry
from sydent_lite.observability.summary import config_summary
from sydent_lite.version import package_version

logger = logging.getLogger(__name__)

# The worker processes' configuration (JSON, YAML key names), set by the parent. The parent's
# validated config, not the file: a worker restarted later runs what its siblings run even if
# the file was edited meanwhile, and the embedded defaults (no file) travel the same way.
CONFIG_ENV = "SYDENT_LITE_WORKER_CONFIG"
APP_FACTORY = "sydent_lite.server:app_from_env"


class _NoUvicornBanner(logging.Filter):
    """Drops uvicorn's "Uvicorn running on http://..." line: it says http even when we serve
    TLS (our protocol does TLS, uvicorn does not know); "sydent-lite listening on" says it right."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Uvicorn running on")


logging.getLogger("uvicorn.error").addFilter(_NoUvicornBanner())


class _Server(uvicorn.Server):
    """uvicorn.Server that announces itself once the socket is bound and the app started."""

    def __init__(self, config: uvicorn.Config, announce: str) -> None:
        super().__init__(config)
        self._announce = announce

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started:
            print(f"sydent-lite listening on {self._announce}", flush=True)


class _Supervisor(Multiprocess):
    """uvicorn's worker supervisor, announcing once when every worker has started."""

    def __init__(self, config: uvicorn.Config, sockets: list[socket.socket], announce: str) -> None:
        super().__init__(config, sockets=sockets)  # uvicorn >= 0.30 (health-checked workers)
        self._announce = announce
        self.announced = False

    @staticmethod
    def _ready(process: Any) -> bool:
        if not process.process.is_alive():
            return False
        is_ready = getattr(process, "is_ready", None)  # newer uvicorn: startup finished, not just alive
        return bool(is_ready(timeout=1) if is_ready is not None else process.is_alive(timeout=1))

    def keep_subprocess_alive(self) -> None:
        waiting = not self.announced and not self.should_exit.is_set() and bool(self.processes)
        if waiting and all(self._ready(p) for p in self.processes):
            self.announced = True
            print(f"sydent-lite listening on {self._announce} ({len(self.processes)} workers)", flush=True)
        super().keep_subprocess_alive()


def app_from_env() -> Any:
    """The ASGI app of one worker process (uvicorn factory): config from CONFIG_ENV."""
    raw = os.environ.get(CONFIG_ENV)
    if not raw:
        raise RuntimeError(f"{APP_FACTORY} runs in worker processes started by `sydent-lite serve --workers N`")
    limit_malloc_arenas()
    config = config_from_dict(json.loads(raw))
    os.environ.pop(CONFIG_ENV, None)  # holds secrets; nothing this worker starts needs it
    setup_from_config(config)  # the same logging as the parent's
    setup_sentry(config)  # each worker reports its own errors
    configure(limits_from_config(config.listen))  # this process's connections
    return create_app(config)


def _uvicorn_options(config: Config, file_limit: int) -> dict[str, Any]:
    listen = config.listen
    return {
        "host": listen.host,
        "port": listen.port,
        "backlog": backlog_for(file_limit),  # counted in what must fit under the file limit
        # Our protocol: uvicorn's httptools one with deadlines, head limits and connection
        # caps; it also does TLS itself (listen.tls_*), so uvicorn gets no certificate.
        "http": PROTOCOL,
        "lifespan": "on",
        # uvloop where it is safe (faster: `GET /v2` +15 %, v1 lookup +30 % in bench/run.py), but
        # asyncio's loop under our own TLS: uvloop starts reading a new connection right after
        # connection_made whatever the protocol asked (pause_reading is ignored there), so the
        # ClientHello could reach the HTTP protocol before start_tls took over: a third of the
        # handshakes on one process, one in fifteen on workers, hung until the deadline
        # (measured; tests/test_tls_and_limits.py).
        "loop": "asyncio" if listen.tls_certificate else "auto",
        "ws": "none",  # nothing here speaks websockets; "auto" imports an implementation (~10 MiB)
        "log_config": None,  # our logging setup, not uvicorn's
        "access_log": False,  # access lines would carry ?access_token= query strings
        "proxy_headers": False,  # X-Forwarded-For is ours to judge (listen.trusted_proxies)
        "server_header": False,
        "timeout_graceful_shutdown": 10,
    }


def _announcement(config: Config) -> str:
    listen = config.listen
    scheme = "https" if listen.tls_certificate else "http"
    host = f"[{listen.host}]" if ":" in listen.host else listen.host
    return f"{scheme}://{host}:{listen.port}"


def _migrate_once(config: Config) -> None:
    """Apply migrations before the workers start, so they find the schema ready."""
    from sydent_lite.storage.database import migrate_database

    asyncio.run(migrate_database(config.database.url))


def sqlite_workers_warning(database_url: str, workers: int) -> str | None:
    """What to tell an operator who runs several workers on SQLite (None: nothing)."""
    if workers <= 1 or not database_url.startswith("sqlite"):
        return None
    return (
        f"SQLite with --workers {workers}: one process writes at a time, and a worker waiting for "
        "another's write stops serving meanwhile (up to 5 s; SQLite runs on the event loop). "
        "Use PostgreSQL for more than one process (docs/deployment.md)."
    )


def serve(config: Config, workers: int = 1) -> int:
    limit_malloc_arenas()
    # Allowed (it works, slowly under writes): said once, at start-up, where operators look.
    warning = sqlite_workers_warning(config.database.url, workers)
    if warning:
        logger.warning("%s", warning)
    # Fail on a bad key, terms or templates file (or TLS certificate) before binding the port.
    load_static_parts(config)
    # ConfigError (sentry-sdk missing, a bad DSN) before the port is bound; workers start
    # their own reporting.
    setup_sentry(config, start=workers <= 1)
    # Once, by the process the operator started (workers do not repeat it).
    logger.info("sydent-lite %s starting; %s", package_version(), config_summary(config, workers))
    limits = limits_from_config(config.listen)
    file_limit = raise_file_limit()  # before the workers start: they inherit it
    if workers <= 1:
        configure(limits)
        uv_config = uvicorn.Config(create_app(config), **_uvicorn_options(config, file_limit))
        server = _Server(uv_config, _announcement(config))
        # uvicorn's run, not asyncio.run: it picks uvloop (loop="auto"), as the workers do.
        server.run()
        return 0 if server.started else 1
    return _serve_workers(config, workers, file_limit)


def _serve_workers(config: Config, workers: int, file_limit: int) -> int:
    try:
        _migrate_once(config)
    except Exception as e:  # unreachable, refused, not migratable: say so and stop
        logger.debug("database preparation failed", exc_info=True)
        print(f"sydent-lite: cannot prepare the database: {e}", file=sys.stderr)
        return 1
    os.environ[CONFIG_ENV] = config.model_dump_json(by_alias=True)
    uv_config = uvicorn.Config(APP_FACTORY, factory=True, workers=workers, **_uvicorn_options(config, file_limit))
    try:
        sock = uv_config.bind_socket()
    except SystemExit:
        return 1  # uvicorn logged why (address in use, ...)
    # prometheus_client's shared directory for the workers (they inherit the environment).
    metrics_dir = prepare_multiprocess(workers)
    supervisor = _Supervisor(uv_config, [sock], _announcement(config))
    try:
        supervisor.run()
    except KeyboardInterrupt:  # pragma: no cover
        pass
    finally:
        sock.close()
        cleanup_multiprocess(metrics_dir)
    return 0 if supervisor.announced else 1
