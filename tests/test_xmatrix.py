"""Inbound X-Matrix request authentication: header parsing, key fetching/caching, signatures.

Key fetches go over real TLS to the homeserver stand-in on 127.0.0.1 (trustme CA).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import signedjson.key
import signedjson.sign
from signedjson.types import SigningKey
from support.homeserver import KEY_SERVER_PATH, HomeserverStandIn
from support.smtp import free_port
from unpaddedbase64 import encode_base64

from sydent_lite.config import FederationConfig
from sydent_lite.federation.client import FederationClient
from sydent_lite.federation.xmatrix import (
    ServerKeyStore,
    XMatrixAuth,
    XMatrixError,
    parse_x_matrix,
    verify_request,
)

OUR_NAME = "identity.example.org"
UNBIND_URI = "/_matrix/identity/v2/3pid/unbind"
DAY_MS = 24 * 3600 * 1000


# --- fixtures and helpers -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def _hs_module(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HomeserverStandIn]:
    hs = HomeserverStandIn(tmp_path_factory.mktemp("xmatrix-hs")).start()
    yield hs
    hs.stop()


@pytest.fixture(scope="module")
def _hs2_module(tmp_path_factory: pytest.TempPathFactory, _hs_module: HomeserverStandIn) -> Iterator[HomeserverStandIn]:
    # Same CA (one ca_file for the client) and the same key id "ed25519:hs1", different key.
    hs = HomeserverStandIn(tmp_path_factory.mktemp("xmatrix-hs2"), ca=_hs_module.ca).start()
    yield hs
    hs.stop()


@pytest.fixture
def hs(_hs_module: HomeserverStandIn) -> Iterator[HomeserverStandIn]:
    _hs_module.clear_requests()
    yield _hs_module
    _hs_module.set_handler("GET", KEY_SERVER_PATH, None)
    _hs_module.clear_requests()


@pytest.fixture
def hs2(_hs2_module: HomeserverStandIn) -> Iterator[HomeserverStandIn]:
    _hs2_module.clear_requests()
    yield _hs2_module
    _hs2_module.clear_requests()


@pytest.fixture
async def fed(_hs_module: HomeserverStandIn) -> AsyncIterator[FederationClient]:
    client = FederationClient(FederationConfig(ca_file=str(_hs_module.ca_path), ip_allowlist=["127.0.0.0/8"]))
    yield client
    await client.aclose()


class FakeClock:
    def __init__(self) -> None:
        self.now = int(time.time() * 1000)

    def __call__(self) -> int:
        return self.now

    def advance(self, ms: int) -> None:
        self.now += ms


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def keys(fed: FederationClient, clock: FakeClock) -> ServerKeyStore:
    return ServerKeyStore(fed, clock=clock)


def key_fetches(hs: HomeserverStandIn) -> int:
    return len(hs.requests_to(KEY_SERVER_PATH, "GET"))


def key_response(
    server_name: str,
    signers: list[tuple[str, SigningKey]],
    *,
    verify_keys: dict[str, Any] | None = None,
    old_verify_keys: dict[str, Any] | None = None,
    valid_until_ts: int | None = None,
) -> dict[str, Any]:
    """A /_matrix/key/v2/server body for `server_name`, signed by each (name, key) of signers."""
    body: dict[str, Any] = {
        "server_name": server_name,
        "valid_until_ts": valid_until_ts if valid_until_ts is not None else int(time.time() * 1000) + DAY_MS,
        "verify_keys": verify_keys
        if verify_keys is not None
        else {f"{k.alg}:{k.version}": {"key": encode_base64(k.verify_key.encode())} for _, k in signers},
        "old_verify_keys": old_verify_keys or {},
    }
    for name, key in signers:
        body = signedjson.sign.sign_json(body, name, key)
    return body


def verify_entry(key: SigningKey) -> dict[str, str]:
    return {"key": encode_base64(key.verify_key.encode())}


def sign_request(
    signing_key: SigningKey,
    origin: str,
    *,
    method: str = "POST",
    uri: str = UNBIND_URI,
    destination: str = OUR_NAME,
    content: Any = None,
    destination_field: str = "destination_is",
) -> str:
    """An X-Matrix header signed by an arbitrary key (the stand-in only signs with its own)."""
    obj: dict[str, Any] = {"method": method, "uri": uri, "origin": origin, destination_field: destination}
    if content is not None:
        obj["content"] = content
    signed = signedjson.sign.sign_json(obj, origin, signing_key)
    key_id = f"{signing_key.alg}:{signing_key.version}"
    sig = signed["signatures"][origin][key_id]
    return f'X-Matrix origin="{origin}",key="{key_id}",sig="{sig}",destination="{destination}"'


def replace_param(header: str, name: str, value: str | None) -> str:
    """Rebuild a stand-in header with one parameter replaced (or removed when value is None)."""
    auth = parse_x_matrix(header)
    params = {"origin": auth.origin, "key": auth.key_id, "sig": auth.signature, "destination": auth.destination}
    params[name] = value
    return "X-Matrix " + ",".join(f'{k}="{v}"' for k, v in params.items() if v is not None)


UNBIND_BODY = {"mxid": "@alice:hs.example", "threepid": {"medium": "email", "address": "a@example.com"}}


async def verify(keys: ServerKeyStore, authorization: str | None, **kwargs: Any) -> str:
    args: dict[str, Any] = {"method": "POST", "uri": UNBIND_URI, "content": UNBIND_BODY, "our_server_name": OUR_NAME}
    args.update(kwargs)
    return await verify_request(keys, authorization=authorization, **args)


# --- header parsing -----------------------------------------------------------------------------


def test_parse_quoted_values() -> None:
    auth = parse_x_matrix(
        'X-Matrix origin="hs.example.org",key="ed25519:abc_1",sig="c2lnbmF0dXJl",destination="id.example.org"'
    )
    assert auth == XMatrixAuth("hs.example.org", "ed25519:abc_1", "c2lnbmF0dXJl", "id.example.org")


def test_parse_bare_values_any_order_case_insensitive() -> None:
    auth = parse_x_matrix("x-MATRIX Sig=ab+/cd,KEY=ed25519:k1,destination=id.example.org:8090,Origin=127.0.0.1:8448")
    assert auth == XMatrixAuth("127.0.0.1:8448", "ed25519:k1", "ab+/cd", "id.example.org:8090")


def test_parse_ipv6_origin_quoted_and_bare() -> None:
    assert parse_x_matrix('X-Matrix origin="[::1]:8448",key=ed25519:a,sig=x').origin == "[::1]:8448"
    assert parse_x_matrix("X-Matrix origin=[::1]:8448,key=ed25519:a,sig=x").origin == "[::1]:8448"


def test_parse_backslash_escapes() -> None:
    auth = parse_x_matrix(r'X-Matrix origin="hs.ex\ample.org",key="ed25519:\a\b\c",sig="s\"i\\g"')
    assert auth.origin == "hs.example.org"
    assert auth.key_id == "ed25519:abc"
    assert auth.signature == 's"i\\g'


def test_parse_whitespace_and_empty_elements() -> None:
    auth = parse_x_matrix(
        '  X-Matrix   origin = "hs.example.org" ,\tkey="ed25519:a" , ,sig="s",  destination="d.org"  '
    )
    assert auth == XMatrixAuth("hs.example.org", "ed25519:a", "s", "d.org")


def test_parse_ignores_unknown_params() -> None:
    auth = parse_x_matrix(
        'X-Matrix foo=bar,origin="hs.example.org",extra="x, y=\\"z\\"",key="ed25519:a",sig="s",foo=again'
    )
    assert auth == XMatrixAuth("hs.example.org", "ed25519:a", "s", None)


def test_parse_destination_optional() -> None:
    assert parse_x_matrix('X-Matrix origin="hs.example.org",key="ed25519:a",sig="s"').destination is None


def test_signature_not_in_repr() -> None:
    auth = parse_x_matrix('X-Matrix origin="hs.example.org",key="ed25519:a",sig="SECRETSIG"')
    assert "SECRETSIG" not in repr(auth)


@pytest.mark.parametrize(
    "header",
    [
        "",
        "   ",
        "Bearer abc",
        "X-Matrix",
        "X-Matrix ",
        "X-Matrixorigin=a,key=ed25519:a,sig=s",
        "Basic origin=hs.example.org,key=ed25519:a,sig=s",
        'X-Matrix key="ed25519:a",sig="s"',  # no origin
        'X-Matrix origin="hs.example.org",sig="s"',  # no key
        'X-Matrix origin="hs.example.org",key="ed25519:a"',  # no sig
        'X-Matrix origin="",key="ed25519:a",sig="s"',
        'X-Matrix origin="hs.example.org",key="",sig="s"',
        'X-Matrix origin="hs.example.org",key="ed25519:a",sig=""',
        'X-Matrix origin="hs.example.org",key="ed25519:a",sig="s",destination=""',
        'X-Matrix origin="not a server",key="ed25519:a",sig="s"',
        'X-Matrix origin="hs.example.org:99999",key="ed25519:a",sig="s"',
        'X-Matrix origin="hs_example!org",key="ed25519:a",sig="s"',
        'X-Matrix origin="hs.example.org",key="nocolon",sig="s"',
        'X-Matrix origin="hs.example.org",key="ed25519:a b",sig="s"',
        'X-Matrix origin="hs.example.org,key="ed25519:a",sig="s"',  # unterminated quote
        'X-Matrix origin="hs.example.org",key="ed25519:a",sig="s\\',  # dangling escape
        'X-Matrix origin="hs.example.org" junk,key="ed25519:a",sig="s"',
        'X-Matrix origin="hs.example.org",origin="evil.example",key="ed25519:a",sig="s"',
        'X-Matrix origin="hs.example.org",key="ed25519:a",sig="s",sig="t"',
        'X-Matrix origin,key="ed25519:a",sig="s"',
        'X-Matrix =hs.example.org,key="ed25519:a",sig="s"',
        "X-Matrix ===,,,",
        'X-Matrix origin="hs.example.org\r\n",key="ed25519:a",sig="s"',
        'X-Matrix origin="hs.example.org",key="ed25519:a",sig="s\x00"',
        "X-Matrix origin=hs.example.org;key=ed25519:a;sig=s",
        'X-Matrix origin="hs.example.org",key="ed25519:a",sig="' + "A" * 9000 + '"',
        "\x00\xff garbage \u2603",
    ],
)
def test_parse_rejects_malformed(header: str) -> None:
    with pytest.raises(ValueError):
        parse_x_matrix(header)


# --- verifying requests -------------------------------------------------------------------------


async def test_synapse_style_destination_is(hs: HomeserverStandIn, keys: ServerKeyStore) -> None:
    header = hs.x_matrix_authorization("POST", UNBIND_URI, OUR_NAME, UNBIND_BODY)
    assert await verify(keys, header) == hs.server_name
    assert key_fetches(hs) == 1


async def test_spec_style_destination(hs: HomeserverStandIn, keys: ServerKeyStore) -> None:
    header = hs.x_matrix_authorization("POST", UNBIND_URI, OUR_NAME, UNBIND_BODY, destination_field="destination")
    assert await verify(keys, header) == hs.server_name


async def test_header_without_destination_accepted(hs: HomeserverStandIn, keys: ServerKeyStore) -> None:
    header = replace_param(hs.x_matrix_authorization("POST", UNBIND_URI, OUR_NAME, UNBIND_BODY), "destination", None)
    assert "destination" not in header
    assert await verify(keys, header) == hs.server_name


async def test_request_without_content_and_with_query(hs: HomeserverStandIn, keys: ServerKeyStore) -> None:
    uri = "/_matrix/identity/v2/something?a=1&b=two"
    header = hs.x_matrix_authorization("GET", uri, OUR_NAME)
    assert await verify(keys, header, method="GET", uri=uri, content=None) == hs.server_name
    with pytest.raises(XMatrixError):  # the query is part of what was signed
        await verify(keys, header, method="GET", uri=uri.split("?")[0], content=None)


async def test_missing_or_malformed_header(hs: HomeserverStandIn, keys: ServerKeyStore) -> None:
    for header in (None, "", "Bearer token", "X-Matrix origin=hs.example.org"):
        with pytest.raises(XMatrixError):
            await verify(keys, header)
    assert key_fetches(hs) == 0


async def test_forged_signature(hs: HomeserverStandIn, keys: ServerKeyStore) -> None:
    good = hs.x_matrix_authorization("POST", UNBIND_URI, OUR_NAME, UNBIND_BODY)
    forged = replace_param(good, "sig", encode_base64(b"\x01" * 64))
    with pytest.raises(XMatrixError, match="Invalid request signature"):
        await verify(keys, forged)


@pytest.mark.parametrize("bad_sig", ["not base64!!", encode_base64(b"short"), encode_base64(b"x" * 65)])
async def test_malformed_signature(hs: HomeserverStandIn, keys: ServerKeyStore, bad_sig: str) -> None:
    header = replace_param(hs.x_matrix_authorization("POST", UNBIND_URI, OUR_NAME, UNBIND_BODY), "sig", bad_sig)
    with pytest.raises(XMatrixError):
        await verify(keys, header)


@pytest.mark.parametrize(
    "change",
    [
        {"method": "PUT"},
        {"uri": "/_matrix/identity/v2/3pid/bind"},
        {"content": {**UNBIND_BODY, "mxid": "@mallory:hs.example"}},
        {"content": None},
    ],
)
async def test_tampered_request(hs: HomeserverStandIn, keys: ServerKeyStore, change: dict[str, Any]) -> None:
    header = hs.x_matrix_authorization("POST", UNBIND_URI, OUR_NAME, UNBIND_BODY)
    with pytest.raises(XMatrixError, match="Invalid request signature"):
        await verify(keys, header, **change)


async def test_signature_by_another_key(hs: HomeserverStandIn, keys: ServerKeyStore) -> None:
    # Same key id as the published one, different private key.
    impostor = signedjson.key.generate_signing_key(hs.signing_key.version)
    header = sign_request(impostor, hs.server_name, content=UNBIND_BODY)
    assert parse_x_matrix(header).key_id == hs.key_id
    with pytest.raises(XMatrixError, match="Invalid request signature"):
        await verify(keys, header)


async def test_origin_is_not_the_signer(hs: HomeserverStandIn, hs2: HomeserverStandIn, keys: ServerKeyStore) -> None:
    # hs2 signs a request and claims it comes from hs (whose key has the same id).
    obj = {
        "method": "POST",
        "uri": UNBIND_URI,
        "origin": hs.server_name,
        "destination_is": OUR_NAME,
        "content": UNBIND_BODY,
    }
    sig = signedjson.sign.sign_json(obj, hs.server_name, hs2.signing_key)["signatures"][hs.server_name][hs2.key_id]
    header = f'X-Matrix origin="{hs.server_name}",key="{hs2.key_id}",sig="{sig}",destination="{OUR_NAME}"'
    with pytest.raises(XMatrixError, match="Invalid request signature"):
        await verify(keys, header)
    # hs2's genuine header, with only the origin swapped.
    swapped = replace_param(
        hs2.x_matrix_authorization("POST", UNBIND_URI, OUR_NAME, UNBIND_BODY), "origin", hs.server_name
    )
    with pytest.raises(XMatrixError, match="Invalid request signature"):
        await verify(keys, swapped)
    # ...while hs2's own header verifies as hs2.
    assert await verify(keys, hs2.x_matrix_authorization("POST", UNBIND_URI, OUR_NAME, UNBIND_BODY)) == hs2.server_name


async def test_destination_for_another_server(hs: HomeserverStandIn, keys: ServerKeyStore) -> None:
    header = hs.x_matrix_authorization("POST", UNBIND_URI, "other-is.example.org", UNBIND_BODY)
    with pytest.raises(XMatrixError, match="another server"):
        await verify(keys, header)
    assert key_fetches(hs) == 0  # refused before any network access


async def test_signed_for_another_server_header_rewritten(hs: HomeserverStandIn, keys: ServerKeyStore) -> None:
    header = hs.x_matrix_authorization("POST", UNBIND_URI, "other-is.example.org", UNBIND_BODY)
    for rewritten in (replace_param(header, "destination", OUR_NAME), replace_param(header, "destination", None)):
        with pytest.raises(XMatrixError, match="Invalid request signature"):
            await verify(keys, rewritten)


async def test_unknown_key_id(hs: HomeserverStandIn, keys: ServerKeyStore) -> None:
    header = replace_param(hs.x_matrix_authorization("POST", UNBIND_URI, OUR_NAME, UNBIND_BODY), "key", "ed25519:nope")
    with pytest.raises(XMatrixError, match="Unknown signing key"):
        await verify(keys, header)


async def test_non_ed25519_key_id(hs: HomeserverStandIn, keys: ServerKeyStore) -> None:
    header = replace_param(
        hs.x_matrix_authorization("POST", UNBIND_URI, OUR_NAME, UNBIND_BODY), "key", "curve25519:hs1"
    )
    with pytest.raises(XMatrixError):
        await verify(keys, header)


async def test_unreachable_origin(fed: FederationClient, clock: FakeClock) -> None:
    keys = ServerKeyStore(fed, clock=clock)
    origin = f"127.0.0.1:{free_port()}"
    header = sign_request(signedjson.key.generate_signing_key("k"), origin, content=UNBIND_BODY)
    with pytest.raises(XMatrixError, match="Could not fetch"):
        await verify(keys, header)


async def test_origin_refused_by_ip_policy(hs: HomeserverStandIn) -> None:
    client = FederationClient(FederationConfig(ca_file=str(hs.ca_path)))  # default blocklist: loopback
    try:
        keys = ServerKeyStore(client)
        header = hs.x_matrix_authorization("POST", UNBIND_URI, OUR_NAME, UNBIND_BODY)
        with pytest.raises(XMatrixError):
            await verify(keys, header)
    finally:
        await client.aclose()
    assert key_fetches(hs) == 0


async def test_signature_not_logged_at_info(
    hs: HomeserverStandIn, keys: ServerKeyStore, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    good = hs.x_matrix_authorization("POST", UNBIND_URI, OUR_NAME, UNBIND_BODY)
    await verify(keys, good)
    forged_sig = encode_base64(b"\x02" * 64)
    with pytest.raises(XMatrixError) as excinfo:
        await verify(keys, replace_param(good, "sig", forged_sig))
    for sig in (parse_x_matrix(good).signature, forged_sig):
        assert sig not in caplog.text
        assert sig not in str(excinfo.value)


# --- key responses ------------------------------------------------------------------------------


async def get_key(keys: ServerKeyStore, hs: HomeserverStandIn, key_id: str | None = None) -> Any:
    return await keys.get_verify_key(hs.server_name, key_id or hs.key_id)


async def test_get_verify_key(hs: HomeserverStandIn, keys: ServerKeyStore) -> None:
    key = await get_key(keys, hs)
    assert key.encode() == hs.signing_key.verify_key.encode()
    assert (key.alg, key.version) == ("ed25519", hs.signing_key.version)


async def test_expired_key_response(hs: HomeserverStandIn, keys: ServerKeyStore) -> None:
    expired = key_response(
        hs.server_name, [(hs.server_name, hs.signing_key)], valid_until_ts=int(time.time() * 1000) - 1000
    )
    hs.set_handler("GET", KEY_SERVER_PATH, lambda _r: (200, expired))
    with pytest.raises(XMatrixError):
        await get_key(keys, hs)
    with pytest.raises(XMatrixError):
        await verify(keys, hs.x_matrix_authorization("POST", UNBIND_URI, OUR_NAME, UNBIND_BODY))


@pytest.mark.parametrize("valid_until", [None, "soon", True, 1.5e15])
async def test_bad_valid_until(hs: HomeserverStandIn, keys: ServerKeyStore, valid_until: Any) -> None:
    body = {
        "server_name": hs.server_name,
        "verify_keys": {hs.key_id: verify_entry(hs.signing_key)},
        "old_verify_keys": {},
    }
    if valid_until is not None:
        body["valid_until_ts"] = valid_until
    signed = signedjson.sign.sign_json(body, hs.server_name, hs.signing_key)
    hs.set_handler("GET", KEY_SERVER_PATH, lambda _r: (200, signed))
    with pytest.raises(XMatrixError):
        await get_key(keys, hs)


async def test_response_for_another_server_name(hs: HomeserverStandIn, keys: ServerKeyStore) -> None:
    other = key_response("other.example.org", [("other.example.org", hs.signing_key)])
    hs.set_handler("GET", KEY_SERVER_PATH, lambda _r: (200, other))
    with pytest.raises(XMatrixError):
        await get_key(keys, hs)


async def test_response_self_signature_tampered(hs: HomeserverStandIn, keys: ServerKeyStore) -> None:
    attacker = signedjson.key.generate_signing_key(hs.signing_key.version)
    body = key_response(hs.server_name, [(hs.server_name, hs.signing_key)])
    body["verify_keys"] = {hs.key_id: verify_entry(attacker)}  # swapped after signing
    hs.set_handler("GET", KEY_SERVER_PATH, lambda _r: (200, body))
    with pytest.raises(XMatrixError):
        await get_key(keys, hs)


async def test_response_signed_by_other_listed_key_only(hs: HomeserverStandIn, keys: ServerKeyStore) -> None:
    # hs's key is listed, but only another (also listed) key signed the response.
    other = signedjson.key.generate_signing_key("other")
    body = key_response(
        hs.server_name,
        [(hs.server_name, other)],
        verify_keys={hs.key_id: verify_entry(hs.signing_key), "ed25519:other": verify_entry(other)},
    )
    hs.set_handler("GET", KEY_SERVER_PATH, lambda _r: (200, body))
    with pytest.raises(XMatrixError):
        await get_key(keys, hs)
    assert (await keys.get_verify_key(hs.server_name, "ed25519:other")).encode() == other.verify_key.encode()


async def test_response_without_signatures(hs: HomeserverStandIn, keys: ServerKeyStore) -> None:
    body = key_response(hs.server_name, [], verify_keys={hs.key_id: verify_entry(hs.signing_key)})
    hs.set_handler("GET", KEY_SERVER_PATH, lambda _r: (200, body))
    with pytest.raises(XMatrixError):
        await get_key(keys, hs)


async def test_key_only_in_old_verify_keys(hs: HomeserverStandIn, keys: ServerKeyStore) -> None:
    new = signedjson.key.generate_signing_key("new")
    body = key_response(
        hs.server_name,
        [(hs.server_name, new)],
        old_verify_keys={hs.key_id: {**verify_entry(hs.signing_key), "expired_ts": int(time.time() * 1000) - 1}},
    )
    hs.set_handler("GET", KEY_SERVER_PATH, lambda _r: (200, body))
    header = hs.x_matrix_authorization("POST", UNBIND_URI, OUR_NAME, UNBIND_BODY)
    with pytest.raises(XMatrixError, match="expired"):
        await verify(keys, header)
    with pytest.raises(XMatrixError, match="expired"):
        await verify(keys, header)
    assert key_fetches(hs) == 1
    assert (await keys.get_verify_key(hs.server_name, "ed25519:new")).encode() == new.verify_key.encode()


@pytest.mark.parametrize("status, body", [(404, {"errcode": "M_UNRECOGNIZED"}), (500, {}), (200, ["not", "a dict"])])
async def test_key_fetch_error_answers(hs: HomeserverStandIn, keys: ServerKeyStore, status: int, body: Any) -> None:
    hs.set_handler("GET", KEY_SERVER_PATH, lambda _r: (status, body))
    with pytest.raises(XMatrixError, match="Could not fetch"):
        await get_key(keys, hs)


async def test_invalid_server_name(keys: ServerKeyStore) -> None:
    with pytest.raises(XMatrixError):
        await keys.get_verify_key("not a server name", "ed25519:a")


# --- caching ------------------------------------------------------------------------------------


async def test_second_verification_uses_cache(hs: HomeserverStandIn, keys: ServerKeyStore) -> None:
    header = hs.x_matrix_authorization("POST", UNBIND_URI, OUR_NAME, UNBIND_BODY)
    await verify(keys, header)
    await verify(keys, header)
    await verify(
        keys, hs.x_matrix_authorization("POST", UNBIND_URI, OUR_NAME, UNBIND_BODY, destination_field="destination")
    )
    assert key_fetches(hs) == 1


async def test_refetch_after_valid_until(hs: HomeserverStandIn, keys: ServerKeyStore, clock: FakeClock) -> None:
    # Keys valid for 24 h from "now" on the injected clock, like the stand-in's own answer.
    hs.set_handler(
        "GET",
        KEY_SERVER_PATH,
        lambda _r: (
            200,
            key_response(hs.server_name, [(hs.server_name, hs.signing_key)], valid_until_ts=clock.now + DAY_MS),
        ),
    )
    header = hs.x_matrix_authorization("POST", UNBIND_URI, OUR_NAME, UNBIND_BODY)
    await verify(keys, header)
    clock.advance(DAY_MS - 60_000)
    await verify(keys, header)
    assert key_fetches(hs) == 1
    clock.advance(2 * 60_000)
    await verify(keys, header)
    assert key_fetches(hs) == 2


async def test_cache_capped_at_seven_days(hs: HomeserverStandIn, keys: ServerKeyStore, clock: FakeClock) -> None:
    body = key_response(hs.server_name, [(hs.server_name, hs.signing_key)], valid_until_ts=clock.now + 365 * DAY_MS)
    hs.set_handler("GET", KEY_SERVER_PATH, lambda _r: (200, body))
    await get_key(keys, hs)
    clock.advance(7 * DAY_MS - 1000)
    await get_key(keys, hs)
    assert key_fetches(hs) == 1
    clock.advance(2000)
    await get_key(keys, hs)
    assert key_fetches(hs) == 2


async def test_expired_cache_and_expired_refetch(hs: HomeserverStandIn, keys: ServerKeyStore, clock: FakeClock) -> None:
    await get_key(keys, hs)
    clock.advance(DAY_MS + 1000)  # cache expired; the server now only serves stale keys
    hs.set_handler(
        "GET",
        KEY_SERVER_PATH,
        lambda _r: (
            200,
            key_response(hs.server_name, [(hs.server_name, hs.signing_key)], valid_until_ts=clock.now - 1),
        ),
    )
    with pytest.raises(XMatrixError):
        await get_key(keys, hs)
    assert key_fetches(hs) == 2


async def test_unknown_key_refetch_rate_limited(hs: HomeserverStandIn, keys: ServerKeyStore, clock: FakeClock) -> None:
    await get_key(keys, hs)
    assert key_fetches(hs) == 1
    # Unknown key ids right after a fetch: no refetch (a forger cannot make us hammer hs).
    for i in range(5):
        with pytest.raises(XMatrixError, match="Unknown signing key"):
            await keys.get_verify_key(hs.server_name, f"ed25519:forged{i}")
    assert key_fetches(hs) == 1
    # The server rotates its key; a minute later, a request with the new key id refetches once.
    rotated = signedjson.key.generate_signing_key("rotated")
    body = key_response(hs.server_name, [(hs.server_name, rotated), (hs.server_name, hs.signing_key)])
    hs.set_handler("GET", KEY_SERVER_PATH, lambda _r: (200, body))
    clock.advance(61_000)
    key = await keys.get_verify_key(hs.server_name, "ed25519:rotated")
    assert key.encode() == rotated.verify_key.encode()
    assert key_fetches(hs) == 2
    with pytest.raises(XMatrixError, match="Unknown signing key"):
        await keys.get_verify_key(hs.server_name, "ed25519:forged")
    assert key_fetches(hs) == 2
    # The known keys keep working meanwhile.
    await get_key(keys, hs)
    await keys.get_verify_key(hs.server_name, "ed25519:rotated")
    assert key_fetches(hs) == 2


async def test_failed_fetch_rate_limited(hs: HomeserverStandIn, keys: ServerKeyStore, clock: FakeClock) -> None:
    hs.set_handler("GET", KEY_SERVER_PATH, lambda _r: (500, {}))
    for _ in range(3):
        with pytest.raises(XMatrixError):
            await get_key(keys, hs)
    assert key_fetches(hs) == 1
    hs.set_handler("GET", KEY_SERVER_PATH, None)
    clock.advance(61_000)
    await get_key(keys, hs)
    assert key_fetches(hs) == 2


async def test_unknown_key_refetch_keeps_cached_keys_on_bad_answer(
    hs: HomeserverStandIn, keys: ServerKeyStore, clock: FakeClock
) -> None:
    await get_key(keys, hs)
    hs.set_handler("GET", KEY_SERVER_PATH, lambda _r: (500, {}))
    clock.advance(61_000)
    with pytest.raises(XMatrixError):
        await keys.get_verify_key(hs.server_name, "ed25519:unknown")
    assert key_fetches(hs) == 2
    await get_key(keys, hs)  # still cached
    assert key_fetches(hs) == 2


# --- store behaviour with a scripted client -----------------------------------------------------


class ScriptedClient:
    """Answers key requests for any server name with a fresh, correctly signed response."""

    def __init__(self) -> None:
        self.signing_keys: dict[str, SigningKey] = {}
        self.fetches: list[str] = []
        self.gate: asyncio.Event | None = None

    def key_for(self, server_name: str) -> SigningKey:
        return self.signing_keys.setdefault(server_name, signedjson.key.generate_signing_key("k1"))

    async def request_json(self, method: str, server_name: str, path: str, **_kw: Any) -> tuple[int, object]:
        assert (method, path) == ("GET", KEY_SERVER_PATH)
        self.fetches.append(server_name)
        if self.gate is not None:
            await self.gate.wait()
        key = self.key_for(server_name)
        return 200, key_response(server_name, [(server_name, key)])


async def test_concurrent_lookups_share_one_fetch() -> None:
    client = ScriptedClient()
    client.gate = asyncio.Event()
    keys = ServerKeyStore(client)  # type: ignore[arg-type]
    lookups = [asyncio.create_task(keys.get_verify_key("hs.example.org", "ed25519:k1")) for _ in range(5)]
    await asyncio.sleep(0.01)
    client.gate.set()
    results = await asyncio.gather(*lookups)
    assert client.fetches == ["hs.example.org"]
    assert {r.encode() for r in results} == {client.key_for("hs.example.org").verify_key.encode()}


async def test_cancelled_lookup_does_not_cancel_shared_fetch() -> None:
    client = ScriptedClient()
    client.gate = asyncio.Event()
    keys = ServerKeyStore(client)  # type: ignore[arg-type]
    first = asyncio.create_task(keys.get_verify_key("hs.example.org", "ed25519:k1"))
    second = asyncio.create_task(keys.get_verify_key("hs.example.org", "ed25519:k1"))
    await asyncio.sleep(0.01)
    first.cancel()
    client.gate.set()
    assert (await second).encode() == client.key_for("hs.example.org").verify_key.encode()
    assert client.fetches == ["hs.example.org"]


async def test_cache_size_bounded() -> None:
    client = ScriptedClient()
    clock = FakeClock()
    keys = ServerKeyStore(client, clock=clock, max_servers=2)  # type: ignore[arg-type]
    for name in ("a.example", "b.example", "c.example"):
        await keys.get_verify_key(name, "ed25519:k1")
    assert len(keys._cache) == 2 and "a.example" not in keys._cache
    assert len(keys._last_fetch) <= 2
    clock.advance(61_000)
    await keys.get_verify_key("a.example", "ed25519:k1")  # evicted: fetched again
    await keys.get_verify_key("c.example", "ed25519:k1")  # still cached
    assert client.fetches == ["a.example", "b.example", "c.example", "a.example"]


async def test_verify_request_with_scripted_client() -> None:
    client = ScriptedClient()
    keys = ServerKeyStore(client)  # type: ignore[arg-type]
    key = client.key_for("hs.example.org")
    header = sign_request(key, "hs.example.org", content=UNBIND_BODY, destination_field="destination")
    assert await verify(keys, header) == "hs.example.org"
    # Unpadded base64 is expected, but a padded signature decodes to the same bytes.
    sig = parse_x_matrix(header).signature
    assert await verify(keys, replace_param(header, "sig", sig + "==")) == "hs.example.org"


async def test_malformed_verify_key_entries_skipped(hs: HomeserverStandIn, keys: ServerKeyStore) -> None:
    body = key_response(
        hs.server_name,
        [(hs.server_name, hs.signing_key)],
        verify_keys={
            hs.key_id: verify_entry(hs.signing_key),
            "ed25519:short": {"key": "AAAA"},
            "ed25519:nokey": {},
            "curve25519:x": {"key": encode_base64(b"k" * 32)},
        },
    )
    hs.set_handler("GET", KEY_SERVER_PATH, lambda _r: (200, body))
    assert (await get_key(keys, hs)).encode() == hs.signing_key.verify_key.encode()
    with pytest.raises(XMatrixError):
        await keys.get_verify_key(hs.server_name, "ed25519:short")
