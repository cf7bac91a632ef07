"""Unhandled errors reported to Sentry (config `sentry_dsn`; the optional extra `sentry`).

What leaves the machine is the exception, its stack (file names, lines, function names; no
local variables) and the log message that reported it, which our logs already keep free of
tokens, secrets and addresses. Never sent: request headers, bodies, query strings (an
access_token travels in one), cookies, client addresses, breadcrumbs of outbound requests
(their URLs carry OpenID tokens), local variables of stack frames. As Sydent, events are
tagged with our server name.
"""

from __future__ import annotations

import logging
from typing import Any

from sydent_lite.config import Config, ConfigError
from sydent_lite.version import package_version

logger = logging.getLogger(__name__)

# Event keys never sent (sentry-sdk fills some of them in from integrations).
_DROPPED = ("request", "user", "breadcrumbs", "extra", "contexts")


def _scrub(event: dict[str, Any], hint: dict[str, Any]) -> dict[str, Any] | None:
    for key in _DROPPED:
        event.pop(key, None)
    for exception in (event.get("exception") or {}).get("values") or ():
        for frame in (exception.get("stacktrace") or {}).get("frames") or ():
            frame.pop("vars", None)
    return event


def setup_sentry(config: Config, *, start: bool = True) -> bool:
    """Start reporting to Sentry if `sentry_dsn` is set; ConfigError if sentry-sdk is missing
    or the DSN is not one. `start` False: only check that. True when reporting."""
    if not config.sentry_dsn:
        return False
    try:
        import sentry_sdk
    except ImportError:
        raise ConfigError(
            "config key 'sentry_dsn' is set but sentry-sdk is not installed: "
            "pip install 'sydent-lite[sentry]' (or remove sentry_dsn)"
        ) from None
    try:
        from sentry_sdk.utils import Dsn

        Dsn(config.sentry_dsn)
    except Exception as e:  # BadDsn
        raise ConfigError(f"config key 'sentry_dsn' is not a usable Sentry DSN: {type(e).__name__}") from None
    if not start:
        return False
    sentry_sdk.init(
        dsn=config.sentry_dsn,
        release=package_version(),
        send_default_pii=False,
        include_local_variables=False,
        include_source_context=False,
        max_request_body_size="never",
        # Only the default integrations (logging: ERROR lines become events); the ones
        # that hook into starlette, httpx, SQLAlchemy, Redis would record requests.
        auto_enabling_integrations=False,
        max_breadcrumbs=0,
        before_send=_scrub,  # type: ignore[arg-type]
        traces_sample_rate=None,
    )
    sentry_sdk.set_tag("sydent_server_name", config.effective_server_name)
    logger.info("reporting errors to Sentry")
    return True
