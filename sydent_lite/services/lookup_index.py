"""Which lookup hashes and which (medium, address) pairs are bound, in memory, kept current.

Lookups are the identity server's hot path (a client asks about its whole address book:
hundreds or thousands of hashes or addresses per request, most of them not bound). Sorting
out the misses in memory costs well under a microsecond each where an indexed `IN (...)` of
the whole batch costs milliseconds, so each process loads the index once at start and then
applies the database's change log (migration 0004: triggers append every change to
`associations`, whoever makes it).

Freshness: before each lookup the process reads the log rows it has not applied yet (one
small query, shared by the lookups that arrive while it runs), so a bind committed by any
process is seen by every lookup that starts after it. Old log rows are pruned after an hour;
a process that fell behind the pruning point (stopped for that long) reloads the whole index.

What is held: two slot filters (one-hash Bloom filters), one of lookup hashes (v2 lookups)
and one of (medium, address) pairs (v1 bulk_lookup, which would otherwise SHA-256 every pair
it is asked about), 32 slots of one byte per association each, rounded up to a power of two
(100,000: 8 MiB for both). A slot only says "maybe": the candidates (the hits, plus ~3% of
the misses) are confirmed by their full lookup hash or address, so neither a shared nor a
stale slot can ever answer wrongly. Slots are not cleared when an association goes (another
may share the slot); removals are counted and the filters rebuilt when they pile up or the
filters get crowded.

Where candidates are confirmed (services.lookup_confirmers, chosen at start): on SQLite, by
an indexed read of the in-process database; on PostgreSQL, by an exact in-memory table of
every lookup hash and its mxid, so that a lookup costs the shared database nothing but its
token check and the change poll.

Changes that fire no row trigger: a TRUNCATE on PostgreSQL is logged as one marker row
(migration 0005), on which everything held is dropped. Changes made with triggers switched
off (`session_replication_role = replica`, some restore tools) are not seen at all: restart
the servers after such a change.
"""

from __future__ import annotations

import asyncio
import logging
from array import array
from collections import deque
from collections.abc import Collection, Hashable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import compress, islice, repeat

from sydent_lite.clock import SYSTEM_CLOCK, Clock
from sydent_lite.services.lookup_confirmers import CandidateConfirmer, row_hash
from sydent_lite.services.pacing import Pace
from sydent_lite.storage.association_changes import CHANGES_PER_READ, AssociationChangeStore, Change
from sydent_lite.storage.associations import AssociationStore

logger = logging.getLogger(__name__)

BACKGROUND_REFRESH_SECONDS = 2.0
KEEP_CHANGES_MS = 60 * 60 * 1000
# Rebuild once this many removed associations (or a quarter of the index) left stale slots.
MAX_STALE = 10_000
# Slots per association in a slot filter: the share of misses that become false candidates is
# at most 1/SLOTS_PER_KEY (~3%), each costing one more candidate to confirm.
SLOTS_PER_KEY = 32
MIN_SLOTS = 1 << 16
# The association id of the log's marker row for a TRUNCATE (migration 0005): no row has it.
TRUNCATED = 0
# A load beside the one answering (a rebuild; an upcoming pepper's) is at work at most this
# share of the time (services.pacing): the rest of its worker's event loop is the lookups'.
BACKGROUND_LOAD_SHARE = 0.25
# Keys set in a slot filter per step of a paced load: a million at once held the event loop
# for ~0.3 s (random writes all over tens of MiB), ~5-10 ms per step this way.
FILTER_STEP = 16_384


def _keys(values: Iterable[Hashable]) -> Iterator[int]:
    """The index key of each value: its own hash (cached by CPython for strings, stable within
    the process). In C: no Python code runs per value."""
    return map(hash, values)


class SlotFilter:
    """A one-hash Bloom filter: a set of keys that may say "maybe" wrongly but never "no"
    wrongly, one byte per slot, the slot being the key's low bits. 100,000 keys take 4 MiB
    here; a Python set of them took 7 MiB (an int object and a 16-byte entry each, in a table
    kept 40% empty)."""

    def __init__(self, keys: Iterable[int], expected: int) -> None:
        size = MIN_SLOTS
        while size < expected * SLOTS_PER_KEY:
            size *= 2
        self.slots = bytearray(size)
        self._mask = size - 1
        self.count = 0
        self.add(keys)

    def add(self, keys: Iterable[int]) -> None:
        # In chunks: a list of a million slot numbers was ~40 MiB at the peak of a load.
        keys = iter(keys)
        while slots := list(map(self._mask.__and__, islice(keys, 65_536))):
            deque(map(self.slots.__setitem__, slots, repeat(1)), maxlen=0)
            self.count += len(slots)

    def maybe(self, keys: Iterable[int]) -> Iterator[int]:
        """For each key, nonzero if it may be held, 0 if it certainly is not."""
        return map(self.slots.__getitem__, map(self._mask.__and__, keys))

    @property
    def crowded(self) -> bool:
        """Twice the keys it was sized for: time to rebuild it bigger."""
        return self.count * SLOTS_PER_KEY > 2 * len(self.slots)


@dataclass
class _Held:
    """What an index holds, as of change-log id `last_id`."""

    hashes: SlotFilter
    threepids: SlotFilter
    confirmer: CandidateConfirmer
    last_id: int = 0
    stale: int = 0  # associations removed since the filters were built (their slots stay set)

    def clear(self) -> None:
        """Everything went (a TRUNCATE)."""
        self.hashes, self.threepids = SlotFilter((), 0), SlotFilter((), 0)
        self.confirmer = self.confirmer.empty()
        self.stale = 0


class LookupIndex:
    def __init__(
        self,
        changes: AssociationChangeStore,
        associations: AssociationStore,
        confirmer: CandidateConfirmer,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        """`confirmer`: where candidates are confirmed (services.lookup_confirmers)."""
        self._store = changes
        self._clock = clock
        self._associations = associations
        self._held = _Held(SlotFilter((), 0), SlotFilter((), 0), confirmer.empty())
        self._lock = asyncio.Lock()
        # Polls started so far: a lookup needs one that started after it arrived.
        self._polls_started = 0
        self._polls_done = 0

    def __len__(self) -> int:
        return self._held.hashes.count

    @property
    def _stale(self) -> int:
        return self._held.stale

    async def load(self, *, block_lookups: bool = True, pace: Pace | None = None) -> None:
        """(Re)build the index from the associations table, then apply what changed meanwhile.

        `block_lookups=False`: lookups go on with the current index while the new one is
        built and brought up to date beside it (a rebuild to drop stale entries: the current
        one answers correctly); only the last few changes and the swap happen under the
        lock. A process that fell behind the log must not answer from what it holds: it
        blocks lookups throughout, flat out.

        `pace`: how a load that lookups are not waiting for shares the event loop with them
        (services.pacing; None: flat out, as at start, when there is nothing to serve yet).
        """
        started = self._clock.monotonic()
        if block_lookups:
            async with self._lock:
                held = await self._build(None)
                await self._apply_changes(held)
                self._held = held
        else:
            held = await self._build(pace)
            await self._apply_changes(held)
            async with self._lock:
                await self._apply_changes(held)
                self._held = held
        took = self._clock.monotonic() - started
        slept = pace.slept if pace is not None else 0.0
        logger.info("lookup index loaded: %d associations in %.1f s (%.1f s of it paused)", len(self), took, slept)

    async def _build(self, pace: Pace | None) -> _Held:
        # The log position first: changes made during the scan are applied again afterwards,
        # which is harmless (setting a slot twice changes nothing; the mxid table replays
        # each changed row's history in order, ending where the row is now).
        # Everything up to the pruning point is in the table too (the log may be empty).
        last_id = max(await self._store.latest_id(), await self._store.pruned_through())
        # Keys are collected in flat arrays (8 bytes each, no objects) to size the filters.
        hash_keys, threepid_keys = array("q"), array("q")
        confirmer = self._held.confirmer.empty()
        # Paced: the share done is counted in keys, two an association (both confirmers
        # yield every row's lookup hash and its (medium, address), in one pass or two).
        expected = 2 * await self._associations.count() if pace is not None and pace.deadline is not None else 0
        if pace is not None:
            pace.begin()
        async for batch in confirmer.load():
            hash_keys.extend(_keys(batch.lookup_hashes))
            threepid_keys.extend(_keys(batch.threepids))
            if pace is not None:
                await pace.step(min(0.99, (len(hash_keys) + len(threepid_keys)) / expected) if expected else 0.0)
        if pace is None:
            hashes, threepids = SlotFilter(hash_keys, len(hash_keys)), SlotFilter(threepid_keys, len(threepid_keys))
        else:
            hashes, threepids = SlotFilter((), len(hash_keys)), SlotFilter((), len(threepid_keys))
            for target, keys in ((hashes, hash_keys), (threepids, threepid_keys)):
                for start in range(0, len(keys), FILTER_STEP):
                    target.add(keys[start : start + FILTER_STEP])
                    await pace.step(0.99)
        return _Held(hashes, threepids, confirmer, last_id)

    async def _apply_changes(self, held: _Held) -> None:
        while True:
            changes = await self._store.since(held.last_id)
            if not changes:
                return
            # A TRUNCATE's marker: everything held goes, with whatever the log said before it.
            marker = max((i for i, c in enumerate(changes) if c.association_id == TRUNCATED), default=-1)
            if marker >= 0:
                held.clear()
            await self._apply(held, changes[marker + 1 :])
            held.last_id = changes[-1].id
            if len(changes) < CHANGES_PER_READ:  # else there may be more
                return

    async def _apply(self, held: _Held, changes: Sequence[Change]) -> None:
        present_ids = [c.association_id for c in changes if c.present]
        # The rows as they are now (the log holds only the lookup hash and the row id).
        current = await self._associations.index_rows_by_id(present_ids) if present_ids else []
        slot = held.confirmer.slot
        held.hashes.add(_keys([row_hash(row, slot) for row in current]))
        held.threepids.add(_keys([(row.medium, row.address) for row in current]))
        held.stale += len(changes) - len(present_ids)
        held.confirmer.apply(changes, current)

    async def catch_up(self) -> None:
        """Apply every change committed before this call (coalesced with concurrent callers)."""
        arrived_after = self._polls_started
        async with self._lock:
            # A poll that started after we arrived has finished: it saw what we need.
            if self._polls_done > arrived_after:
                return
            self._polls_started += 1
            # Counted as done only if it succeeded: after a failed poll (the database went
            # away mid-way) the lookups waiting here poll for themselves, and fail rather than
            # answer from a half-applied batch.
            await self._apply_changes(self._held)
            self._polls_done = self._polls_started

    async def mxids(self, hashes: Collection[str]) -> dict[str, str]:
        """lookup hash -> mxid for the bound ones among `hashes` (call catch_up first)."""
        held = self._held
        # Most hashes are of people who are not bound: sort them out without a Python loop.
        candidates = list(compress(hashes, held.hashes.maybe(_keys(hashes))))
        if not candidates:
            return {}
        return await held.confirmer.confirm_hashes(candidates)

    async def mxids_by_address(self, medium: str, addresses: Sequence[str]) -> dict[str, str]:
        """address -> mxid for the bound ones among `addresses` of `medium`, in their stored
        form (call catch_up first)."""
        held = self._held
        candidates = list(compress(addresses, held.threepids.maybe(_keys(zip(repeat(medium), addresses)))))
        if not candidates:
            return {}
        return await held.confirmer.confirm_addresses(medium, candidates)

    async def run(self) -> None:
        """Background: keep up with other processes' binds, reload after falling behind pruning."""
        while True:
            await self._clock.sleep(BACKGROUND_REFRESH_SECONDS)
            try:
                await self.maintain()
            except Exception:
                logger.exception("lookup index refresh failed; will retry")

    async def maintain(self) -> None:
        """One step of the background work: catch up, rebuild, or reload after falling behind."""
        held = self._held
        if await self._store.pruned_through() > held.last_id:
            logger.warning("lookup index fell behind the change log; reloading")
            await self.load()
        elif held.stale > max(MAX_STALE, len(self) // 4) or held.hashes.crowded or held.threepids.crowded:
            logger.info("lookup index: rebuilding (%d associations, %d removed)", len(self), held.stale)
            await self.load(block_lookups=False, pace=Pace(self._clock, BACKGROUND_LOAD_SHARE))
        else:
            await self.catch_up()

    async def prune(self) -> int:
        return await self._store.prune(self._clock.time_ms() - KEEP_CHANGES_MS)
