"""Prometheus metrics, and the small listener that serves them.

Label values are always from small fixed sets (route templates, methods, status codes, mail
kinds, lookup APIs, rate-limit names), never addresses, user IDs or raw URLs, so the number of series is bounded.

The metrics listener is separate from the API listener (`metrics.host`/`metrics.port`) so it
can stay on a private interface; it answers `GET <metrics.path>` and nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from sqlalchemy import func, select

from sydent_lite.observability import multiprocess_dir

if TYPE_CHECKING:
    from sydent_lite.storage.database import Database

logger = logging.getLogger(__name__)

# --- the metrics ---------------------------------------------------------------------------------

REQUESTS = Counter(
    "sydent_requests_total",
    "HTTP requests answered, by matched route template ('unmatched' for unknown paths), method and status.",
    ["route", "method", "status"],
)
REQUEST_DURATION = Histogram(
    "sydent_request_duration_seconds",
    "Time from receiving a request to the end of its response, by route template and method.",
    ["route", "method"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)

EMAIL_KINDS = ("validation", "invite")
EMAILS_SENT = Counter("sydent_emails_sent_total", "Emails handed over for delivery, by kind.", ["kind"])
EMAILS_FAILED = Counter("sydent_emails_failed_total", "Emails that could not be handed over, by kind.", ["kind"])

SMS_SENT = Counter("sydent_sms_sent_total", "Validation SMS handed over to the provider.")
SMS_FAILED = Counter("sydent_sms_failed_total", "Validation SMS the provider did not take.")

# api: "v2" (hashed /v2/lookup), "v1" (/api/v1/lookup), "v1_bulk" (/api/v1/bulk_lookup).
LOOKUP_APIS = ("v2", "v1", "v1_bulk")
LOOKUPS = Counter("sydent_lookups_total", "Addresses looked up (one per address asked about), by API.", ["api"])

# limit: the name of the rate limit that refused (services.ratelimit.LIMITS), never its subject.
RATE_LIMITED = Counter(
    "sydent_rate_limited_total",
    "Requests refused with 429 M_LIMIT_EXCEEDED, by the limit that tripped (its keys: rate_limits.<limit>_*).",
    ["limit"],
)

# Read from the database at scrape time (`refresh_onbind_pending`): every worker sees the same
# queue, so with several workers the most recently read value is the right one.
ONBIND_PENDING = Gauge(
    "sydent_onbind_pending",
    "onbind callbacks queued and not yet delivered (all workers; read from the database at scrape time).",
    multiprocess_mode="mostrecent",
)

# Series that exist from the start (at 0), so rate() and alerts work before the first event.
for _kind in EMAIL_KINDS:
    EMAILS_SENT.labels(kind=_kind)
    EMAILS_FAILED.labels(kind=_kind)
for _api in LOOKUP_APIS:
    LOOKUPS.labels(api=_api)


@functools.lru_cache(maxsize=4096)
def _request_children(route: str, method: str, status: int) -> tuple[Counter, Histogram]:
    # labels() looks the child up under a lock on every call; the set of (route, method,
    # status) is small and fixed, so resolve each once.
    return REQUESTS.labels(route=route, method=method, status=str(status)), REQUEST_DURATION.labels(
        route=route, method=method
    )


def observe_request(route: str, method: str, status: int, seconds: float) -> None:
    counter, histogram = _request_children(route, method, status)
    counter.inc()
    histogram.observe(seconds)


# --- collecting ------------------------------------------------------------------------------------

ONBIND_QUERY_TIMEOUT_SECONDS = 2.0


async def refresh_onbind_pending(database: Database) -> None:
    """Set `sydent_onbind_pending` from the database (a COUNT on a small table)."""
    from sydent_lite.storage.tables import onbind_callbacks

    try:
        async with asyncio.timeout(ONBIND_QUERY_TIMEOUT_SECONDS):
            async with database.connect() as conn:
                count = (await conn.execute(select(func.count()).select_from(onbind_callbacks))).scalar_one()
    except Exception as e:  # the scrape still answers; the gauge keeps its last value
        logger.warning("metrics: cannot count pending onbind callbacks (%s)", type(e).__name__)
        return
    ONBIND_PENDING.set(count)


def render() -> bytes:
    """The exposition text: this process's metrics, or every worker's in multiprocess mode."""
    if multiprocess_dir():
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]  # unannotated upstream
        return generate_latest(registry)
    return generate_latest(REGISTRY)


# --- the listener ----------------------------------------------------------------------------------

_MAX_REQUEST_HEAD = 16 * 1024
_READ_TIMEOUT_SECONDS = 10.0
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 500: "Internal Server Error"}


class MetricsServer:
    """A minimal HTTP/1.x listener on the event loop that serves `render()` at one path.

    Deliberately tiny (one request per connection, GET/HEAD only, no request body): it only
    ever talks to a Prometheus scraper, and it must not pull in a second web server with its
    own signal handling into the process.
    """

    def __init__(
        self,
        host: str,
        port: int,
        path: str = "/metrics",
        before_scrape: Callable[[], Awaitable[None]] | None = None,
        reuse_port: bool | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.path = path if path.startswith("/") else "/" + path
        self._before_scrape = before_scrape
        # Several workers share the port; the kernel spreads scrapes over them (all equivalent).
        self._reuse_port = bool(multiprocess_dir()) if reuse_port is None else reuse_port
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}{self.path}"

    async def start(self) -> None:
        kwargs = {"reuse_port": True} if self._reuse_port and hasattr(socket, "SO_REUSEPORT") else {}
        self._server = await asyncio.start_server(
            self._on_connection, self.host, self.port, limit=_MAX_REQUEST_HEAD, **kwargs
        )
        if self.port == 0:  # tests: an ephemeral port
            self.port = self._server.sockets[0].getsockname()[1]
        logger.info("metrics listening on %s", self.url)

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for task in list(self._connections):
            task.cancel()
        for task in list(self._connections):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        with contextlib.suppress(Exception):
            async with asyncio.timeout(5):
                await server.wait_closed()

    def _on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.get_running_loop().create_task(self._handle(reader, writer))
        self._connections.add(task)
        task.add_done_callback(self._connections.discard)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                async with asyncio.timeout(_READ_TIMEOUT_SECONDS):
                    head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ConnectionError):
                return
            status, body, content_type, head_only = await self._answer(head)
            reason = _REASONS.get(status, "")
            headers = (
                f"HTTP/1.1 {status} {reason}\r\n"
                f"Content-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\n"
                "Cache-Control: no-store\r\n"
                "Connection: close\r\n\r\n"
            ).encode("latin-1")
            writer.write(headers if head_only else headers + body)
            with contextlib.suppress(ConnectionError):
                await writer.drain()
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _answer(self, head: bytes) -> tuple[int, bytes, str, bool]:
        text_plain = "text/plain; charset=utf-8"
        parts = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            return 400, b"bad request\n", text_plain, False
        method, target = parts[0], parts[1]
        if target.split("?", 1)[0] != self.path:
            return 404, b"not found\n", text_plain, method == "HEAD"
        if method not in ("GET", "HEAD"):
            return 405, b"method not allowed\n", text_plain, False
        if self._before_scrape is not None:
            try:
                await self._before_scrape()
            except Exception:
                logger.exception("metrics: refreshing values before a scrape failed")
        try:
            body = await asyncio.to_thread(render)
        except Exception:
            logger.exception("metrics: rendering failed")
            return 500, b"internal error\n", text_plain, False
        return 200, body, CONTENT_TYPE_LATEST, method == "HEAD"
