"""Logs: a request id on every record, a last-line-of-defence redaction, text or JSON lines.

The request id lives in a contextvar set by the HTTP middleware for the duration of a request
(asyncio tasks started inside the request inherit it); records logged outside any request get
"-". Code must still never log tokens, secrets, codes or full addresses: `RedactingFilter`
only catches the obvious shapes (key=value, "key": "value", Bearer, URL passwords, email
addresses) in case something slips through.
"""

from __future__ import annotations

import json
import logging
import random
import re
import sys
import time
from contextvars import ContextVar
from typing import Any, TextIO

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
_PATTERNS: list[tuple[re.Pattern[str], str]] = [
    # scheme://user:password@host
    (re.compile(r"(://[^/\s:@]+):[^/\s@]+@"), rf"\1:{REDACTED}@"),
    # Authorization: Bearer <token>
    (re.compile(r"(?i)\b(bearer)\s+[A-Za-z0-9._~+/=-]+"), rf"\1 {REDACTED}"),
    # "client_secret": "..."  /  'token': '...'  (JSON, Python reprs)
    (re.compile(rf"(?i)([\"'])({_SECRET_KEY})\1(\s*:\s*)([\"'])(?:\\.|(?!\4).)*\4"), rf"\1\2\1\3\4{REDACTED}\4"),
    # "token": 123456  (a numeric code in JSON)
    (re.compile(rf"(?i)([\"'])({_SECRET_KEY})\1(\s*:\s*)\d+"), rf"\1\2\1\3{REDACTED}"),
    # access_token=..., client_secret=..., token=..., sig=... (query strings, key=value text)
    (re.compile(rf"(?i)\b({_SECRET_KEY})=[^&\s\"'<>;,)\]]+"), rf"\1={REDACTED}"),
    # email addresses: first character and the domain only
    (
        re.compile(r"([^\s@<>()\[\]\"',;:=&/?])[^\s@<>()\[\]\"',;:=&/?]*@((?:[\w-]+\.)+[\w-]{2,})"),
        r"\1...@\2",
    ),
]


def redact(text: str) -> str:
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
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


# --- formatting ------------------------------------------------------------------------------------

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT, defaults={"request_id": "-"})
        self._second = -1
        self._second_text = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        # One strftime per second rather than per line (an access line per request adds up).
        second = int(record.created)
        if second != self._second:
            self._second, self._second_text = second, time.strftime("%Y-%m-%d %H:%M:%S", self.converter(second))
        return f"{self._second_text},{int(record.msecs):03d}"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, request_id, message (and exc, stack)."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
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


LOG_FORMATS = ("text", "json")


def make_handler(fmt: str = "text", stream: TextIO | None = None) -> logging.Handler:
    """A stream handler with the request id and redaction filters and the chosen format."""
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)} (got {fmt!r})")
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.addFilter(RequestIdFilter())
    handler.addFilter(RedactingFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler._sydent_lite = True  # type: ignore[attr-defined]
    return handler


def setup_logging(level: str | int = "INFO", fmt: str = "text", stream: TextIO | None = None) -> logging.Handler:
    """Configure the root logger (idempotent: replaces the handler a previous call installed)."""
    # The documented logging optimisation: no caller lookup (sys._getframe) per record; our
    # formats never show file or line.
    logging._srcfile = None  # type: ignore[attr-defined]
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_sydent_lite", False)]:
        root.removeHandler(old)
    handler = make_handler(fmt, stream)
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    return handler
