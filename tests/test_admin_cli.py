"""Operator commands against a database the real server filled: keys, associations, bind."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

import yaml
from support.db import allow_inserts, refuse_inserts, sql
from support.homeserver import HomeserverStandIn
from support.inprocess import InProcessServer
from support.server import IdentityApi, SydentServer, unique_email
from support.smtp import SmtpSink

V1 = "/_matrix/identity/api/v1"


def cli(server, *args: str) -> subprocess.CompletedProcess[str]:  # type: ignore[no-untyped-def]
    return subprocess.run(
        [sys.executable, "-m", "sydent_lite", *args, "--config", str(server.config_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_generate_config_is_a_valid_config(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "sydent_lite", "generate-config", "--server-name", "id.test"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    data = yaml.safe_load(out)
    assert data["server_name"] == "id.test" and data["public_baseurl"] == "https://id.test"
    path = tmp_path / "c.yaml"
    path.write_text(out)
    from sydent_lite.config import load_config

    assert load_config(path).server_name == "id.test"


def test_keys_show_and_generate(make_inprocess_server: Callable[..., InProcessServer]) -> None:
    server = make_inprocess_server()
    with server.new_client() as client:
        public_key = client.get("/_matrix/identity/v2/pubkey/ed25519:0").json()["public_key"]
    shown = cli(server, "keys", "show")
    assert shown.returncode == 0 and shown.stdout.strip() == f"ed25519:0 {public_key}"
    refused = cli(server, "keys", "generate")
    assert refused.returncode == 2 and "refusing" in refused.stderr
    assert cli(server, "keys", "show").stdout == shown.stdout  # untouched


def test_delete_everything_about_a_person(
    make_inprocess_server: Callable[..., InProcessServer],
    api_for: Callable[[SydentServer], IdentityApi],
    homeserver: HomeserverStandIn,
    smtp: SmtpSink,
) -> None:
    # Delivered invites are kept (not Sydent's default), so the person's stored invite is there
    # to be deleted whether or not the onbind callback has been delivered yet.
    server = make_inprocess_server(terms_path=None, extra_config={"invites": {"delete_tokens_on_bind": False}})
    api: IdentityApi = api_for(server)
    user = api.register()
    first, second = unique_email("forgetme"), unique_email("forgetme2")
    # An invitation to the address before it is bound (delivered at bind, still stored).
    resp = api.client.post(
        f"{V1}/store-invite",
        json={"medium": "email", "address": first, "room_id": "!r:hs.test", "sender": "@s:hs.test"},
    )
    assert resp.status_code == 200, resp.text
    api.smtp.wait_for(first)  # the invite mail, out of the way of the validation mail
    _, assoc = api.bind_email(first, user)
    api.bind_email(second, user)
    other = api.register()
    kept = unique_email("keepme")
    api.bind_email(kept, other)
    # A pending session for one of the person's addresses.
    api.start_email_session(first, v1=True)

    shown = cli(server, "associations", "show", "--mxid", user.user_id)
    assert shown.returncode == 0, shown.stderr
    assert {a["address"] for a in json.loads(shown.stdout)} == {first, second}

    deleted = cli(server, "associations", "delete", "--mxid", user.user_id)
    assert deleted.returncode == 0, deleted.stderr
    assert "associations removed: 2" in deleted.stdout
    assert f"email {first} -> {user.user_id}" in deleted.stdout
    assert "access tokens removed: 1" in deleted.stdout
    assert "pending invites removed: 1" in deleted.stdout
    assert "validation sessions removed: 3" in deleted.stdout  # two binds and the pending one

    # Gone from every lookup; the other person's binding and token are untouched.
    assert api.v1_lookup("email", first).json() == {}
    assert api.v1_lookup("email", second).json() == {}
    assert api.lookup_email(other, first) is None
    assert api.lookup_email(other, kept) == other.user_id
    assert api.client.get("/_matrix/identity/v2/account", headers=user.headers).status_code == 401
    assert assoc["mxid"] == user.user_id


def test_delete_by_address_and_bind_by_hand(
    make_inprocess_server: Callable[..., InProcessServer], api_for: Callable[[SydentServer], IdentityApi]
) -> None:
    server = make_inprocess_server(terms_path=None)
    api: IdentityApi = api_for(server)
    address = unique_email("byhand")
    bound = cli(server, "bind", "--medium", "email", "--address", address.upper(), "--mxid", "@hand:hs.test")
    assert bound.returncode == 0, bound.stderr
    signed = json.loads(bound.stdout)
    assert signed["address"] == address and signed["mxid"] == "@hand:hs.test"
    assert api.v1_lookup("email", address).json() == signed  # the running server sees it
    bad = cli(server, "bind", "--medium", "email", "--address", address, "--mxid", "hand")
    assert bad.returncode == 2 and "not a Matrix user ID" in bad.stderr

    deleted = cli(server, "associations", "delete", "--medium", "email", "--address", address)
    assert deleted.returncode == 0 and "associations removed: 1" in deleted.stdout
    assert api.v1_lookup("email", address).json() == {}
    usage = cli(server, "associations", "delete", "--address", address)
    assert usage.returncode == 2


def test_bind_by_hand_queues_the_pending_invites(
    make_server: Callable[..., SydentServer],
    api_for: Callable[[SydentServer], IdentityApi],
    homeserver: HomeserverStandIn,
) -> None:
    """`sydent-lite bind` goes the way /bind goes: the address's pending invites are queued in
    the bind's own transaction (a failure there leaves no binding), and the running server
    delivers them."""
    server = make_server(terms_path=None)
    api: IdentityApi = api_for(server)
    address = unique_email("handinvite")
    resp = api.client.post(
        f"{V1}/store-invite",
        json={"medium": "email", "address": address, "room_id": "!r:hs.test", "sender": "@s:hs.test"},
    )
    assert resp.status_code == 200, resp.text
    token = resp.json()["token"]
    api.smtp.wait_for(address)  # the invite mail
    mxid = homeserver.user_id("byhand" + uuid.uuid4().hex[:8])

    refuse_inserts(server.database_url, "onbind_callbacks")
    try:
        failed = cli(server, "bind", "--medium", "email", "--address", address, "--mxid", mxid)
        assert failed.returncode != 0, failed.stdout
        assert api.v1_lookup("email", address).json() == {}
    finally:
        allow_inserts(server.database_url, "onbind_callbacks")

    bound = cli(server, "bind", "--medium", "email", "--address", address, "--mxid", mxid)
    assert bound.returncode == 0, bound.stderr
    assert sql(server.database_url, "SELECT callback_id FROM invites WHERE token = ?", token)[0]["callback_id"]
    server.restart()  # the running server sends it at its next look at the queue; a start looks at once
    req = homeserver.wait_for_onbind(mxid)
    assert req.json["address"] == address and [inv["token"] for inv in req.json["invites"]] == [token]
