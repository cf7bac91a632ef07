"""Where the lookup index confirms its candidates: in memory (the default) or in the database.

The index's slot filters (services.lookup_index) sort out most of a lookup's misses, and only
say "maybe" of the rest: each candidate is then confirmed by its full lookup hash or address,
here. Which confirmer a server uses is chosen once, at start (context.py,
`lookup.mxids_in_memory`):

- `MemoryConfirmer` (the default): every lookup hash with its mxid in memory
  (services.mxid_table, ~85 bytes an association), kept exact by the change log. Reading the
  candidates from the database cost PostgreSQL ~1 ms of CPU per lookup (and the database is
  what every worker shares), and SQLite ~0.4 ms of a 1.2 ms lookup. bulk_lookup's candidate
  addresses are hashed (SHA-256, only the candidates) and confirmed there too.
- `DatabaseConfirmer`: an indexed read of the database per lookup; it holds nothing.

Besides the two confirmations, a confirmer says how the index loads (what it scans of the
table, feeding itself on the way) and takes the log's changes as the index applies them.

Each confirmer reads one hash slot of the table (storage.peppers: one per live pepper); during
a rotation a process holds one index, and so one confirmer, per live pepper.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import deque
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import NamedTuple

from sydent_lite.services.hashing import lookup_hash
from sydent_lite.services.index_snapshot import IndexSnapshots
from sydent_lite.services.mxid_table import MxidTable
from sydent_lite.storage.association_changes import Change
from sydent_lite.storage.associations import AssociationStore, IndexRow


class FilterKeys(NamedTuple):
    """Values for the index's two slot filters, from a batch of the table."""

    lookup_hashes: Iterable[str]
    threepids: Iterable[tuple[str, str]]  # (medium, address)


def row_hash(row: IndexRow, slot: int) -> str:
    """The row's lookup hash in hash slot `slot`."""
    return (row.lookup_hash if slot == 0 else row.lookup_hash_b) or ""


def change_hash(change: Change, slot: int) -> str:
    return change.lookup_hash if slot == 0 else change.lookup_hash_b


class CandidateConfirmer(ABC):
    slot: int = 0
    # Where snapshots of the index are shared between processes (None: each holds its own).
    snapshots: IndexSnapshots | None = None
    # The mxid table, if it holds one (what a snapshot writes).
    table: MxidTable | None = None

    @property
    def changed(self) -> int:
        """Changes held beside a mapped table."""
        return self.table.changed if self.table is not None else 0

    def holding(self, table: MxidTable) -> CandidateConfirmer:
        """One of this kind answering from `table` (mapped from a snapshot)."""
        raise NotImplementedError(f"{type(self).__name__} holds no table")

    @abstractmethod
    async def confirm_hashes(self, hashes: Sequence[str]) -> dict[str, str]:
        """lookup hash -> mxid for the bound ones among `hashes`."""

    @abstractmethod
    async def confirm_addresses(self, medium: str, addresses: Sequence[str]) -> dict[str, str]:
        """address -> mxid for the bound ones among `addresses` of `medium` (stored forms)."""

    # --- what keeps it current ----------------------------------------------------------

    @abstractmethod
    def empty(self) -> CandidateConfirmer:
        """One of this kind that holds nothing: for a (re)load, or after a TRUNCATE."""

    @abstractmethod
    def load(self, expected: int) -> AsyncIterator[FilterKeys]:
        """Read the whole table (taking what this confirmer holds), yielding the filters' keys;
        `expected`: how many rows it has (counted just before)."""

    @abstractmethod
    def apply(self, changes: Sequence[Change], current: Sequence[IndexRow]) -> None:
        """Take `changes`, in the log's order; `current`: the rows of the ones present, as they
        are now (a row deleted meanwhile is missing: its deletion is further on in the log)."""


class DatabaseConfirmer(CandidateConfirmer):
    """Candidates confirmed by an indexed read of the database; nothing held."""

    def __init__(self, associations: AssociationStore, slot: int = 0) -> None:
        self._associations = associations
        self.slot = slot

    async def confirm_hashes(self, hashes: Sequence[str]) -> dict[str, str]:
        return await self._associations.mxids_by_hash(hashes, self.slot)

    async def confirm_addresses(self, medium: str, addresses: Sequence[str]) -> dict[str, str]:
        return await self._associations.mxids_by_address(medium, addresses)

    def empty(self) -> DatabaseConfirmer:
        return self

    async def load(self, expected: int) -> AsyncIterator[FilterKeys]:
        # Two scans of indexes that cover the columns: the table's rows (each with its signed
        # association) are not read.
        async for hashes in self._associations.all_hashes(slot=self.slot):
            yield FilterKeys(hashes, ())
        async for threepids in self._associations.all_threepids():
            yield FilterKeys((), threepids)

    def apply(self, changes: Sequence[Change], current: Sequence[IndexRow]) -> None:
        pass


class MemoryConfirmer(CandidateConfirmer):
    """Candidates confirmed in an exact in-memory table of every lookup hash and its mxid."""

    def __init__(
        self,
        associations: AssociationStore,
        pepper: str,
        table: MxidTable | None = None,
        slot: int = 0,
        snapshots: IndexSnapshots | None = None,
    ) -> None:
        """`pepper`: the one every lookup hash of slot `slot` is computed with (services.peppers).
        `snapshots`: where the index is shared with the other processes (services.index_snapshot)."""
        self._associations = associations
        self._pepper = pepper
        self.slot = slot
        self.snapshots = snapshots
        self._table = table if table is not None else MxidTable()

    @property
    def table(self) -> MxidTable:  # type: ignore[override]
        return self._table

    def holding(self, table: MxidTable) -> MemoryConfirmer:
        return MemoryConfirmer(self._associations, self._pepper, table, self.slot, self.snapshots)

    async def confirm_hashes(self, hashes: Sequence[str]) -> dict[str, str]:
        return self._table.get_many(hashes)

    async def confirm_addresses(self, medium: str, addresses: Sequence[str]) -> dict[str, str]:
        by_hash = {lookup_hash(a, medium, self._pepper): a for a in addresses}
        return {by_hash[h]: mxid for h, mxid in self._table.get_many(by_hash).items()}

    def empty(self) -> MemoryConfirmer:
        return MemoryConfirmer(self._associations, self._pepper, slot=self.slot, snapshots=self.snapshots)

    async def load(self, expected: int) -> AsyncIterator[FilterKeys]:
        # One pass over the whole rows: PostgreSQL reads them from the table anyway (its
        # index-only scans need a vacuumed table).
        self._table = table = MxidTable(expected)
        async for batch in self._associations.all_index_columns():
            hashes = batch.lookup_hashes if self.slot == 0 else [h or "" for h in batch.lookup_hashes_b]
            deque(map(table.set, hashes, batch.mxids, batch.ids), maxlen=0)
            yield FilterKeys(hashes, zip(batch.media, batch.addresses, strict=True))

    def apply(self, changes: Sequence[Change], current: Sequence[IndexRow]) -> None:
        # A removal drops its hash (if it is still that association's); an addition sets the
        # row's hash and mxid as they are now (any later change of that row follows in the log).
        now = {row.id: row for row in current}
        slot = self.slot
        for change in changes:
            if not change.present:
                self._table.discard(change_hash(change, slot), change.association_id)
            elif (row := now.get(change.association_id)) is not None:
                self._table.set(row_hash(row, slot), row.mxid, row.id)
