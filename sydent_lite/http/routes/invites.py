"""Invitations: store-invite and ephemeral signing (sign-ed25519)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from sydent_lite.context import AppContext
from sydent_lite.errors import ErrorCode, MatrixError, invalid_param
from sydent_lite.http.auth import require_user
from sydent_lite.http.client_ip import client_ip
from sydent_lite.http.json_codec import JSONResponse
from sydent_lite.http.request import optional_str, query_params, read_body, require_fields, require_str
from sydent_lite.http.routes import Route, versioned
from sydent_lite.services.ratelimit import client_subject
from sydent_lite.threepids import is_valid_user_id

REQUIRED = ("medium", "address", "room_id", "sender")
MAX_FIELDS = 50


async def store_invite(request: Request, ctx: AppContext, v2: bool) -> Response:
    # v2: the token's user is the sender, and the mail says so; v1 vouches for nobody.
    verified_sender = await require_user(request, ctx) if v2 else None
    body = await read_body(request)
    require_fields(body, *REQUIRED)
    if len(body) > MAX_FIELDS:
        raise invalid_param("Too many fields")
    # Every string field reaches the invite template; other JSON values are dropped.
    fields = {}
    for name in body:
        if isinstance(name, str) and len(name) <= 64 and isinstance(body[name], str):
            fields[name] = require_str(body, name, max_length=2048)
    for name in REQUIRED:
        if name not in fields:
            raise invalid_param(f"'{name}' must be a string")
    # Any room ID as sent (matrix-is-tester sends "$aroom:fake.test"), as Sydent: it is only
    # echoed (into the mail, its join link URL-quoted, and the onbind callback).
    if not fields["room_id"] or len(fields["room_id"]) > 255:
        raise invalid_param("'room_id' must be 1-255 characters")
    if not is_valid_user_id(fields["sender"]):
        raise invalid_param("'sender' is not a Matrix user ID")
    if verified_sender is not None and fields["sender"] != verified_sender:
        # As Sydent (since 2.3): nobody invites in someone else's name.
        raise MatrixError(403, ErrorCode.UNAUTHORIZED, "'sender' is not the user of the access token")
    # Who may invite, and what: the allow-list (v2; v1 is off with one) and the blocks.
    ctx.access.check_user(fields["sender"])
    ctx.invites.check_allowed(fields)
    brand = fields.pop("brand", None) or optional_str(query_params(request), "brand", max_length=64)
    # Shared by every worker (see services/ratelimit.py): per client IP, per invited address.
    rl = ctx.config.rate_limits
    ip = client_subject(client_ip(request, ctx.config.listen.trusted_proxies))
    await ctx.rate_limiter.check(f"si-ip:{ip}", rl.store_invite_per_ip_per_minute / 60, rl.store_invite_per_ip_burst)
    await ctx.rate_limiter.check(
        f"si-addr:{fields['address'].casefold()}",
        rl.store_invite_per_address_per_hour / 3600,
        rl.store_invite_per_address_burst,
    )
    # ... and per inviter, as Sydent: one user cannot mail many addresses from many IPs.
    await ctx.rate_limiter.check(
        f"si-sender:{fields['sender']}", rl.store_invite_per_sender_per_hour / 3600, rl.store_invite_per_sender_burst
    )
    return JSONResponse(await ctx.invites.store_invite(fields, brand, verified_sender=verified_sender))


SIGN_FIELDS = ("mxid", "token", "private_key")


async def sign_ed25519(request: Request, ctx: AppContext, v2: bool) -> Response:
    if v2:
        await require_user(request, ctx)
    # Element POSTs the mailed sign URL (token, private_key in its query string) with `mxid`
    # appended and no body (older clients: the body `null`), as Sydent allows. Body values win.
    body = await read_body(request, allow_empty=True)
    query = query_params(request)
    params = {name: body[name] if body.get(name) is not None else query.get(name) for name in SIGN_FIELDS}
    # The spec requires private_key on v1 and v2: the token alone is public (room state).
    require_fields(params, *SIGN_FIELDS)
    mxid = require_str(params, "mxid", max_length=255)
    token = require_str(params, "token", max_length=255)
    private_key = require_str(params, "private_key", max_length=128)
    if not is_valid_user_id(mxid):
        raise invalid_param("'mxid' is not a valid Matrix user ID")
    return JSONResponse(await ctx.invites.sign_ed25519(mxid, token, private_key))


def routes() -> list[Route]:
    return [
        *versioned("/store-invite", store_invite, ["POST"]),
        *versioned("/sign-ed25519", sign_ed25519, ["POST"]),
    ]
