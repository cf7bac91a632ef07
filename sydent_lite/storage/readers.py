"""Hot-path reads below SQLAlchemy: small indexed queries run straight on the driver.

Every lookup checks a token and polls the association change log; each v1 lookup reads one
row. Through SQLAlchemy each of those is statement building, a pool checkout and, on
PostgreSQL, a transaction of its own: `BEGIN`, the query, `ROLLBACK` (three statements,
three round trips, for one read). The readers here run the query and nothing else:

- `SqliteReader`: a plain `sqlite3` connection on the event loop's thread (aiosqlite would
  hand every call to a thread and back, costlier than the query itself).
- `PgReader`: an asyncpg pool of its own, autocommit (no transaction around a single read),
  prepared statements cached per connection by asyncpg, no reset on release (these reads
  leave no session state behind).

Both take SQL with `?` placeholders and, for lists, an `{among}` marker after the column:
`SELECT ... WHERE lookup_hash {among}` becomes `IN (?, ?, ...)` in chunks on SQLite and
`= ANY($n)` with one array parameter on PostgreSQL (one prepared statement for any length).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import sqlite3
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine

logger = logging.getLogger(__name__)

Row = tuple[Any, ...]

# Keeps each IN (...) list well under SQLite's bound-parameter limit.
SQLITE_IN_CHUNK = 500


class HotReader:
    """Autocommit reads: every query sees the latest commit."""

    async def all(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        raise NotImplementedError

    async def first(self, sql: str, params: Sequence[Any] = ()) -> Row | None:
        rows = await self.all(sql, params)
        return rows[0] if rows else None

    async def all_among(self, sql: str, params: Sequence[Any], values: Sequence[Any]) -> list[Row]:
        """Rows of `sql`, whose `{among}` (after a column) matches any of `values`; `params`
        fill the `?` before the marker."""
        raise NotImplementedError

    async def aclose(self) -> None:
        pass


class SqliteReader(HotReader):
    def __init__(self, path: str) -> None:
        self._conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._conn.execute("PRAGMA busy_timeout=5000")
        self._conn.execute("PRAGMA query_only=1")

    async def all(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        return self._conn.execute(sql, tuple(params)).fetchall()

    async def first(self, sql: str, params: Sequence[Any] = ()) -> Row | None:
        return self._conn.execute(sql, tuple(params)).fetchone()

    async def all_among(self, sql: str, params: Sequence[Any], values: Sequence[Any]) -> list[Row]:
        out: list[Row] = []
        for i in range(0, len(values), SQLITE_IN_CHUNK):
            chunk = values[i : i + SQLITE_IN_CHUNK]
            marks = "IN (" + ", ".join("?" * len(chunk)) + ")"
            out += self._conn.execute(sql.format(among=marks), (*params, *chunk)).fetchall()
        return out

    def close(self) -> None:
        self._conn.close()

    async def aclose(self) -> None:
        self.close()


@lru_cache(maxsize=256)
def _numbered(sql: str) -> str:
    """`?` placeholders (and `{among}`) as asyncpg's `$1`, `$2`, ... (our SQL has no `?` in
    literals)."""
    counter = iter(range(1, 1000))
    return re.sub(r"\?", lambda _: f"${next(counter)}", sql.replace("{among}", "= ANY(?)"))


class PgReader(HotReader):
    """An asyncpg pool of its own (opened on first use), beside SQLAlchemy's."""

    # Reads are single indexed queries of well under a millisecond: a few connections
    # serve a worker's whole concurrency.
    POOL_SIZE = 8

    def __init__(self, dsn: str) -> None:
        self._dsn = dsn
        self._pool: Any = None
        # One pool opening at a time; a lock per event loop (commands run one loop each).
        self._opening: tuple[asyncio.AbstractEventLoop, asyncio.Lock] | None = None

    async def _get_pool(self) -> Any:
        if self._pool is None:
            loop = asyncio.get_running_loop()
            if self._opening is None or self._opening[0] is not loop:
                self._opening = (loop, asyncio.Lock())
            async with self._opening[1]:
                if self._pool is None:
                    import asyncpg

                    self._pool = await asyncpg.create_pool(
                        self._dsn, min_size=1, max_size=self.POOL_SIZE, reset=_keep_session
                    )
        return self._pool

    async def all(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        return await self._fetch(_numbered(sql), tuple(params))

    async def all_among(self, sql: str, params: Sequence[Any], values: Sequence[Any]) -> list[Row]:
        return await self._fetch(_numbered(sql), (*params, list(values)))

    async def _fetch(self, sql: str, args: tuple[Any, ...]) -> list[Row]:
        pool = await self._get_pool()
        for attempt in (1, 2):
            async with pool.acquire() as conn:
                try:
                    rows = await conn.fetch(sql, *args)
                except _connection_lost() as e:
                    # The server ended the session (a restart, a terminated backend), maybe
                    # before the pool noticed. The connection goes; a read is safe to repeat.
                    with contextlib.suppress(Exception):  # the pool may have let it go already
                        conn.terminate()
                    if attempt == 2:
                        raise
                    logger.info("database connection lost during a read (%s); retrying once", type(e).__name__)
                    continue
            return [tuple(r) for r in rows]
        raise AssertionError("unreachable")

    async def aclose(self) -> None:
        """Close the pool (a later read opens a new one)."""
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()


@lru_cache(maxsize=1)
def _connection_lost() -> tuple[type[BaseException], ...]:
    import asyncpg

    # InternalClientError: the server's goodbye arrived, the socket's end not yet.
    return (
        asyncpg.PostgresConnectionError,
        asyncpg.exceptions.AdminShutdownError,
        asyncpg.exceptions.InternalClientError,
        asyncpg.InterfaceError,
        ConnectionError,
    )


async def _keep_session(_connection: Any) -> None:
    """Pool release without asyncpg's reset (`RESET ALL`, `UNLISTEN *`, ...: a statement per
    release); these reads change nothing in the session."""


def hot_reader(engine: AsyncEngine) -> HotReader | None:
    """The engine's reader (one per engine); None for in-memory SQLite (a second connection
    would see another database)."""
    sync = engine.sync_engine
    reader: HotReader | None = sync.__dict__.get("_sydent_reader")
    if reader is not None:
        return reader
    url = sync.url
    if sync.dialect.name == "sqlite":
        if not url.database or url.database == ":memory:":
            return None
        sqlite_reader = SqliteReader(url.database)
        event.listen(sync, "engine_disposed", lambda _engine: sqlite_reader.close())
        reader = sqlite_reader
    else:
        reader = PgReader(url.set(drivername="postgresql").render_as_string(hide_password=False))
    sync.__dict__["_sydent_reader"] = reader
    return reader


async def close_pg_reader(engine: AsyncEngine) -> None:
    """Close the PostgreSQL reader's pool, as the engine's own is closed (SQLite's reader
    closes with the engine by itself)."""
    reader = engine.sync_engine.__dict__.get("_sydent_reader")
    if isinstance(reader, PgReader):
        await reader.aclose()
