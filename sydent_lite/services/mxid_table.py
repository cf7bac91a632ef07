"""Every association's lookup hash -> Matrix ID, in memory, exact, in ~85 bytes each.

On PostgreSQL the lookup index (services.lookup_index) answers its candidates from here
instead of asking the database: confirming ~130 candidates of a 1,000-hash lookup cost
PostgreSQL ~1 ms of CPU (a B-tree descent each), about as much as the whole lookup cost the
worker, and the database is the one thing every worker shares. (On SQLite the database is
in-process and that read costs ~0.1 ms; the memory is not spent there.)

Layout, no Python object per association:
- `_keys`: each row's lookup hash, 43 ASCII bytes (unpadded base64 of a SHA-256 digest),
  row after row.
- `_mxids` and `_ends`: the rows' Matrix IDs (UTF-8) one after another, and where each ends.
- `_ids`: each row's association id. A removal names the association it removes: it drops
  the entry only if the entry is still that association's (two rows with one lookup hash
  take SHA-256 collisions, or hand-written SQL; neither may make the other one vanish).
- `_slots`: an open-addressing table (linear probing) of row number + 1 (0: empty), at
  most 60% full, keyed by the CRC-32 of the hash's bytes: the same in every process (Python's
  str hash is not), so that a table written to a snapshot file (services.index_snapshot) is
  read by every worker as it was written. (CRC-32 is no secret; it does not need to be: the
  stored hashes are SHA-256 digests under a pepper, nobody chooses where they land.)
A rebind appends a new row and points the slot at it; a removal empties the slot (backward
shift, no tombstones). Rows left behind are dropped when the lookup index rebuilds (it counts
removals itself). A stored hash of another shape (none are written by this server;
hand-written SQL could) lives in the small `_odd` dict.

A *mapped* table (`MxidTable.mapped`) reads its rows and slots from read-only buffers (a
snapshot file every worker maps) and keeps the changes made since in `_over`, a dict of
lookup hash -> (mxid, association id), mxid None for a removal, which wins over the rows.
"""

from __future__ import annotations

import zlib
from array import array
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

KEY_SIZE = 43  # unpadded base64 of a 32-byte digest
MAX_LOAD = 0.6
MIN_SLOTS = 1 << 10


def _key_bytes(lookup_hash: str) -> bytes | None:
    if len(lookup_hash) != KEY_SIZE or not lookup_hash.isascii():
        return None
    return lookup_hash.encode("ascii")


@dataclass
class TableBuffers:
    """A table's contents as flat buffers (what a snapshot file holds)."""

    keys: Any  # buffers: bytes-like, or memoryviews of a mapped file ("I" for the arrays)
    mxids: Any
    ends: Any
    ids: Any
    slots: Any
    odd: dict[str, tuple[str, int]]
    live: int


class MxidTable:
    def __init__(self, expected: int = 0) -> None:
        size = MIN_SLOTS
        while size * MAX_LOAD < expected:
            size *= 2
        self._keys = bytearray()
        self._mxids = bytearray()
        self._ends = array("I")  # 4 GiB of mxids: far more associations than memory holds
        self._ids = array("I")  # PostgreSQL's associations.id is a 32-bit integer
        self._slots = array("I", bytes(4 * size))
        self._mask = size - 1
        self._odd: dict[str, tuple[str, int]] = {}
        self._live = 0
        self._over: dict[str, tuple[str | None, int]] = {}
        self._mapped = False

    @classmethod
    def mapped(cls, buffers: TableBuffers) -> MxidTable:
        """A table over read-only buffers; changes go to its overlay."""
        table = cls.__new__(cls)
        table._keys, table._mxids, table._ends, table._ids = buffers.keys, buffers.mxids, buffers.ends, buffers.ids
        table._slots = buffers.slots
        table._mask = len(buffers.slots) - 1
        table._odd = dict(buffers.odd)
        table._live = buffers.live
        table._over = {}
        table._mapped = True
        return table

    def buffers(self) -> TableBuffers:
        """What a snapshot of this (unmapped) table writes."""
        if self._mapped:
            raise ValueError("a mapped table is written by merging, not as it is")
        return TableBuffers(self._keys, self._mxids, self._ends, self._ids, self._slots, self._odd, self._live)

    @property
    def changed(self) -> int:
        """Changes held beside the mapped rows (0 for a table of its own)."""
        return len(self._over)

    def __len__(self) -> int:
        return self._live + len(self._odd)

    def get_many(self, hashes: Iterable[str]) -> dict[str, str]:
        """lookup hash -> mxid for those of `hashes` that are held."""
        out: dict[str, str] = {}
        # _find and _mxid, inlined: this loop runs for every candidate of every lookup.
        slots, keys, mask, ends, mxids, over = self._slots, self._keys, self._mask, self._ends, self._mxids, self._over
        crc32 = zlib.crc32
        for lookup_hash in hashes:
            if over and lookup_hash in over:
                if (mxid := over[lookup_hash][0]) is not None:
                    out[lookup_hash] = mxid
                continue
            if len(lookup_hash) != KEY_SIZE or not lookup_hash.isascii():
                if lookup_hash in self._odd:
                    out[lookup_hash] = self._odd[lookup_hash][0]
                continue
            key = lookup_hash.encode("ascii")
            slot = crc32(key) & mask
            while entry := slots[slot]:
                start = (entry - 1) * KEY_SIZE
                if keys[start : start + KEY_SIZE] == key:
                    row = entry - 1
                    out[lookup_hash] = str(mxids[ends[row - 1] if row else 0 : ends[row]], "utf-8")
                    break
                slot = (slot + 1) & mask
        return out

    def set(self, lookup_hash: str, mxid: str, association_id: int) -> None:
        if self._mapped:
            now = self._current(lookup_hash)
            if now != (mxid, association_id):
                self._live += now is None
                self._over[lookup_hash] = (mxid, association_id)
            return
        key = _key_bytes(lookup_hash)
        if key is None:
            self._odd[lookup_hash] = (mxid, association_id)
            return
        slot, row = self._find(lookup_hash, key)
        if row >= 0:
            if self._ids[row] == association_id and self._mxid(row) == mxid:
                return
            # Rebound: a new row; the old one stays behind until the next rebuild.
        else:
            self._live += 1
        self._slots[slot] = self._append(key, mxid, association_id) + 1
        if self._live > MAX_LOAD * len(self._slots):
            self._resize(2 * len(self._slots))

    def discard(self, lookup_hash: str, association_id: int) -> None:
        """Forget `lookup_hash` if association `association_id` is the one it maps to."""
        if self._mapped:
            now = self._current(lookup_hash)
            if now is not None and now[1] == association_id:
                self._live -= 1
                self._over[lookup_hash] = (None, association_id)
            return
        key = _key_bytes(lookup_hash)
        if key is None:
            if self._odd.get(lookup_hash, ("", -1))[1] == association_id:
                del self._odd[lookup_hash]
            return
        slot, row = self._find(lookup_hash, key)
        if row < 0 or self._ids[row] != association_id:
            return
        self._live -= 1
        self._empty(slot)

    def _current(self, lookup_hash: str) -> tuple[str, int] | None:
        """(mxid, association id) that `lookup_hash` maps to now, or None."""
        if lookup_hash in self._over:
            mxid, association_id = self._over[lookup_hash]
            return None if mxid is None else (mxid, association_id)
        key = _key_bytes(lookup_hash)
        if key is None:
            return self._odd.get(lookup_hash)
        _, row = self._find(lookup_hash, key)
        return None if row < 0 else (self._mxid(row), self._ids[row])

    # --- the table ------------------------------------------------------------------------

    def _find(self, lookup_hash: str, key: bytes) -> tuple[int, int]:
        """(slot, row) of `key`, or (the empty slot where it would go, -1)."""
        slots, keys, mask = self._slots, self._keys, self._mask
        slot = zlib.crc32(key) & mask
        while True:
            entry = slots[slot]
            if entry == 0:
                return slot, -1
            start = (entry - 1) * KEY_SIZE
            if keys[start : start + KEY_SIZE] == key:
                return slot, entry - 1
            slot = (slot + 1) & mask

    def _append(self, key: bytes, mxid: str, association_id: int) -> int:
        self._ids.append(association_id)
        self._keys += key
        self._mxids += mxid.encode("utf-8")
        self._ends.append(len(self._mxids))
        return len(self._ends) - 1

    def _mxid(self, row: int) -> str:
        start = self._ends[row - 1] if row else 0
        return str(self._mxids[start : self._ends[row]], "utf-8")

    def _row_home(self, entry: int) -> int:
        start = (entry - 1) * KEY_SIZE
        return zlib.crc32(self._keys[start : start + KEY_SIZE]) & self._mask

    def _empty(self, slot: int) -> None:
        """Empty `slot`, moving later entries of its run back so every entry stays reachable
        from its home slot (linear probing's deletion without tombstones)."""
        slots, mask = self._slots, self._mask
        slots[slot] = 0
        hole, probe = slot, slot
        while True:
            probe = (probe + 1) & mask
            entry = slots[probe]
            if entry == 0:
                return
            home = self._row_home(entry)
            # The entry may fill the hole unless its home lies cyclically in (hole, probe].
            if (hole < home <= probe) if hole <= probe else (home > hole or home <= probe):
                continue
            slots[hole] = entry
            slots[probe] = 0
            hole = probe

    def _resize(self, size: int) -> None:
        old = self._slots
        self._slots = array("I", bytes(4 * size))
        self._mask = size - 1
        slots, mask = self._slots, self._mask
        for entry in old:
            if not entry:
                continue
            slot = self._row_home(entry)
            while slots[slot]:
                slot = (slot + 1) & mask
            slots[slot] = entry
