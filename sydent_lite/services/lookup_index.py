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

What is held: two slot filters (one-hash Bloom filters), one of lookup hashes (v2 lookups) and
one of (medium, address) pairs (v1 bulk_lookup, which would otherwise SHA-256 every pair it is
asked about), 32 slots per association each, rounded up to a power of two: a byte a slot up to
64 Mi slots (100,000: 8 MiB for both), a bit a slot above (10,000,000: 128 MiB for both, not 1
GiB; at 10,000,000 on PostgreSQL a lookup with bit slots answered ~12% fewer a second than with
bytes, which at that size the memory is worth). A slot only says "maybe": the candidates (the
hits, plus ~3% of the misses) are confirmed by their full lookup hash or address, so neither a
shared nor a stale slot can ever answer wrongly. Slots are not cleared when an association goes
(another may share the slot); removals are counted and the filters rebuilt when they pile up or
the filters get crowded.

Where candidates are confirmed (services.lookup_confirmers, chosen at start): on SQLite, by
an indexed read of the in-process database; on PostgreSQL, by an exact in-memory table of
every lookup hash and its mxid, so that a lookup costs the shared database nothing but its
token check and the change poll.

Shared between workers (PostgreSQL, where the index holds every mxid): the index a process
answers from is mapped from a snapshot file (services.index_snapshot) that one process wrote
and every worker maps read-only (one copy in the page cache for all), plus what changed since
the snapshot's change-log id, held by each process itself: the filters' slots set since (a
set of slot numbers) and the mxid table's changes (services.mxid_table's overlay). A process
that starts maps the newest usable snapshot and replays the log from its id; if there is none,
one process builds the index from the table and writes it (in a child process of its own,
services.index_builder, where the server configured one) while the others wait for its lock,
then map it. A new snapshot is written (by whichever process takes the lock; paced, in the
background) when the changes held beside one grow large or it gets old enough for the log's
pruning to approach it; every process switches to the newest as it appears, as a rebuild
swaps in today. If the directory is not usable, each process holds its own index as before.
On SQLite (one process; its index builds in about a second at the sizes SQLite is for) a
process always holds its own.

The slots of an index that may be shared are chosen by the CRC-32 of the value's bytes (in C,
no Python code per value): the same in every process, which Python's str hash is not. An index
only its process reads (SQLite's) uses Python's hash: cheaper, and keyed.

Changes that fire no row trigger: a TRUNCATE on PostgreSQL is logged as one marker row
(migration 0005), on which everything held is dropped. Changes made with triggers switched
off (`session_replication_role = replica`, some restore tools) are not seen at all: restart
the servers after such a change, deleting the snapshot directory first (docs/deployment.md).
"""

from __future__ import annotations

import asyncio
import logging
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import compress, groupby, islice, repeat
from operator import itemgetter

import numpy as np

from sydent_lite.clock import SYSTEM_CLOCK, Clock
from sydent_lite.memory import release_free_memory
from sydent_lite.services.filter_keys import FilterKeyArray, HashKeys
from sydent_lite.services.index_snapshot import IndexSnapshots, Snapshot, SnapshotContents, odd_section, read_odd
from sydent_lite.services.lookup_confirmers import CandidateConfirmer, row_hash
from sydent_lite.services.mxid_table import MxidTable, TableBuffers
from sydent_lite.services.pacing import Pace
from sydent_lite.storage.association_changes import CHANGES_PER_READ, AssociationChangeStore, Change
from sydent_lite.storage.associations import AssociationStore

logger = logging.getLogger(__name__)

BACKGROUND_REFRESH_SECONDS = 2.0
KEEP_CHANGES_MS = 60 * 60 * 1000
# Rebuild once this many removed associations (or a quarter of the index) left stale slots.
MAX_STALE = 10_000
# Slots per association in a slot filter, to the nearest power of two (22.6 to 45 slots a key):
# the share of misses that become false candidates is about 1/slots a key (2-4.4%), each
# costing one more candidate to confirm. (Rounding up instead, 32 to 64 a key, gave 10,000,000
# associations 2**29 slots, 64 MiB a filter where 2**28 holds them at 26.8 a key: 64 MiB of
# the snapshot builder's and of every worker's memory for ~2% fewer false candidates.)
SLOTS_PER_KEY = 32
_SQRT2 = 2**0.5
MIN_SLOTS = 1 << 16
# Above this many slots a filter packs eight to a byte (services.lookup_index's docstring).
MAX_BYTE_SLOTS = 1 << 26
# A packed filter's bit is the key's low three bits, its byte the other 29: at most 2**29 bytes.
MAX_SLOTS = 1 << 32
_BIT = np.array([1 << i for i in range(8)], dtype=np.uint8)
# The association id of the log's marker row for a TRUNCATE (migration 0005): no row has it.
TRUNCATED = 0
# A load beside the one answering (a rebuild; an upcoming pepper's) is at work at most this
# share of the time (services.pacing): the rest of its worker's event loop is the lookups'.
BACKGROUND_LOAD_SHARE = 0.25
# A new snapshot is written once the changes held beside the mapped one pass this many (or a
# fiftieth of the index; each costs its process ~300 bytes), or once it is this old (and
# something changed since): well before the log's pruning (KEEP_CHANGES_MS) passes its id, so
# that a process starting then can still replay the log from it.
MAX_CHANGED = 20_000
SNAPSHOT_MAX_AGE_MS = KEEP_CHANGES_MS // 3


def _crc_keys(values: Iterable[str]) -> Iterator[int]:
    """CRC-32 of each value's bytes (the same in every process, for the shared snapshots). In
    C: no Python code runs per value. surrogatepass: a lookup may carry any JSON string, lone
    surrogates too; they must not raise here."""
    return map(zlib.crc32, map(str.encode, values, repeat("utf-8"), repeat("surrogatepass")))


def _threepid_keys(medium: str, addresses: Sequence[str]) -> FilterKeyArray:
    """The index key of each (medium, address) in a shared index: the CRC-32 of
    "medium\0address"."""
    return np.fromiter(_crc_keys(map(f"{medium}\0".__add__, addresses)), np.uint32, len(addresses))


def _local_keys(medium: str, addresses: Sequence[str]) -> FilterKeyArray:
    """The index key of each (medium, address) in an index no other process reads (SQLite's;
    snapshots off): Python's hash of the address, xor the medium's, cut to 32 bits. Keyed
    (SipHash, a random key per process): nobody can make up pairs that all pass the filter, as
    CRC-32's linearity lets anyone do. The address's hash alone, not a (medium, address)
    tuple's: no tuple made and hashed per address (~0.1 of ~0.22 us an address, a tenth of
    a bulk_lookup's CPU)."""
    return (np.fromiter(map(hash, addresses), np.int64, len(addresses)) ^ hash(medium)).astype(np.uint32)


ThreepidKeys = Callable[[str, Sequence[str]], FilterKeyArray]


@dataclass(frozen=True)
class _Keys:
    """How an index keys its filters: fixed for its life (a filter probed by another key
    function would say "no" wrongly). Lookup hashes: keyed with the index's own secret
    (services.filter_keys; a snapshot carries it). (medium, address) pairs: by `_local_keys`,
    or, in a shared index, `_threepid_keys` (unkeyed: left so, see docs/design.md)."""

    hashes: HashKeys
    addresses: ThreepidKeys  # (medium, its addresses) -> their keys

    def pairs(self, pairs: Iterable[tuple[str, str]]) -> FilterKeyArray:
        """The keys of (medium, address) pairs of any media (a scan of the table: long runs of
        one medium)."""
        parts = [self.addresses(medium, [a for _, a in run]) for medium, run in groupby(pairs, itemgetter(0))]
        return np.concatenate(parts) if parts else np.empty(0, np.uint32)


def _shared_keys(secret: bytes | None = None) -> _Keys:
    return _Keys(HashKeys(secret) if secret is not None else HashKeys.random(), _threepid_keys)


def _own_keys() -> _Keys:
    return _Keys(HashKeys.random(), _local_keys)


class SlotFilter:
    """A one-hash Bloom filter: a set of 32-bit keys that may say "maybe" wrongly but never
    "no" wrongly. Small ones hold a byte a slot, the slot being the key's top bits. Large ones
    (`packed`) hold a bit a slot, 8x smaller: the byte is the key's top bits, the bit in it
    the key's low three. Probed and filled a whole batch of keys at a time, with numpy: one
    gather for 1,000 keys, not a Python call each. 100,000 keys take 4 MiB here; a Python
    set of them took 7 MiB (an int object and a 16-byte entry each, in a table kept 40% empty)."""

    def __init__(self, keys: Iterable[int] | FilterKeyArray, expected: int) -> None:
        size = MIN_SLOTS
        while size * _SQRT2 < expected * SLOTS_PER_KEY and size < MAX_SLOTS:
            size *= 2
        self.packed = size > MAX_BYTE_SLOTS
        self.size = size
        self.slots: bytearray | memoryview = bytearray(size // 8 if self.packed else size)
        self._set_view()
        self.count = 0
        # A mapped filter's keys added since (see mapped): their slots, or for a packed one
        # their bytes (a byte's other bits then say "maybe" too: never a wrong "no").
        self.added: set[int] | None = None
        self._added_sorted: FilterKeyArray | None = None  # `added` as an array, for the probe
        self.add(keys)

    def _set_view(self) -> None:
        self._view = np.frombuffer(self.slots, dtype=np.uint8)
        # Top bits of a 32-bit key: as many as index a byte.
        self._shift = 32 - (len(self.slots).bit_length() - 1)

    @classmethod
    def mapped(cls, slots: memoryview, count: int, packed: bool) -> SlotFilter:
        """A filter over the read-only slots of a snapshot: keys added later go to `added`."""
        mapped = cls((), 0)
        mapped.slots, mapped.count, mapped.added, mapped.packed = slots, count, set(), packed
        mapped._set_view()
        mapped.size = len(slots) * (8 if packed else 1)
        return mapped

    def add(self, keys: Iterable[int] | FilterKeyArray) -> None:
        if isinstance(keys, np.ndarray):
            self._add(keys)
            return
        # In chunks: a list of a million slot numbers was ~40 MiB at the peak of a load.
        keys = iter(keys)
        while chunk := list(islice(keys, 65_536)):
            self._add(np.array(chunk, dtype=np.uint32))

    def _add(self, keys: FilterKeyArray) -> None:
        where = keys >> self._shift
        if self.added is not None:
            self.added.update(where.tolist())
            self._added_sorted = None
        elif self.packed:
            np.bitwise_or.at(self._view, where, _BIT[keys & 7])  # .at: repeated bytes get every bit
        else:
            self._view[where] = 1
        self.count += len(keys)

    def maybe(self, keys: Iterable[int] | FilterKeyArray) -> list[bool]:
        """For each key, True if it may be held, False if it certainly is not."""
        if not isinstance(keys, np.ndarray):
            keys = np.fromiter(keys, dtype=np.uint32)
        where = keys >> self._shift
        held = self._view[where]
        if self.packed:
            held &= _BIT[keys & 7]
        found = held.astype(bool)
        if self.added:
            if self._added_sorted is None:
                self._added_sorted = np.array(sorted(self.added), dtype=np.uint32)
            found |= np.isin(where, self._added_sorted)
        result: list[bool] = found.tolist()
        return result

    @property
    def crowded(self) -> bool:
        """Twice the keys it was sized for: time to rebuild it bigger."""
        return self.count * SLOTS_PER_KEY > 2 * self.size


@dataclass
class _Held:
    """What an index holds, as of change-log id `last_id`."""

    hashes: SlotFilter
    threepids: SlotFilter
    confirmer: CandidateConfirmer
    keys: _Keys  # what the filters were built with
    last_id: int = 0
    stale: int = 0  # associations removed since the filters were built (their slots stay set)
    snapshot: Snapshot | None = None  # what it is mapped from (None: its own memory)
    base_id: int = 0  # the log id its filters and table were built or mapped at

    def clear(self) -> None:
        """Everything went (a TRUNCATE)."""
        self.hashes, self.threepids = SlotFilter((), 0), SlotFilter((), 0)
        self.confirmer = self.confirmer.empty()
        self.stale = 0
        self.snapshot = None

    @property
    def changed(self) -> int:
        """Changes held beside a mapped snapshot."""
        return len(self.hashes.added or ()) + len(self.threepids.added or ()) + self.confirmer.changed


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
        self._held = _Held(SlotFilter((), 0), SlotFilter((), 0), confirmer.empty(), _own_keys())
        self._snapshots = confirmer.snapshots
        if self._snapshots is not None and not self._snapshots.prepare_directory():
            self._snapshots = None
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
                held = await self._fresh(None)
                await self._apply_changes(held)
                self._held = held
        else:
            held = await self._fresh(pace)
            await self._apply_changes(held)
            async with self._lock:
                await self._apply_changes(held)
                self._held = held
        took = self._clock.monotonic() - started
        slept = pace.slept if pace is not None else 0.0
        how = f"mapped from {held.snapshot.path.name}" if held.snapshot is not None else "loaded"
        logger.info("lookup index %s: %d associations in %.1f s (%.1f s of it paused)", how, len(self), took, slept)

    async def _fresh(self, pace: Pace | None) -> _Held:
        """An index as of some log id: mapped from the newest usable snapshot, else built from
        the table and written as one (by one process: the others wait for it, then map it)."""
        snapshots = self._snapshots
        if snapshots is None:
            return await self._build(pace)
        if (held := await self._mapped(snapshots)) is not None:
            return held
        async with snapshots.lock(wait=True) as ours:
            if not ours:  # the lock file cannot be made (logged): an index of our own
                return await self._build(pace)
            if (held := await self._mapped(snapshots)) is not None:
                return held  # written by the process we waited for
            wrote = snapshots.builder is not None and await snapshots.builder.run(pace)
            if wrote and (held := await self._mapped(snapshots)) is not None:
                return held
            built = await self._build(pace)
            await self._apply_changes(built)
            if not await self._write(snapshots, built):
                return built
        return await self._mapped(snapshots) or built

    async def write_snapshot(self, pace: Pace | None) -> bool:
        """Build the index from the table and write it as a snapshot, holding nothing after
        (services.index_builder's child process; the caller holds the writer's lock)."""
        if self._snapshots is None:
            return False
        built = await self._build(pace)
        await self._apply_changes(built)
        return await self._write(self._snapshots, built)

    async def _mapped(self, snapshots: IndexSnapshots) -> _Held | None:
        # The log must reach back to the snapshot's id (pruning), and a snapshot ahead of the log
        # is of some other history (a database restored, recreated): never used.
        oldest = await self._store.pruned_through()
        newest = max(await self._store.latest_id(), oldest)
        snapshot = await snapshots.newest(oldest, newest)
        if snapshot is None:
            return None
        sec = snapshot.sections
        table = MxidTable.mapped(
            TableBuffers(
                sec["keys"], sec["mxids"], sec["ends"], sec["ids"], sec["slots"], read_odd(sec["odd"]), snapshot.live
            )
        )
        return _Held(
            SlotFilter.mapped(sec["hash_filter"], snapshot.hash_count, snapshot.hash_filter_packed),
            SlotFilter.mapped(sec["threepid_filter"], snapshot.threepid_count, snapshot.threepid_filter_packed),
            self._held.confirmer.holding(table),
            _shared_keys(bytes(sec["hash_key"])),
            snapshot.last_id,
            snapshot=snapshot,
            base_id=snapshot.last_id,
        )

    async def _write(self, snapshots: IndexSnapshots, held: _Held) -> bool:
        """Write `held` (built here, answering nothing yet) as a snapshot; False if it could not
        be (logged; this process goes on with its own index, without snapshots)."""
        table = held.confirmer.table
        if table is None or held.hashes.added is not None:
            return False
        t = table.buffers()
        contents = SnapshotContents(
            held.last_id,
            self._clock.time_ms(),
            t.live,
            held.hashes.count,
            held.threepids.count,
            held.hashes.packed,
            held.threepids.packed,
            [
                held.hashes.slots,
                held.threepids.slots,
                t.keys,
                t.mxids,
                t.ends,
                t.ids,
                t.slots,
                odd_section(t.odd),
                held.keys.hashes.secret,
            ],
        )
        try:
            path = await asyncio.to_thread(snapshots.write, contents)
        except Exception as e:  # a full disk, a directory gone: never a rebuild every 2 s
            logger.warning("lookup index snapshots off: writing one in %s failed (%s)", snapshots.directory, e)
            self._snapshots = None
            return False
        logger.info("lookup index snapshot written: %s (%d associations)", path.name, t.live)
        return True

    async def _build(self, pace: Pace | None) -> _Held:
        # The log position first: changes made during the scan are applied again afterwards,
        # which is harmless (setting a slot twice changes nothing; the mxid table replays
        # each changed row's history in order, ending where the row is now).
        # Everything up to the pruning point is in the table too (the log may be empty).
        last_id = max(await self._store.latest_id(), await self._store.pruned_through())
        # The filters are sized by the count (rows added during the scan only crowd them a
        # little; a crowded filter is rebuilt): collecting the keys first to size them exactly
        # held 16 bytes an association more at the build's peak (160 MB at 10,000,000).
        expected = await self._associations.count()
        hashes, threepids = SlotFilter((), expected), SlotFilter((), expected)
        confirmer = self._held.confirmer.empty()
        # The same in every process if it may be written as a snapshot; else cheaper.
        keys = _shared_keys() if self._snapshots is not None else _own_keys()
        # Paced: the share done is counted in keys, two an association (both confirmers
        # yield every row's lookup hash and its (medium, address), in one pass or two).
        if pace is not None:
            pace.begin()
        async for batch in confirmer.load(expected):
            hashes.add(keys.hashes(batch.lookup_hashes))
            threepids.add(keys.pairs(batch.threepids))
            if pace is not None:
                await pace.step(min(0.99, (hashes.count + threepids.count) / (2 * expected)) if expected else 0.0)
        return _Held(hashes, threepids, confirmer, keys, last_id, base_id=last_id)

    async def _apply_changes(self, held: _Held) -> None:
        while True:
            changes = await self._store.since(held.last_id)
            if not changes:
                return
            # A TRUNCATE's marker: everything held goes, with whatever the log said before it.
            marker = max((i for i, c in enumerate(changes) if c.association_id == TRUNCATED), default=-1)
            if marker >= 0:
                held.clear()
                held.base_id = changes[marker].id
            await self._apply(held, changes[marker + 1 :])
            held.last_id = changes[-1].id
            if len(changes) < CHANGES_PER_READ:  # else there may be more
                return

    async def _apply(self, held: _Held, changes: Sequence[Change]) -> None:
        present_ids = [c.association_id for c in changes if c.present]
        # The rows as they are now (the log holds only the lookup hash and the row id).
        current = await self._associations.index_rows_by_id(present_ids) if present_ids else []
        slot = held.confirmer.slot
        held.hashes.add(held.keys.hashes([row_hash(row, slot) for row in current]))
        held.threepids.add(held.keys.pairs([(row.medium, row.address) for row in current]))
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

    async def mxids(self, hashes: Sequence[str]) -> dict[str, str]:
        """lookup hash -> mxid for the bound ones among `hashes` (call catch_up first)."""
        held = self._held
        # Most hashes are of people who are not bound: sort them out without a Python loop.
        candidates = list(compress(hashes, held.hashes.maybe(held.keys.hashes(hashes))))
        if not candidates:
            return {}
        return await held.confirmer.confirm_hashes(candidates)

    async def mxids_by_address(self, medium: str, addresses: Sequence[str]) -> dict[str, str]:
        """address -> mxid for the bound ones among `addresses` of `medium`, in their stored
        form (call catch_up first)."""
        held = self._held
        candidates = list(compress(addresses, held.threepids.maybe(held.keys.addresses(medium, addresses))))
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
        elif self._snapshots is not None:
            await self._maintain_shared(held, self._snapshots)
        elif held.stale > max(MAX_STALE, len(self) // 4) or held.hashes.crowded or held.threepids.crowded:
            logger.info("lookup index: rebuilding (%d associations, %d removed)", len(self), held.stale)
            await self.load(block_lookups=False, pace=Pace(self._clock, BACKGROUND_LOAD_SHARE))
        else:
            await self.catch_up()

    async def _maintain_shared(self, held: _Held, snapshots: IndexSnapshots) -> None:
        if self._newer_snapshot(held, snapshots):
            # Another process wrote a newer snapshot: switch to it (one copy for all).
            await self.load(block_lookups=False, pace=Pace(self._clock, BACKGROUND_LOAD_SHARE))
            return
        too_many = held.changed > max(MAX_CHANGED, len(self) // 50)
        too_old = held.snapshot is not None and (
            self._clock.time_ms() - held.snapshot.written_ms > SNAPSHOT_MAX_AGE_MS and held.last_id > held.base_id
        )
        if not (too_many or too_old or held.snapshot is None):
            await self.catch_up()
            return
        async with snapshots.lock(wait=False) as ours:
            if not ours or self._newer_snapshot(held, snapshots):
                await self.catch_up()  # another process is writing one, or has: switched next time
                return
            logger.info(
                "lookup index: writing a new snapshot (%d associations, %d changes since)", len(self), held.changed
            )
            built: _Held | None = None
            written = snapshots.builder is not None and await snapshots.builder.run(
                Pace(self._clock, BACKGROUND_LOAD_SHARE)
            )
            if not written:
                built = await self._build(Pace(self._clock, BACKGROUND_LOAD_SHARE))
                await self._apply_changes(built)
                written = await self._write(snapshots, built)
        if written:
            await self.load(block_lookups=False, pace=Pace(self._clock, BACKGROUND_LOAD_SHARE))  # maps it
            if built is not None:
                del built
                release_free_memory()  # the build's memory, back to the system: the mapping has it all
        else:
            assert built is not None
            async with self._lock:
                await self._apply_changes(built)
                self._held = built

    @staticmethod
    def _newer_snapshot(held: _Held, snapshots: IndexSnapshots) -> bool:
        """A snapshot file newer than what `held` stands on (one listing; checked on mapping).
        One at the same log id counts for an index of its own (after a TRUNCATE, every process
        would otherwise write the same one in turn)."""
        newest = snapshots.newest_id()
        return newest > held.base_id or (held.snapshot is None and newest == held.base_id)

    async def prune(self) -> int:
        return await self._store.prune(self._clock.time_ms() - KEEP_CHANGES_MS)
