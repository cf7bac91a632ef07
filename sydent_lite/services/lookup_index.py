"""The lookup hash -> Matrix ID map, held in memory by each process and kept current.

Lookups are the identity server's hot path (a client asks about its whole address book:
hundreds or thousands of hashes per request, most of them not bound). Sorting out the misses
in a dict costs well under a microsecond per hash where an indexed `IN (...)` of the whole
batch costs milliseconds, so each process loads the map once at start and then applies the database's change
log (migration 0004: triggers append every change to `associations`, whoever makes it).

Freshness: before each lookup the process reads the log rows it has not applied yet (one
small query, shared by the lookups that arrive while it runs), so a bind committed by any
process is seen by every lookup that starts after it. Old log rows are pruned after an hour;
a process that fell behind the pruning point (stopped for that long) reloads the whole map.

What is held: which lookup hashes exist and the row that holds each, keyed by the hash
string's own 64-bit hash (about 100 bytes per association: 100,000 take ~10 MiB). The mxids
of the hits (a few per cent of a batch) are read from the database by primary key, and each
hit's full lookup hash is compared there, so a 64-bit collision can never answer wrongly.
"""

from __future__ import annotations

import asyncio
import logging
from array import array
from collections.abc import Collection
from itertools import compress, repeat
from operator import is_not

from sydent_lite.secrets_util import now_ms
from sydent_lite.storage.association_changes import AssociationChangeStore
from sydent_lite.storage.associations import AssociationStore

logger = logging.getLogger(__name__)

BACKGROUND_REFRESH_SECONDS = 2.0
KEEP_CHANGES_MS = 60 * 60 * 1000


# key -> association id, or (rarely: two hashes with one 64-bit key) a tuple of ids.
_Ids = int | tuple[int, ...]


# The dict key of a lookup hash: the string's own hash (cached by CPython, stable within the
# process). The builtin itself rather than a function calling it: `map(_key, ...)` stays in C.
_key = hash


class LookupIndex:
    def __init__(self, changes: AssociationChangeStore, associations: AssociationStore) -> None:
        self._store = changes
        self._associations = associations
        self._ids: dict[int, _Ids] = {}
        self._last_id = 0
        self._lock = asyncio.Lock()
        # Polls started so far: a lookup needs one that started after it arrived.
        self._polls_started = 0
        self._polls_done = 0

    def __len__(self) -> int:
        return len(self._ids)

    def _add(self, key: int, association_id: int) -> None:
        held = self._ids.get(key)
        if held is None or held == association_id:
            self._ids[key] = association_id
        elif isinstance(held, int):
            self._ids[key] = (held, association_id)
        elif association_id not in held:
            self._ids[key] = (*held, association_id)

    def _remove(self, key: int, association_id: int) -> None:
        held = self._ids.get(key)
        if held is None:
            return
        if isinstance(held, int):
            if held == association_id:
                del self._ids[key]
            return
        rest = tuple(i for i in held if i != association_id)
        self._ids[key] = rest[0] if len(rest) == 1 else rest

    async def load(self) -> None:
        """(Re)build the index from the associations table, then apply what changed meanwhile."""
        # The log position first: changes made during the scan are applied again afterwards,
        # which is harmless (adding a present id or removing an absent one changes nothing).
        # Everything up to the pruning point is in the table too (the log may be empty).
        last_id = max(await self._store.latest_id(), await self._store.pruned_through())
        # Keys and ids go into flat arrays first and the dict is built afterwards: building it
        # while the scanned rows come and go interleaves long-lived ints with short-lived
        # strings, and the fragmented memory (~10 MiB per 100,000) is never given back.
        keys, ids = array("q"), array("q")
        async for batch in self._store.all_hashes():
            for association_id, lookup_hash in batch:
                keys.append(_key(lookup_hash))
                ids.append(association_id)
        self._ids = {}
        for key, association_id in zip(keys, ids, strict=True):
            self._add(key, association_id)
        del keys, ids
        self._last_id = last_id
        await self._apply_changes()
        logger.info("lookup index loaded: %d associations", len(self._ids))

    async def _apply_changes(self) -> None:
        while True:
            rows = await self._store.since(self._last_id)
            for change_id, lookup_hash, association_id, present in rows:
                if present:
                    self._add(_key(lookup_hash), association_id)
                else:
                    self._remove(_key(lookup_hash), association_id)
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

    async def mxids(self, hashes: Collection[str]) -> dict[str, str]:
        """lookup hash -> mxid for the bound ones among `hashes` (call catch_up first)."""
        # Most hashes are of people who are not bound: sort them out without a Python loop.
        held_all = list(map(self._ids.get, map(_key, hashes)))
        present = list(map(is_not, held_all, repeat(None)))
        wanted = set(compress(hashes, present))
        candidates: set[int] = set()
        for held in compress(held_all, present):
            if isinstance(held, int):
                candidates.add(held)
            else:
                candidates.update(held)
        if not candidates:
            return {}
        rows = await self._associations.hashes_and_mxids(list(candidates))
        # The full hash must match: a key collision or a row changed since is no answer.
        return {h: mxid for _, h, mxid in rows if h in wanted}

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
