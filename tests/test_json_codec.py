"""http.json_codec: msgspec's speed with the stdlib's meaning. Every body reads as json.loads
reads it (msgspec's refusals go to the stdlib), and every answer is the bytes Starlette's
JSONResponse wrote."""

from __future__ import annotations

import json
import math
from typing import Any

import msgspec
import pytest
from starlette.responses import JSONResponse as StarletteJSONResponse

from sydent_lite.errors import ErrorCode
from sydent_lite.http import json_codec

# Bodies msgspec refuses and the stdlib reads: each must still mean what it meant.
STDLIB_ONLY = [
    b'{"addresses": ["\\ud800", "ok"]}',  # a lone surrogate (filtered later, as unstorable)
    b'{"n": NaN, "m": -Infinity}',
    b'{"f": 1e400}',
    '{"utf16": "\u00e9"}'.encode("utf-16"),
]
BOTH = [
    b'{"algorithm": "sha256", "pepper": "p", "addresses": ["a", "b\\u00e9", "\\u2028"]}',
    b'{"a": 1, "a": 2}',  # the last wins in both
    b' {"x": [1, 2.5, -0, true, false, null, {"y": "\\"\\\\/"}]} ',
    '{"é": "日本"}'.encode(),
    b'{"big": 123456789012345678901234567890, "low": -9223372036854775809}',  # ints, not floats
    b"[1E5, 1.5e-7, 0.1, 123456789.123456789, 5e-324, 1.7976931348623157e308]",
]


def same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(map(same, a, b))
    return type(a) is type(b) and a == b


@pytest.mark.parametrize("raw", STDLIB_ONLY)
def test_what_orjson_refuses_reads_as_the_stdlib_reads_it(raw: bytes) -> None:
    with pytest.raises(msgspec.DecodeError):
        msgspec.json.decode(raw)  # the case is real: msgspec does refuse it
    assert same(json_codec.loads(raw), json.loads(raw))


@pytest.mark.parametrize("raw", BOTH)
def test_what_both_read_means_the_same(raw: bytes) -> None:
    assert same(json_codec.loads(raw), json.loads(raw))


@pytest.mark.parametrize("raw", [b"", b"{", b'{"a": }', b"\xff\xfe\x00", b'{"a": "\xc3"}', b"[" * 100_000])
def test_bad_bodies_raise_the_stdlibs_errors(raw: bytes) -> None:
    with pytest.raises((ValueError, RecursionError)) as ours:
        json_codec.loads(raw)
    with pytest.raises((ValueError, RecursionError)) as stdlib:
        json.loads(raw)
    assert type(ours.value) is type(stdlib.value)


@pytest.mark.parametrize(
    "content",
    [
        {},
        {"mappings": {"h" * 43: "@alice:hs.test", "é": "@bob:日本.test"}},
        {"errcode": ErrorCode.UNRECOGNIZED, "error": "Unrecognized request", "retry_after_ms": 10},
        {"threepids": [["email", "a@b.test", "@a:b.test"]], "ok": True, "none": None, "n": -(2**63)},
        {"s": '\u2028</script>\x00\x7f"\\'},
        {1: "non-str key"},
        {"big": 2**70, "low": -(2**70)},
        {"tuple": (1, "a")},
    ],
)
def test_answers_are_starlettes_bytes(content: Any) -> None:
    assert json_codec.JSONResponse(content).body == StarletteJSONResponse(content).body


# bulk_lookup's fast path: a body it reads must give exactly the pairs the general path gives;
# every other body (wrong shapes, unstorable strings, what msgspec refuses) goes to the general
# path, whose checks give the errors.
BULK_BODIES = [
    b'{"threepids": [["email", "a@example.test"], ["msisdn", "447700900001"]]}',
    b'{"threepids": []}',
    b'{"extra": {"x": [1]}, "threepids": [["email", "b\\u00e9@example.test"]]}',
    b'{"threepids": [["email", "x"]], "threepids": [["email", "last@example.test"]]}',  # the last wins
    b'{"threepids": [["email", "nul\\u0000@example.test"]]}',  # unstorable: the general path drops it
    b'{"threepids": [["email", "\\ud800@example.test"]]}',
    b'{"threepids": [["email", "a"], ["email"]]}',
    b'{"threepids": [["email", "a", "b"]]}',
    b'{"threepids": [["email", 5]]}',
    b'{"threepids": null}',
    b'{"threepids": "email a"}',
    b'{"threepids": [{"email": "a", "x": "y"}]}',
    b'{"threepids": [["email", "a"]]} trailing',
    b"[]",
    '{"threepids": [["email", "utf16@example.test"]]}'.encode("utf-16"),
]


@pytest.mark.parametrize("raw", BULK_BODIES)
def test_bulk_lookup_fast_path_reads_only_what_the_general_path_reads_alike(raw: bytes) -> None:
    from sydent_lite.http.routes.lookup import _threepid_pairs, _well_formed_pairs

    fast = _well_formed_pairs(raw)
    if fast is None:
        return  # the general path reads it: tests/test_versions_cors_errors.py, test_bind_lookup.py
    general = _threepid_pairs(json.loads(raw)["threepids"], 10_000)
    assert [list(p) for p in fast] == general


def test_bulk_lookup_fast_path_leaves_unstorable_and_malformed_bodies_alone() -> None:
    from sydent_lite.http.routes.lookup import _well_formed_pairs

    taken = [raw for raw in BULK_BODIES if _well_formed_pairs(raw) is not None]
    assert taken == BULK_BODIES[:4]


@pytest.mark.parametrize("status", [200, 201, 400, 404, 429, 500, 204, 304, 101])
@pytest.mark.parametrize("headers", [None, {"Allow": "GET"}, {"Content-Type": "text/plain"}])
def test_answers_carry_starlettes_headers(status: int, headers: dict[str, str] | None) -> None:
    content = {"errcode": "M_UNKNOWN", "error": "é"}
    ours = json_codec.JSONResponse(content, status_code=status, headers=headers)
    theirs = StarletteJSONResponse(content, status_code=status, headers=headers)
    assert ours.raw_headers == theirs.raw_headers


def test_stored_json_text_is_sent_as_it_is_with_starlettes_headers() -> None:
    from starlette.responses import Response

    text = '{"mxid": "@é:example.org",  "ts": 1}'  # not re-encoded: spacing kept
    ours = json_codec.JSONText(text)
    theirs = Response(text, media_type="application/json")
    assert (ours.body, ours.raw_headers) == (theirs.body, theirs.raw_headers)
