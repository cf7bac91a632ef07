"""Serving HTTPS directly (homeservers only call https://), and requestToken rate limits."""

from __future__ import annotations

import socket
import ssl
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import trustme
from support.db import DatabaseFactory
from support.homeserver import HomeserverStandIn
from support.inprocess import InProcessServer
from support.server import SydentServer, new_secret, unique_email
from support.smtp import SmtpSink

V2 = "/_matrix/identity/v2"
V1 = "/_matrix/identity/api/v1"


def certificate(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A certificate for 127.0.0.1 from a new CA: (chain, private key, CA certificate) files."""
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "id.test")
    cert_path, key_path, ca_path = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "ca.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_path))
    for blob in cert.cert_chain_pems[1:]:
        blob.write_to_path(str(cert_path), append=True)
    cert.private_key_pem.write_to_path(str(key_path))
    ca.cert_pem.write_to_path(str(ca_path))
    return cert_path, key_path, ca_path


def test_serves_https_when_given_a_certificate(make_server: Callable[..., SydentServer], tmp_path: Path) -> None:
    cert_path, key_path, ca_path = certificate(tmp_path)
    server = make_server(extra_config={"listen": {"tls_certificate": str(cert_path), "tls_private_key": str(key_path)}})
    assert f"listening on https://127.0.0.1:{server.port}" in server.output()
    context = ssl.create_default_context(cafile=str(ca_path))
    with httpx.Client(base_url=f"https://127.0.0.1:{server.port}", verify=context) as client:
        resp = client.get(f"{V2}")
        assert resp.status_code == 200 and resp.json() == {}
        assert client.get("/_matrix/identity/versions").json()["versions"]
    # Plain HTTP on the TLS port is not served.
    try:
        plain = httpx.get(f"http://127.0.0.1:{server.port}{V2}", timeout=5)
        assert plain.status_code >= 400
    except httpx.HTTPError:
        pass


class WorkersServer(SydentServer):
    workers = 1

    def serve_args(self) -> list[str]:
        return ["--workers", str(self.workers)] if self.workers > 1 else []


@pytest.mark.parametrize("workers", [1, 2])
def test_every_tls_handshake_completes(
    workers: int,
    db_factory: DatabaseFactory,
    smtp_sink: SmtpSink,
    homeserver: HomeserverStandIn,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    """Clients send their ClientHello at once; each handshake must complete, on one process and
    on workers. (On uvloop a third of them hung until the deadline: the hello reached the HTTP
    protocol before start_tls took over.)"""
    cert_path, key_path, ca_path = certificate(tmp_path)
    server = WorkersServer(
        tmp_path / "server",
        database_url=db_factory.create().url,
        smtp_port=smtp_sink.port,
        ca_file=homeserver.ca_path,
        name=f"sydent_lite TLS, {workers} worker(s)",
        extra_config={"listen": {"tls_certificate": str(cert_path), "tls_private_key": str(key_path)}},
    )
    server.workers = workers
    request.node.extra_sydent_servers = [server]
    server.start(timeout=60.0)
    try:
        context = ssl.create_default_context(cafile=str(ca_path))
        failures = []
        for attempt in range(40):
            with socket.create_connection(("127.0.0.1", server.port), timeout=5) as raw:
                try:
                    with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                        tls.sendall(f"GET {V2} HTTP/1.1\r\nHost: id.test\r\nConnection: close\r\n\r\n".encode())
                        assert tls.recv(64).startswith(b"HTTP/1.1 200"), attempt
                except (TimeoutError, ssl.SSLError) as e:
                    failures.append((attempt, repr(e)))
        assert failures == [], failures
    finally:
        server.stop()


def test_request_token_is_rate_limited_per_address(
    make_inprocess_server: Callable[..., InProcessServer], smtp: SmtpSink
) -> None:
    server = make_inprocess_server(
        extra_config={
            "rate_limits": {
                "enabled": True,
                "request_token_per_address_burst": 2,
                "request_token_per_address_per_hour": 1.0,
                "request_token_per_ip_burst": 100,
            }
        }
    )
    address = unique_email("limited")
    with server.new_client() as client:
        statuses = []
        for attempt in range(1, 4):
            # A new client secret each time: each request really sends a mail.
            body = {"client_secret": new_secret(), "email": address, "send_attempt": attempt}
            statuses.append(client.post(f"{V1}/validate/email/requestToken", json=body))
        assert [r.status_code for r in statuses] == [200, 200, 429], [r.text for r in statuses]
        limited = statuses[2].json()
        assert limited["errcode"] == "M_LIMIT_EXCEEDED"
        assert isinstance(limited["retry_after_ms"], int) and limited["retry_after_ms"] > 0
        # A retry of an existing session (same secret, same attempt) sends nothing and is not limited.
        first = {"client_secret": new_secret(), "email": unique_email("other"), "send_attempt": 1}
        sid = client.post(f"{V1}/validate/email/requestToken", json=first).json()["sid"]
        for _ in range(5):
            assert client.post(f"{V1}/validate/email/requestToken", json=first).json() == {"sid": sid}


def test_request_token_is_rate_limited_per_client_ip(
    make_inprocess_server: Callable[..., InProcessServer], smtp: SmtpSink
) -> None:
    server = make_inprocess_server(
        extra_config={
            "rate_limits": {"enabled": True, "request_token_per_ip_burst": 3, "request_token_per_ip_per_minute": 1.0}
        }
    )
    with server.new_client() as client:
        codes = [
            client.post(
                f"{V1}/validate/email/requestToken",
                json={"client_secret": new_secret(), "email": unique_email(f"ip{i}"), "send_attempt": 1},
            ).status_code
            for i in range(5)
        ]
    assert codes == [200, 200, 200, 429, 429]


def _request_token(client: httpx.Client, ip_header: str | None = None):  # type: ignore[no-untyped-def]
    headers = {"X-Forwarded-For": ip_header} if ip_header else {}
    body = {"client_secret": new_secret(), "email": unique_email("xff"), "send_attempt": 1}
    return client.post(f"{V1}/validate/email/requestToken", json=body, headers=headers).status_code


def test_x_forwarded_for_only_from_trusted_proxies(
    make_inprocess_server: Callable[..., InProcessServer], smtp: SmtpSink
) -> None:
    limits = {"enabled": True, "request_token_per_ip_burst": 2, "request_token_per_ip_per_minute": 1.0}
    # Not trusted: the header is ignored, so every request counts against 127.0.0.1.
    untrusted = make_inprocess_server(extra_config={"rate_limits": limits})
    with untrusted.new_client() as client:
        codes = [_request_token(client, f"198.51.100.{i}") for i in range(3)]
    assert codes == [200, 200, 429]
    # Trusted (the test talks from 127.0.0.1): each forwarded client has its own budget ...
    trusted = make_inprocess_server(
        extra_config={"rate_limits": limits, "listen": {"trusted_proxies": ["127.0.0.0/8"]}}
    )
    with trusted.new_client() as client:
        assert [_request_token(client, f"198.51.100.{i}") for i in range(3)] == [200, 200, 200]
        # ... and the right-most untrusted hop is the client, whatever the client claimed before it.
        assert [_request_token(client, "203.0.113.7, 198.51.100.50") for _ in range(3)] == [200, 200, 429]
        assert _request_token(client, "203.0.113.8, 198.51.100.50, 127.0.0.1") == 429
        assert _request_token(client, "not-an-ip") == 200  # malformed: the peer's own budget


def test_store_invite_and_lookup_limits(make_inprocess_server: Callable[..., InProcessServer], smtp: SmtpSink) -> None:
    server = make_inprocess_server(
        terms_path=None,
        extra_config={
            "rate_limits": {
                "enabled": True,
                "store_invite_per_address_burst": 2,
                "store_invite_per_address_per_hour": 1.0,
                "lookup_per_token_burst": 3,
                "lookup_per_token_per_minute": 1.0,
            }
        },
    )
    address = unique_email("invlimit")
    with server.new_client() as client:
        codes = []
        for _ in range(3):
            codes.append(
                client.post(
                    f"{V1}/store-invite",
                    json={"medium": "email", "address": address, "room_id": "!r:hs.test", "sender": "@s:hs.test"},
                )
            )
        assert [r.status_code for r in codes] == [200, 200, 429], [r.text for r in codes]
        assert codes[2].json()["errcode"] == "M_LIMIT_EXCEEDED" and codes[2].json()["retry_after_ms"] > 0
        lookups = [
            client.get(f"{V1}/lookup", params={"medium": "email", "address": address}).status_code for _ in range(4)
        ]
        assert lookups == [200, 200, 200, 429]
