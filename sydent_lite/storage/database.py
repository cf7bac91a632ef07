"""The database object (engine, hot reader, write turns) and schema migrations."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Table, event, exc, text
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from sydent_lite.resources import migrations_dir
from sydent_lite.storage.inline_sqlite import check_aiosqlite_internals, inline_creator
from sydent_lite.storage.readers import HotReader, PgReader, Row, SqliteReader, sqlite_pragmas

if TYPE_CHECKING:
    from alembic.config import Config as AlembicConfig

logger = logging.getLogger(__name__)


def async_database_url(url: str) -> str:
    """Map the operator-facing URL onto the async driver (sqlite -> aiosqlite, postgresql -> asyncpg)."""
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        path = parsed.database
        if not path or path == ":memory:":
            # Every connection would see a database of its own (and the hot reader another).
            raise ValueError("database.url: an in-memory SQLite database is not supported; name a file")
        parsed = parsed.set(drivername="sqlite+aiosqlite")
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    elif backend == "postgresql":
        parsed = parsed.set(drivername="postgresql+asyncpg")
    else:
        raise ValueError(f"unsupported database backend {backend!r}")
    return parsed.render_as_string(hide_password=False)


class Database:
    """The database: SQLAlchemy's engine, the hot reader beside it, and how writes begin.

    - `connect()` / `begin()`: SQLAlchemy connections, a transaction for `begin()`.
    - `reader`: the few reads every request makes, straight on the driver (storage.readers).
    - SQLite: this process's write transactions take turns on an asyncio lock (one per event
      loop). SQLite lets one writer in at a time; a second connection that tries is put to
      sleep by the busy handler in growing steps (up to 100 ms each), which under concurrent
      writes turned a 10 ms requestToken into seconds. Waiting on an asyncio lock instead
      costs nothing. (Other processes still meet at SQLite's own lock: busy_timeout.) Reads
      are not serialised.
    - `dispose()` closes the reader and the engine's pool.
    """

    def __init__(self, engine: AsyncEngine, reader: HotReader) -> None:
        self._engine = engine
        self.reader = reader
        self.dialect: str = engine.dialect.name
        self._write_locks: dict[asyncio.AbstractEventLoop, asyncio.Lock] = {}
        self._begin = self._begin_in_turn if self.dialect == "sqlite" else engine.begin

    def connect(self) -> AsyncConnection:
        return self._engine.connect()

    def begin(self) -> AbstractAsyncContextManager[AsyncConnection]:
        """A transaction, committed when the block ends (rolled back if it raises)."""
        return self._begin()

    async def write(self, sql: str, args: Sequence[Any] = ()) -> list[Row]:
        """One statement, committed on its own, below SQLAlchemy (storage.readers: `write`); the
        rows it returns. `sql` is in the reader's dialect (reader.param, insert_sql)."""
        if self.dialect != "sqlite":
            return await self.reader.write(sql, args)
        async with self._write_lock():
            return await self.reader.write(sql, args)

    def insert_sql(self, table: Table, columns: Sequence[str], suffix: str = "") -> str:
        """INSERT INTO table (columns) VALUES (a parameter each), then `suffix`, for `write`."""
        names = ", ".join(f'"{c}"' for c in columns)
        marks = ", ".join(self.reader.param(n) for n in range(1, len(columns) + 1))
        return f"INSERT INTO {table.name} ({names}) VALUES ({marks}){suffix}"

    def _write_lock(self) -> asyncio.Lock:
        loop = asyncio.get_running_loop()
        lock = self._write_locks.get(loop)
        if lock is None:
            lock = self._write_locks[loop] = asyncio.Lock()
        return lock

    @asynccontextmanager
    async def _begin_in_turn(self) -> AsyncIterator[AsyncConnection]:
        async with self._write_lock(), self._engine.begin() as conn:
            yield conn

    async def dispose(self) -> None:
        try:
            await self.reader.aclose()
        finally:
            await self._engine.dispose()


# How long a write waits for another process's write to finish (it blocks this process's loop
# meanwhile: keep it short; several processes belong on PostgreSQL).
SQLITE_BUSY_TIMEOUT_MS = 5000


def check_driver(url: str) -> None:
    """Raise AiosqliteChanged if `url` is SQLite's and the installed aiosqlite cannot run inline
    (open_database checks it too; this lets start-up fail before anything else happens)."""
    if async_database_url(url).startswith("sqlite"):
        check_aiosqlite_internals()


def open_database(url: str) -> Database:
    """The database at `url` (sqlite:///path or postgresql://...); connections open on first use."""
    async_url = async_database_url(url)
    if async_url.startswith("sqlite"):
        path = make_url(async_url).database
        assert path is not None  # async_database_url refuses URLs without one
        # Inline (see storage.inline_sqlite); a connection beyond pool_size is opened and
        # closed per use, so the pool covers the usual concurrency.
        creator = inline_creator(path, SQLITE_BUSY_TIMEOUT_MS / 1000)
        engine = create_async_engine(async_url, async_creator=creator, pool_size=20, max_overflow=40)

        @event.listens_for(engine.sync_engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            # WAL lets readers go on while a writer commits; foreign keys are off by default.
            cur = dbapi_conn.cursor()
            for pragma in sqlite_pragmas(SQLITE_BUSY_TIMEOUT_MS):
                cur.execute(pragma)
            cur.close()

        return Database(engine, SqliteReader(path, SQLITE_BUSY_TIMEOUT_MS))
    engine = create_async_engine(async_url, pool_size=20, max_overflow=20)
    _ping_when_idle(engine)
    return Database(engine, PgReader(_asyncpg_connect_args(engine)))


def _asyncpg_connect_args(engine: AsyncEngine) -> dict[str, Any]:
    """asyncpg.connect's arguments as SQLAlchemy's dialect derives them from the URL (host,
    port, user, password, database, ssl and the other query options), less the ones its own
    adapter consumes."""
    sync = engine.sync_engine
    _, kwargs = sync.dialect.create_connect_args(sync.url)
    for adapter_only in ("prepared_statement_cache_size", "prepared_statement_name_func", "async_creator_fn"):
        kwargs.pop(adapter_only, None)
    return dict(kwargs)


# A pooled connection unused this long is pinged before it is handed out again.
PING_AFTER_IDLE_SECONDS = 5.0


def _ping_when_idle(engine: AsyncEngine) -> None:
    """pool_pre_ping, for connections that sat idle only.

    pool_pre_ping pings on every checkout: under load that was a third of a lookup's round
    trips to PostgreSQL (token, change log, candidates: three checkouts, three pings), and
    the database's CPU is the one the workers share. A connection in steady use has just
    proven itself; one that sat idle (the database may have restarted meanwhile) is pinged,
    and replaced if the ping fails, as pool_pre_ping would.
    """
    sync = engine.sync_engine

    @event.listens_for(sync, "checkout")
    def _ping_if_idle(dbapi_conn: Any, record: Any, _proxy: Any) -> None:
        idle_since = record.info.get("sydent_idle_since")
        if idle_since is not None and time.monotonic() - idle_since < PING_AFTER_IDLE_SECONDS:
            return
        try:
            sync.dialect.do_ping(dbapi_conn)
        except Exception as e:
            raise exc.DisconnectionError() from e  # the pool retries with a new connection

    @event.listens_for(sync, "checkin")
    def _mark_idle(_dbapi_conn: Any, record: Any) -> None:
        if record is not None:
            record.info["sydent_idle_since"] = time.monotonic()


def _alembic_config(connection: Connection) -> AlembicConfig:
    from alembic.config import Config as AlembicConfig

    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(migrations_dir()))
    cfg.attributes["connection"] = connection
    return cfg


def _upgrade(connection: Connection) -> None:
    from alembic import command

    command.upgrade(_alembic_config(connection), "head")


_REVISION = re.compile(r"^(down_)?revision\s*=\s*['\"]?([^'\"\s]*)['\"]?\s*$", re.M)


@lru_cache(maxsize=1)
def head_revision() -> str:
    """The newest migration's revision id, read from the migration files (no Alembic import)."""
    revisions, parents = set(), set()
    for path in (migrations_dir() / "versions").glob("*.py"):
        found = {bool(m.group(1)): m.group(2) for m in _REVISION.finditer(path.read_text(encoding="utf-8"))}
        if False in found:
            revisions.add(found[False])
        if found.get(True) not in (None, "None"):
            parents.add(found[True])
    heads = revisions - parents
    if len(heads) != 1:
        raise RuntimeError(f"migrations must have exactly one head, found {sorted(heads)}")
    return heads.pop()


async def _schema_is_current(database: Database) -> bool:
    try:
        async with database.connect() as conn:
            current = (await conn.execute(text("SELECT version_num FROM alembic_version"))).scalar()
    except Exception:  # no alembic_version table yet: a new database
        return False
    return current == head_revision()


# pg_advisory_xact_lock key serialising migrations ("sydentlt" as a big-endian bigint).
MIGRATION_LOCK_KEY = int.from_bytes(b"sydentlt", "big") - 2**63


async def migrate(database: Database) -> None:
    """Bring the schema up to date (idempotent, safe to run from many processes at once).

    On PostgreSQL the upgrade runs in one transaction holding an advisory lock: processes
    starting together take turns, and the ones after the first find the schema up to date.
    (Released at commit, or when the connection drops.) SQLite lets one writer in at a time.
    """
    # Alembic (about 10 MiB once imported) is only loaded when there is something to do.
    if await _schema_is_current(database):
        return
    async with database.begin() as conn:
        if database.dialect == "postgresql":
            await conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
        await conn.run_sync(_upgrade)


async def analyze_if_never_analyzed(database: Database) -> None:
    """PostgreSQL: ANALYZE the associations table if it has no column statistics.

    Lookups read their candidates with `lookup_hash = ANY($1)`. With no statistics at all
    (a table filled by a bulk load with autovacuum off) the planner guessed that 150 hashes
    matched three rows in four and scanned all 1,000,000: 5 lookups a second. Autovacuum
    keeps statistics current after that; this only covers the never-analyzed start.
    """
    if database.dialect != "postgresql":
        return
    async with database.connect() as conn:
        has_stats = (
            await conn.execute(
                text(
                    "SELECT EXISTS (SELECT 1 FROM pg_stats WHERE schemaname = current_schema()"
                    " AND tablename = 'associations' AND attname = 'lookup_hash')"
                )
            )
        ).scalar()
    if not has_stats:
        logger.info("associations table has no planner statistics yet: analyzing it")
        async with database.begin() as conn:
            await conn.execute(text("ANALYZE associations"))


async def migrate_database(url: str) -> None:
    """`migrate` on a throwaway connection: for commands and the worker supervisor."""
    database = open_database(url)
    try:
        await migrate(database)
    finally:
        await database.dispose()
