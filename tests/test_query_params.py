"""http.request.parse_query: query strings read as Starlette reads them (parse_qsl), faster."""

from __future__ import annotations

import random
from urllib.parse import parse_qsl

import pytest

from sydent_lite.http.request import parse_query

PIECES = ["a", "=", "&", "%", "%4", "%40", "%C3", "%A9", "%c3%a9", "%E2%82%AC", "%ZZ", "+", "é", "\xa9", "\xc3", "\xff"]
PIECES += [" ", "%26", "%3D", "%%", "x=y", "%ED%A0%80", "%F0%9F%98%80", ";", "#"]


@pytest.mark.parametrize("seed", range(4))
def test_parse_query_is_parse_qsl(seed: int) -> None:
    # Query strings arrive as latin-1 (one character a byte): escapes, bad escapes, partial
    # and surrogate UTF-8, '+', separators escaped or not, raw high bytes.
    rng = random.Random(seed)
    for _ in range(25_000):
        query = "".join(rng.choice(PIECES) for _ in range(rng.randrange(0, 12)))
        assert parse_query(query) == dict(parse_qsl(query, keep_blank_values=True)), query


def test_parse_query_of_a_v1_lookup() -> None:
    query = "medium=email&address=alice%40example.org&address=bob%2Bx%40example.org&flag"
    assert parse_query(query) == {"medium": "email", "address": "bob+x@example.org", "flag": ""}
