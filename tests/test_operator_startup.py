"""What an operator sees first: `sydent-lite --version`, and the one start-up line that
summarises the effective configuration without a single secret.

The secrets test puts a password, token or key into every config key that takes one (SMTP,
the SMS providers, the webhook's headers, Redis, and on PostgreSQL the database URL), runs
the server at DEBUG (below the level the redaction filter acts on, so nothing is masked for
it) through start-up, a registration and a mail that fails to send, and looks for each
secret in everything the server wrote.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import make_url
from support.db import DatabaseFactory
from support.homeserver import HomeserverStandIn
from support.server import REPO_ROOT, V2, SydentServer, new_secret, unique_email
from support.smtp import SmtpSink
from test_workers import WorkersServer

from sydent_lite.config import config_from_dict
from sydent_lite.observability.summary import config_summary, database_summary

SECRETS = {
    "smtp": "smtp-pw-" + new_secret(),
    "twilio": "twilio-token-" + new_secret(),
    "openmarket": "openmarket-pw-" + new_secret(),
    "webhook": "webhook-bearer-" + new_secret(),
    "redis": "redis-pw-" + new_secret(),
    "database": "db-pw-" + new_secret(),
}


def test_version_is_the_installed_packages() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "sydent_lite", "--version"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"sydent-lite {version('sydent-lite')}"


def with_password(url: str, password: str) -> str:
    parsed = make_url(url)
    return parsed.set(username=parsed.username or "postgres", password=password).render_as_string(hide_password=False)


def secret_config(database_url: str, backend: str) -> dict[str, Any]:
    config: dict[str, Any] = {
        "email": {"smtp": {"username": "mailer", "password": SECRETS["smtp"]}},
        "sms": {
            "provider": "webhook",
            "twilio": {"account_sid": "AC123", "auth_token": SECRETS["twilio"]},
            "openmarket": {"username": "om", "password": SECRETS["openmarket"]},
            "webhook": {
                "url": "http://127.0.0.1:9/sms",
                "headers": {"Authorization": f"Bearer {SECRETS['webhook']}"},
            },
        },
        # No Redis password is configured on the test Redis: AUTH fails, requests go through.
        "rate_limits": {"enabled": True, "redis_url": f"redis://:{SECRETS['redis']}@127.0.0.1:6379/0"},
    }
    if backend == "postgres":  # trust authentication: the password is accepted and ignored
        config["database"] = {"url": with_password(database_url, SECRETS["database"])}
    return config


def test_the_start_up_line_summarises_the_config_and_no_log_holds_a_secret(
    make_server: Callable[..., SydentServer], smtp: SmtpSink, homeserver: HomeserverStandIn, backend: str
) -> None:
    server = make_server(start=False)
    server.extra_config = {**secret_config(server.database_url, backend), "log_level": "DEBUG"}
    server.start()

    lines = [line for line in server.output().splitlines() if "starting; configuration:" in line]
    assert len(lines) == 1, server.output()
    line = lines[0]
    assert " INFO sydent_lite.server " in line
    assert f"sydent-lite {version('sydent-lite')} starting" in line
    assert f"server_name={server.server_name}, public_baseurl={server.base_url}, " in line
    dialect = "sqlite" if backend == "sqlite" else "postgresql 127.0.0.1:5432/"
    assert f"database={dialect}" in line
    assert f"listen=http://127.0.0.1:{server.port}, workers=1, " in line
    assert f"email=smtp 127.0.0.1:{server.smtp_port} none with login, sms=webhook, " in line
    assert "rate_limits=on (redis), metrics=off, v1=on" in line

    # A registration through the homeserver, then a mail that cannot go out (the sink offers
    # no AUTH): the paths that use credentials and tokens and log about them.
    openid = homeserver.openid_token("secrets" + new_secret())
    resp = server.client.post(f"{V2}/account/register", json=openid)
    assert resp.status_code == 200, resp.text
    token = resp.json()["token"]
    body = {"client_secret": new_secret(), "email": unique_email("secrets"), "send_attempt": 1}
    resp = server.client.post(
        f"{V2}/validate/email/requestToken", json=body, headers={"Authorization": f"Bearer {token}"}
    )
    assert resp.status_code == 400 and resp.json()["errcode"] == "M_EMAIL_SEND_ERROR", resp.text
    server.stop()
    tokens = {"openid": openid["access_token"], "identity server token": token, "client_secret": body["client_secret"]}

    written = server.log_path.read_text(encoding="utf-8")
    assert "starting; configuration:" in written and "M_EMAIL_SEND_ERROR" not in written
    assert "not sent" in written  # the failed mail was logged: its line is among those checked
    for name, secret in {**SECRETS, **tokens}.items():
        assert secret not in written, name


def test_with_workers_the_line_is_written_once_by_the_parent(
    db_factory: DatabaseFactory, smtp_sink: SmtpSink, homeserver: HomeserverStandIn, tmp_path: Path
) -> None:
    server = WorkersServer(
        tmp_path / "workers",
        database_url=db_factory.create().url,
        smtp_port=smtp_sink.port,
        ca_file=homeserver.ca_path,
        name="sydent_lite --workers 2",
    )
    server.start()
    try:
        assert "(2 workers)" in server.output()  # every worker has started
        lines = [line for line in server.output().splitlines() if "starting; configuration:" in line]
        assert len(lines) == 1 and ", workers=2, " in lines[0], server.output()
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("sqlite:///data/sydent_lite.db", "sqlite data/sydent_lite.db"),
        ("sqlite+aiosqlite:////var/lib/sydent-lite/db.sqlite", "sqlite /var/lib/sydent-lite/db.sqlite"),
        (
            "postgresql+asyncpg://sydent:hunter2@db.example.org:5433/sydent?ssl=require",
            "postgresql db.example.org:5433/sydent",
        ),
        ("postgresql://sydent:hunter2@[2001:db8::5]/ids", "postgresql [2001:db8::5]/ids"),
        ("postgresql://sydent@/sydent?host=/run/postgresql", "postgresql /run/postgresql/sydent"),
    ],
)
def test_database_urls_are_shown_without_user_password_or_options(url: str, shown: str) -> None:
    assert database_summary(url) == shown


def test_the_summary_of_a_production_config() -> None:
    config = config_from_dict(
        {
            "server_name": "id.example.org",
            "public_baseurl": "https://id.example.org/",
            "listen": {"host": "::1", "port": 8090},
            "database": {"url": "postgresql+asyncpg://sydent:hunter2@db.internal/sydent"},
            "email": {"transport": "smtp", "smtp": {"host": "mail.internal", "port": 587, "security": "starttls"}},
            "sms": {"provider": "twilio", "twilio": {"account_sid": "AC1", "auth_token": "tw-secret"}},
            "rate_limits": {"redis_url": "rediss://:redis-secret@cache.internal:6380/1"},
            "metrics": {"enabled": True, "port": 9092},
        }
    )
    assert config_summary(config, 4) == (
        "configuration: server_name=id.example.org, public_baseurl=https://id.example.org, "
        "database=postgresql db.internal/sydent, listen=http://[::1]:8090, workers=4, "
        "email=smtp mail.internal:587 starttls, sms=twilio, rate_limits=on (redis), "
        "metrics=on 127.0.0.1:9092/metrics, v1=on, homeserver_allow_list=off, internal_api=off, sentry=off"
    )
    sydent_like = config_from_dict(
        {
            "access": {"v1_enabled": False, "homeserver_allow_list": ["a.example", "b.example"]},
            "internal_api": {"enabled": True, "host": "::1"},
            "sentry_dsn": "https://sentry-key@sentry.example/1",
        }
    )
    summary = config_summary(sydent_like, 1)
    assert "v1=off, homeserver_allow_list=2, internal_api=on [::1]:8091, sentry=on" in summary
    assert "sentry-key" not in summary
    off = config_from_dict({"rate_limits": {"enabled": False}})
    assert "email=maildir data/outbox, sms=file, rate_limits=off, metrics=off" in config_summary(off, 1)
