"""Versions, status checks, CORS, and how every endpoint answers malformed requests.

Contract: docs/api-behaviour.md, "Requests and errors".
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from support.server import V1, V2, IdentityApi, User, new_secret, unique_email

CORS_METHODS = {"GET", "POST", "PUT", "DELETE", "OPTIONS"}
CORS_HEADERS = {"origin", "x-requested-with", "content-type", "accept", "authorization"}
LIMIT = 64 * 1024

POST_ENDPOINTS_V2 = [
    "/account/register",
    "/account/logout",
    "/terms",
    "/validate/email/requestToken",
    "/validate/email/submitToken",
    "/validate/msisdn/requestToken",
    "/validate/msisdn/submitToken",
    "/3pid/bind",
    "/3pid/unbind",
    "/lookup",
    "/store-invite",
    "/sign-ed25519",
]
POST_ENDPOINTS_V1 = [
    "/validate/email/requestToken",
    "/validate/email/submitToken",
    "/validate/msisdn/requestToken",
    "/validate/msisdn/submitToken",
    "/3pid/bind",
    "/3pid/unbind",
    "/bulk_lookup",
    "/store-invite",
    "/sign-ed25519",
]
ALL_POST = [V2 + p for p in POST_ENDPOINTS_V2] + [V1 + p for p in POST_ENDPOINTS_V1]

# POST endpoints that need no access token, where body checks are reached without one.
UNAUTHENTICATED_POST = [
    f"{V1}/validate/email/requestToken",
    f"{V1}/validate/email/submitToken",
    f"{V1}/3pid/bind",
    f"{V1}/bulk_lookup",
    f"{V2}/account/register",
]


def assert_error(resp: httpx.Response, status: int, errcode: str) -> dict[str, Any]:
    assert resp.status_code == status, f"{resp.request.method} {resp.request.url}: {resp.status_code} {resp.text}"
    assert resp.headers.get("content-type", "").startswith("application/json"), resp.headers
    body: dict[str, Any] = resp.json()
    assert body.get("errcode") == errcode, body
    assert isinstance(body.get("error"), str), body
    return body


def token_set(value: str | None) -> set[str]:
    return {part.strip() for part in (value or "").split(",") if part.strip()}


def assert_cors(resp: httpx.Response) -> None:
    assert resp.headers.get("access-control-allow-origin") == "*", dict(resp.headers)
    methods = {m.upper() for m in token_set(resp.headers.get("access-control-allow-methods"))}
    assert methods >= CORS_METHODS, resp.headers.get("access-control-allow-methods")
    headers = {h.lower() for h in token_set(resp.headers.get("access-control-allow-headers"))}
    assert headers >= CORS_HEADERS, resp.headers.get("access-control-allow-headers")
    # No browser may sniff an answer into HTML or script (a JSON error echoing a value).
    assert resp.headers.get("x-content-type-options") == "nosniff", dict(resp.headers)


# --- versions and status ---------------------------------------------------------------------


def test_versions(client: httpx.Client) -> None:
    resp = client.get("/_matrix/identity/versions")
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("application/json")
    versions = resp.json()["versions"]
    assert isinstance(versions, list) and versions
    for v in versions:
        assert isinstance(v, str) and re.fullmatch(r"v\d+\.\d+|r\d+\.\d+\.\d+", v), v
    # The v2 API with hashed lookups and terms is Matrix v1.1+.
    assert any(re.fullmatch(r"v1\.\d+", v) for v in versions), versions
    # Every version whose behaviour is built (v1.18: M_TOKEN_INCORRECT, ...), up to v1.19.
    # Not v1.20, which drops ?access_token= (still sent by Synapse, still accepted here).
    assert {f"v1.{i}" for i in range(1, 20)} <= set(versions), versions
    assert not {v for v in versions if re.fullmatch(r"v1\.(2\d|[3-9]\d)|v[2-9]\.\d+", v)}, versions


@pytest.mark.parametrize("path", ["/_matrix/identity/v2", "/_matrix/identity/api/v1"])
def test_status_check(client: httpx.Client, path: str) -> None:
    resp = client.get(path)
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("application/json")
    assert resp.json() == {}
    assert_cors(resp)


# --- CORS ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "method,path",
    [
        ("GET", "/_matrix/identity/v2"),
        ("GET", "/_matrix/identity/v2/terms"),
        ("GET", "/_matrix/identity/v2/pubkey/ed25519:0"),
        ("GET", "/_matrix/identity/v2/account"),  # 401
        ("GET", "/_matrix/identity/v2/no/such/endpoint"),  # 404
        ("POST", f"{V1}/validate/email/requestToken"),  # 400
    ],
)
def test_cors_headers_on_every_response(client: httpx.Client, method: str, path: str) -> None:
    resp = client.request(
        method, path, headers={"Origin": "https://app.example.test"}, json={} if method == "POST" else None
    )
    assert_cors(resp)


@pytest.mark.parametrize(
    "path",
    [
        f"{V2}/lookup",
        f"{V2}/account/register",
        f"{V2}/validate/email/requestToken",
        f"{V1}/3pid/bind",
        "/_matrix/identity/versions",
        "/_matrix/identity/v2/no/such/endpoint",
    ],
)
def test_options_preflight(client: httpx.Client, path: str) -> None:
    resp = client.options(
        path,
        headers={
            "Origin": "https://app.example.test",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
    )
    assert resp.status_code == 200, resp.text
    assert_cors(resp)


# --- unknown paths, wrong methods -------------------------------------------------------------


@pytest.mark.parametrize(
    "method,path",
    [
        ("GET", "/_matrix/identity/v2/no/such/endpoint"),
        ("POST", "/_matrix/identity/v2/no/such/endpoint"),
        ("GET", "/_matrix/identity/api/v1/no_such_thing"),
        ("GET", "/_matrix/identity/v3/lookup"),
        ("GET", "/not/matrix/at/all"),
    ],
)
def test_unknown_path_is_404_unrecognized(client: httpx.Client, method: str, path: str) -> None:
    assert_error(client.request(method, path), 404, "M_UNRECOGNIZED")


@pytest.mark.parametrize(
    "method,path",
    [
        ("GET", f"{V2}/lookup"),
        ("GET", f"{V2}/3pid/bind"),
        ("GET", f"{V2}/account/register"),
        ("POST", f"{V2}/hash_details"),
        ("POST", f"{V2}/account"),
        ("DELETE", f"{V2}/terms"),
        ("PUT", "/_matrix/identity/versions"),
        ("POST", "/_matrix/identity/v2"),
        ("POST", f"{V1}/lookup"),
        ("GET", f"{V1}/bulk_lookup"),
        ("PUT", f"{V2}/validate/email/submitToken"),
    ],
)
def test_wrong_method_is_405_unrecognized(client: httpx.Client, method: str, path: str) -> None:
    assert_error(client.request(method, path), 405, "M_UNRECOGNIZED")


@pytest.mark.parametrize(
    "method,path,allowed",
    [
        ("GET", f"{V2}/lookup", {"POST"}),
        ("POST", f"{V2}/hash_details", {"GET", "HEAD"}),
        ("PUT", "/_matrix/identity/versions", {"GET", "HEAD"}),
        ("DELETE", f"{V2}/terms", {"GET", "HEAD", "POST"}),
        ("PUT", f"{V2}/validate/email/submitToken", {"GET", "HEAD", "POST"}),
        ("POST", f"{V1}/lookup", {"GET", "HEAD"}),
        ("GET", f"{V1}/bulk_lookup", {"POST"}),
    ],
)
def test_405_names_the_allowed_methods(client: httpx.Client, method: str, path: str, allowed: set[str]) -> None:
    """RFC 9110 section 15.5.6: a 405 carries Allow; OPTIONS is answered on every path (CORS)."""
    resp = client.request(method, path)
    assert_error(resp, 405, "M_UNRECOGNIZED")
    assert {m.upper() for m in token_set(resp.headers.get("allow"))} == allowed | {"OPTIONS"}, resp.headers
    assert_cors(resp)


@pytest.mark.parametrize(
    "method,path",
    [
        ("GET", "/_matrix/identity/v2/"),
        ("GET", "/_matrix/identity/api/v1/"),
        ("GET", "/_matrix/identity/versions/"),
        ("GET", f"{V2}/terms/"),
        ("GET", f"{V2}/hash_details/"),
        ("POST", f"{V2}/lookup/"),
        ("POST", f"{V1}/bulk_lookup/"),
        ("POST", f"{V2}/validate/email/requestToken/"),
    ],
)
def test_trailing_slash_is_404_unrecognized_not_a_redirect(client: httpx.Client, method: str, path: str) -> None:
    resp = client.request(method, path)
    assert "location" not in resp.headers, resp.headers
    assert_error(resp, 404, "M_UNRECOGNIZED")
    assert_cors(resp)


# --- bodies ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", UNAUTHENTICATED_POST)
@pytest.mark.parametrize(
    "body",
    [b"{", b'{"client_secret": "abc",', b"not json", b"{'single': 'quotes'}", b"\xff\xfe{}"],
    ids=["open-brace", "truncated", "text", "single-quotes", "bad-utf8"],
)
def test_malformed_json_is_not_json(client: httpx.Client, path: str, body: bytes) -> None:
    resp = client.post(path, content=body, headers={"Content-Type": "application/json"})
    assert_error(resp, 400, "M_NOT_JSON")


def test_malformed_json_on_authenticated_endpoint(client: httpx.Client, user: User) -> None:
    for path in (f"{V2}/lookup", f"{V2}/3pid/bind", f"{V2}/validate/email/requestToken", f"{V2}/terms"):
        resp = client.post(path, content=b"{oops", headers={**user.headers, "Content-Type": "application/json"})
        assert_error(resp, 400, "M_NOT_JSON")


@pytest.mark.parametrize("path", UNAUTHENTICATED_POST)
@pytest.mark.parametrize("body", [b"[]", b'["a", 1]', b'"a string"', b"42", b"null", b"true"])
def test_json_that_is_not_an_object_is_bad_json(client: httpx.Client, path: str, body: bytes) -> None:
    resp = client.post(path, content=body, headers={"Content-Type": "application/json"})
    assert_error(resp, 400, "M_BAD_JSON")


def test_non_object_on_authenticated_endpoint(client: httpx.Client, user: User) -> None:
    for path in (f"{V2}/lookup", f"{V2}/3pid/bind", f"{V2}/terms"):
        resp = client.post(path, content=b"[1, 2]", headers={**user.headers, "Content-Type": "application/json"})
        assert_error(resp, 400, "M_BAD_JSON")


@pytest.mark.parametrize(
    "path,body,missing",
    [
        (f"{V1}/validate/email/requestToken", {"client_secret": "abc", "send_attempt": 1}, "email"),
        (f"{V1}/validate/email/requestToken", {"email": "a@example.test", "send_attempt": 1}, "client_secret"),
        (f"{V1}/validate/email/requestToken", {"email": "a@example.test", "client_secret": "abc"}, "send_attempt"),
        (f"{V1}/validate/email/submitToken", {"sid": "abc", "client_secret": "abc"}, "token"),
        (f"{V1}/validate/email/submitToken", {"token": "abc", "client_secret": "abc"}, "sid"),
        (f"{V1}/3pid/bind", {"sid": "abc", "client_secret": "abc"}, "mxid"),
        (f"{V1}/3pid/bind", {"mxid": "@a:example.test", "client_secret": "abc"}, "sid"),
        (f"{V1}/bulk_lookup", {}, "threepids"),
        (f"{V2}/account/register", {"token_type": "Bearer", "matrix_server_name": "example.test"}, "access_token"),
    ],
)
def test_missing_params(client: httpx.Client, path: str, body: dict[str, Any], missing: str) -> None:
    err = assert_error(client.post(path, json=body), 400, "M_MISSING_PARAMS")
    assert missing in err["error"], err


def test_missing_params_on_authenticated_endpoints(client: httpx.Client, user: User) -> None:
    err = assert_error(
        client.post(f"{V2}/lookup", json={"algorithm": "sha256", "addresses": []}, headers=user.headers),
        400,
        "M_MISSING_PARAMS",
    )
    assert "pepper" in err["error"]
    err = assert_error(client.post(f"{V2}/terms", json={}, headers=user.headers), 400, "M_MISSING_PARAMS")
    assert "user_accepts" in err["error"]


@pytest.mark.parametrize(
    "path,body",
    [
        (
            f"{V1}/validate/email/requestToken",
            {"email": "a@example.test", "client_secret": "abc", "send_attempt": "one"},
        ),
        (f"{V1}/validate/email/requestToken", {"email": "a@example.test", "client_secret": "abc", "send_attempt": [1]}),
        (f"{V1}/validate/email/requestToken", {"email": "a@example.test", "client_secret": 12345, "send_attempt": 1}),
        (
            f"{V1}/validate/email/requestToken",
            {"email": "a@example.test", "client_secret": "has space", "send_attempt": 1},
        ),
        (
            f"{V1}/validate/email/requestToken",
            {"email": "a@example.test", "client_secret": "x" * 256, "send_attempt": 1},
        ),
        (f"{V1}/validate/email/requestToken", {"email": ["a@example.test"], "client_secret": "abc", "send_attempt": 1}),
        (f"{V1}/validate/email/submitToken", {"sid": "abc", "client_secret": "abc", "token": 123}),
        (f"{V1}/validate/email/submitToken", {"sid": "a/b", "client_secret": "abc", "token": "abc"}),
        (f"{V1}/validate/email/submitToken", {"sid": {"x": 1}, "client_secret": "abc", "token": "abc"}),
        (f"{V1}/3pid/bind", {"sid": "abc", "client_secret": "abc", "mxid": 7}),
        (f"{V1}/bulk_lookup", {"threepids": "email a@example.test"}),
        (f"{V1}/bulk_lookup", {"threepids": [["email"]]}),
        # Pairs whose parts are not both strings, and things of length 2 that are not pairs.
        (f"{V1}/bulk_lookup", {"threepids": [["email", "a@example.test"], ["email", 5]]}),
        (f"{V1}/bulk_lookup", {"threepids": [["email", ["a@example.test"]]]}),
        (f"{V1}/bulk_lookup", {"threepids": [[None, "a@example.test"]]}),
        (f"{V1}/bulk_lookup", {"threepids": ["ab"]}),
        (f"{V1}/bulk_lookup", {"threepids": [{"email": 1, "a": 2}]}),
        (
            f"{V2}/account/register",
            {"access_token": "x", "token_type": "Bearer", "matrix_server_name": "not a server!"},
        ),
        (f"{V2}/account/register", {"access_token": 5, "token_type": "Bearer", "matrix_server_name": "example.test"}),
    ],
)
def test_wrong_types_and_formats_are_invalid_param(client: httpx.Client, path: str, body: dict[str, Any]) -> None:
    assert_error(client.post(path, json=body), 400, "M_INVALID_PARAM")


@pytest.mark.parametrize("path", [f"{V1}/validate/email/requestToken", f"{V2}/account/register", f"{V1}/3pid/bind"])
def test_oversized_body_is_413(client: httpx.Client, path: str) -> None:
    big = json.dumps(
        {"email": "a@example.test", "client_secret": "abc", "send_attempt": 1, "padding": "x" * (LIMIT + 1024)}
    ).encode()
    assert_error(client.post(path, content=big, headers={"Content-Type": "application/json"}), 413, "M_TOO_LARGE")


def test_oversized_chunked_body_is_413(client: httpx.Client) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"padding": "'
        for _ in range(40):
            yield b"x" * 4096  # 160 KiB in total, without a Content-Length
        yield b'"}'

    resp = client.post(
        f"{V1}/validate/email/requestToken", content=chunks(), headers={"Content-Type": "application/json"}
    )
    assert_error(resp, 413, "M_TOO_LARGE")


def test_oversized_body_on_authenticated_endpoint(client: httpx.Client, user: User) -> None:
    big = b'{"sid": "abc", "client_secret": "abc", "mxid": "' + b"a" * (LIMIT + 10) + b'"}'
    resp = client.post(f"{V2}/3pid/bind", content=big, headers={**user.headers, "Content-Type": "application/json"})
    assert_error(resp, 413, "M_TOO_LARGE")
    # Lookups take a whole address book (tests/test_client_shapes.py), and no more.
    lookup_cap = LIMIT + 10_000 * 128
    big = b'{"algorithm": "sha256", "pepper": "p", "addresses": ["' + b"a" * lookup_cap + b'"]}'
    resp = client.post(f"{V2}/lookup", content=big, headers={**user.headers, "Content-Type": "application/json"})
    assert_error(resp, 413, "M_TOO_LARGE")


# --- never a 500 ---------------------------------------------------------------------------------

HOSTILE_JSON_BODIES: list[bytes] = [
    b"",
    b"{",
    b"[]",
    b"null",
    b"\x00",
    b"\xff\xfe\xfd",
    b"[" * 20000 + b"]" * 20000,  # deep nesting
    b'{"a":' * 5000 + b"1" + b"}" * 5000,
    b'{"email": NaN, "client_secret": Infinity, "send_attempt": -Infinity}',
    b'{"send_attempt": 1e999, "email": "a@example.test", "client_secret": "abc"}',
    b'{"send_attempt": 123456789012345678901234567890, "email": "a@example.test", "client_secret": "abc"}',
    b'{"send_attempt": -1, "email": "a@example.test", "client_secret": "abc", "sid": "abc", "token": "t"}',
    b'{"send_attempt": true, "email": "a@example.test", "client_secret": "abc"}',
    b'{"email": "\\ud800@example.test", "client_secret": "abc", "send_attempt": 1}',
    b'{"email": "nul\\u0000@example.test", "client_secret": "abc", "send_attempt": 1}',
    b'{"email": "a@example.test\\r\\nBcc: victim@example.test", "client_secret": "abc", "send_attempt": 1}',
    b'{"sid": "\\u0000", "client_secret": "\\u0000", "token": "\\u0000", "mxid": "@\\u0000:x"}',
    b'{"sid": null, "client_secret": null, "token": null, "mxid": null, "email": null, "send_attempt": null}',
    b'{"sid": "abc", "client_secret": "abc", "mxid": "@a:example.test", "threepid": "email"}',
    b'{"sid": "abc", "client_secret": "abc", "mxid": "@a:example.test", "threepid": {"medium": 1, "address": []}}',
    b'{"mxid": "@a:example.test", "threepid": {"medium": "email", "address": "\\u0000"}}',
    b'{"algorithm": "sha256", "pepper": null, "addresses": null}',
    b'{"algorithm": ["sha256"], "pepper": {}, "addresses": [null, 1, {}, []]}',
    b'{"algorithm": "none", "pepper": "x", "addresses": ["\\u0000 email", "\\ud800"]}',
    b'{"threepids": [[null, null], [1, 2], ["email"], "x", [["a"], ["b"]]]}',
    b'{"threepids": [["email", "\\u0000"], ["msisdn", "\\ud800"]]}',
    b'{"user_accepts": [null, 1, {"a": 1}]}',
    b'{"user_accepts": "https://terms.id.test/tos-1.0-en.html"}',
    b'{"access_token": "x", "token_type": "Bearer", "matrix_server_name": "\\u0000"}',
    b'{"access_token": "x", "token_type": "Bearer", "matrix_server_name": "[::1"}',
    b'{"access_token": "x", "token_type": "Bearer", "matrix_server_name": "127.0.0.1:99999"}',
    b'{"access_token": "x", "token_type": "Bearer", "matrix_server_name": "127.0.0.1:-1"}',
    b'{"access_token": ["x"], "matrix_server_name": 1}',
    b'{"country": "GB", "phone_number": "\\u0000", "client_secret": "abc", "send_attempt": 1}',
    b'{"country": 1, "phone_number": [], "client_secret": "abc", "send_attempt": 1}',
    b'{"medium": "email", "address": "\\ud800", "room_id": "!r:x", "sender": "@s:x"}',
    b'{"mxid": "@a:x", "token": "t", "private_key": "!!!not base64!!!"}',
    '{"email": "ünïcødé@exämple.test", "client_secret": "abc", "send_attempt": 1}'.encode(),
]

HOSTILE_FORM_BODIES: list[bytes] = [
    b"email=%FF%FE&client_secret=abc&send_attempt=1",
    b"email=a%40example.test&client_secret=abc&send_attempt=notanumber",
    b"email=a%40example.test&email=b%40example.test&client_secret=abc&send_attempt=1",
    b"sid=%00&client_secret=%00&token=%00&mxid=%00",
    b"threepids=x&algorithm=sha256",
    b"%%%%&&&===",
]


def test_hostile_bodies_never_cause_a_server_error(client: httpx.Client, user: User, api: IdentityApi) -> None:
    failures = []
    for path in ALL_POST:
        auth_variants = ({}, user.headers) if path.startswith(V2) else ({},)
        cases = [("application/json", b) for b in HOSTILE_JSON_BODIES]
        cases += [("application/x-www-form-urlencoded", b) for b in HOSTILE_FORM_BODIES]
        cases += [("text/plain", b'{"email": "a@example.test"}'), ("application/json; charset=latin-1", b"{}")]
        for content_type, body in cases:
            for headers in auth_variants:
                try:
                    resp = client.post(path, content=body, headers={**headers, "Content-Type": content_type})
                except httpx.TransportError as e:  # the server dropped the connection: as bad as a 500
                    failures.append(
                        f"{path} [{content_type}, auth={bool(headers)}] {body[:60]!r}: connection failed: {e!r}"
                    )
                    continue
                problem = None
                if resp.status_code >= 500:
                    problem = f"status {resp.status_code}"
                elif resp.status_code >= 400:
                    try:
                        err = resp.json()
                    except ValueError:
                        err = None
                    if not isinstance(err, dict) or not isinstance(err.get("errcode"), str):
                        problem = "error is not a JSON errcode object"
                    elif not resp.headers.get("content-type", "").startswith("application/json"):
                        problem = "error without application/json content type"
                if problem:
                    failures.append(
                        f"{path} [{content_type}, auth={bool(headers)}] {body[:60]!r}: {problem}: {resp.text[:200]}"
                    )
    assert not failures, f"{len(failures)} bad answers:\n" + "\n".join(failures[:40])
    # The header injection attempt must not have mailed anybody else.
    assert api.smtp.all_to("victim@example.test") == []


def test_hostile_query_strings_never_cause_a_server_error(client: httpx.Client, user: User) -> None:
    gets = [
        f"{V2}/3pid/getValidated3pid",
        f"{V1}/3pid/getValidated3pid",
        f"{V1}/lookup",
        f"{V2}/pubkey/isvalid",
        f"{V1}/pubkey/isvalid",
        f"{V2}/pubkey/ephemeral/isvalid",
        f"{V2}/hash_details",
        f"{V2}/account",
        f"{V2}/terms",
        f"{V2}/pubkey/%00",
        f"{V2}/pubkey/ed25519:%FF",
        f"{V2}/pubkey/" + "a" * 5000,
    ]
    queries = [
        "",
        "sid=%00&client_secret=%00",
        "sid=%FF%FE&client_secret=%C3",
        "sid=" + "a" * 10000 + "&client_secret=abc",
        "sid=abc&sid=def&client_secret=abc&client_secret=x",
        "medium=email&address=%00",
        "medium=%00&address=a%40example.test",
        "medium=email&address=%ED%A0%80",
        "public_key=%00",
        "public_key=%FF",
        "public_key=" + "A" * 10000,
        "access_token=%00",
        "access_token=" + "a" * 10000,
        "%%%&&&===",
    ]
    failures = []
    for path in gets:
        for query in queries:
            for headers in ({}, user.headers):
                try:
                    resp = client.get(f"{path}?{query}" if query else path, headers=headers)
                except httpx.TransportError as e:
                    failures.append(f"GET {path}?{query[:60]} auth={bool(headers)}: connection failed: {e!r}")
                    continue
                if resp.status_code >= 500:
                    failures.append(
                        f"GET {path}?{query[:60]} auth={bool(headers)}: {resp.status_code} {resp.text[:200]}"
                    )
                elif resp.status_code >= 400:
                    try:
                        ok = isinstance(resp.json().get("errcode"), str)
                    except (ValueError, AttributeError):
                        ok = False
                    if not ok:
                        failures.append(f"GET {path}?{query[:60]}: not a JSON error: {resp.text[:200]}")
    # The link target answers HTML; it must not fail either.
    for query in queries:
        try:
            resp = client.get(f"{V2}/validate/email/submitToken?{query}&token=%00")
        except httpx.TransportError as e:
            failures.append(f"GET submitToken?{query[:60]}: connection failed: {e!r}")
            continue
        if resp.status_code >= 500:
            failures.append(f"GET submitToken?{query[:60]}: {resp.status_code} {resp.text[:200]}")
    assert not failures, "\n".join(failures[:40])


def test_bad_authorization_headers_are_401(client: httpx.Client) -> None:
    for value in [
        "Bearer",
        "Bearer\tx y",
        "Basic dXNlcjpwYXNz",
        "bearer-ish token",
        "Bearer a b",
        "Bearer " + "a" * 5000,
        "X-Matrix origin=x,key=y,sig=z",
    ]:
        resp = client.get(f"{V2}/account", headers={"Authorization": value})
        assert_error(resp, 401, "M_UNAUTHORIZED")


def test_form_encoded_request_token_v1(api: IdentityApi) -> None:
    """The deprecated form encoding is accepted on v1 (the wrong-types test above covers JSON)."""
    email = unique_email("form")
    resp = api.request_email_token(email, new_secret(), v1=True, form=True)
    assert resp.status_code == 200, resp.text
    assert re.fullmatch(r"[0-9a-zA-Z]{24}", resp.json()["sid"])
    api.smtp.wait_for(email)
