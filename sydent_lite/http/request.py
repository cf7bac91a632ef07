"""Reading request bodies and parameters into checked values, or a Matrix error."""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import parse_qsl, unquote_to_bytes

from starlette.requests import ClientDisconnect, Request

from sydent_lite.errors import ErrorCode, MatrixError, invalid_param, missing_params
from sydent_lite.http import json_codec
from sydent_lite.secrets_util import OPAQUE_ID_RE

# Every endpoint's body cap but the lookups' (sized from lookup.max_addresses: routes/lookup.py).
MAX_BODY_BYTES = 64 * 1024
# What a JSON value's parse costs is per value, not per byte: 1 MB of `{},{},...` made ~30 MB of
# objects and took ~90 ms of the event loop. Bodies allowed past MAX_BODY_BYTES say how many
# array elements and object members they may hold (`max_items`), counted before parsing as the
# bytes that open or separate them (`[`, `{`, `,`), which never undercounts.
_ITEM_BYTES = b",[{"


async def _read_limited(request: Request, max_bytes: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise MatrixError(413, ErrorCode.TOO_LARGE, "Request body too large")
    chunks = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_bytes:
                raise MatrixError(413, ErrorCode.TOO_LARGE, "Request body too large")
            chunks.append(chunk)
    except ClientDisconnect:
        # The client went away mid-body: nobody reads the answer, and it is not our error
        # (no traceback in the log). 400 for the access line.
        raise MatrixError(400, ErrorCode.UNKNOWN, "The client disconnected before sending its request") from None
    return b"".join(chunks)


def _item_bytes(raw: bytes) -> int:
    return len(raw) - len(raw.translate(None, _ITEM_BYTES))  # one pass, in C


async def read_body(
    request: Request,
    *,
    allow_form: bool = True,
    allow_empty: bool = False,
    max_bytes: int = MAX_BODY_BYTES,
    max_items: int | None = None,
) -> dict[str, Any]:
    """The request's JSON object (or, where the spec still allows it, form fields).

    allow_empty: no body at all, or the JSON `null`, reads as {} (for endpoints whose clients
    may send every parameter in the query string instead).
    max_bytes, max_items: as read_raw_body's.
    """
    raw = await read_raw_body(request, max_bytes=max_bytes, max_items=max_items)
    return parse_body(request, raw, allow_form=allow_form, allow_empty=allow_empty)


async def read_raw_body(request: Request, *, max_bytes: int = MAX_BODY_BYTES, max_items: int | None = None) -> bytes:
    """The request's body, unparsed (for an endpoint that parses its own shape first).

    max_bytes: the body cap (413 M_TOO_LARGE over it). max_items: with a cap above
    MAX_BODY_BYTES, at most this many array elements and object members in a body larger than
    MAX_BODY_BYTES (400 M_TOO_LARGE, before parsing).
    """
    raw = await _read_limited(request, max_bytes)
    if max_items is not None and len(raw) > MAX_BODY_BYTES and _item_bytes(raw) > max_items:
        raise MatrixError(400, ErrorCode.TOO_LARGE, "Request body holds more entries than this endpoint takes")
    return raw


def parse_body(request: Request, raw: bytes, *, allow_form: bool = True, allow_empty: bool = False) -> dict[str, Any]:
    """`raw` (the request's body) as read_body reads it."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    # As Sydent: a body that looks like JSON is JSON whatever its Content-Type says (curl -d
    # labels everything as a form); only other bodies are read as form fields.
    looks_like_json = raw.lstrip()[:1] in (b"{", b"[")
    if allow_form and content_type == "application/x-www-form-urlencoded" and not looks_like_json:
        try:
            return dict(parse_qsl(raw.decode("utf-8"), keep_blank_values=True))
        except UnicodeDecodeError:
            raise MatrixError(400, ErrorCode.NOT_JSON, "Body is not valid UTF-8") from None
    if not raw.strip():
        if allow_empty:
            return {}
        raise MatrixError(400, ErrorCode.NOT_JSON, "Request body must be a JSON object")
    try:
        body = json_codec.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise MatrixError(400, ErrorCode.NOT_JSON, "Request body is not valid JSON") from None
    except RecursionError:
        raise MatrixError(400, ErrorCode.BAD_JSON, "Request body is nested too deeply") from None
    if body is None and allow_empty:
        return {}
    if not isinstance(body, dict):
        raise MatrixError(400, ErrorCode.BAD_JSON, "Request body must be a JSON object")
    return body


def is_storable(value: str) -> bool:
    """False for strings no database may be handed: NUL characters (PostgreSQL refuses them)
    and lone surrogates (not encodable as UTF-8)."""
    if "\x00" in value:
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def require_fields(source: dict[str, Any], *names: str) -> None:
    """400 M_MISSING_PARAMS naming every one of `names` that is absent (or null) at once."""
    missing = [n for n in names if source.get(n) is None]
    if missing:
        raise missing_params(*missing)


def _checked_str(value: object, name: str, max_length: int) -> str:
    if not isinstance(value, str):
        raise invalid_param(f"'{name}' must be a string")
    if len(value) > max_length:
        raise invalid_param(f"'{name}' is too long")
    if not is_storable(value):
        raise invalid_param(f"'{name}' contains characters that are not allowed")
    return value


def require_str(source: dict[str, Any], name: str, *, max_length: int = 2048) -> str:
    """`source[name]`, a string of at most `max_length` characters that a database can store:
    400 M_MISSING_PARAMS when absent or null, 400 M_INVALID_PARAM otherwise."""
    value = source.get(name)
    if value is None:
        raise missing_params(name)
    return _checked_str(value, name, max_length)


def optional_str(source: dict[str, Any], name: str, *, max_length: int = 2048) -> str | None:
    """As `require_str`, but None when absent or null."""
    value = source.get(name)
    if value is None:
        return None
    return _checked_str(value, name, max_length)


def require_opaque_id(source: dict[str, Any], name: str) -> str:
    """A sid or client_secret: spec `[0-9a-zA-Z.=_-]`, 1-255 characters."""
    value = require_str(source, name)
    if not OPAQUE_ID_RE.match(value):
        raise invalid_param(f"'{name}' must be 1-255 characters from [0-9a-zA-Z.=_-]")
    return value


# An integer written as text: form-encoded bodies carry every number so, and matrix-js-sdk sends
# send_attempt as "1". ASCII digits with an optional minus, nothing else: no spaces, signs,
# points, exponents or other scripts' digits (int() takes " 1", "1_0" and "١", an Arabic-Indic 1;  # noqa: RUF003
# str.isdigit() takes "²", which int() does not). Leading zeros read as decimal ("01" is 1). At most 20
# characters, checked before int() is called.
_DECIMAL_RE = re.compile(r"-?[0-9]{1,19}")


def require_int(source: dict[str, Any], name: str) -> int:
    value = source.get(name)
    if value is None:
        raise missing_params(name)
    if isinstance(value, bool):
        raise invalid_param(f"'{name}' must be an integer")
    if isinstance(value, int):
        result = value
    elif isinstance(value, str) and _DECIMAL_RE.fullmatch(value):
        result = int(value)
    else:
        raise invalid_param(f"'{name}' must be an integer")
    if not (-(2**63) <= result < 2**63):
        raise invalid_param(f"'{name}' is out of range")
    return result


def query_params(request: Request) -> dict[str, Any]:
    # What dict(request.query_params) gives (the last of repeated names wins), without
    # building Starlette's multidict first.
    return parse_query(request.scope["query_string"].decode("latin-1"))


def parse_query(query: str) -> dict[str, str]:
    """dict(parse_qsl(query, keep_blank_values=True)) in a third of its time (~6% of a v1
    lookup's CPU): the same splitting and unquoting (UTF-8, errors replaced), without
    parse_qsl's generality (separators, strict parsing, field counts) and unquote's splitting
    of the text into ASCII runs (the text here is latin-1: every character is one byte)."""
    params = {}
    for field in query.split("&") if query else ():
        if field:
            name, _, value = field.partition("=")
            params[_unquote(name)] = _unquote(value)
    return params


def _unquote(text: str) -> str:
    text = text.replace("+", " ")
    return unquote_to_bytes(text).decode("utf-8", "replace") if "%" in text else text
