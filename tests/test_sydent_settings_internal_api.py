"""Sydent's internal API (`internal_api.*`): /_matrix/identity/internal/bind and /unbind on a
loopback listener of their own, off by default, over real sockets on SQLite and PostgreSQL.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import signedjson.key
import signedjson.sign
from support.db import DatabaseFactory
from support.homeserver import HomeserverStandIn
from support.server import REPO_ROOT, V1, V2, IdentityApi, SydentServer, unique_email
from support.smtp import SmtpSink, free_port
from unpaddedbase64 import decode_base64

from sydent_lite.config import ConfigError, config_from_dict

INTERNAL = "/_matrix/identity/internal"


@pytest.fixture(scope="module")
def internal_api_server(
    db_factory: DatabaseFactory,
    smtp_sink: SmtpSink,
    homeserver: HomeserverStandIn,
    tmp_path_factory: pytest.TempPathFactory,
    backend: str,
) -> Iterator[tuple[SydentServer, int]]:
    """One server with the internal API on, for this module's tests of it (each binds its own
    addresses; a bad request stores nothing): a server a test was a start-up each."""
    port = free_port()
    server = SydentServer(
        tmp_path_factory.mktemp(f"internal-api-{backend}"),
        database_url=db_factory.create(migrated=True).url,
        smtp_port=smtp_sink.port,
        ca_file=homeserver.ca_path,
        extra_config={"internal_api": {"enabled": True, "port": port}},
        name=f"sydent_lite internal api ({backend})",
    )
    server.start()
    yield server, port
    server.stop()


@pytest.fixture
def internal_server(internal_api_server: tuple[SydentServer, int]) -> tuple[SydentServer, httpx.Client]:
    """The module's server and a fresh client of its internal listener."""
    server, port = internal_api_server
    return server, httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10)


def verify(server: SydentServer, client: httpx.Client, signed: dict[str, Any]) -> None:
    key = client.get(f"{V2}/pubkey/ed25519:0").json()["public_key"]
    verify_key = signedjson.key.decode_verify_key_bytes("ed25519:0", decode_base64(key))
    signedjson.sign.verify_signed_json(signed, server.server_name, verify_key)  # raises if invalid


def test_bind_and_unbind(internal_server: tuple[SydentServer, httpx.Client], api_for: Any) -> None:
    server, internal = internal_server
    api: IdentityApi = api_for(server)
    user = api.register()
    address = unique_email()
    with internal:
        # An address as typed: stored case-folded, as /3pid/bind stores it.
        resp = internal.post(
            f"{INTERNAL}/bind", json={"medium": "email", "address": address.upper(), "mxid": user.user_id}
        )
        assert resp.status_code == 200, resp.text
        signed = resp.json()
        assert (signed["medium"], signed["address"], signed["mxid"]) == ("email", address, user.user_id)
        verify(server, api.client, signed)
        assert api.lookup_email(user, address) == user.user_id
        assert api.v1_lookup("email", address).json()["mxid"] == user.user_id

        resp = internal.post(f"{INTERNAL}/unbind", json={"medium": "email", "address": address, "mxid": user.user_id})
        assert resp.status_code == 200 and resp.json() == {}, resp.text
        assert api.lookup_email(user, address) is None
        # As Sydent: {} for a binding that is not there.
        resp = internal.post(f"{INTERNAL}/unbind", json={"medium": "email", "address": address, "mxid": user.user_id})
        assert resp.status_code == 200 and resp.json() == {}, resp.text


def test_a_bind_delivers_the_addresses_invites(
    internal_server: tuple[SydentServer, httpx.Client], api_for: Any, smtp: SmtpSink, homeserver: HomeserverStandIn
) -> None:
    server, internal = internal_server
    api: IdentityApi = api_for(server)
    address = unique_email("invitee")
    invite = {"medium": "email", "address": address, "room_id": "!r:hs.example", "sender": "@a:hs.example"}
    resp = api.client.post(f"{V1}/store-invite", json=invite)
    assert resp.status_code == 200, resp.text
    token = resp.json()["token"]
    smtp.wait_for(address)
    mxid = homeserver.user_id("invitee" + uuid.uuid4().hex[:8])
    with internal:
        resp = internal.post(f"{INTERNAL}/bind", json={"medium": "email", "address": address, "mxid": mxid})
        assert resp.status_code == 200, resp.text
    # Queued as /3pid/bind queues it: the homeserver hears of the invitation.
    body = homeserver.wait_for_onbind(mxid, address=address).json
    assert [(inv["token"], inv["room_id"]) for inv in body["invites"]] == [(token, "!r:hs.example")]


@pytest.mark.parametrize(
    ("body", "status", "errcode"),
    [
        ({"medium": "email", "address": "a@b.example"}, 400, "M_MISSING_PARAMS"),
        ({"medium": "email", "address": "not an address", "mxid": "@a:b.example"}, 400, "M_INVALID_EMAIL"),
        ({"medium": "email", "address": "a@b.example", "mxid": "nobody"}, 400, "M_INVALID_PARAM"),
        ({"medium": "carrier-pigeon", "address": "a@b.example", "mxid": "@a:b.example"}, 400, "M_UNRECOGNIZED"),
    ],
)
def test_bad_requests(
    internal_server: tuple[SydentServer, httpx.Client], body: dict[str, str], status: int, errcode: str
) -> None:
    _, internal = internal_server
    with internal:
        resp = internal.post(f"{INTERNAL}/bind", json=body)
    assert resp.status_code == status and resp.json()["errcode"] == errcode, resp.text


def test_not_on_the_public_port(internal_server: tuple[SydentServer, httpx.Client], api_for: Any) -> None:
    server, internal = internal_server
    api: IdentityApi = api_for(server)
    resp = api.client.post(f"{INTERNAL}/bind", json={"medium": "email", "address": "a@b.example", "mxid": "@a:b.c"})
    assert resp.status_code == 404 and resp.json()["errcode"] == "M_UNRECOGNIZED", resp.text
    internal.close()


def test_off_by_default(make_server: Any) -> None:
    assert config_from_dict({}).internal_api.enabled is False
    port = free_port()
    server: SydentServer = make_server(extra_config={"internal_api": {"port": port}})
    assert server.running
    # Nothing listens on its port unless internal_api.enabled.
    with socket.socket() as s:
        s.settimeout(2)
        assert s.connect_ex(("127.0.0.1", port)) != 0


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.1", "id.example.org"])
def test_only_on_a_loopback_address(host: str) -> None:
    with pytest.raises(ConfigError) as e:
        config_from_dict({"internal_api": {"enabled": True, "host": host}})
    assert "config key 'internal_api.host' must be a loopback address" in str(e.value)


def test_serve_refuses_a_public_host(tmp_path: Any) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("internal_api: {enabled: true, host: 0.0.0.0}\n", encoding="utf-8")
    proc = subprocess.run(
        [sys.executable, "-m", "sydent_lite", "serve", "--config", str(config)],
        cwd=tmp_path,
        env={"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    assert "internal_api.host' must be a loopback address" in proc.stderr
