"""JSON in and out of the HTTP layer: msgspec where it gives the stdlib's answer, else the stdlib.

A 1,000-hash lookup body is ~47 KB of JSON: the stdlib parses it in ~58 us, msgspec in ~29;
a bulk_lookup's 1,000 pairs ~130 against ~90; and Starlette's JSONResponse spent ~50 us
writing a 100-mapping answer that msgspec writes in ~3. msgspec reads a subset of what
`json.loads` reads (not: lone surrogates in escapes, NaN and Infinity, numbers beyond a
double's range, UTF-16 or UTF-32 bodies) and gives the same values for it, integers of any
size included (orjson, the other candidate, turns integers beyond 64 bits into floats). A
body msgspec refuses is read again by the stdlib: what a client sends means what it meant
before, its errors stay the stdlib's, and such a body costs at most two parses.
Answers: msgspec's compact UTF-8 is the bytes Starlette's JSONResponse wrote for our
documents (str, int, bool, None, lists, dicts; an enum as its value); what it will not encode
goes to the stdlib. (One difference is left: a float NaN, which we never send, is written as
`null` where the stdlib raised.)
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import msgspec
from starlette.responses import JSONResponse as StarletteJSONResponse

_T = TypeVar("_T")

_decode = msgspec.json.Decoder().decode
_encode = msgspec.json.Encoder().encode


def loads(raw: bytes) -> Any:
    """`json.loads(raw)`'s value, raising its errors (ValueError, RecursionError)."""
    try:
        return _decode(raw)
    except (msgspec.DecodeError, RecursionError):
        return json.loads(raw)


def shape_reader(shape: type[_T]) -> Callable[[bytes], _T | None]:
    """A reader of bodies of one exact shape (a msgspec Struct), checked while parsed: the body
    as `shape`, or None when it is not one or msgspec cannot read it, for the caller's general
    path (`loads` and its own checks, which give the errors). For hot endpoints: checking a
    parsed body's types in Python cost as much as parsing it."""
    decode = msgspec.json.Decoder(shape).decode

    def read(raw: bytes) -> _T | None:
        try:
            return decode(raw)
        except (msgspec.DecodeError, RecursionError):  # ValidationError is a DecodeError
            return None

    return read


_CONTENT_TYPE = (b"content-type", b"application/json")


class JSONResponse(StarletteJSONResponse):
    def render(self, content: Any) -> bytes:
        try:
            return _encode(content)
        except (TypeError, msgspec.EncodeError, OverflowError):
            return super().render(content)

    def init_headers(self, headers: Mapping[str, str] | None = None) -> None:
        # Starlette's, for the usual answer (no headers of the endpoint's, a status with a
        # body), without its generality: ~3 us of a ~25 us small request in process.
        if headers is not None or self.status_code < 200 or self.status_code in (204, 304):
            super().init_headers(headers)
            return
        self.raw_headers = [(b"content-length", str(len(self.body)).encode("latin-1")), _CONTENT_TYPE]


class JSONText(JSONResponse):
    """An answer that is JSON text already (a stored signed association), sent as it is."""

    def render(self, content: Any) -> bytes:
        return content.encode("utf-8") if isinstance(content, str) else bytes(content)
