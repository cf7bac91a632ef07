"""Inbound server-to-server authentication: `Authorization: X-Matrix ...` request signatures.

Homeservers sign some requests to us (unbind, see docs/api-behaviour.md "Homeserver-signed
unbind"). Verifying one means:

1. parse the header (`parse_x_matrix`; RFC 9110 auth-params, unknown ones ignored);
2. fetch the origin's signing keys from `https://<origin>/_matrix/key/v2/server`
   (`ServerKeyStore`: checks the answer is for that server, self-signed and not expired, and
   caches it until `valid_until_ts`, capped at 7 days);
3. check the ed25519 signature over the canonical JSON of the request object. Synapse signs
   `{method, uri, origin, destination_is, content}`; the spec (and other homeservers) use
   `destination` instead of `destination_is`. Both are tried.

Every failure becomes an `XMatrixError` whose message is safe to return to the caller: it
never contains signatures, internal addresses or exception details. Signatures are never
logged (they are bearer-like credentials for the signed request).
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import nacl.exceptions
import signedjson.key
import signedjson.sign
from canonicaljson import encode_canonical_json
from signedjson.types import VerifyKey
from unpaddedbase64 import decode_base64

from sydent_lite.federation.client import (
    FederationClient,
    FederationError,
    OutboundPolicyError,
)
from sydent_lite.federation.resolver import parse_server_name
from sydent_lite.secrets_util import now_ms

logger = logging.getLogger(__name__)

KEY_SERVER_PATH = "/_matrix/key/v2/server"

# Spec ("valid_until_ts"): use the lesser of valid_until_ts and 7 days into the future.
MAX_KEY_VALIDITY_MS = 7 * 24 * 3600 * 1000
# A server's keys are fetched at most this often (unknown key ids, failures, expiry alike), so
# requests naming arbitrary key ids or origins cannot make us hammer a server.
MIN_REFETCH_INTERVAL_MS = 60 * 1000
DEFAULT_MAX_SERVERS = 1024

_MAX_HEADER_LENGTH = 8192
# RFC 9110 token characters (parameter names).
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
# Bare values: RFC 9110 tokens, plus whatever else older servers send unquoted (the spec asks
# to accept colons; base64 adds '/' and '+'): any visible ASCII except '"' and ','.
_BARE_VALUE = re.compile(r"[\x21\x23-\x2b\x2d-\x7e]+")
_SCHEME = re.compile(r"X-Matrix[ \t]+", re.IGNORECASE)
# "<algorithm>:<version>"; the spec restricts versions to [a-zA-Z0-9_], but servers in the
# wild use a few more characters. The id is only ever used as a dictionary key.
_KEY_ID = re.compile(r"[A-Za-z0-9_]{1,32}:[A-Za-z0-9_.+/=-]{1,128}")
_KNOWN_PARAMS = ("origin", "key", "sig", "destination")


class XMatrixError(Exception):
    """X-Matrix authentication failed; the message is safe to show to the caller."""


@dataclass(frozen=True)
class XMatrixAuth:
    origin: str
    key_id: str
    signature: str = field(repr=False)  # never end up in logs through repr()
    destination: str | None


# --- header parsing ---------------------------------------------------------------------------


def _parse_quoted(header: str, pos: int) -> tuple[str, int]:
    """Parse a quoted-string starting at `header[pos] == '"'`; returns (value, next pos)."""
    out: list[str] = []
    pos += 1
    while pos < len(header):
        ch = header[pos]
        if ch == '"':
            return "".join(out), pos + 1
        if ch == "\\":
            pos += 1
            if pos >= len(header):
                break
            ch = header[pos]
        # qdtext / quoted-pair: HTAB, SP, visible ASCII, obs-text; never other controls.
        if ch != "\t" and (ord(ch) < 0x20 or ord(ch) == 0x7F):
            raise ValueError("control character in quoted value")
        out.append(ch)
        pos += 1
    raise ValueError("unterminated quoted value")


def _skip_ows(header: str, pos: int) -> int:
    """The position after the optional whitespace (spaces and tabs) at `pos`."""
    while pos < len(header) and header[pos] in " \t":
        pos += 1
    return pos


def parse_x_matrix(header: str) -> XMatrixAuth:
    """Parse an `Authorization` header value of the X-Matrix scheme.

    ValueError if it is not X-Matrix, is malformed, repeats a known parameter, lacks origin,
    key or sig, or if origin is not a valid server name. Unknown parameters are ignored.
    """
    if not isinstance(header, str) or len(header) > _MAX_HEADER_LENGTH:
        raise ValueError("invalid header")
    header = header.strip(" \t")
    scheme = _SCHEME.match(header)
    if scheme is None:
        raise ValueError("not an X-Matrix authorization header")
    params: dict[str, str] = {}
    pos = scheme.end()
    while True:
        pos = _skip_ows(header, pos)
        if pos >= len(header):
            break
        if header[pos] == ",":  # empty list element (RFC 9110 #rule)
            pos += 1
            continue
        name_match = _TOKEN.match(header, pos)
        if name_match is None:
            raise ValueError("invalid parameter name")
        name = name_match.group().lower()
        pos = _skip_ows(header, name_match.end())
        if pos >= len(header) or header[pos] != "=":
            raise ValueError("parameter without value")
        pos = _skip_ows(header, pos + 1)
        if pos < len(header) and header[pos] == '"':
            value, pos = _parse_quoted(header, pos)
        else:
            value_match = _BARE_VALUE.match(header, pos)
            if value_match is None:
                raise ValueError("invalid parameter value")
            value, pos = value_match.group(), value_match.end()
        pos = _skip_ows(header, pos)
        if pos < len(header) and header[pos] != ",":
            raise ValueError("junk after parameter value")
        if name in _KNOWN_PARAMS:
            # A repeated parameter is ambiguous: different readers could pick different ones.
            if name in params:
                raise ValueError(f"duplicate parameter {name}")
            params[name] = value

    for required in ("origin", "key", "sig"):
        if not params.get(required):
            raise ValueError(f"missing {required}")
    origin, key_id, sig = params["origin"], params["key"], params["sig"]
    parse_server_name(origin)  # ValueError if invalid
    if not _KEY_ID.fullmatch(key_id):
        raise ValueError("invalid key id")
    destination = params.get("destination")
    if destination is not None and not destination:
        raise ValueError("empty destination")
    return XMatrixAuth(origin=origin, key_id=key_id, signature=sig, destination=destination)


# --- server keys ------------------------------------------------------------------------------


@dataclass
class _ServerKeys:
    verify_keys: dict[str, VerifyKey]  # usable for requests, self-signed
    old_key_ids: frozenset[str]  # listed in old_verify_keys only: not valid for requests
    valid_until_ms: int


class ServerKeyStore:
    """Fetches and caches other servers' signing keys (`GET /_matrix/key/v2/server`).

    Keys are taken straight from the server (trust comes from its TLS certificate, checked by
    the FederationClient), never from notaries. A response is used only if it names the
    server we asked, carries no invalid self-signature, and has `valid_until_ts` in the
    future; a verify key is usable only if the response is signed by that very key. It is
    cached until `valid_until_ts` (at most 7 days). Each server is fetched at most once per
    `MIN_REFETCH_INTERVAL_MS`; concurrent lookups share one fetch.
    """

    def __init__(
        self,
        client: FederationClient,
        *,
        clock: Callable[[], int] = now_ms,
        max_servers: int = DEFAULT_MAX_SERVERS,
    ) -> None:
        self._client = client
        self._clock = clock
        self._max_servers = max(1, max_servers)
        self._cache: OrderedDict[str, _ServerKeys] = OrderedDict()  # LRU order
        self._last_fetch: OrderedDict[str, int] = OrderedDict()  # fetch start, oldest first
        self._inflight: dict[str, asyncio.Task[_ServerKeys | None]] = {}

    async def get_verify_key(self, server_name: str, key_id: str) -> VerifyKey:
        """The verify key `key_id` of `server_name` (a signedjson VerifyKey: .alg, .version).

        XMatrixError if it cannot be obtained or is not valid for signing requests.
        """
        try:
            parse_server_name(server_name)
        except ValueError:
            raise XMatrixError("Invalid origin server name") from None

        keys = self._cached(server_name)
        if keys is not None:
            key = self._pick(keys, key_id)
            if key is not None:
                return key
            if key_id in keys.old_key_ids:  # refetching would not change that
                raise XMatrixError("The signing key has expired")
        # Not cached, expired, or an unknown key id (perhaps a rotation): refetch, rate-limited.
        fresh = await self._fetch_shared(server_name)
        if fresh is not None:
            keys = fresh
        if keys is None:
            raise XMatrixError("Could not fetch the signing keys of the origin server")
        key = self._pick(keys, key_id)
        if key is not None:
            return key
        if key_id in keys.old_key_ids:
            raise XMatrixError("The signing key has expired")
        raise XMatrixError("Unknown signing key for the origin server")

    # -- internals --------------------------------------------------------------------------

    @staticmethod
    def _pick(keys: _ServerKeys, key_id: str) -> VerifyKey | None:
        return keys.verify_keys.get(key_id)

    def _cached(self, server_name: str) -> _ServerKeys | None:
        keys = self._cache.get(server_name)
        if keys is None:
            return None
        if keys.valid_until_ms <= self._clock():
            del self._cache[server_name]
            return None
        self._cache.move_to_end(server_name)
        return keys

    def _remember(self, server_name: str, keys: _ServerKeys) -> None:
        self._cache.pop(server_name, None)
        self._cache[server_name] = keys
        while len(self._cache) > self._max_servers:
            self._cache.popitem(last=False)

    def _may_fetch(self, server_name: str, now: int) -> bool:
        # Forget attempts that no longer limit anything, then bound the table.
        while self._last_fetch:
            oldest_name, oldest_ts = next(iter(self._last_fetch.items()))
            if now - oldest_ts < MIN_REFETCH_INTERVAL_MS and len(self._last_fetch) < self._max_servers:
                break
            del self._last_fetch[oldest_name]
        last = self._last_fetch.get(server_name)
        return last is None or not 0 <= now - last < MIN_REFETCH_INTERVAL_MS

    async def _fetch_shared(self, server_name: str) -> _ServerKeys | None:
        """Fetch (or join the fetch in flight); None if not allowed right now or it failed."""
        task = self._inflight.get(server_name)
        if task is None:
            now = self._clock()
            if not self._may_fetch(server_name, now):
                logger.debug("not refetching keys of %s: fetched less than a minute ago", server_name)
                return None
            self._last_fetch.pop(server_name, None)
            self._last_fetch[server_name] = now
            task = asyncio.get_running_loop().create_task(self._fetch(server_name))
            self._inflight[server_name] = task
            task.add_done_callback(lambda _t: self._inflight.pop(server_name, None))
        # shield: a cancelled caller must not cancel the fetch other callers are waiting for.
        return await asyncio.shield(task)

    async def _fetch(self, server_name: str) -> _ServerKeys | None:
        try:
            status, body = await self._client.request_json("GET", server_name, KEY_SERVER_PATH)
        except (FederationError, OutboundPolicyError, ValueError) as exc:
            logger.info("fetching keys of %s failed: %s", server_name, type(exc).__name__)
            return None
        if status != 200:
            logger.info("fetching keys of %s failed: HTTP %s", server_name, status)
            return None
        try:
            keys = self._parse_response(server_name, body, self._clock())
        except _BadKeyResponse as exc:
            logger.info("rejecting key response of %s: %s", server_name, exc)
            return None
        self._remember(server_name, keys)
        return keys

    @staticmethod
    def _parse_response(server_name: str, body: object, now: int) -> _ServerKeys:
        if not isinstance(body, dict):
            raise _BadKeyResponse("not a JSON object")
        if body.get("server_name") != server_name:
            raise _BadKeyResponse("server_name does not match")
        valid_until = body.get("valid_until_ts")
        if not isinstance(valid_until, int) or isinstance(valid_until, bool):
            raise _BadKeyResponse("missing valid_until_ts")
        if valid_until <= now:
            raise _BadKeyResponse("valid_until_ts is in the past")
        verify_keys = body.get("verify_keys")
        if not isinstance(verify_keys, dict):
            raise _BadKeyResponse("missing verify_keys")
        signatures = body.get("signatures")
        own_sigs = signatures.get(server_name) if isinstance(signatures, dict) else None
        if not isinstance(own_sigs, dict):
            raise _BadKeyResponse("not signed by the server")

        usable: dict[str, VerifyKey] = {}
        for key_id, entry in verify_keys.items():
            key = _decode_key(key_id, entry)
            if key is None or key_id not in own_sigs:
                continue  # unusable key, or not self-signed by it
            try:
                signedjson.sign.verify_signed_json(body, server_name, key)
            except signedjson.sign.SignatureVerifyException:
                # Any bad self-signature discredits the whole response.
                raise _BadKeyResponse(f"invalid self-signature by {key_id}") from None
            usable[key_id] = key
        if not usable:
            raise _BadKeyResponse("no verify key signed the response")

        old = body.get("old_verify_keys")
        old_ids = frozenset(k for k in old if k not in usable) if isinstance(old, dict) else frozenset()
        return _ServerKeys(usable, old_ids, min(valid_until, now + MAX_KEY_VALIDITY_MS))


class _BadKeyResponse(Exception):
    pass


def _decode_key(key_id: object, entry: object) -> VerifyKey | None:
    if not isinstance(key_id, str) or not _KEY_ID.fullmatch(key_id):
        return None
    if not key_id.startswith("ed25519:") or not isinstance(entry, dict):
        return None
    encoded = entry.get("key")
    if not isinstance(encoded, str):
        return None
    try:
        return signedjson.key.decode_verify_key_bytes(key_id, decode_base64(encoded))
    except (ValueError, TypeError):  # bad base64, wrong length, unsupported algorithm
        return None


# --- request verification ---------------------------------------------------------------------


async def verify_request(
    keys: ServerKeyStore,
    *,
    authorization: str | None,
    method: str,
    uri: str,
    content: object,
    our_server_name: str,
) -> str:
    """Check an X-Matrix signed request to us; returns the verified origin server name.

    `uri` is the request target as sent (path plus `?query` if any); `content` the parsed JSON
    body, or None for a request without one. XMatrixError on any failure.
    """
    if not authorization:
        raise XMatrixError("Missing X-Matrix Authorization header")
    try:
        auth = parse_x_matrix(authorization)
    except ValueError:
        raise XMatrixError("Malformed X-Matrix Authorization header") from None
    if auth.destination is not None and auth.destination != our_server_name:
        raise XMatrixError("The request is addressed to another server")

    try:
        signature = decode_base64(auth.signature)
    except ValueError:  # binascii.Error
        raise XMatrixError("Malformed request signature") from None
    if len(signature) != 64:
        raise XMatrixError("Malformed request signature")

    verify_key = await keys.get_verify_key(auth.origin, auth.key_id)

    for destination_field in ("destination_is", "destination"):
        request: dict[str, Any] = {
            "method": method,
            "uri": uri,
            "origin": auth.origin,
            destination_field: our_server_name,
        }
        if content is not None:
            request["content"] = content
        try:
            message = encode_canonical_json(request)
        except (TypeError, ValueError, RecursionError):  # not JSON: cannot have been signed
            raise XMatrixError("The request body cannot be verified") from None
        try:
            verify_key.verify(message, signature)
        except nacl.exceptions.BadSignatureError:
            continue
        logger.debug("verified X-Matrix request from %s (%s)", auth.origin, destination_field)
        return auth.origin
    logger.info("invalid X-Matrix signature from %s with key %s", auth.origin, auth.key_id)
    raise XMatrixError("Invalid request signature")
