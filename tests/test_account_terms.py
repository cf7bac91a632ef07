"""Accounts (OpenID registration, tokens, logout) and terms of service.

Contract: docs/api-behaviour.md, "Authentication (v2)"; spec v2_auth.yaml and v2_terms.yaml.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from support.asserts import assert_error
from support.homeserver import OPENID_USERINFO_PATH, HomeserverStandIn
from support.inprocess import InProcessServer
from support.server import DEFAULT_TERMS, V2, IdentityApi, SydentServer, expected_policies, new_secret, unique_email
from support.smtp import free_port

TOS = DEFAULT_TERMS["docs"]["terms_of_service"]["langs"]
PRIVACY = DEFAULT_TERMS["docs"]["privacy_policy"]["langs"]


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def localpart() -> str:
    return "u" + uuid.uuid4().hex[:12]


# --- register ----------------------------------------------------------------------------------


def test_register_with_openid_token(client: httpx.Client, homeserver: HomeserverStandIn) -> None:
    lp = localpart()
    openid = homeserver.openid_token(lp)
    resp = client.post(f"{V2}/account/register", json=openid)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    token = body["token"]
    assert isinstance(token, str) and len(token) >= 16
    assert body.get("access_token") == token  # for old clients, as Sydent
    assert token != openid["access_token"]

    # The identity server asked the homeserver, over HTTPS, who the OpenID token belongs to.
    calls = [
        r
        for r in homeserver.requests_to(OPENID_USERINFO_PATH, "GET")
        if r.query_value("access_token") == openid["access_token"]
    ]
    assert len(calls) == 1

    # Terms are not accepted yet: the account endpoint refuses, but the token is known.
    assert_error(client.get(f"{V2}/account", headers=bearer(token)), 403, "M_TERMS_NOT_SIGNED")


def test_register_then_account_after_terms(
    api: IdentityApi, client: httpx.Client, homeserver: HomeserverStandIn
) -> None:
    user = api.register()
    resp = client.get(f"{V2}/account", headers=user.headers)
    assert resp.status_code == 200, resp.text
    assert resp.json() == {"user_id": f"@{user.localpart}:{homeserver.server_name}"}


def test_register_with_unknown_openid_token(client: httpx.Client, homeserver: HomeserverStandIn) -> None:
    body = {
        "access_token": "not-a-token-" + uuid.uuid4().hex,
        "token_type": "Bearer",
        "matrix_server_name": homeserver.server_name,
        "expires_in": 3600,
    }
    assert_error(client.post(f"{V2}/account/register", json=body), 401, "M_UNAUTHORIZED")


def test_register_user_of_another_server_is_refused(client: httpx.Client, homeserver: HomeserverStandIn) -> None:
    # The homeserver vouches for a user that is not on matrix_server_name.
    for sub in (
        "@mallory:evil.example.test",
        f"@mallory:{homeserver.server_name}.evil.test",
        "@mallory:127.0.0.1:1",
        "not-a-user-id",
        f"mallory:{homeserver.server_name}",
        "",
    ):
        openid = homeserver.openid_token(sub, raw=True)
        assert_error(client.post(f"{V2}/account/register", json=openid), 401, "M_UNAUTHORIZED")


def test_register_with_unreachable_homeserver(client: httpx.Client) -> None:
    body = {
        "access_token": "x" + uuid.uuid4().hex,
        "token_type": "Bearer",
        "matrix_server_name": f"127.0.0.1:{free_port()}",
        "expires_in": 3600,
    }
    assert_error(client.post(f"{V2}/account/register", json=body), 401, "M_UNAUTHORIZED")


@pytest.mark.parametrize("host", ["[::127.0.0.1]", "[2002:7f00:1::1]", "[fec0::1]", "[64:ff9b:1::7f00:1]"])
def test_register_refuses_ipv6_ranges_that_lead_elsewhere(
    client: httpx.Client, homeserver: HomeserverStandIn, host: str
) -> None:
    # IPv4-compatible and 6to4 addresses of the homeserver's own 127.0.0.1, a site-local and a
    # local NAT64 address: refused as destinations before any connection is tried, although the
    # test servers allow-list 127.0.0.0/8 (the IPv6 ranges themselves are not allow-listed).
    body = homeserver.openid_token(localpart())
    body["matrix_server_name"] = f"{host}:{homeserver.port}"
    err = assert_error(client.post(f"{V2}/account/register", json=body), 401, "M_UNAUTHORIZED")
    assert "not allowed as a destination" in err["error"], err


@pytest.mark.parametrize("drop", ["access_token", "matrix_server_name"])
def test_register_missing_params(client: httpx.Client, homeserver: HomeserverStandIn, drop: str) -> None:
    body = homeserver.openid_token(localpart())
    del body[drop]
    err = assert_error(client.post(f"{V2}/account/register", json=body), 400, "M_MISSING_PARAMS")
    assert drop in err["error"]


@pytest.mark.parametrize("name", ["not a server name", "exa_mple.test:", "host:port", "127.0.0.1:0x50", ""])
def test_register_invalid_server_name(client: httpx.Client, name: str) -> None:
    body = {"access_token": "x", "token_type": "Bearer", "matrix_server_name": name, "expires_in": 3600}
    resp = client.post(f"{V2}/account/register", json=body)
    if name == "":
        assert resp.status_code == 400 and resp.json()["errcode"] in ("M_INVALID_PARAM", "M_MISSING_PARAMS"), resp.text
    else:
        assert_error(resp, 400, "M_INVALID_PARAM")


def test_register_twice_gives_independent_tokens(api: IdentityApi, client: httpx.Client) -> None:
    first = api.register()
    second = api.register(first.localpart, accept_terms=False)  # acceptance belongs to the user
    assert first.token != second.token
    for u in (first, second):
        resp = client.get(f"{V2}/account", headers=u.headers)
        assert resp.status_code == 200 and resp.json()["user_id"] == first.user_id, resp.text
    assert client.post(f"{V2}/account/logout", headers=first.headers).status_code == 200
    assert_error(client.get(f"{V2}/account", headers=first.headers), 401, "M_UNAUTHORIZED")
    assert client.get(f"{V2}/account", headers=second.headers).status_code == 200


# --- tokens ---------------------------------------------------------------------------------------


def test_account_needs_a_token(client: httpx.Client) -> None:
    assert_error(client.get(f"{V2}/account"), 401, "M_UNAUTHORIZED")
    assert_error(client.get(f"{V2}/account", headers=bearer("nope" + uuid.uuid4().hex)), 401, "M_UNAUTHORIZED")
    assert_error(client.get(f"{V2}/account", params={"access_token": "nope"}), 401, "M_UNAUTHORIZED")


def test_token_in_query_string(api: IdentityApi, client: httpx.Client) -> None:
    user = api.register()
    resp = client.get(f"{V2}/account", params={"access_token": user.token})
    assert resp.status_code == 200, resp.text
    assert resp.json() == {"user_id": user.user_id}
    resp = client.get(f"{V2}/hash_details", params={"access_token": user.token})
    assert resp.status_code == 200, resp.text


def test_header_wins_over_query_string(api: IdentityApi, client: httpx.Client) -> None:
    user = api.register()
    resp = client.get(f"{V2}/account", params={"access_token": "bogus"}, headers=user.headers)
    assert resp.status_code == 200 and resp.json() == {"user_id": user.user_id}, resp.text
    resp = client.get(f"{V2}/account", params={"access_token": user.token}, headers=bearer("bogus"))
    assert_error(resp, 401, "M_UNAUTHORIZED")


def test_logout(api: IdentityApi, client: httpx.Client) -> None:
    user = api.register()
    resp = client.post(f"{V2}/account/logout", headers=user.headers)
    assert resp.status_code == 200, resp.text
    assert resp.json() == {}
    assert_error(client.get(f"{V2}/account", headers=user.headers), 401, "M_UNAUTHORIZED")
    assert_error(client.get(f"{V2}/hash_details", headers=user.headers), 401, "M_UNAUTHORIZED")
    assert_error(client.post(f"{V2}/account/logout", headers=user.headers), 401, "M_UNKNOWN_TOKEN")


def test_logout_via_query_string(api: IdentityApi, client: httpx.Client) -> None:
    user = api.register()
    resp = client.post(f"{V2}/account/logout", params={"access_token": user.token})
    assert resp.status_code == 200, resp.text
    assert_error(client.get(f"{V2}/account", headers=user.headers), 401, "M_UNAUTHORIZED")


def test_logout_unknown_token(client: httpx.Client) -> None:
    resp = client.post(f"{V2}/account/logout", headers=bearer("unknown_" + uuid.uuid4().hex))
    assert_error(resp, 401, "M_UNKNOWN_TOKEN")


def test_logout_needs_no_terms(api: IdentityApi, client: httpx.Client) -> None:
    user = api.register(accept_terms=False)
    resp = client.post(f"{V2}/account/logout", headers=user.headers)
    assert resp.status_code == 200, resp.text
    assert_error(client.post(f"{V2}/account/logout", headers=user.headers), 401, "M_UNKNOWN_TOKEN")


# --- terms -----------------------------------------------------------------------------------------


def test_get_terms(client: httpx.Client) -> None:
    resp = client.get(f"{V2}/terms")  # no authentication needed
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("application/json")
    assert resp.json() == expected_policies(DEFAULT_TERMS)


def test_post_terms_needs_a_token(client: httpx.Client) -> None:
    resp = client.post(f"{V2}/terms", json={"user_accepts": [TOS["en"]["url"]]})
    assert_error(resp, 401, "M_UNAUTHORIZED")


def test_post_terms_bad_body(api: IdentityApi, client: httpx.Client) -> None:
    user = api.register(accept_terms=False)
    assert_error(client.post(f"{V2}/terms", json={}, headers=user.headers), 400, "M_MISSING_PARAMS")
    assert_error(
        client.post(f"{V2}/terms", json={"user_accepts": TOS["en"]["url"]}, headers=user.headers),
        400,
        "M_INVALID_PARAM",
    )
    assert_error(
        client.post(f"{V2}/terms", json={"user_accepts": [1, 2]}, headers=user.headers), 400, "M_INVALID_PARAM"
    )


def authenticated_requests() -> list[tuple[str, str, dict[str, Any]]]:
    """(method, path, kwargs) for every authenticated v2 endpoint, with well-formed requests."""
    sid_params = {"sid": "abcdefghijklmnopqrstuvwx", "client_secret": new_secret()}
    return [
        ("GET", f"{V2}/account", {}),
        ("GET", f"{V2}/hash_details", {}),
        ("POST", f"{V2}/lookup", {"json": {"algorithm": "sha256", "pepper": "x", "addresses": []}}),
        ("GET", f"{V2}/3pid/getValidated3pid", {"params": sid_params}),
        ("POST", f"{V2}/3pid/bind", {"json": {**sid_params, "mxid": "@a:example.test"}}),
        ("POST", f"{V2}/validate/email/submitToken", {"json": {**sid_params, "token": "abc"}}),
    ]


def test_terms_not_signed_blocks_authenticated_endpoints(api: IdentityApi, client: httpx.Client) -> None:
    user = api.register(accept_terms=False)
    for method, path, kwargs in authenticated_requests():
        resp = client.request(method, path, headers=user.headers, **kwargs)
        assert_error(resp, 403, "M_TERMS_NOT_SIGNED")

    # requestToken is refused before any mail goes out.
    email = unique_email("terms")
    resp = api.request_email_token(email, new_secret(), user=user)
    assert_error(resp, 403, "M_TERMS_NOT_SIGNED")
    api.smtp.assert_no_mail(email)

    # Query-string tokens are held to the same rule.
    assert_error(client.get(f"{V2}/account", params={"access_token": user.token}), 403, "M_TERMS_NOT_SIGNED")


def test_partial_acceptance_is_not_enough(api: IdentityApi, client: httpx.Client) -> None:
    user = api.register(accept_terms=False)
    resp = api.accept_terms(user, [TOS["en"]["url"]])
    assert resp.status_code == 200 and resp.json() == {}, resp.text
    assert_error(client.get(f"{V2}/account", headers=user.headers), 403, "M_TERMS_NOT_SIGNED")

    # Unknown URLs are accepted without complaint but count for nothing.
    resp = api.accept_terms(user, ["https://terms.id.test/privacy-9.9-en.html", PRIVACY["en"]["url"] + "x"])
    assert resp.status_code == 200, resp.text
    assert_error(client.get(f"{V2}/account", headers=user.headers), 403, "M_TERMS_NOT_SIGNED")

    # Another language of the missing policy completes it; earlier acceptances are kept.
    resp = api.accept_terms(user, [PRIVACY["fr"]["url"]])
    assert resp.status_code == 200, resp.text
    resp = client.get(f"{V2}/account", headers=user.headers)
    assert resp.status_code == 200 and resp.json() == {"user_id": user.user_id}, resp.text


def test_accepting_in_another_language(api: IdentityApi, client: httpx.Client) -> None:
    user = api.register(accept_terms=False)
    resp = api.accept_terms(user, [TOS["fr"]["url"], PRIVACY["fr"]["url"]])
    assert resp.status_code == 200, resp.text
    resp = client.get(f"{V2}/account", headers=user.headers)
    assert resp.status_code == 200, resp.text
    # Accepting again (or accepting an empty list) is harmless.
    assert api.accept_terms(user, [TOS["en"]["url"]]).status_code == 200
    assert api.accept_terms(user, []).status_code == 200
    assert client.get(f"{V2}/account", headers=user.headers).status_code == 200


def test_acceptance_belongs_to_the_user(api: IdentityApi, client: httpx.Client) -> None:
    accepted = api.register()
    other = api.register(accept_terms=False)
    assert client.get(f"{V2}/account", headers=accepted.headers).status_code == 200
    assert_error(client.get(f"{V2}/account", headers=other.headers), 403, "M_TERMS_NOT_SIGNED")


def test_server_without_terms(
    make_inprocess_server: Callable[..., InProcessServer], api_for: Callable[[SydentServer], IdentityApi]
) -> None:
    server = make_inprocess_server(terms_path=None)
    api = api_for(server)
    resp = api.client.get(f"{V2}/terms")
    assert resp.status_code == 200, resp.text
    assert resp.json() == {"policies": {}}
    user = api.register(accept_terms=False)
    resp = api.client.get(f"{V2}/account", headers=user.headers)
    assert resp.status_code == 200, resp.text
    assert resp.json() == {"user_id": user.user_id}
    resp = api.client.get(f"{V2}/hash_details", headers=user.headers)
    assert resp.status_code == 200, resp.text
    # No terms, but still no anonymous access.
    assert_error(api.client.get(f"{V2}/account"), 401, "M_UNAUTHORIZED")
