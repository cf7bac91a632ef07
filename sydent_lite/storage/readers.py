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

from sydent_lite.storage.batching import chunks

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
        for chunk in chunks(values, SQLITE_IN_CHUNK):
            marks = "IN (" + ", ".join("?" * len(chunk)) + ")"
            out += self._conn.execute(sql.format(among=marks), (*params, *chunk)).fetchall()
        return out

    def close(self) -> None:
        self._conn.close()


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
    # A read this slow is stuck (a half-open connection): fail it, rather than hold the lookup
    # index's lock, and every lookup waiting on it, for ever.
    COMMAND_TIMEOUT_SECONDS = 10.0
    CLOSE_TIMEOUT_SECONDS = 5.0

    def __init__(self, connect_kwargs: dict[str, Any]) -> None:
        self._connect_kwargs = connect_kwargs
        # A pool belongs to the event loop that opened it (commands and tests run one loop
        # each): the loop, its pool, and the lock that opening and closing take.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pool: Any = None
        self._lock = asyncio.Lock()

    def _for_this_loop(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            if self._pool is not None:  # left open by a loop that has gone: drop it
                with contextlib.suppress(Exception):
                    self._pool.terminate()
            self._loop, self._pool, self._lock = loop, None, asyncio.Lock()

    async def _get_pool(self) -> Any:
        self._for_this_loop()
        if self._pool is None:
            async with self._lock:
                if self._pool is None:
                    import asyncpg

                    self._pool = await asyncpg.create_pool(
                        **self._connect_kwargs,
                        min_size=1,
                        max_size=self.POOL_SIZE,
                        reset=_keep_session,
                        command_timeout=self.COMMAND_TIMEOUT_SECONDS,
                    )
        return self._pool

    async def all(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        return await self._fetch(_numbered(sql), tuple(params))

    async def all_among(self, sql: str, params: Sequence[Any], values: Sequence[Any]) -> list[Row]:
        return await self._fetch(_numbered(sql), (*params, list(values)))

    async def _fetch(self, sql: str, args: tuple[Any, ...]) -> list[Row]:
        pool = await self._get_pool()
        try:
            return await self._fetch_once(pool, sql, args)
        except _connection_lost() as e:
            # The server ended the session (a restart, a terminated backend), maybe before the
            # pool noticed: that connection went; a read is safe to repeat on another.
            logger.info("database connection lost during a read (%s); retrying once", type(e).__name__)
            return await self._fetch_once(pool, sql, args)

    @staticmethod
    async def _fetch_once(pool: Any, sql: str, args: tuple[Any, ...]) -> list[Row]:
        async with pool.acquire() as conn:
            try:
                rows = await conn.fetch(sql, *args)
            except _connection_lost():
                with contextlib.suppress(Exception):  # the pool may have let it go already
                    conn.terminate()
                raise
        return [tuple(r) for r in rows]

    async def aclose(self) -> None:
        """Close the pool (a later read opens a new one)."""
        self._for_this_loop()
        async with self._lock:  # not while it is being opened
            pool, self._pool = self._pool, None
        if pool is None:
            return
        try:
            await asyncio.wait_for(pool.close(), self.CLOSE_TIMEOUT_SECONDS)
        except (TimeoutError, OSError):  # a read still in progress, or a dead server
            pool.terminate()


@lru_cache(maxsize=1)
def _connection_lost() -> tuple[type[BaseException], ...]:
    """What a read may be retried after: the session is gone, not the query at fault."""
    import asyncpg

    return (
        asyncpg.PostgresConnectionError,  # connection does not exist, failure, ...
        asyncpg.exceptions.AdminShutdownError,  # terminated by an administrator or a restart
        asyncpg.exceptions.InternalClientError,  # the server's goodbye arrived, the socket's end not yet
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
        # asyncpg.connect's arguments as SQLAlchemy's dialect derives them from the URL (host,
        # port, user, password, database, ssl and the other query options), less the ones
        # its own adapter consumes.
        _, kwargs = sync.dialect.create_connect_args(url)
        for adapter_only in ("prepared_statement_cache_size", "prepared_statement_name_func", "async_creator_fn"):
            kwargs.pop(adapter_only, None)
        reader = PgReader(dict(kwargs))
    sync.__dict__["_sydent_reader"] = reader
    return reader


async def close_pg_reader(engine: AsyncEngine) -> None:
    """Close the PostgreSQL reader's pool, as the engine's own is closed (SQLite's reader
    closes with the engine by itself)."""
    reader = engine.sync_engine.__dict__.get("_sydent_reader")
    if isinstance(reader, PgReader):
        await reader.aclose()
