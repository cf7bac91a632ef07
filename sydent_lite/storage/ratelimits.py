"""Rate-limit token buckets in the database (`rate_limit_buckets`), shared by every worker."""

from __future__ import annotations

import logging

from sqlalchemy import bindparam, delete, select, update

from sydent_lite.clock import SYSTEM_CLOCK, Clock
from sydent_lite.storage.database import Database
from sydent_lite.storage.dialect import INSERT_FOR_DIALECT
from sydent_lite.storage.tables import rate_limit_buckets as buckets
from sydent_lite.token_bucket import refill, take_amount

logger = logging.getLogger(__name__)

# Built once (building each per call was a tenth of a requestToken's CPU, profiled).
_ENSURE = {
    name: insert(buckets)
    .values(key=bindparam("bucket"), tokens=bindparam("full"), updated_ms=bindparam("now"))
    .on_conflict_do_nothing()
    for name, insert in INSERT_FOR_DIALECT.items()
}
_READ = select(buckets.c.tokens, buckets.c.updated_ms).where(buckets.c.key == bindparam("bucket"))
_READ_FOR_UPDATE = _READ.with_for_update()
_WRITE = (
    update(buckets)
    .where(buckets.c.key == bindparam("bucket"))
    .values(tokens=bindparam("left"), updated_ms=bindparam("at"))
)

# How often a process deletes buckets that have refilled completely (they equal no row).
PRUNE_INTERVAL_MS = 10 * 60 * 1000


class DatabaseRateLimitStore:
    """Each check is one statement, or one short transaction on the bucket's row.

    A bucket that does not exist yet is created already taken from (a full bucket, refilled by
    nothing), by one INSERT ... ON CONFLICT DO NOTHING RETURNING that commits on its own
    (Database.write): most per-address keys (requestToken, store-invite) are new each time,
    and the transaction that reads and writes an existing bucket cost three times as much.
    An existing bucket: PostgreSQL's SELECT ... FOR UPDATE holds the row while the new level
    is written, so concurrent checks from any number of processes queue on the row and none
    is lost (a concurrent creator's INSERT waits on the key's index entry until the first
    commits, then finds the row). SQLite: the INSERT (making sure the row is still there: it
    may have been pruned meanwhile) opens the write transaction straight away (one writer at
    a time), so the read and the update that follow cannot interleave with another writer's.
    """

    def __init__(self, database: Database, horizon_ms: int, clock: Clock = SYSTEM_CLOCK) -> None:
        self._db = database
        self._clock = clock
        # Buckets untouched for this long have refilled completely: deleting them changes nothing.
        self._horizon_ms = horizon_ms
        self._last_prune_ms = 0
        self._create = database.insert_sql(
            buckets, ["key", "tokens", "updated_ms"], ' ON CONFLICT ("key") DO NOTHING RETURNING "key"'
        )

    async def take(
        self, key: str, rate_per_second: float, burst: int, want: int = 1, need: int = 1
    ) -> tuple[int, float]:
        now = self._clock.time_ms()
        taken = take_amount(float(burst), want, need)  # from a bucket that is new: full
        tokens = float(burst - taken)
        if not await self._db.write(self._create, [key, tokens, now]):  # it exists: refill, then take
            async with self._db.begin() as conn:
                dialect = conn.dialect.name
                await conn.execute(_ENSURE[dialect], {"bucket": key, "full": float(burst), "now": now})
                read = _READ_FOR_UPDATE if dialect == "postgresql" else _READ
                tokens, updated_ms = (await conn.execute(read, {"bucket": key})).one()
                tokens = refill(tokens, now - updated_ms, rate_per_second, burst)
                # All of `need` or nothing: a lookup of 500 addresses never pays for 300 of them.
                taken = take_amount(tokens, want, need)
                tokens -= taken
                # A host whose clock is behind another's never moves a bucket's time backwards.
                await conn.execute(_WRITE, {"bucket": key, "left": tokens, "at": max(now, updated_ms)})
        if now - self._last_prune_ms > PRUNE_INTERVAL_MS:
            self._last_prune_ms = now
            await self.prune(now)
        return taken, tokens

    async def prune(self, now: int) -> int:
        try:
            async with self._db.begin() as conn:
                result = await conn.execute(delete(buckets).where(buckets.c.updated_ms < now - self._horizon_ms))
            return result.rowcount
        except Exception:
            logger.warning("could not prune old rate-limit buckets", exc_info=True)
            return 0

    async def aclose(self) -> None:
        return None
