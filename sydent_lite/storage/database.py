"""Engine creation and schema migrations."""

from __future__ import annotations

import logging
from pathlib import Path

from alembic import command
from alembic.config import Config as AlembicConfig
from sqlalchemy import event, text
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from sydent_lite.resources import migrations_dir

logger = logging.getLogger(__name__)


def async_database_url(url: str) -> str:
    """Map the operator-facing URL onto the async driver (sqlite -> aiosqlite, postgresql -> asyncpg)."""
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        parsed = parsed.set(drivername="sqlite+aiosqlite")
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    elif backend == "postgresql":
        parsed = parsed.set(drivername="postgresql+asyncpg")
    else:
        raise ValueError(f"unsupported database backend {backend!r}")
    return parsed.render_as_string(hide_password=False)


def create_engine(url: str) -> AsyncEngine:
    async_url = async_database_url(url)
    if async_url.startswith("sqlite"):
        # A pool big enough for the usual concurrency: a connection beyond pool_size is opened
        # and closed per use, and an aiosqlite connection is a thread plus a file open.
        engine = create_async_engine(async_url, connect_args={"timeout": 30}, pool_size=20, max_overflow=40)

        @event.listens_for(engine.sync_engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record) -> None:  # type: ignore[no-untyped-def]
            # WAL lets readers go on while a writer commits; foreign keys are off by default.
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        return engine
    return create_async_engine(async_url, pool_size=20, max_overflow=20, pool_pre_ping=True)


def _alembic_config(connection: Connection) -> AlembicConfig:
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(migrations_dir()))
    cfg.attributes["connection"] = connection
    return cfg


def _upgrade(connection: Connection) -> None:
    command.upgrade(_alembic_config(connection), "head")


# pg_advisory_xact_lock key serialising migrations ("sydentlt" as a big-endian bigint).
MIGRATION_LOCK_KEY = int.from_bytes(b"sydentlt", "big") - 2**63


async def migrate(engine: AsyncEngine) -> None:
    """Bring the schema up to date (idempotent, safe to run from many processes at once).

    On PostgreSQL the upgrade runs in one transaction holding an advisory lock: processes
    starting together take turns, and the ones after the first find the schema up to date.
    (Released at commit, or when the connection drops.) SQLite lets one writer in at a time.
    """
    async with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            await conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
        await conn.run_sync(_upgrade)
