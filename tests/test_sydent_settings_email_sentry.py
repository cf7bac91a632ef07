"""`email.hostname` (Sydent's: our name in EHLO) and `sentry_dsn` (Sydent's, with sentry-sdk as
the optional extra `sentry`), over real sockets.
"""

from __future__ import annotations

import gzip
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from support.db import allow_inserts, refuse_inserts
from support.homeserver import HomeserverStandIn
from support.server import REPO_ROOT, V2, IdentityApi, SydentServer, unique_email, wait_until
from support.smtp import SmtpSink


def test_email_hostname_is_the_ehlo_name(make_server: Any, api_for: Any, smtp: SmtpSink) -> None:
    api: IdentityApi = api_for(make_server(extra_config={"email": {"hostname": "mail.id.test"}}))
    address = unique_email()
    api.start_email_session(address, v1=True)
    assert api.smtp.all_to(address)[-1].ehlo_name == "mail.id.test"


def test_without_email_hostname_the_server_name_is(make_server: Any, api_for: Any, smtp: SmtpSink) -> None:
    api: IdentityApi = api_for(make_server())
    address = unique_email()
    api.start_email_session(address, v1=True)
    # server_name is 127.0.0.1:<port>: an address literal in EHLO (RFC 5321 4.1.3).
    assert api.smtp.all_to(address)[-1].ehlo_name == "[127.0.0.1]"


# --- Sentry -------------------------------------------------------------------------------------


class SentryStandIn:
    """Sentry's ingest endpoint: records every envelope POSTed to it, decompressed."""

    def __init__(self) -> None:
        self.envelopes: list[bytes] = []
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                encoding = self.headers.get("content-encoding", "")
                assert encoding in ("", "gzip"), encoding
                sink.envelopes.append(gzip.decompress(body) if encoding == "gzip" else body)
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def dsn(self) -> str:
        return f"http://0123456789abcdef@127.0.0.1:{self.port}/42"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def sentry() -> Iterator[SentryStandIn]:
    pytest.importorskip("sentry_sdk")  # the `sentry` extra (in the test extra too)
    stand_in = SentryStandIn()
    yield stand_in
    stand_in.close()


def test_unhandled_errors_reach_sentry_without_secrets(
    make_server: Any, api_for: Any, homeserver: HomeserverStandIn, sentry: SentryStandIn
) -> None:
    server: SydentServer = make_server(extra_config={"sentry_dsn": sentry.dsn})
    api: IdentityApi = api_for(server)
    openid = homeserver.openid_token("u" + uuid.uuid4().hex[:12])
    secret_header = "hdr-" + uuid.uuid4().hex
    query_token = "qs-" + uuid.uuid4().hex
    refuse_inserts(server.database_url, "accounts")  # a failing disk, say: a 500
    try:
        resp = api.client.post(
            f"{V2}/account/register?access_token={query_token}",
            json=openid,
            headers={"Authorization": f"Bearer {secret_header}", "X-Custom": secret_header},
        )
    finally:
        allow_inserts(server.database_url, "accounts")
    assert resp.status_code == 500 and resp.json()["errcode"] == "M_UNKNOWN", resp.text
    wait_until(lambda: any(b'"exception"' in e for e in sentry.envelopes), timeout=15, what="an event in Sentry")
    event = b"\n".join(sentry.envelopes)
    assert b"refused by the test" in event  # the error itself
    assert b"sydent_server_name" in event and server.server_name.encode() in event  # tagged, as Sydent
    # Nothing of the request: no token of any kind, no header, no body, no query string.
    for secret in (openid["access_token"], secret_header, query_token):
        assert secret.encode() not in event, secret
    assert b'"request"' not in event and b'"vars"' not in event


def test_sentry_dsn_without_sentry_sdk_is_a_config_error(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(
        f"sentry_dsn: http://abc@127.0.0.1:9/1\ndatabase: {{url: 'sqlite:///{tmp_path}/db.sqlite'}}\n"
        f"signing_key_path: {tmp_path}/signing.key\n",
        encoding="utf-8",
    )
    # sentry-sdk made unimportable, as on an install without the extra.
    code = (
        "import sys; sys.modules['sentry_sdk'] = None\n"
        "from sydent_lite.cli import main\n"
        f"sys.exit(main(['serve', '--config', {str(config)!r}]))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env={"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "config key 'sentry_dsn' is set but sentry-sdk is not installed: pip install 'sydent-lite[sentry]'" in (
        proc.stderr
    )
    assert "listening on" not in proc.stdout
