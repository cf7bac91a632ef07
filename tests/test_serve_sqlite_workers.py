"""`serve --workers N` on SQLite: allowed (it works), but the operator is warned at start-up
that one process writes at a time and a waiting worker stops serving (use PostgreSQL)."""

from __future__ import annotations

from pathlib import Path

import pytest
from support.db import DatabaseFactory
from support.homeserver import HomeserverStandIn
from support.server import V2, SydentServer
from support.smtp import SmtpSink

from sydent_lite.server import sqlite_workers_warning

WARNING = "SQLite with --workers 2: one process writes at a time"


class TwoWorkerServer(SydentServer):
    def serve_args(self) -> list[str]:
        return ["--workers", "2"]


def test_sqlite_with_two_workers_warns_and_serves(
    smtp_sink: SmtpSink, homeserver: HomeserverStandIn, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    dbs = DatabaseFactory("sqlite", tmp_path / "db")
    server = TwoWorkerServer(
        tmp_path / "server",
        database_url=dbs.create().url,
        smtp_port=smtp_sink.port,
        ca_file=homeserver.ca_path,
        name="sydent_lite --workers 2 on SQLite",
    )
    request.node.extra_sydent_servers = [server]
    try:
        server.start(timeout=60.0)
        assert server.client.get(V2).status_code == 200
        assert WARNING in server.output(), server.output()
        assert "Use PostgreSQL for more than one process" in server.output()
    finally:
        server.stop()
        dbs.cleanup()


@pytest.mark.parametrize(
    ("url", "workers"),
    [("sqlite:///data/x.db", 1), ("postgresql://postgres@127.0.0.1/x", 2), ("postgresql://postgres@127.0.0.1/x", 1)],
)
def test_no_warning_for_one_process_or_postgresql(url: str, workers: int) -> None:
    assert sqlite_workers_warning(url, workers) is None
    assert sqlite_workers_warning("sqlite:///data/x.db", 2) is not None
