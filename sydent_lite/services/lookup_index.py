"""The lookup hash -> Matrix ID map, held in memory by each process and kept current.

Lookups are the identity server's hot path (a client asks about its whole address book:
hundreds or thousands of hashes per request). Answering them from a dict costs microseconds
per hash where an indexed `IN (...)` query through the async driver costs milliseconds per
request, so each process loads the map once at start and then applies the database's change
log (migration 0004: triggers append every change to `associations`, whoever makes it).

Freshness: before each lookup the process reads the log rows it has not applied yet (one
small query, shared by the lookups that arrive while it runs), so a bind committed by any
process is seen by every lookup that starts after it. Old log rows are pruned after an hour;
a process that fell behind the pruning point (stopped for that long) reloads the whole map.

Memory: about 200 bytes per association (100,000 associations: ~20 MiB).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

from sydent_lite.secrets_util import now_ms
from sydent_lite.storage.association_changes import AssociationChangeStore

logger = logging.getLogger(__name__)

BACKGROUND_REFRESH_SECONDS = 2.0
KEEP_CHANGES_MS = 60 * 60 * 1000


class LookupIndex:
    def __init__(self, store: AssociationChangeStore) -> None:
        self._store = store
        self._map: dict[str, str] = {}
        self._last_id = 0
        self._lock = asyncio.Lock()
        # Polls started so far: a lookup needs one that started after it arrived.
        self._polls_started = 0
        self._polls_done = 0

    def __len__(self) -> int:
        return len(self._map)

    async def load(self) -> None:
        """(Re)build the map from the associations table, then apply what changed meanwhile."""
        # The log position first: changes made during the scan are applied again afterwards,
        # which is harmless (each row sets a hash to a value) and closes the gap.
        # Everything up to the pruning point is in the table too (the log may be empty).
        last_id = max(await self._store.latest_id(), await self._store.pruned_through())
        fresh: dict[str, str] = {}
        async for batch in self._store.all_mappings():
            fresh.update(batch)
        self._map, self._last_id = fresh, last_id
        await self._apply_changes()
        logger.info("lookup index loaded: %d associations", len(self._map))

    async def _apply_changes(self) -> None:
        while True:
            rows = await self._store.since(self._last_id)
            for change_id, lookup_hash, mxid in rows:
                if mxid is None:
                    self._map.pop(lookup_hash, None)
                else:
                    self._map[lookup_hash] = mxid
                self._last_id = change_id
            if len(rows) < 10_000:
                return

    async def catch_up(self) -> None:
        """Apply every change committed before this call (coalesced with concurrent callers)."""
        arrived_after = self._polls_started
        async with self._lock:
            # A poll that started after we arrived has finished: it saw what we need.
            if self._polls_done > arrived_after:
                return
            self._polls_started += 1
            try:
                await self._apply_changes()
            finally:
                self._polls_done = self._polls_started

    def mxids(self, hashes: Iterable[str]) -> dict[str, str]:
        get = self._map.get
        return {h: m for h in hashes if (m := get(h)) is not None}

    async def run(self) -> None:
        """Background: keep up with other processes' binds, reload after falling behind pruning."""
        while True:
            await asyncio.sleep(BACKGROUND_REFRESH_SECONDS)
            try:
                if await self._store.pruned_through() > self._last_id:
                    logger.warning("lookup index fell behind the change log; reloading")
                    async with self._lock:
                        await self.load()
                else:
                    await self.catch_up()
            except Exception:
                logger.exception("lookup index refresh failed; will retry")

    async def prune(self) -> int:
        return await self._store.prune(now_ms() - KEEP_CHANGES_MS)
