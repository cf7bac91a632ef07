"""The load balancer's health check: 200 while the database answers, 503 when it does not."""

from __future__ import annotations

from pathlib import Path

import httpx
from support.db import DatabaseFactory
from support.homeserver import HomeserverStandIn
from support.server import SydentServer
from support.smtp import SmtpSink


def test_health_ok(client: httpx.Client) -> None:
    resp = client.get("/_sydent_lite/health")
    assert resp.status_code == 200 and resp.json() == {"status": "ok"}


def test_health_reports_a_lost_database(tmp_path: Path, smtp_sink: SmtpSink, homeserver: HomeserverStandIn) -> None:
    # PostgreSQL, because a database can vanish under a running server there.
    factory = DatabaseFactory("postgres", tmp_path / "db")
    database = factory.create()
    server = SydentServer(
        tmp_path / "server",
        database_url=database.url,
        smtp_port=smtp_sink.port,
        ca_file=homeserver.ca_path,
        name="sydent_lite (health)",
    )
    server.start()
    try:
        assert server.client.get("/_sydent_lite/health").status_code == 200
        database.drop()  # terminates the server's connections too
        resp = server.client.get("/_sydent_lite/health")
        assert resp.status_code == 503
        assert resp.json()["status"] == "unavailable" and resp.json()["errcode"] == "M_UNKNOWN"
    finally:
        server.stop()
        factory.cleanup()
