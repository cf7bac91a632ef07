"""aiosqlite's connection API, run on the calling thread (the event loop's) instead of its own.

aiosqlite hands every call (cursor, execute, fetch, commit) to a per-connection thread and
back. SQLite answers an indexed query or a small write in tens of microseconds, and the
hand-offs cost far more: under load each one waits for the GIL, and a four-statement write
transaction took 10-20 ms. Run inline, the same work blocks the loop for a fraction of a
millisecond. Within a process, writes take turns on an asyncio lock (storage.database), so a
write never waits inside SQLite for another connection of ours; it can wait for another
*process* (busy_timeout, kept short), which is why PostgreSQL is the database for several.

Relies on aiosqlite funnelling every call through Connection._execute, and on its
_connection, _running and _connector attributes (true of 0.20-0.22; pyproject pins <0.23).
`check_aiosqlite_internals` makes sure of it before the first connection is opened, so a
changed aiosqlite stops start-up with a message instead of hanging on a worker thread that
inline connections never start.
"""

from __future__ import annotations

import inspect
import sqlite3
from collections.abc import Awaitable, Callable, Generator
from typing import Any, TypeVar

import aiosqlite

_T = TypeVar("_T")


class InlineConnection(aiosqlite.Connection):
    def __init__(self, connector: Callable[[], sqlite3.Connection]) -> None:
        super().__init__(connector, iter_chunk_size=64)  # the worker thread is never started

    def __await__(self) -> Generator[Any, None, InlineConnection]:
        return self._open().__await__()

    async def _open(self) -> InlineConnection:
        if self._connection is None:
            self._connection = self._connector()
        return self

    async def _execute(self, fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
        if not self._running or self._connection is None:
            raise ValueError("Connection closed")
        return fn(*args, **kwargs)

    def stop(self) -> None:
        self._running = False
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    async def close(self) -> None:
        self.stop()


class AiosqliteChanged(RuntimeError):
    """The installed aiosqlite lacks an internal that InlineConnection relies on."""


_INSTANCE_ATTRIBUTES = ("_connection", "_running", "_connector")


def check_aiosqlite_internals() -> None:
    """Raise AiosqliteChanged unless aiosqlite still works as InlineConnection assumes.

    Checks the attributes it overrides or sets, then opens an in-memory database inline and
    drives each call the SQLAlchemy dialect makes (execute, fetch, cursor close, commit,
    rollback, close) without an event loop: a call that goes around Connection._execute would
    wait for aiosqlite's worker thread, and so suspend instead of finishing.
    """
    version = getattr(aiosqlite, "__version__", "?")

    def changed(what: str) -> AiosqliteChanged:
        return AiosqliteChanged(
            f"aiosqlite {version} is not supported: {what}. sydent_lite runs SQLite connections on the "
            "event loop through aiosqlite internals true of 0.20-0.22: install 'aiosqlite>=0.20,<0.23'."
        )

    execute = getattr(aiosqlite.Connection, "_execute", None)
    if execute is None or not inspect.iscoroutinefunction(execute):
        raise changed("Connection._execute is gone")
    base = aiosqlite.Connection(lambda: sqlite3.connect(":memory:"), iter_chunk_size=64)
    missing = [name for name in _INSTANCE_ATTRIBUTES if not hasattr(base, name)]
    if missing:
        raise changed(f"Connection no longer sets {', '.join(missing)}")

    conn = InlineConnection(lambda: sqlite3.connect(":memory:", check_same_thread=False))
    try:
        _finish_inline(conn._open(), "connect", changed)
        cursor = _finish_inline(conn.execute("SELECT 1"), "execute", changed)
        if list(_finish_inline(cursor.fetchall(), "fetchall", changed)) != [(1,)]:
            raise changed("a query through Connection.execute returned the wrong rows")
        _finish_inline(cursor.close(), "cursor close", changed)
        _finish_inline(conn.commit(), "commit", changed)
        _finish_inline(conn.rollback(), "rollback", changed)
    finally:
        conn.stop()


def _finish_inline(awaitable: Awaitable[_T], call: str, changed: Callable[[str], AiosqliteChanged]) -> _T:
    """Run an awaitable that must complete without suspending (it never waits for anything)."""
    step = awaitable.__await__()
    try:
        step.send(None)
    except StopIteration as done:
        result: _T = done.value
        return result
    except Exception as e:
        raise changed(f"{call} failed when run inline ({type(e).__name__}: {e})") from e
    finally:
        step.close()
    raise changed(f"{call} goes around Connection._execute (it waited for aiosqlite's worker thread)")


def inline_creator(path: str, busy_timeout_s: float) -> Callable[[], Any]:
    """An `async_creator` for create_async_engine: inline connections to the file at path."""
    check_aiosqlite_internals()

    def connect() -> sqlite3.Connection:
        return sqlite3.connect(path, timeout=busy_timeout_s, check_same_thread=False)

    async def create() -> InlineConnection:
        return await InlineConnection(connect)

    return create
