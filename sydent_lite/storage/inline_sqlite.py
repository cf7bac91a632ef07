"""aiosqlite's connection API, run on the calling thread (the event loop's) instead of its own.

aiosqlite hands every call (cursor, execute, fetch, commit) to a per-connection thread and
back. SQLite answers an indexed query or a small write in tens of microseconds, and the
hand-offs cost far more: under load each one waits for the GIL, and a four-statement write
transaction took 10-20 ms. Run inline, the same work blocks the loop for a fraction of a
millisecond. Within a process, writes take turns on an asyncio lock (storage.database), so a
write never waits inside SQLite for another connection of ours; it can wait for another
*process* (busy_timeout, kept short), which is why PostgreSQL is the database for several.

Relies on aiosqlite funnelling every call through Connection._execute (true of 0.20-0.22).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Generator
from typing import Any

import aiosqlite


class InlineConnection(aiosqlite.Connection):
    def __init__(self, connector: Callable[[], sqlite3.Connection]) -> None:
        super().__init__(connector, iter_chunk_size=64)  # the worker thread is never started

    def __await__(self) -> Generator[Any, None, InlineConnection]:
        return self._open().__await__()

    async def _open(self) -> InlineConnection:
        if self._connection is None:
            self._connection = self._connector()
        return self

    async def _execute(self, fn, *args, **kwargs):  # type: ignore[no-untyped-def]
        if not self._running or self._connection is None:
            raise ValueError("Connection closed")
        return fn(*args, **kwargs)

    def stop(self) -> None:  # type: ignore[override]
        self._running = False
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    async def close(self) -> None:
        self.stop()


def inline_creator(path: str, busy_timeout_s: float) -> Callable[[], Any]:
    """An `async_creator` for create_async_engine: inline connections to the file at path."""

    def connect() -> sqlite3.Connection:
        return sqlite3.connect(path, timeout=busy_timeout_s, check_same_thread=False)

    async def create() -> InlineConnection:
        return await InlineConnection(connect)

    return create
