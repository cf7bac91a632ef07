"""Sydent's access settings: `access.homeserver_allow_list`, `access.v1_enabled`,
`access.v1_associations_enabled` (Sydent's homeserver_allow_list, enable_v1_access,
enable_v1_associations), over real sockets, on SQLite and PostgreSQL.
"""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import pytest
from support.homeserver import HomeserverStandIn
from support.server import V1, V2, IdentityApi, SydentServer, unique_email
from support.smtp import SmtpSink

from sydent_lite.config import ConfigError, config_from_dict

NOT_ALLOWED = {"errcode": "M_UNAUTHORIZED", "error": "This homeserver is not authorized to access this server."}
V1_OFF = {"access": {"v1_enabled": False}}


def allow_only(*servers: str) -> dict[str, Any]:
    return {"access": {"v1_enabled": False, "homeserver_allow_list": list(servers)}}


def assert_unrecognized(resp: httpx.Response) -> None:
    assert resp.status_code == 404, resp.text
    assert resp.json()["errcode"] == "M_UNRECOGNIZED", resp.text


def test_allow_list_admits_its_homeservers(make_server: Any, api_for: Any, homeserver: HomeserverStandIn) -> None:
    # Listed in another case: server names compare in any case.
    api: IdentityApi = api_for(make_server(extra_config=allow_only("other.example", homeserver.server_name.upper())))
    user = api.register()
    _, signed = api.bind_email(unique_email(), user)
    assert signed["mxid"] == user.user_id


def test_allow_list_refuses_registration_before_asking_the_homeserver(
    make_server: Any, api_for: Any, homeserver: HomeserverStandIn
) -> None:
    api: IdentityApi = api_for(make_server(extra_config=allow_only("allowed.example")))
    localpart = "u" + uuid.uuid4().hex[:12]
    before = len(homeserver.requests_to("/_matrix/federation/v1/openid/userinfo"))
    resp = api.client.post(f"{V2}/account/register", json=homeserver.openid_token(localpart))
    assert resp.status_code == 403 and resp.json() == NOT_ALLOWED, resp.text
    # Refused before the OpenID exchange: nobody can make us call an unlisted server.
    assert len(homeserver.requests_to("/_matrix/federation/v1/openid/userinfo")) == before


def test_tokens_of_a_homeserver_taken_off_the_list_can_no_longer_bind_or_invite(
    make_server: Any, api_for: Any, smtp: SmtpSink
) -> None:
    server: SydentServer = make_server(extra_config=V1_OFF)
    api: IdentityApi = api_for(server)
    user = api.register()
    address = unique_email()
    session = api.validated_email_session(address, user=user)
    # Sydent checks the list only at registration; a token from before keeps working there.
    server.extra_config = allow_only("allowed.example")
    server.restart()
    resp = api.bind(session, user.user_id, user=user)
    assert resp.status_code == 403 and resp.json() == NOT_ALLOWED, resp.text
    invitee = unique_email("invitee")
    body = {"medium": "email", "address": invitee, "room_id": "!room:allowed.example", "sender": user.user_id}
    resp = api.client.post(f"{V2}/store-invite", json=body, headers=user.headers)
    assert resp.status_code == 403 and resp.json() == NOT_ALLOWED, resp.text
    smtp.assert_no_mail(invitee)
    assert api.lookup_email(user, address) is None


def test_allow_list_needs_v1_off() -> None:
    with pytest.raises(ConfigError) as e:
        config_from_dict({"access": {"homeserver_allow_list": ["hs.example"]}})
    assert "'access.homeserver_allow_list' needs 'access.v1_enabled: false'" in str(e.value)


V1_GETS = ["", "/pubkey/ed25519:0", "/pubkey/isvalid?public_key=x", "/lookup?medium=email&address=a@b.c"]
V1_POSTS = [
    "/validate/email/requestToken",
    "/3pid/bind",
    "/3pid/unbind",
    "/bulk_lookup",
    "/store-invite",
    "/sign-ed25519",
]


def test_v1_off_removes_every_v1_endpoint(make_server: Any, api_for: Any) -> None:
    api: IdentityApi = api_for(make_server(extra_config=V1_OFF))
    for path in V1_GETS:
        assert_unrecognized(api.client.get(f"{V1}{path}"))
    for path in V1_POSTS:
        assert_unrecognized(api.client.post(f"{V1}{path}", json={}))
    # v2 is all there.
    assert api.client.get(V2).status_code == 200
    assert api.client.get(f"{V2}/pubkey/ed25519:0").status_code == 200
    user = api.register()
    _, signed = api.bind_email(unique_email(), user)
    assert api.lookup_email(user, signed["address"]) == user.user_id


def test_v1_associations_off_removes_only_v1_bind(make_server: Any, api_for: Any) -> None:
    api: IdentityApi = api_for(make_server(extra_config={"access": {"v1_associations_enabled": False}}))
    address = unique_email()
    session = api.validated_email_session(address, v1=True)  # v1 validation is still there
    assert_unrecognized(api.bind(session, "@someone:hs.example", v1=True))
    assert api.client.get(f"{V1}/pubkey/ed25519:0").status_code == 200
    resp = api.v1_lookup("email", address)
    assert resp.status_code == 200 and resp.json() == {}, resp.text
    # v2 bind of the same session works.
    user = api.register()
    assert api.bind(session, user.user_id, user=user).status_code == 200
