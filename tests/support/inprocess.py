"""The in-process tier: the real application, served by uvicorn on a real loopback socket, but
in this process (its event loop on a thread of its own) instead of a `python -m sydent_lite`
subprocess.

What it saves is the subprocess: its start-up (interpreter, imports: 4-5 s on this machine)
and the real waiting for time to pass, because its services read the time from a `FakeClock`
that the test advances. Clients still speak HTTP over a socket, so every contract tested here
(status codes, error bodies, headers) is the one a real client sees.

What needs a real process stays with `support.server.SydentServer`: start-up and its failures,
signals and restarts, workers, TLS, resource limits, PostgreSQL connection handling across
processes, the browser.

`InProcessServer` is a `SydentServer` (same config, same `base_url`, `new_client`, `IdentityApi`)
whose `start`/`stop` run the app here; the fake clock exists only in tests. Its log lines (the
server's handler, with its filters, at the configured level) are its `output()`, as a
subprocess's stderr is: tests that a secret is never logged read them. Loggers are per process,
so they include what other in-process servers log meanwhile: more, never less.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, TextIO, cast

import uvicorn

from sydent_lite.config import Config, config_from_dict
from sydent_lite.context import AppContext, build_context
from sydent_lite.http.app import create_app
from sydent_lite.http.protocol import configure, limits_from_config
from sydent_lite.observability.logs import make_handler
from sydent_lite.server import _uvicorn_options

from .clock import FakeClock
from .server import ServerStartError, SydentServer

logger = logging.getLogger(__name__)


class InProcessServer(SydentServer):
    """A SydentServer served in this process, on `clock` (a FakeClock unless given)."""

    def __init__(self, workdir: Path, *, clock: FakeClock | None = None, **kwargs: Any) -> None:
        super().__init__(workdir, **kwargs)
        self.clock = clock if clock is not None else FakeClock()
        self._uvicorn: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._failure: BaseException | None = None
        self._log_handler: logging.Handler | None = None
        self._root_level = logging.root.level

    def start(self, timeout: float = 30.0) -> InProcessServer:
        assert self._thread is None, "already running"
        self.write_config()
        config = config_from_dict(self.config())
        configure(limits_from_config(config.listen))
        self._capture_logs(config)
        clock = self.clock

        async def context(cfg: Config) -> AppContext:
            return await build_context(cfg, clock)

        options = _uvicorn_options(config, file_limit=1024)
        options["timeout_graceful_shutdown"] = 2
        server = uvicorn.Server(uvicorn.Config(create_app(config, context), **options))
        self._uvicorn = server
        self._failure = None
        self._thread = threading.Thread(target=self._serve, args=(server,), name=f"{self.name} loop", daemon=True)
        self.starts += 1
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not server.started:
            if not self._thread.is_alive():
                self._thread = None
                raise ServerStartError(f"{self.name} did not start: {self._failure!r}")
            if time.monotonic() > deadline:
                self.stop()
                raise ServerStartError(f"{self.name} did not start within {timeout:.0f}s")
            time.sleep(0.01)
        return self

    def _serve(self, server: uvicorn.Server) -> None:
        try:
            asyncio.run(server.serve())
        except BaseException as e:  # reported by start() / the failure report
            self._failure = e
            self._output.append(f"[in-process] {e!r}")

    def stop(self, timeout: float = 10.0) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
        if self._uvicorn is not None:
            self._uvicorn.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                self._output.append("[test] in-process server did not stop in time")
            self._thread = None
        self._uvicorn = None
        if self._log_handler is not None:
            logging.root.removeHandler(self._log_handler)
            logging.root.setLevel(self._root_level)
            self._log_handler = None
        # The app's start-up freezes what is alive (gc.freeze); here that is the test process.
        gc.unfreeze()

    def _capture_logs(self, config: Config) -> None:
        handler = make_handler("text", cast(TextIO, _Lines(self._output, self.log_path)))
        handler.setLevel(config.log_level.upper())
        self._root_level = logging.root.level
        logging.root.addHandler(handler)
        if logging.root.level > handler.level:
            logging.root.setLevel(handler.level)
        self._log_handler = handler

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()


class _Lines:
    """A text stream whose lines go to a server's output (and its log file)."""

    def __init__(self, output: deque[str], log_path: Path) -> None:
        self._output = output
        self._log_path = log_path
        self._partial = ""

    def write(self, text: str) -> int:
        lines = (self._partial + text).split("\n")
        self._partial = lines.pop()
        if lines:
            self._output.extend(f"[log] {line}" for line in lines)
            with open(self._log_path, "a", encoding="utf-8") as log:
                log.writelines(f"[log] {line}\n" for line in lines)
        return len(text)

    def flush(self) -> None:
        return None
