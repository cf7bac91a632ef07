"""Homeserver-signed unbind: `POST /3pid/unbind` with an `Authorization: X-Matrix ...` header.

Contract: docs/api-behaviour.md, "Homeserver-signed unbind" (and "Associations" for unbind with a
session); ../shared/notes/homeserver-interop.md ("Homeserver-signed unbind": Synapse signs
`destination_is`, others `destination`). The homeserver stand-in publishes its key at
/_matrix/key/v2/server and signs requests with `x_matrix_authorization`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import signedjson.key
import signedjson.sign
from support.asserts import assert_error
from support.homeserver import KEY_SERVER_PATH, OPENID_USERINFO_PATH, HomeserverStandIn, RecordedRequest
from support.inprocess import InProcessServer
from support.server import V1, V2, IdentityApi, SydentServer, User, unique_email

OTHER_SERVER = "other.example.test:8448"


def unbind_body(mxid: str, address: str) -> dict[str, Any]:
    return {"mxid": mxid, "threepid": {"medium": "email", "address": address}}


def x_matrix(
    hs: HomeserverStandIn,
    *,
    uri: str,
    destination: str,
    content: Any,
    destination_field: str = "destination_is",
    method: str = "POST",
    signing_key: Any = None,
    key_id: str | None = None,
    header_destination: str | None = None,
) -> str:
    """An X-Matrix header from the stand-in, with the knobs to get it wrong on purpose."""
    key = signing_key or hs.signing_key
    obj: dict[str, Any] = {
        "method": method,
        "uri": uri,
        "origin": hs.server_name,
        destination_field: destination,
        "content": content,
    }
    signed = signedjson.sign.sign_json(obj, hs.server_name, key)
    sig = signed["signatures"][hs.server_name][f"{key.alg}:{key.version}"]
    return (
        f'X-Matrix origin="{hs.server_name}",key="{key_id or hs.key_id}",sig="{sig}",'
        f'destination="{header_destination or destination}"'
    )


def post_unbind(client: httpx.Client, prefix: str, body: dict[str, Any], authorization: str | None) -> httpx.Response:
    headers = {"Authorization": authorization} if authorization is not None else {}
    return client.post(f"{prefix}/3pid/unbind", json=body, headers=headers)


def assert_bound(api: IdentityApi, address: str, assoc: dict[str, Any], viewer: User | None = None) -> None:
    assert api.v1_lookup("email", address).json() == assoc
    if viewer is not None:
        assert api.lookup_email(viewer, address) == assoc["mxid"]


# --- success ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("style", ["destination_is", "destination"])
@pytest.mark.parametrize("prefix", [V2, V1], ids=["v2", "v1"])
def test_homeserver_signed_unbind(
    api: IdentityApi, idserver: SydentServer, homeserver: HomeserverStandIn, prefix: str, style: str
) -> None:
    user = api.register()
    address = unique_email("xunbind")
    api.bind_email(address, user)
    keep = unique_email("xkeep")
    _, keep_assoc = api.bind_email(keep, user)
    assert api.lookup_email(user, address) == user.user_id

    body = unbind_body(user.user_id, address)
    auth = homeserver.x_matrix_authorization(
        "POST", f"{prefix}/3pid/unbind", idserver.server_name, body, destination_field=style
    )
    resp = post_unbind(api.client, prefix, body, auth)
    assert resp.status_code == 200, resp.text
    assert resp.json() == {}

    assert api.v1_lookup("email", address).json() == {}
    assert api.lookup_email(user, address) is None
    # The user's other binding stays.
    assert_bound(api, keep, keep_assoc, user)


def test_homeserver_signed_unbind_for_another_user_leaves_the_binding(
    api: IdentityApi,
    idserver: SydentServer,
    homeserver: HomeserverStandIn,
) -> None:
    user = api.register()
    address = unique_email("xother")
    _, assoc = api.bind_email(address, user)
    body = unbind_body(homeserver.user_id("somebody_else"), address)
    auth = homeserver.x_matrix_authorization("POST", f"{V2}/3pid/unbind", idserver.server_name, body)
    resp = post_unbind(api.client, V2, body, auth)
    assert resp.status_code == 200, resp.text
    assert resp.json() == {}
    assert_bound(api, address, assoc, user)


# --- refusals --------------------------------------------------------------------------------------------

# Each case: (body sent, server name, homeserver) -> Authorization header (None: no header).
Forger = Callable[[dict[str, Any], str, HomeserverStandIn], "str | None"]
URI = f"{V2}/3pid/unbind"


def _forged_signature(body: dict[str, Any], us: str, hs: HomeserverStandIn) -> str:
    impostor = signedjson.key.generate_signing_key(hs.signing_key.version)  # same key id, other key
    return x_matrix(hs, uri=URI, destination=us, content=body, signing_key=impostor)


def _other_body(body: dict[str, Any], us: str, hs: HomeserverStandIn) -> str:
    other = {"mxid": body["mxid"], "threepid": {"medium": "email", "address": unique_email("notthisone")}}
    return x_matrix(hs, uri=URI, destination=us, content=other)


def _no_content_signed(body: dict[str, Any], us: str, hs: HomeserverStandIn) -> str:
    signed = hs.sign_json({"method": "POST", "uri": URI, "origin": hs.server_name, "destination_is": us})
    sig = signed["signatures"][hs.server_name][hs.key_id]
    return f'X-Matrix origin="{hs.server_name}",key="{hs.key_id}",sig="{sig}",destination="{us}"'


CASES: dict[str, Forger] = {
    "forged_signature": _forged_signature,
    "signature_over_another_body": _other_body,
    "signature_without_the_body": _no_content_signed,
    "signature_for_another_method": lambda b, us, hs: x_matrix(hs, uri=URI, destination=us, content=b, method="PUT"),
    "signature_for_another_uri": lambda b, us, hs: x_matrix(hs, uri=f"{V1}/3pid/bind", destination=us, content=b),
    "unknown_key_id": lambda b, us, hs: x_matrix(
        hs,
        uri=URI,
        destination=us,
        content=b,
        signing_key=signedjson.key.generate_signing_key("unknown"),
        key_id="ed25519:unknown",
    ),
    "destination_is_another_server": lambda b, us, hs: x_matrix(hs, uri=URI, destination=OTHER_SERVER, content=b),
    "destination_another_server_spec_style": lambda b, us, hs: x_matrix(
        hs, uri=URI, destination=OTHER_SERVER, content=b, destination_field="destination"
    ),
    "header_destination_another_server": lambda b, us, hs: x_matrix(
        hs, uri=URI, destination=us, content=b, header_destination=OTHER_SERVER
    ),
    "missing_header": lambda b, us, hs: None,
    "bearer_instead_of_x_matrix": lambda b, us, hs: "Bearer not-an-x-matrix-header",
    "garbled_header": lambda b, us, hs: "X-Matrix this is not a header",
    "empty_signature": lambda b, us, hs: (
        f'X-Matrix origin="{hs.server_name}",key="{hs.key_id}",sig="",destination="{us}"'
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_homeserver_signed_unbind_refused(
    api: IdentityApi, idserver: SydentServer, homeserver: HomeserverStandIn, case: str
) -> None:
    user = api.register()
    address = unique_email("xrefused")
    _, assoc = api.bind_email(address, user)
    body = unbind_body(user.user_id, address)
    auth = CASES[case](body, idserver.server_name, homeserver)
    assert_error(post_unbind(api.client, V2, body, auth), 403, "M_FORBIDDEN")
    assert_bound(api, address, assoc, user)
    # The same request, properly signed, is accepted (the refusal was about the header).
    good = homeserver.x_matrix_authorization("POST", URI, idserver.server_name, body)
    resp = post_unbind(api.client, V2, body, good)
    assert resp.status_code == 200 and resp.json() == {}, resp.text
    assert api.v1_lookup("email", address).json() == {}


@pytest.mark.parametrize("prefix", [V2, V1], ids=["v2", "v1"])
def test_unbind_without_session_or_header_is_forbidden(api: IdentityApi, prefix: str) -> None:
    user = api.register()
    address = unique_email("xnoheader")
    _, assoc = api.bind_email(address, user)
    assert_error(post_unbind(api.client, prefix, unbind_body(user.user_id, address), None), 403, "M_FORBIDDEN")
    # A bearer token of the very user is no substitute.
    resp = api.client.post(f"{prefix}/3pid/unbind", json=unbind_body(user.user_id, address), headers=user.headers)
    assert_error(resp, 403, "M_FORBIDDEN")
    assert_bound(api, address, assoc, user)


def test_mxid_on_another_server_than_the_origin(
    api: IdentityApi, idserver: SydentServer, homeserver: HomeserverStandIn
) -> None:
    address = unique_email("xforeign")
    victim = "@victim:" + OTHER_SERVER
    session = api.validated_email_session(address, v1=True)
    resp = api.bind(session, victim, v1=True)
    assert resp.status_code == 200, resp.text
    assoc = resp.json()

    body = unbind_body(victim, address)
    for style in ("destination_is", "destination"):
        auth = homeserver.x_matrix_authorization("POST", URI, idserver.server_name, body, destination_field=style)
        assert_error(post_unbind(api.client, V2, body, auth), 403, "M_FORBIDDEN")
    assert_bound(api, address, assoc)


def _key_requests(hs: HomeserverStandIn, since: float) -> list[RecordedRequest]:
    return [r for r in hs.requests_since(since) if r.path.startswith(KEY_SERVER_PATH)]


def test_expired_homeserver_key_is_refused(
    make_inprocess_server: Callable[..., InProcessServer],
    api_for: Callable[[SydentServer], IdentityApi],
    homeserver: HomeserverStandIn,
) -> None:
    server = make_inprocess_server()  # a fresh server: nothing cached about the stand-in's keys
    api = api_for(server)
    user = api.register()
    address = unique_email("xexpired")
    _, assoc = api.bind_email(address, user)

    def expired_keys(_: RecordedRequest) -> tuple[int, Any]:
        keys = homeserver.server_keys()
        keys.pop("signatures")
        keys["valid_until_ts"] = int(time.time() * 1000) - 3600 * 1000
        return 200, homeserver.sign_json(keys)

    paths = [KEY_SERVER_PATH, f"{KEY_SERVER_PATH}/{homeserver.key_id}", f"{KEY_SERVER_PATH}/"]
    since = time.time()
    for path in paths:
        homeserver.set_handler("GET", path, expired_keys)
    try:
        body = unbind_body(user.user_id, address)
        for style in ("destination_is", "destination"):
            auth = homeserver.x_matrix_authorization("POST", URI, server.server_name, body, destination_field=style)
            assert_error(post_unbind(api.client, V2, body, auth), 403, "M_FORBIDDEN")
        assert_bound(api, address, assoc, user)
        # The refusal came from looking at the (expired) key.
        fetched = _key_requests(homeserver, since)
        assert fetched and all(r.status == 200 for r in fetched), [(r.path, r.status) for r in fetched]
    finally:
        for path in paths:
            homeserver.set_handler("GET", path, None)


def test_blocked_homeserver_address(
    make_inprocess_server: Callable[..., InProcessServer],
    api_for: Callable[[SydentServer], IdentityApi],
    homeserver: HomeserverStandIn,
) -> None:
    # 127.0.0.1 is not allowed any more: the stand-in may not be contacted.
    server = make_inprocess_server(extra_config={"federation": {"ip_allowlist": []}})
    api = api_for(server)
    since = time.time()

    resp = api.client.post(f"{V2}/account/register", json=homeserver.openid_token("blockeduser"))
    assert_error(resp, 401, "M_UNAUTHORIZED")

    address = unique_email("xblocked")
    mxid = homeserver.user_id("blockeduser")
    session = api.validated_email_session(address, v1=True)
    resp = api.bind(session, mxid, v1=True)
    assert resp.status_code == 200, resp.text
    assoc = resp.json()

    body = unbind_body(mxid, address)
    auth = homeserver.x_matrix_authorization("POST", URI, server.server_name, body)
    assert_error(post_unbind(api.client, V2, body, auth), 403, "M_FORBIDDEN")
    assert_bound(api, address, assoc)

    time.sleep(0.3)
    seen = homeserver.requests_since(since)
    contacted = [
        (r.method, r.path) for r in seen if r.path == OPENID_USERINFO_PATH or r.path.startswith(KEY_SERVER_PATH)
    ]
    assert contacted == [], contacted
