"""3PID -> Matrix ID associations: one row per 3PID, with the signed JSON as bind returned it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from sqlalchemy import delete, func, literal, select, tuple_, update
from sqlalchemy.ext.asyncio import AsyncConnection

from sydent_lite.storage.database import Database
from sydent_lite.storage.dialect import insert_for
from sydent_lite.storage.invites import CallbackRequest, queue_callback_on
from sydent_lite.storage.peppers import SLOT_COLUMNS, live_peppers_on
from sydent_lite.storage.tables import associations as assoc


@dataclass
class StoredAssociation:
    medium: str
    address: str
    lookup_hash: str  # slot 0's hash (storage.peppers); "" if no live pepper owns the slot
    mxid: str
    ts: int
    not_before: int
    not_after: int
    signed_json: str
    lookup_hash_b: str | None = None  # slot 1's


# The live pepper of each hash slot, as a bind saw it (None: no live pepper there).
LivePeppers = tuple[str | None, str | None]


class IndexRow(NamedTuple):
    """What the lookup index needs of an association."""

    id: int
    medium: str
    address: str
    lookup_hash: str
    mxid: str
    lookup_hash_b: str | None


class IndexColumns(NamedTuple):
    """A batch of IndexRows, a column at a time: the lookup index's load takes each column
    whole (map, zip: no Python code per row)."""

    ids: Sequence[int]
    media: Sequence[str]
    addresses: Sequence[str]
    lookup_hashes: Sequence[str]
    mxids: Sequence[str]
    lookup_hashes_b: Sequence[str | None]


_INDEX_COLUMNS = ", ".join(IndexRow._fields)
_INDEX_SELECT = tuple(assoc.c[name] for name in IndexRow._fields)
_STORED_COLUMNS = ", ".join(StoredAssociation.__dataclass_fields__)


async def _upsert_on(conn: AsyncConnection, a: StoredAssociation) -> None:
    values = a.__dict__.copy()
    stmt = insert_for(conn, assoc).values(**values)
    stmt = stmt.on_conflict_do_update(
        index_elements=["medium", "address"],
        set_={k: v for k, v in values.items() if k not in ("medium", "address")},
    )
    await conn.execute(stmt)


class AssociationStore:
    def __init__(self, database: Database) -> None:
        self._db = database
        self.database = database
        self._reader = reader = database.reader
        # v1 lookup's hot path.
        where = f"medium = {reader.param(1)} AND address = {reader.param(2)}"
        self._get_sql = f"SELECT {_STORED_COLUMNS} FROM {assoc.name} WHERE {where}"
        self._signed_json_sql = f"SELECT signed_json FROM {assoc.name} WHERE {where}"

    async def upsert(self, a: StoredAssociation) -> None:
        """Insert, or replace the association of that 3PID in one statement (no lost race)."""
        async with self._db.begin() as conn:
            await _upsert_on(conn, a)

    async def bind(
        self,
        a: StoredAssociation,
        callback: CallbackRequest | None,
        peppers: LivePeppers | None = None,
        rehash: Callable[[LivePeppers], StoredAssociation] | None = None,
        now: int = 0,
    ) -> int | None:
        """Store the association and queue the onbind callback of the 3PID's pending invites,
        in one transaction: both are stored or neither is (a crash in between cannot leave a
        bound address whose invites are never sent). Returns the callback id, if one was queued.

        The upsert comes first: it takes the 3PID's row lock (PostgreSQL) or the write lock
        (SQLite), so concurrent binds of one address take turns, and the later ones find the
        invites already claimed.

        `peppers`: the live peppers `a` was hashed for. Read again after the upsert, under the
        lock that a rotation's start takes too (storage.peppers): if a rotation started
        meanwhile, the row is written again with `rehash(peppers as they are)`, so that no
        bind is left without the new pepper's hash.
        """
        async with self._db.begin() as conn:
            await _upsert_on(conn, a)
            if peppers is not None and rehash is not None:
                live = await live_peppers_on(conn, now)
                if live != peppers:
                    await _upsert_on(conn, rehash(live))
            return await queue_callback_on(conn, callback) if callback is not None else None

    async def delete(self, medium: str, address: str, mxid: str) -> bool:
        async with self._db.begin() as conn:
            result = await conn.execute(
                delete(assoc).where(assoc.c.medium == medium, assoc.c.address == address, assoc.c.mxid == mxid)
            )
        return result.rowcount > 0

    async def get(self, medium: str, address: str) -> StoredAssociation | None:
        found = await self._reader.first(self._get_sql, (medium, address))
        return StoredAssociation(*found) if found else None

    async def signed_json(self, medium: str, address: str) -> str | None:
        """The 3PID's signed association as stored (v1 lookup's hot path: one column, no row object)."""
        found = await self._reader.first(self._signed_json_sql, (medium, address))
        return found[0] if found else None

    async def mxids_by_hash(self, hashes: Sequence[str], slot: int = 0) -> dict[str, str]:
        """lookup hash (of hash slot `slot`) -> mxid for the bound ones among `hashes` (the lookup
        index's candidates)."""
        column = SLOT_COLUMNS[slot]
        found: dict[str, str] = {}
        for among, args in self._reader.in_list(column, list(set(hashes)), 1):
            found.update(await self._reader.all(f"SELECT {column}, mxid FROM {assoc.name} WHERE {among}", args))
        return found

    async def mxids_by_address(self, medium: str, addresses: Sequence[str]) -> dict[str, str]:
        """address -> mxid for the bound ones among `addresses` of `medium` (stored forms)."""
        reader = self._reader
        found: dict[str, str] = {}
        for among, args in reader.in_list("address", list(set(addresses)), 2):
            sql = f"SELECT address, mxid FROM {assoc.name} WHERE medium = {reader.param(1)} AND {among}"
            found.update(await reader.all(sql, (medium, *args)))
        return found

    async def index_rows_by_id(self, ids: Sequence[int]) -> list[IndexRow]:
        """The rows with these ids that still exist."""
        rows: list[IndexRow] = []
        for among, args in self._reader.in_list("id", list(set(ids)), 1):
            found = await self._reader.all(f"SELECT {_INDEX_COLUMNS} FROM {assoc.name} WHERE {among}", args)
            rows += map(IndexRow._make, found)
        return rows

    async def all_hashes(self, batch: int = 2_000, slot: int = 0) -> AsyncIterator[list[str]]:
        """Every lookup hash of slot `slot`, in batches, in the order of its index."""
        # With the id: the keyset pagination needs a unique key (rows may share a hash).
        async for rows in self._scan_in_key_order((assoc.c[SLOT_COLUMNS[slot]], assoc.c.id), batch):
            yield [lookup_hash for lookup_hash, _id in rows]

    def all_threepids(self, batch: int = 2_000) -> AsyncIterator[list[tuple[str, str]]]:
        """Every (medium, address), in batches, in the order of their unique index."""
        return self._scan_in_key_order((assoc.c.medium, assoc.c.address), batch)

    async def _scan_in_key_order(self, key: tuple[Any, ...], batch: int) -> AsyncIterator[list[Any]]:
        """The whole table's `key` columns (unique together), a batch per short read.

        Keyset pagination in the order of an index that covers the columns: no long read of
        a big table, and the table itself (every signed association) is not pulled through
        the page cache.
        """
        after: tuple[Any, ...] | None = None
        while True:
            query = select(*key).where(key[0].is_not(None)).order_by(*key).limit(batch)
            if after is not None:
                query = query.where(tuple_(*key) > tuple_(*map(literal, after)))
            async with self._db.connect() as conn:
                rows = [tuple(r) for r in await conn.execute(query)]
            if not rows:
                return
            after = rows[-1]
            yield rows

    async def count(self) -> int:
        async with self._db.connect() as conn:
            return (await conn.execute(select(func.count()).select_from(assoc))).scalar() or 0

    async def all_index_columns(self, batch: int = 2_000) -> AsyncIterator[IndexColumns]:
        """Every row's IndexRow, a batch of columns at a time, in id order: one pass over the
        table (the lookup index's start when it holds the mxids)."""
        async for rows in self._scan_by_id(_INDEX_SELECT, batch):
            yield IndexColumns._make(zip(*rows, strict=True))

    def iter_threepids(self, batch: int = 1000) -> AsyncIterator[list[tuple[int, str, str]]]:
        """(id, medium, address) in batches, for recomputing lookup hashes."""
        return self._scan_by_id((assoc.c.id, assoc.c.medium, assoc.c.address), batch)

    async def _scan_by_id(self, columns: tuple[Any, ...], batch: int) -> AsyncIterator[list[Any]]:
        """`columns` (the first one `id`) of every row, a batch per short read, in id order."""
        last_id = 0
        while True:
            async with self._db.connect() as conn:
                query = select(*columns).where(assoc.c.id > last_id).order_by(assoc.c.id).limit(batch)
                rows = [tuple(r) for r in await conn.execute(query)]
            if not rows:
                return
            last_id = rows[-1][0]
            yield rows

    async def set_hashes(self, id_to_hash: dict[int, str]) -> None:
        async with self._db.begin() as conn:
            for row_id, h in id_to_hash.items():
                await conn.execute(update(assoc).where(assoc.c.id == row_id).values(lookup_hash=h))
