"""Rate-limit token buckets in the database (`rate_limit_buckets`), shared by every worker."""

from __future__ import annotations

import logging

from sqlalchemy import delete, select, update

from sydent_lite.clock import SYSTEM_CLOCK, Clock
from sydent_lite.storage.database import Database
from sydent_lite.storage.dialect import insert_for
from sydent_lite.storage.tables import rate_limit_buckets as buckets
from sydent_lite.token_bucket import refill, take_amount

logger = logging.getLogger(__name__)

# How often a process deletes buckets that have refilled completely (they equal no row).
PRUNE_INTERVAL_MS = 10 * 60 * 1000


class DatabaseRateLimitStore:
    """Each check is one short transaction on the bucket's row.

    PostgreSQL: INSERT ... ON CONFLICT DO NOTHING makes sure the row exists, then SELECT ...
    FOR UPDATE holds it while the new level is written, so concurrent checks from any number
    of processes queue on the row and none is lost. SQLite: the INSERT opens the write
    transaction straight away (one writer at a time), so the read and the update that follow
    cannot interleave with another writer's.
    """

    def __init__(self, database: Database, horizon_ms: int, clock: Clock = SYSTEM_CLOCK) -> None:
        self._db = database
        self._clock = clock
        # Buckets untouched for this long have refilled completely: deleting them changes nothing.
        self._horizon_ms = horizon_ms
        self._last_prune_ms = 0

    async def take(
        self, key: str, rate_per_second: float, burst: int, want: int = 1, need: int = 1
    ) -> tuple[int, float]:
        now = self._clock.time_ms()
        async with self._db.begin() as conn:
            await conn.execute(
                insert_for(conn, buckets).values(key=key, tokens=float(burst), updated_ms=now).on_conflict_do_nothing()
            )
            query = select(buckets.c.tokens, buckets.c.updated_ms).where(buckets.c.key == key)
            if conn.dialect.name == "postgresql":
                query = query.with_for_update()
            tokens, updated_ms = (await conn.execute(query)).one()
            tokens = refill(tokens, now - updated_ms, rate_per_second, burst)
            # All of `need` or nothing: a lookup of 500 addresses never pays for 300 of them.
            taken = take_amount(tokens, want, need)
            tokens -= taken
            # A host whose clock is behind another's never moves a bucket's time backwards.
            await conn.execute(
                update(buckets).where(buckets.c.key == key).values(tokens=tokens, updated_ms=max(now, updated_ms))
            )
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
