"""Lookups: v2 hashed lookup and its hash details; v1 single and bulk lookups."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import chain

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from sydent_lite.context import AppContext
from sydent_lite.errors import ErrorCode, MatrixError, invalid_param
from sydent_lite.http.auth import require_user
from sydent_lite.http.client_ip import client_ip
from sydent_lite.http.json_codec import JSONResponse, JSONText, shape_reader
from sydent_lite.http.request import (
    MAX_BODY_BYTES,
    is_storable,
    parse_body,
    query_params,
    read_body,
    read_raw_body,
    require_fields,
    require_str,
)
from sydent_lite.http.routes import Route, versioned
from sydent_lite.observability import metrics
from sydent_lite.services.ratelimit import client_subject
from sydent_lite.threepids import stored_address

# A lookup carries up to lookup.max_addresses entries in one body (Element Android sends the
# whole address book at once), so the lookups' body cap is derived from that count: the small
# cap of every other endpoint (the other fields, whitespace) plus BYTES_PER_ADDRESS an entry.
# The longest entry is a known size only for sha256: 43 characters, 47 bytes as `"<hash>", `,
# ~51 pretty-printed. A `none` entry "<address> <medium>" or a bulk_lookup pair
# `["email", "<address>"], ` is its address plus 10-15 bytes (~40 pretty-printed), and an
# address may be up to 254 characters (RFC 5321), but a book of 10,000 addresses of that length
# is no real book (real ones average under 30). So 128 bytes an entry: 10,000 of them with
# addresses averaging up to ~110 characters (~90 pretty-printed) fit, and so does any one
# address of the longest length among them. The default, 10,000: 1,345,536 bytes (~1.3 MiB).
BYTES_PER_ADDRESS = 128


def lookup_body_limit(max_addresses: int) -> int:
    return MAX_BODY_BYTES + max_addresses * BYTES_PER_ADDRESS


# Array elements and object members (read_body's max_items) a lookup body of N entries holds,
# with room for separators inside the entries themselves (a `,` or `{` in an address: rare): v2,
# N addresses and three fields; bulk_lookup, a list, a `,` inside and a `,` after each pair.
def _v2_items(max_addresses: int) -> int:
    return 2 * max_addresses + 64


def _bulk_items(max_addresses: int) -> int:
    return 4 * max_addresses + 64


async def hash_details(request: Request, ctx: AppContext, v2: bool) -> Response:
    await require_user(request, ctx)
    return JSONResponse({"lookup_pepper": ctx.associations.pepper, "algorithms": ["none", "sha256"]})


async def _limit_lookups(ctx: AppContext, who: str) -> None:
    """Requests per user (v2) or client IP (v1), shared by every worker."""
    rl = ctx.config.rate_limits
    await ctx.rate_limiter.check(f"lookup:{who}", rl.lookup_per_token_per_minute / 60, rl.lookup_per_token_burst)


async def _limit_addresses(ctx: AppContext, who: str, count: int) -> None:
    """Addresses per user (v2) or client IP (v1): a lookup of N addresses costs N, at once.

    The burst is at least lookup.max_addresses (config), so any lookup of an allowed size can
    be paid for: a 429 here is worth retrying."""
    rl = ctx.config.rate_limits
    rate = rl.lookup_addresses_per_minute / 60
    await ctx.rate_limiter.check(f"lookup-addr:{who}", rate, rl.lookup_addresses_burst, count)


def _ip(request: Request, ctx: AppContext) -> str:
    return "ip:" + client_subject(client_ip(request, ctx.config.listen.trusted_proxies))


async def lookup_v2(request: Request, ctx: AppContext, v2: bool) -> Response:
    # Per user, not per token: a new token (another /account/register) is no new budget.
    who = "user:" + await require_user(request, ctx)
    await _limit_lookups(ctx, who)
    max_addresses = ctx.config.lookup.max_addresses
    body = await read_body(
        request, allow_form=False, max_bytes=lookup_body_limit(max_addresses), max_items=_v2_items(max_addresses)
    )
    require_fields(body, "algorithm", "pepper", "addresses")
    algorithm = require_str(body, "algorithm", max_length=64)
    pepper = require_str(body, "pepper", max_length=256)
    addresses = body["addresses"]
    if not isinstance(addresses, list) or not set(map(type, addresses)) <= {str}:
        raise invalid_param("'addresses' must be a list of strings")
    if len(addresses) > max_addresses:
        raise MatrixError(400, ErrorCode.TOO_LARGE, f"At most {max_addresses} addresses per lookup")
    await _limit_addresses(ctx, who, len(addresses))
    if not is_storable("".join(addresses)):  # checked at once: almost every list passes
        # A string no database can hold cannot match a stored one either.
        addresses = [a for a in addresses if is_storable(a)]
    mappings = await ctx.associations.hashed_lookup(algorithm, pepper, addresses)
    _LOOKUPS_V2.inc(len(addresses))
    return JSONResponse({"mappings": mappings})


async def lookup_v1(request: Request, ctx: AppContext, v2: bool) -> Response:
    who = _ip(request, ctx)
    await _limit_lookups(ctx, who)
    await _limit_addresses(ctx, who, 1)
    params = query_params(request)
    require_fields(params, "medium", "address")
    medium, address = require_str(params, "medium", max_length=16), require_str(params, "address", max_length=512)
    signed = await ctx.associations.signed_association_json(medium, stored_address(medium, address))
    _LOOKUPS_V1.inc()
    # The stored text as is: no parse and re-encode of a document we wrote ourselves.
    return JSONText(signed or "{}")


def _threepid_pairs(value: object, max_addresses: int) -> list[list[str]]:
    """bulk_lookup's `threepids`, checked: a list of [medium, address] string pairs.

    The checks run over the whole list at once (in C: map, set, join) rather than pair by pair
    in Python, which cost a quarter of a 1,000-pair lookup.
    """
    if not isinstance(value, list) or not set(map(type, value)) <= {list} or not set(map(len, value)) <= {2}:
        raise invalid_param("'threepids' must be a list of [medium, address] pairs")
    try:
        joined = "".join(chain.from_iterable(value))  # a TypeError if any is not a string
    except TypeError:
        raise invalid_param("'threepids' must be a list of [medium, address] pairs") from None
    if len(value) > max_addresses:
        raise _too_many(max_addresses)
    if is_storable(joined):
        return value
    # A string no database can hold cannot match a stored one either.
    return [pair for pair in value if is_storable(pair[0]) and is_storable(pair[1])]


class _BulkBody(msgspec.Struct):
    threepids: list[tuple[str, str]]


_read_bulk_body = shape_reader(_BulkBody)


def _well_formed_pairs(raw: bytes) -> list[tuple[str, str]] | None:
    """A bulk_lookup body's pairs when it is exactly a list of [medium, address] string pairs
    (types and lengths checked as it is parsed), else None: read it the general way. NUL is the
    one unstorable character msgspec reads (it refuses lone surrogates), always as an escape."""
    # The backslash alone first: memchr, where the whole escape's search took ~22 us of a body.
    if b"\\" in raw and b"\\u0000" in raw:
        return None
    body = _read_bulk_body(raw)
    return None if body is None else body.threepids


def _too_many(max_addresses: int) -> MatrixError:
    return MatrixError(400, ErrorCode.TOO_LARGE, f"At most {max_addresses} threepids per lookup")


async def bulk_lookup(request: Request, ctx: AppContext, v2: bool) -> Response:
    who = _ip(request, ctx)
    await _limit_lookups(ctx, who)
    max_addresses = ctx.config.lookup.max_addresses
    raw = await read_raw_body(request, max_bytes=lookup_body_limit(max_addresses), max_items=_bulk_items(max_addresses))
    pairs: Sequence[Sequence[str]] | None = _well_formed_pairs(raw)
    if pairs is not None:
        if len(pairs) > max_addresses:
            raise _too_many(max_addresses)
        asked = len(pairs)
    else:
        body = parse_body(request, raw, allow_form=False)
        require_fields(body, "threepids")
        pairs = _threepid_pairs(body["threepids"], max_addresses)
        asked = len(body["threepids"])
    await _limit_addresses(ctx, who, asked)  # as asked, before unstorable ones are dropped
    found = await ctx.associations.bulk_lookup(pairs)
    _LOOKUPS_V1_BULK.inc(len(pairs))
    return JSONResponse({"threepids": found})


_LOOKUPS_V2, _LOOKUPS_V1, _LOOKUPS_V1_BULK = (metrics.LOOKUPS.labels(api=a) for a in ("v2", "v1", "v1_bulk"))


def routes() -> list[Route]:
    return [
        *versioned("/hash_details", hash_details, ["GET"], v1=False),
        *versioned("/lookup", lookup_v2, ["POST"], v1=False),
        *versioned("/lookup", lookup_v1, ["GET"], v2=False),
        *versioned("/bulk_lookup", bulk_lookup, ["POST"], v2=False),
    ]
