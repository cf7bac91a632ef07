"""Database.write: one statement committed on its own, below SQLAlchemy (storage.readers), on
SQLite and PostgreSQL. It takes this process's turn for writes on SQLite (a write run while
one of our transactions holds SQLite's lock would block the event loop for the busy timeout,
then fail), and what it writes is committed at once: another process sees it."""

from __future__ import annotations

import asyncio

from support.db import DatabaseFactory

from sydent_lite.storage.database import migrate, open_database
from sydent_lite.storage.ratelimits import DatabaseRateLimitStore
from sydent_lite.storage.sessions import SessionStore, ValidationSession
from sydent_lite.storage.tables import rate_limit_buckets


def session(sid: str) -> ValidationSession:
    return ValidationSession(sid, "email", f"{sid}@example.test", "c" * 64, "t" * 64, 1, None, None, 1, 1, False, None)


async def test_a_write_waits_for_a_transaction_of_this_process_and_is_committed_at_once(
    db_factory: DatabaseFactory,
) -> None:
    url = db_factory.create().url
    database, other_process = open_database(url), open_database(url)
    try:
        await migrate(database)
        store = SessionStore(database)
        async with database.begin() as conn:
            # An open write transaction: on SQLite it holds the database's write lock.
            await conn.execute(rate_limit_buckets.insert().values(key="held", tokens=1.0, updated_ms=1))
            write = asyncio.create_task(store.create(session("s1")))
            await asyncio.sleep(0.2)
            if database.dialect == "sqlite":
                assert not write.done()  # waiting for its turn, the event loop free
        await asyncio.wait_for(write, 10)
        # Committed on its own: a connection of another process sees it straight away.
        seen = await SessionStore(other_process).get("s1")
        assert seen == session("s1") and seen.validated is False  # a bool, not SQLite's 0
        assert await SessionStore(other_process).find("email", "s1@example.test", "c" * 64) == seen
    finally:
        await database.dispose()
        await other_process.dispose()


async def test_a_new_bucket_is_created_taken_from_and_an_existing_one_refilled(db_factory: DatabaseFactory) -> None:
    database = open_database(db_factory.create().url)
    try:
        await migrate(database)
        store = DatabaseRateLimitStore(database, 3_600_000)
        assert await store.take("k", 0.0, 5, want=2, need=1) == (2, 3.0)  # created, 2 of 5 taken
        assert await store.take("k", 0.0, 5, want=4, need=4) == (0, 3.0)  # all or nothing
        assert await store.take("k", 0.0, 5, want=3, need=3) == (3, 0.0)
        async with database.connect() as conn:
            rows = (await conn.execute(rate_limit_buckets.select())).all()
        assert [(r.key, r.tokens) for r in rows] == [("k", 0.0)]
    finally:
        await database.dispose()
