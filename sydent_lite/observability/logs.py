"""Logs: a request id on every record, a last-line-of-defence redaction, text or JSON lines.

The request id lives in a contextvar set by the HTTP middleware for the duration of a request
(asyncio tasks started inside the request inherit it); records logged outside any request get
"-". Code must still never log tokens, secrets, codes or full addresses: `RedactingFilter`
only catches the obvious shapes (key=value, "key": "value", Bearer, URL passwords, email
addresses) in case something slips through.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import re
import sys
import time
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from sydent_lite.config import Config

REQUEST_ID: ContextVar[str] = ContextVar("sydent_lite_request_id", default="-")
REQUEST_ID_HEADER = "X-Request-Id"
_INCOMING_REQUEST_ID = re.compile(r"[0-9A-Za-z-]{1,64}")


def new_request_id() -> str:
    # Not a secret, only unique enough to follow one request through the logs: no syscall.
    return f"{random.getrandbits(64):016x}"


def request_id_from_header(value: str | None) -> str:
    """The caller's (or proxy's) request id if it is short and plain, else a fresh one."""
    if value is not None and _INCOMING_REQUEST_ID.fullmatch(value):
        return value
    return new_request_id()


def current_request_id() -> str:
    return REQUEST_ID.get()


class RequestIdFilter(logging.Filter):
    """Adds `request_id` to every record passing the handler ("-" outside requests)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not isinstance(getattr(record, "request_id", None), str):
            record.request_id = REQUEST_ID.get()
        return True


# --- redaction ---------------------------------------------------------------------------------

REDACTED = "<redacted>"
# Names whose values are secret: *token, *secret, *password, sig, signature, code (exact word).
_SECRET_KEY = r"(?:[A-Za-z0-9_-]*(?:token|secret|password|passwd|signature)|sig|code)"
# Each pattern with the substrings one of which it cannot match without (`needs`, looked for in
# the text lowered): most lines hold none of them, and a substring test is far cheaper than a
# pattern's scan (the six scans were 16 us a line, half of what an INFO record cost).
_PATTERNS: list[tuple[tuple[str, ...], re.Pattern[str], str]] = [
    # scheme://user:password@host
    (("://",), re.compile(r"(://[^/\s:@]+):[^/\s@]+@"), rf"\1:{REDACTED}@"),
    # Authorization: Bearer <token>
    (("bearer",), re.compile(r"(?i)\b(bearer)\s+[A-Za-z0-9._~+/=-]+"), rf"\1 {REDACTED}"),
    # "client_secret": "..."  /  'token': '...'  (JSON, Python reprs)
    (
        ('"', "'"),
        re.compile(rf"(?i)([\"'])({_SECRET_KEY})\1(\s*:\s*)([\"'])(?:\\.|(?!\4).)*\4"),
        rf"\1\2\1\3\4{REDACTED}\4",
    ),
    # "token": 123456  (a numeric code in JSON)
    (('"', "'"), re.compile(rf"(?i)([\"'])({_SECRET_KEY})\1(\s*:\s*)\d+"), rf"\1\2\1\3{REDACTED}"),
    # access_token=..., client_secret=..., token=..., sig=... (query strings, key=value text)
    (("=",), re.compile(rf"(?i)\b({_SECRET_KEY})=[^&\s\"'<>;,)\]]+"), rf"\1={REDACTED}"),
    # email addresses: first character and the domain only
    (
        ("@",),
        re.compile(r"([^\s@<>()\[\]\"',;:=&/?])[^\s@<>()\[\]\"',;:=&/?]*@((?:[\w-]+\.)+[\w-]{2,})"),
        r"\1...@\2",
    ),
]


def redact(text: str) -> str:
    lowered = text.lower()  # no other character matches b, e, a or r case-insensitively
    for needs, pattern, replacement in _PATTERNS:
        if any(n in lowered for n in needs):
            text = pattern.sub(replacement, text)
            lowered = text.lower()
    return text


class RedactingFilter(logging.Filter):
    """Masks obvious secrets and addresses in records at `min_level` and above (default INFO)."""

    def __init__(self, min_level: int = logging.INFO) -> None:
        super().__init__()
        self.min_level = min_level
        self._formatter = logging.Formatter()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < self.min_level or getattr(record, "_sydent_redacted", False):
            return True
        try:
            message = record.getMessage()
        except Exception:  # a broken format string: let logging report it as usual
            return True
        record.msg, record.args = redact(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = self._formatter.formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        record._sydent_redacted = True
        return True


def redact_every_record(logger_name: str) -> None:
    """Redact every record of that logger, at every level, whichever handler gets it (ours,
    a test's, an operator's own logging set-up): for libraries that log what we send, such
    as httpx, whose request lines quote the URL with its query string (OpenID tokens)."""
    logger = logging.getLogger(logger_name)
    if not any(isinstance(f, RedactingFilter) for f in logger.filters):
        logger.addFilter(RedactingFilter(logging.NOTSET))


# --- formatting ------------------------------------------------------------------------------------

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT, defaults={"request_id": "-"})
        self._second = -1
        self._second_text = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return self.time_text(record.created, record.msecs)

    def time_text(self, created: float, msecs: float) -> str:
        # One strftime per second rather than per line (an access line per request adds up).
        second = int(created)
        if second != self._second:
            self._second, self._second_text = second, time.strftime("%Y-%m-%d %H:%M:%S", self.converter(second))
        return f"{self._second_text},{int(msecs):03d}"

    def format_line(self, created: float, level: str, name: str, request_id: str, message: str) -> str:
        """What `format` makes of a record with these fields (no exception, no stack)."""
        return f"{self.time_text(created, _msecs(created))} {level} {name} [{request_id}] {message}"


def _msecs(created: float) -> float:
    # As LogRecord computes it.
    return (created - int(created)) * 1000 + 0.0


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, request_id, message (and exc, stack)."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": self._ts(record.created, record.msecs),
            "level": record.levelname,
            "logger": record.name,
            "request_id": getattr(record, "request_id", "-"),
            "message": record.getMessage(),
        }
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            out["exc"] = record.exc_text
        if record.stack_info:
            out["stack"] = record.stack_info
        return json.dumps(out, ensure_ascii=False)

    @staticmethod
    def _ts(created: float, msecs: float) -> str:
        return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{int(msecs):03d}Z"

    def format_line(self, created: float, level: str, name: str, request_id: str, message: str) -> str:
        """What `format` makes of a record with these fields (no exception, no stack)."""
        out = {
            "ts": self._ts(created, _msecs(created)),
            "level": level,
            "logger": name,
            "request_id": request_id,
            "message": message,
        }
        return json.dumps(out, ensure_ascii=False)


class LogHandler(logging.StreamHandler[TextIO]):
    """Our stream handler, with a lane for access lines that skips the logging machinery.

    An access line per request through `Logger.info` cost about a quarter of the CPU of a
    small request (a LogRecord, two filters, the formatter, a write and a flush each). Access
    lines are made of a route template, a method and a status: nothing to redact. `access()`
    formats them directly and writes them in batches, once per turn of the event loop (or
    at once, outside one). Other records below WARNING are formatted at once and join the same
    batch (a requestToken's or store-invite's "sent mail" line was a write and a flush of its
    own); a WARNING or worse is written at once, after what is pending, so that what explains a
    crash is on disk before it. Lines keep their order.
    """

    terminator = "\n"
    _sydent_lite = True  # marks the handlers setup_logging installed (it replaces only those)

    def __init__(self, stream: TextIO, formatter: TextFormatter | JsonFormatter) -> None:
        super().__init__(stream)
        self.setFormatter(formatter)
        self.line_formatter = formatter
        self._pending: list[str] = []
        self._flush_scheduled = False

    def access(self, name: str, request_id: str, message: str) -> None:
        self._batch(self.line_formatter.format_line(time.time(), "INFO", name, request_id, message))

    def _batch(self, line: str) -> None:
        with self.lock:  # type: ignore[union-attr]  # never None: Handler.__init__ made it
            self._pending.append(line)
            if self._flush_scheduled:
                return
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                loop = None
            if loop is None:
                self._write_pending()
                return
            self._flush_scheduled = True
        loop.call_soon(self.flush_pending)

    def flush_pending(self) -> None:
        with self.lock:  # type: ignore[union-attr]  # never None: Handler.__init__ made it
            self._write_pending()

    def _write_pending(self) -> None:
        self._flush_scheduled = False
        if not self._pending:
            return
        lines, self._pending = self._pending, []
        try:
            self.stream.write(self.terminator.join(lines) + self.terminator)
            self.stream.flush()
        except Exception:  # as StreamHandler.emit: a broken stream is not the request's problem
            pass

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno < logging.WARNING:
            try:
                line = self.format(record)
            except Exception:  # as StreamHandler.emit
                self.handleError(record)
                return
            self._batch(line)
            return
        if self._pending:
            self.flush_pending()
        super().emit(record)

    def flush(self) -> None:
        if self._pending:
            self.flush_pending()
        super().flush()


_active_handler: LogHandler | None = None


def access_lane(logger: logging.Logger) -> LogHandler | None:
    """The handler whose `access()` may stand in for `logger.info`, or None.

    Only when the record would have gone nowhere else than to our one handler on the root
    logger, unfiltered, as `setup_logging` leaves things: any other set-up (a test's handler,
    an operator's logging config) gets ordinary records.
    """
    handler = _active_handler
    if handler is None or not logger.isEnabledFor(logging.INFO):
        return None
    root = logging.root
    if root.handlers != [handler] or root.filters or handler.level > logging.INFO:
        return None
    current: logging.Logger | None = logger
    while current is not None and current is not root:
        if current.handlers or current.filters or not current.propagate:
            return None
        current = current.parent
    return handler


LOG_FORMATS = ("text", "json")


def make_handler(fmt: str = "text", stream: TextIO | None = None) -> LogHandler:
    """A stream handler with the request id and redaction filters and the chosen format."""
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)} (got {fmt!r})")
    handler = LogHandler(
        stream if stream is not None else sys.stderr, JsonFormatter() if fmt == "json" else TextFormatter()
    )
    handler.addFilter(RequestIdFilter())
    handler.addFilter(RedactingFilter())
    return handler


def setup_logging(level: str | int = "INFO", fmt: str = "text", stream: TextIO | None = None) -> logging.Handler:
    """Configure the root logger (idempotent: replaces the handler a previous call installed)."""
    global _active_handler
    # The documented logging optimisation: no caller lookup (sys._getframe) per record; our
    # formats never show file or line.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_sydent_lite", False)]:
        old.flush()
        root.removeHandler(old)
    handler = make_handler(fmt, stream)
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    _active_handler = handler
    return handler


LOG_FORMAT_ENV = "SYDENT_LITE_LOG_FORMAT"
# Libraries whose INFO lines are noise in our logs (httpx: a line per request, with its URL).
_QUIET_LIBRARIES = ("httpx", "httpcore", "alembic")


def setup_from_config(config: Config) -> None:
    """Levelled logs on stderr: `time LEVEL logger [request-id] message` ("-" outside requests).

    JSON lines instead with `log_format: json` in the config (or the environment variable
    SYDENT_LITE_LOG_FORMAT=json, which wins). Secrets and email addresses that slip into a
    message at INFO and above are masked (`RedactingFilter`).
    """
    fmt = (os.environ.get(LOG_FORMAT_ENV) or config.log_format or "text").lower()
    if fmt not in LOG_FORMATS:
        print(f"sydent-lite: unknown log format {fmt!r} (text or json); using text", file=sys.stderr)
        fmt = "text"
    setup_logging(config.log_level, fmt, sys.stderr)
    for name in _QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(logging.WARNING)
