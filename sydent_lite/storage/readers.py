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

Each reader spells its driver's SQL: `param(n)` is the n-th parameter (`?` or `$n`), and
`in_list(column, values, n)` gives `(clause, args)` pairs matching any of `values`, as
Synapse's `make_in_list_sql_clause` does: `column IN (?, ?, ...)` in chunks under SQLite's
parameter limit (run one statement per pair), `column = ANY($n)` with one array parameter on
PostgreSQL (one pair: one prepared statement for any length). A query is written once, with
its parameters numbered in the order they appear; SQLite ignores the numbers.

`write` runs one statement that commits on its own (an INSERT of a new session, invitation
or rate-limit bucket): through SQLAlchemy such a write was a transaction of its own around
it (a pool checkout, BEGIN, the statement, COMMIT, a task for the close), about as much CPU
as SQLite took to run it. On SQLite it goes through a second connection of this reader's
(the first is read-only), in the process's turn for writes (storage.database); on PostgreSQL
through the same pool, autocommit. A write is never retried: it may have been applied.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from abc import ABC, abstractmethod
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

from sydent_lite.storage.batching import chunks

logger = logging.getLogger(__name__)

Row = tuple[Any, ...]

# Keeps each IN (...) list well under SQLite's bound-parameter limit.
SQLITE_IN_CHUNK = 500


class HotReader(ABC):
    """Autocommit reads: every query sees the latest commit."""

    @abstractmethod
    def param(self, n: int) -> str:
        """The placeholder of the n-th parameter (from 1) of a statement."""

    @abstractmethod
    def in_list(self, column: str, values: Sequence[Any], n: int) -> list[tuple[str, list[Any]]]:
        """`(clause, args)` pairs, together matching the rows whose `column` is any of `values`:
        run the statement once per pair. The clause takes the parameters from number `n` on
        (on PostgreSQL: exactly one)."""

    @abstractmethod
    async def all(self, sql: str, args: Sequence[Any] = ()) -> list[Row]: ...

    async def first(self, sql: str, args: Sequence[Any] = ()) -> Row | None:
        rows = await self.all(sql, args)
        return rows[0] if rows else None

    @abstractmethod
    async def write(self, sql: str, args: Sequence[Any] = ()) -> list[Row]:
        """Run one statement that commits on its own; the rows it returns (RETURNING). Call
        through Database.write, which takes the process's turn for writes on SQLite."""

    @abstractmethod
    async def aclose(self) -> None: ...


def sqlite_pragmas(busy_timeout_ms: int) -> list[str]:
    """What every connection that writes to the database sets (SQLAlchemy's and the writer):
    WAL lets readers go on while a writer commits; NORMAL syncs at checkpoints, not commits."""
    return ["PRAGMA journal_mode=WAL", "PRAGMA synchronous=NORMAL", f"PRAGMA busy_timeout={busy_timeout_ms}"]


class SqliteReader(HotReader):
    def __init__(self, path: str, busy_timeout_ms: int) -> None:
        self._path = path
        self._busy_timeout_ms = busy_timeout_ms
        self._conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._conn.execute(f"PRAGMA busy_timeout={busy_timeout_ms}")
        self._conn.execute("PRAGMA query_only=1")
        self._writer: sqlite3.Connection | None = None  # opened by the first write

    def param(self, n: int) -> str:
        return "?"

    def in_list(self, column: str, values: Sequence[Any], n: int) -> list[tuple[str, list[Any]]]:
        clauses = []
        for chunk in chunks(values, SQLITE_IN_CHUNK):
            marks = ", ".join("?" * len(chunk))
            clauses.append((f"{column} IN ({marks})", list(chunk)))
        return clauses

    async def all(self, sql: str, args: Sequence[Any] = ()) -> list[Row]:
        return self._conn.execute(sql, args).fetchall()

    async def first(self, sql: str, args: Sequence[Any] = ()) -> Row | None:
        row: Row | None = self._conn.execute(sql, args).fetchone()
        return row

    async def write(self, sql: str, args: Sequence[Any] = ()) -> list[Row]:
        if self._writer is None:
            writer = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
            for pragma in sqlite_pragmas(self._busy_timeout_ms):
                writer.execute(pragma)
            self._writer = writer
        return self._writer.execute(sql, args).fetchall()

    async def aclose(self) -> None:
        self._conn.close()
        if self._writer is not None:
            self._writer.close()
            self._writer = None


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

    def param(self, n: int) -> str:
        return f"${n}"

    def in_list(self, column: str, values: Sequence[Any], n: int) -> list[tuple[str, list[Any]]]:
        return [(f"{column} = ANY(${n})", [list(values)])]

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

    async def all(self, sql: str, args: Sequence[Any] = ()) -> list[Row]:
        pool = await self._get_pool()
        try:
            return await self._fetch_once(pool, sql, args)
        except _connection_lost() as e:
            # The server ended the session (a restart, a terminated backend), maybe before the
            # pool noticed: that connection went; a read is safe to repeat on another.
            logger.info("database connection lost during a read (%s); retrying once", type(e).__name__)
            return await self._fetch_once(pool, sql, args)

    async def write(self, sql: str, args: Sequence[Any] = ()) -> list[Row]:
        return await self._fetch_once(await self._get_pool(), sql, args)  # autocommit: one statement

    @staticmethod
    async def _fetch_once(pool: Any, sql: str, args: Sequence[Any]) -> list[Row]:
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
