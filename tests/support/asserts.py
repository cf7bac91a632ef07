"""Checks the test modules share: a Matrix error answer, an HTML page, a signed association,
our public key, a mail's HTML part."""

from __future__ import annotations

from typing import Any

import httpx
import signedjson.key
import signedjson.sign
from signedjson.types import VerifyKey
from unpaddedbase64 import decode_base64

from .server import V2, SydentServer, now_ms
from .smtp import ReceivedMail

ASSOCIATION_KEYS = {"address", "medium", "mxid", "not_before", "not_after", "ts", "signatures"}
YEAR_MS = 365 * 24 * 3600 * 1000


def assert_error(resp: httpx.Response, status: int, errcode: str | tuple[str, ...]) -> dict[str, Any]:
    """A Matrix error answer (`errcode` one of those given, `error` a string); returns the body."""
    assert resp.status_code == status, f"{resp.request.method} {resp.request.url}: {resp.status_code} {resp.text}"
    assert resp.headers.get("content-type", "").startswith("application/json"), resp.headers
    body = resp.json()
    assert isinstance(body, dict), body
    allowed = (errcode,) if isinstance(errcode, str) else errcode
    assert body.get("errcode") in allowed, body
    assert isinstance(body.get("error"), str), body
    return body


def assert_html(resp: httpx.Response, status: int) -> str:
    """An HTML page (not a redirect); returns its text."""
    assert resp.status_code == status, f"{resp.request.url}: {resp.status_code} {resp.text[:300]}"
    assert resp.headers.get("content-type", "").startswith("text/html"), resp.headers
    assert "location" not in resp.headers, resp.headers
    return resp.text


def public_key(client: httpx.Client) -> str:
    """Our long-term public key (ed25519:0), unpadded base64."""
    resp = client.get(f"{V2}/pubkey/ed25519:0")
    assert resp.status_code == 200, resp.text
    key = resp.json()["public_key"]
    assert isinstance(key, str)
    return key


def verify_key_from(public_key_b64: str) -> VerifyKey:
    return signedjson.key.decode_verify_key_bytes("ed25519:0", decode_base64(public_key_b64))


def assert_signed_association(
    assoc: dict[str, Any],
    server: SydentServer,
    client: httpx.Client,
    *,
    address: str,
    mxid: str,
    medium: str = "email",
) -> None:
    """A signed association as /bind answers it: its fields, times, and our signature alone."""
    assert set(assoc) == ASSOCIATION_KEYS, assoc
    assert assoc["medium"] == medium
    assert assoc["address"] == address
    assert assoc["mxid"] == mxid
    ts = assoc["ts"]
    assert isinstance(ts, int) and abs(ts - now_ms()) < 60_000, ts
    assert assoc["not_before"] == ts
    assert isinstance(assoc["not_after"], int)
    assert 99 * YEAR_MS <= assoc["not_after"] - ts <= 101 * YEAR_MS, assoc
    # Signed by us alone, with ed25519:0, under our server_name.
    assert set(assoc["signatures"]) == {server.server_name}, assoc["signatures"]
    assert set(assoc["signatures"][server.server_name]) == {"ed25519:0"}
    signedjson.sign.verify_signed_json(assoc, server.server_name, verify_key_from(public_key(client)))


def html_part(mail: ReceivedMail) -> str:
    part = mail.message.get_body(preferencelist=("html",))
    assert part is not None, f"mail has no text/html part:\n{mail.raw.decode('utf-8', 'replace')}"
    content = part.get_content()
    assert isinstance(content, str)
    return content
