"""The start-up line that says what this server runs with: what an operator checks first.

One line, `key=value` pairs, built from a fixed list of fields: nothing is copied from the
config wholesale, so a password, token or key added to the config later cannot reach it.
Database and Redis URLs are reduced to their dialect, host and database name.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

if TYPE_CHECKING:
    from sydent_lite.config import Config


def _host_port(host: str, port: int | None) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"{shown}:{port}" if port is not None else shown


def database_summary(url: str) -> str:
    """`sqlite data/x.db`, `postgresql db.example.org:5432/sydent`: no user, password or query."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        return "unparsable URL"
    dialect = parsed.get_backend_name()
    if dialect == "sqlite":
        return f"sqlite {parsed.database or '?'}"
    # A Unix socket directory comes as ?host=/run/postgresql; a path is no secret.
    socket_dir = parsed.query.get("host")
    host = parsed.host or (socket_dir if isinstance(socket_dir, str) else None) or "localhost"
    return f"{dialect} {_host_port(host, parsed.port)}/{parsed.database or ''}"


def _email(config: Config) -> str:
    email = config.email
    if email.transport == "smtp":
        smtp = email.smtp
        login = " with login" if smtp.username else ""
        return f"smtp {_host_port(smtp.host, smtp.port)} {smtp.security}{login}"
    return f"maildir {email.maildir}"


def _rate_limits(config: Config) -> str:
    limits = config.rate_limits
    if not limits.enabled:
        return "off"
    return "on (redis)" if limits.redis_url else "on (database)"


def _metrics(config: Config) -> str:
    metrics = config.metrics
    if not metrics.enabled:
        return "off"
    return f"on {_host_port(metrics.host, metrics.port)}{metrics.path}"


def _v1(config: Config) -> str:
    access = config.access
    if access.v1_enabled:
        return "on" if access.v1_associations_enabled else "on without bind"
    return "off"


def _internal_api(config: Config) -> str:
    api = config.internal_api
    return f"on {_host_port(api.host, api.port)}" if api.enabled else "off"


def config_summary(config: Config, workers: int) -> str:
    listen = config.listen
    fields = [
        ("server_name", config.effective_server_name),
        ("public_baseurl", config.base_url),
        ("database", database_summary(config.database.url)),
        ("listen", f"{'https' if listen.tls_certificate else 'http'}://{_host_port(listen.host, listen.port)}"),
        ("workers", str(workers)),
        ("email", _email(config)),
        ("sms", config.sms.provider),
        ("rate_limits", _rate_limits(config)),
        ("metrics", _metrics(config)),
        ("v1", _v1(config)),
        (
            "homeserver_allow_list",
            str(len(config.access.homeserver_allow_list)) if config.access.homeserver_allow_list else "off",
        ),
        ("internal_api", _internal_api(config)),
        # Whether, never where: the DSN holds Sentry's key.
        ("sentry", "on" if config.sentry_dsn else "off"),
    ]
    return "configuration: " + ", ".join(f"{name}={value}" for name, value in fields)
