"""Validation sessions for email and phone numbers: requestToken, and submitToken (JSON and the
human-facing page behind the emailed link); one handler per step, the medium from the path."""

from __future__ import annotations

from urllib.parse import quote, unquote_plus, urlsplit

from starlette.requests import Request
from starlette.responses import Response

from sydent_lite.context import AppContext
from sydent_lite.errors import ErrorCode, MatrixError
from sydent_lite.http.auth import require_user
from sydent_lite.http.client_ip import client_ip as forwarded_client_ip
from sydent_lite.http.json_codec import JSONResponse
from sydent_lite.http.pages import html_page, redirect_from_page
from sydent_lite.http.request import (
    optional_str,
    query_params,
    read_body,
    require_fields,
    require_int,
    require_opaque_id,
    require_str,
)
from sydent_lite.http.routes import Route, versioned
from sydent_lite.secrets_util import OPAQUE_ID_RE
from sydent_lite.services.sessions import SessionLocked

PAGE_TEMPLATE = "verify_response_template.html"


def client_ip(request: Request) -> str:
    ctx: AppContext = request.app.state.ctx
    return forwarded_client_ip(request, ctx.config.listen.trusted_proxies)


async def request_token(request: Request, ctx: AppContext, v2: bool) -> Response:
    if v2:
        await require_user(request, ctx)
    body = await read_body(request)
    require_fields(body, "client_secret", "email", "send_attempt")
    client_secret = require_opaque_id(body, "client_secret")
    send_attempt = require_int(body, "send_attempt")
    email = require_str(body, "email", max_length=512)
    next_link = optional_str(body, "next_link")
    # Sydent reads `brand` from the query string; clients also put it in the body.
    brand = optional_str(body, "brand", max_length=64) or optional_str(query_params(request), "brand", max_length=64)
    sid = await ctx.sessions.request_email_token(
        client_secret=client_secret,
        email=email,
        send_attempt=send_attempt,
        next_link=next_link,
        brand=brand,
        client_ip=client_ip(request),
    )
    return JSONResponse({"sid": sid})


async def request_msisdn_token(request: Request, ctx: AppContext, v2: bool) -> Response:
    if v2:
        await require_user(request, ctx)
    body = await read_body(request)
    require_fields(body, "client_secret", "country", "phone_number", "send_attempt")
    client_secret = require_opaque_id(body, "client_secret")
    send_attempt = require_int(body, "send_attempt")
    country = require_str(body, "country", max_length=8)
    phone_number = require_str(body, "phone_number", max_length=64)
    next_link = optional_str(body, "next_link")
    brand = optional_str(body, "brand", max_length=64)
    sid, number = await ctx.sessions.request_msisdn_token(
        client_secret=client_secret,
        country=country,
        phone_number=phone_number,
        send_attempt=send_attempt,
        next_link=next_link,
        brand=brand,
        client_ip=client_ip(request),
    )
    return JSONResponse({"success": True, "sid": sid, "msisdn": number.msisdn, "intl_fmt": number.intl_fmt})


def _medium(request: Request) -> str:
    return "msisdn" if "/validate/msisdn/" in request.url.path else "email"


async def submit_token_json(request: Request, ctx: AppContext, v2: bool) -> Response:
    if v2:
        await require_user(request, ctx)
    body = await read_body(request)
    require_fields(body, "sid", "client_secret", "token")
    sid = require_opaque_id(body, "sid")
    client_secret = require_opaque_id(body, "client_secret")
    token = require_str(body, "token", max_length=255)
    await ctx.sessions.submit_token(sid, client_secret, token, _medium(request), client_ip=client_ip(request))
    return JSONResponse({"success": True})


def _is_followable(link: str | None) -> bool:
    if not link:
        return False
    try:
        parts = urlsplit(link)
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.netloc)


def next_link_with_sid(link: str, sid: str) -> str:
    """`link` with `sid=<sid>` added, as Sydent and Synapse add it: the client chose the link
    before it knew the session's id, and Element's registration reads it from there.

    A fragment that is a client-side route (`#/register?client_secret=...`, `#!/...`, any
    fragment holding `?`) gets it in its own query: hash-routed apps such as Element Web read
    their parameters there, and there is where Sydent and Synapse (appending to the very end)
    put it. Otherwise it goes into the URL's query, before any `#anchor`, which stays intact.
    The other parameters are kept as written; a `sid` already in that query is replaced, so
    the client reads exactly one, ours.
    """
    head, hash_mark, fragment = link.partition("#")
    if hash_mark and (fragment.startswith(("/", "!/")) or "?" in fragment):
        return f"{head}#{_with_param(fragment, 'sid', sid)}"
    return _with_param(head, "sid", sid) + hash_mark + fragment


def _with_param(part: str, name: str, value: str) -> str:
    base, _, query = part.partition("?")
    kept = [p for p in query.split("&") if p and unquote_plus(p.partition("=")[0]) != name]
    kept.append(f"{name}={quote(value, safe='')}")
    return f"{base}?{'&'.join(kept)}"


async def submit_token_page(request: Request, ctx: AppContext, v2: bool) -> Response:
    """The page behind the emailed link: needs no token (the person has only their mail)."""
    params = query_params(request)
    brand = params.get("brand")

    def page(message: str, status: int) -> Response:
        return html_page(ctx.templates.render_page(PAGE_TEMPLATE, brand, message), status)

    try:
        require_fields(params, "sid", "client_secret", "token")
        sid = require_opaque_id(params, "sid")
        client_secret = require_opaque_id(params, "client_secret")
        token = require_str(params, "token", max_length=255)
        session = await ctx.sessions.submit_token(
            sid, client_secret, token, _medium(request), client_ip=client_ip(request)
        )
    except SessionLocked as e:
        return page(
            "This validation link is no longer valid: too many incorrect codes were tried. "
            "Please ask for a new one from your Matrix client.",
            e.status,
        )
    except MatrixError as e:
        sid_param = params.get("sid", "")
        if brand is None and OPAQUE_ID_RE.match(sid_param):
            stored = await ctx.sessions.get_session(sid_param)
            brand = stored.brand if stored else None
        messages = {
            ErrorCode.NO_VALID_SESSION: "This validation link is not valid: no such session was found.",
            ErrorCode.SESSION_EXPIRED: (
                "This validation link has expired. Please ask for a new one from your Matrix client."
            ),
            ErrorCode.TOKEN_INCORRECT: "This validation link is not valid: the code is incorrect.",
            ErrorCode.LIMIT_EXCEEDED: "Too many attempts to validate this address. Please try again later.",
        }
        return page(messages.get(e.errcode, "This validation link is incomplete or malformed."), e.status)
    if brand is None:
        brand = session.brand
    if session.next_link and _is_followable(session.next_link):
        return redirect_from_page(next_link_with_sid(session.next_link, session.sid))
    return page("Verification successful! Please return to your Matrix client to continue.", 200)


async def submit_token(request: Request, ctx: AppContext, v2: bool) -> Response:
    if request.method == "GET":
        return await submit_token_page(request, ctx, v2)
    return await submit_token_json(request, ctx, v2)


def routes() -> list[Route]:
    return [
        *versioned("/validate/email/requestToken", request_token, ["POST"]),
        *versioned("/validate/email/submitToken", submit_token, ["GET", "POST"]),
        *versioned("/validate/msisdn/requestToken", request_msisdn_token, ["POST"]),
        *versioned("/validate/msisdn/submitToken", submit_token, ["GET", "POST"]),
    ]
