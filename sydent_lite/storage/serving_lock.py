"""Serving and importing exclude each other: a lock every serving process holds (shared) and
`import-sydent` takes (exclusive).

Why: a server reads the signing key and the lookup pepper once, at start-up; an import that
changes them under a running server left it serving the old key next to Sydent-signed
associations. So the import refuses while a server is up, and a server refuses to start while
an import runs ("import before the first start", docs/deployment.md).

- PostgreSQL: a session-level advisory lock on a connection held for the lock's lifetime (a
  crashed process's connection closes, and its lock with it).
- SQLite: flock(2) on `<database file>.serving-lock` beside the database (released by the
  kernel when the process ends).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection

from sydent_lite.storage.database import Database

# One 64-bit advisory lock key for this purpose (signed, as PostgreSQL takes it).
_PG_KEY = int.from_bytes(hashlib.sha256(b"sydent_lite serving lock").digest()[:8], "big", signed=True)


class ServingLockBusy(Exception):
    """The lock is held the other way: the message says by whom and what to do."""


class ServingLock:
    """Held until `release()`: shared (a serving process) or exclusive (an import)."""

    def __init__(self, exclusive: bool, conn: AsyncConnection | None, fd: int | None) -> None:
        self._exclusive = exclusive
        self._conn = conn
        self._fd = fd

    async def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the file drops the flock
            self._fd = None
        if self._conn is not None:
            conn, self._conn = self._conn, None
            unlock = func.pg_advisory_unlock if self._exclusive else func.pg_advisory_unlock_shared
            try:
                await conn.execute(select(unlock(_PG_KEY)))
                await conn.commit()
            finally:
                await conn.close()


def sqlite_lock_path(url: str) -> Path | None:
    """The lock file of a SQLite database URL (None: not SQLite)."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database:
        return None
    return Path(parsed.database + ".serving-lock")


async def take_serving_lock(database: Database, url: str, *, exclusive: bool) -> ServingLock:
    """The lock, without waiting; ServingLockBusy if it is held the other way (or, for
    exclusive, at all)."""
    busy = (
        "a sydent-lite server is running on this database: stop every server (and worker) before importing"
        if exclusive
        else "an import-sydent is running on this database: start the server when it has finished"
    )
    lock_path = sqlite_lock_path(url)
    if lock_path is not None:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ServingLockBusy(busy) from None
        return ServingLock(exclusive, None, fd)
    conn = database.connect()
    await conn.start()
    try:
        try_lock = func.pg_try_advisory_lock if exclusive else func.pg_try_advisory_lock_shared
        got = (await conn.execute(select(try_lock(_PG_KEY)))).scalar_one()
        await conn.commit()  # the session lock outlives the transaction; no idle transaction
    except BaseException:
        await conn.close()
        raise
    if not got:
        await conn.close()
        raise ServingLockBusy(busy)
    return ServingLock(exclusive, conn, None)
