"""Sydent's invite abuse controls and delete_tokens_on_bind, over real sockets, on SQLite and
PostgreSQL: `invites.blocked_homeservers`, `invites.blocked_room_ids`, `invites.blocked_keywords`,
`rate_limits.store_invite_per_sender_*` and `invites.delete_tokens_on_bind`. Each abuse is
performed and shown refused: no mail sent, nothing stored.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from support.db import DatabaseFactory, sql
from support.homeserver import HomeserverStandIn
from support.server import V1, V2, IdentityApi, SydentServer, unique_email, wait_until
from support.smtp import SmtpSink

NOT_ALLOWED = {"errcode": "M_UNAUTHORIZED", "error": "Invite not allowed"}


def invitation(address: str, sender: str = "@inviter:fine.example", **extra: str) -> dict[str, str]:
    return {"medium": "email", "address": address, "room_id": "!room:fine.example", "sender": sender, **extra}


def post_v1(api: IdentityApi, body: dict[str, str]) -> httpx.Response:
    return api.client.post(f"{V1}/store-invite", json=body)


def stored_invites(server: SydentServer, address: str) -> list[dict[str, Any]]:
    return sql(server.database_url, "SELECT token, delivered_ts FROM invites WHERE address = ?", address)


def assert_refused(api: IdentityApi, smtp: SmtpSink, body: dict[str, str]) -> None:
    resp = post_v1(api, body)
    assert resp.status_code == 403 and resp.json() == NOT_ALLOWED, resp.text
    smtp.assert_no_mail(body["address"])
    assert stored_invites(api.server, body["address"]) == []


def assert_accepted(api: IdentityApi, smtp: SmtpSink, body: dict[str, str]) -> None:
    resp = post_v1(api, body)
    assert resp.status_code == 200, resp.text
    smtp.wait_for(body["address"])
    assert len(stored_invites(api.server, body["address"])) == 1


@pytest.fixture(scope="module")
def blocking_server(
    db_factory: DatabaseFactory,
    smtp_sink: SmtpSink,
    homeserver: HomeserverStandIn,
    tmp_path_factory: pytest.TempPathFactory,
    backend: str,
) -> Iterator[SydentServer]:
    """One server with the block lists for this module's tests of them (each its own addresses):
    the lists are only read, so a server a test would have been one more start-up each."""
    server = SydentServer(
        tmp_path_factory.mktemp(f"blocking-{backend}"),
        database_url=db_factory.create(migrated=True).url,
        smtp_port=smtp_sink.port,
        ca_file=homeserver.ca_path,
        extra_config={
            "invites": {
                "blocked_homeservers": ["Spam.Example"],
                "blocked_room_ids": ["!spamroom:fine.example"],
                "blocked_keywords": ["Crypto Giveaway", "http", "t.me/"],
            }
        },
        name=f"sydent_lite blocking ({backend})",
    )
    server.start()
    yield server
    server.stop()


@pytest.fixture
def blocking(blocking_server: SydentServer, api_for: Any) -> IdentityApi:
    api: IdentityApi = api_for(blocking_server)
    return api


def test_blocked_homeserver(blocking: IdentityApi, smtp: SmtpSink) -> None:
    assert_refused(blocking, smtp, invitation(unique_email(), sender="@bot:spam.example"))
    assert_refused(blocking, smtp, invitation(unique_email(), sender="@bot:SPAM.example"))
    # Exactly that server name: not its subdomains.
    assert_accepted(blocking, smtp, invitation(unique_email(), sender="@user:sub.spam.example"))


def test_blocked_room(blocking: IdentityApi, smtp: SmtpSink) -> None:
    assert_refused(blocking, smtp, {**invitation(unique_email()), "room_id": "!spamroom:fine.example"})
    assert_accepted(blocking, smtp, {**invitation(unique_email()), "room_id": "!otherroom:fine.example"})


@pytest.mark.parametrize(
    "fields",
    [
        {"room_name": "FREE crypto GIVEAWAY today"},
        {"sender_display_name": "crypto giveaway bot"},
        {"room_name": "join http://scam.example"},
        {"room_alias": "#x:fine.example", "room_name": "see t.me/scam"},
        # A web client location with the keyword past its scheme is still matched.
        {"org.matrix.web_client_location": "https://http.scam.example"},
    ],
)
def test_blocked_keywords_in_what_the_inviter_wrote(
    blocking: IdentityApi, smtp: SmtpSink, fields: dict[str, str]
) -> None:
    assert_refused(blocking, smtp, invitation(unique_email(), **fields))


def test_keywords_do_not_match_the_web_client_url_of_every_invite(blocking: IdentityApi, smtp: SmtpSink) -> None:
    # Synapse puts its email.invite_client_location into every invitation: "http" must not
    # refuse them all (sydent#540), nor "mail" the medium of every one.
    body = invitation(
        unique_email(),
        room_name="Team chat",
        sender_display_name="Alice",
        **{"org.matrix.web_client_location": "https://app.element.io"},
    )
    assert_accepted(blocking, smtp, body)


def test_keyword_mail_does_not_match_the_medium(make_server: Any, api_for: Any, smtp: SmtpSink) -> None:
    api: IdentityApi = api_for(make_server(extra_config={"invites": {"blocked_keywords": ["mail"]}}))
    assert_accepted(api, smtp, invitation("someone@fine.example", room_name="Team chat"))
    assert_refused(api, smtp, invitation(unique_email(), room_name="check your e-MAIL box"))


def test_limit_per_inviter(make_server: Any, api_for: Any, smtp: SmtpSink) -> None:
    # Only the per-sender limit is tight: the flood comes from one inviter, to fresh addresses.
    server = make_server(
        extra_config={
            "rate_limits": {
                "enabled": True,
                "store_invite_per_ip_burst": 100,
                "store_invite_per_sender_burst": 3,
                "store_invite_per_sender_per_hour": 1.0,
            }
        }
    )
    api: IdentityApi = api_for(server)
    spammer = f"@spammer{uuid.uuid4().hex[:6]}:fine.example"
    for _ in range(3):
        assert_accepted(api, smtp, invitation(unique_email(), sender=spammer))
    victim = unique_email()
    resp = post_v1(api, invitation(victim, sender=spammer))
    assert resp.status_code == 429, resp.text
    assert resp.json()["errcode"] == "M_LIMIT_EXCEEDED" and resp.json()["retry_after_ms"] > 0, resp.text
    smtp.assert_no_mail(victim)
    assert stored_invites(server, victim) == []
    # Another inviter is not held back by the first one's flood.
    assert_accepted(api, smtp, invitation(unique_email(), sender="@someone.else:fine.example"))


def test_v2_invitations_are_checked_too(make_server: Any, api_for: Any, smtp: SmtpSink) -> None:
    server = make_server(extra_config={"invites": {"blocked_keywords": ["giveaway"]}})
    api: IdentityApi = api_for(server)
    user = api.register()
    address = unique_email()
    body = invitation(address, sender=user.user_id, room_name="Giveaway!")
    resp = api.client.post(f"{V2}/store-invite", json=body, headers=user.headers)
    assert resp.status_code == 403 and resp.json() == NOT_ALLOWED, resp.text
    smtp.assert_no_mail(address)


def invite_then_bind(api: IdentityApi, smtp: SmtpSink, homeserver: HomeserverStandIn) -> tuple[str, str, str]:
    """(address, token, ephemeral public key) of an invitation delivered by onbind."""
    address = unique_email("invitee")
    resp = post_v1(api, invitation(address))
    assert resp.status_code == 200, resp.text
    token, ephemeral = resp.json()["token"], resp.json()["public_keys"][1]["public_key"]
    smtp.wait_for(address)
    invitee = api.register()
    api.bind_email(address, invitee)
    homeserver.wait_for_onbind(invitee.user_id, address=address)
    return address, token, ephemeral


def ephemeral_valid(api: IdentityApi, key: str) -> bool:
    resp = api.client.get(f"{V2}/pubkey/ephemeral/isvalid", params={"public_key": key})
    assert resp.status_code == 200, resp.text
    return bool(resp.json()["valid"])


def test_delete_tokens_on_bind_deletes_delivered_invites(
    make_server: Any, api_for: Any, smtp: SmtpSink, homeserver: HomeserverStandIn
) -> None:
    api: IdentityApi = api_for(make_server())  # the default, as Sydent's
    address, token, ephemeral = invite_then_bind(api, smtp, homeserver)
    wait_until(lambda: stored_invites(api.server, address) == [], what="the delivered invite deleted")
    # A join signed with the ephemeral key keeps verifying for servers that see it later.
    assert ephemeral_valid(api, ephemeral)
    # The token is gone, as in Sydent: nothing left to sign for.
    resp = api.client.post(f"{V1}/sign-ed25519", json={"mxid": "@x:fine.example", "token": token, "private_key": "x"})
    assert resp.status_code == 404 and resp.json()["errcode"] == "M_UNRECOGNIZED", resp.text


def test_delete_tokens_on_bind_false_keeps_them_marked_delivered(
    make_server: Any, api_for: Any, smtp: SmtpSink, homeserver: HomeserverStandIn
) -> None:
    api: IdentityApi = api_for(make_server(extra_config={"invites": {"delete_tokens_on_bind": False}}))
    address, token, ephemeral = invite_then_bind(api, smtp, homeserver)

    def delivered() -> bool:
        rows = stored_invites(api.server, address)
        return len(rows) == 1 and rows[0]["delivered_ts"] is not None

    wait_until(delivered, what="the invite marked delivered")
    assert stored_invites(api.server, address)[0]["token"] == token
    assert ephemeral_valid(api, ephemeral)
