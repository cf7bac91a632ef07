"""3PID -> Matrix ID associations: one row per 3PID, with the signed JSON as bind returned it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, func, literal, select, tuple_, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from sydent_lite.storage.batching import chunks
from sydent_lite.storage.dialect import insert_for
from sydent_lite.storage.invites import CallbackRequest, queue_callback_on
from sydent_lite.storage.readers import SQLITE_IN_CHUNK, hot_reader
from sydent_lite.storage.tables import associations as assoc


@dataclass
class StoredAssociation:
    medium: str
    address: str
    lookup_hash: str
    mxid: str
    ts: int
    not_before: int
    not_after: int
    signed_json: str


# What the lookup index needs of a row.
IndexRow = tuple[int, str, str, str, str]  # id, medium, address, lookup_hash, mxid
_INDEX_SELECT = (assoc.c.id, assoc.c.medium, assoc.c.address, assoc.c.lookup_hash, assoc.c.mxid)

_GET_SQL = (
    f"SELECT {', '.join(StoredAssociation.__dataclass_fields__)} FROM {assoc.name} WHERE medium = ? AND address = ?"
)


async def _upsert_on(conn: AsyncConnection, a: StoredAssociation) -> None:
    values = a.__dict__.copy()
    stmt = insert_for(conn, assoc).values(**values)
    stmt = stmt.on_conflict_do_update(
        index_elements=["medium", "address"],
        set_={k: v for k, v in values.items() if k not in ("medium", "address")},
    )
    await conn.execute(stmt)


class AssociationStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._reader = hot_reader(engine)

    async def upsert(self, a: StoredAssociation) -> None:
        """Insert, or replace the association of that 3PID in one statement (no lost race)."""
        async with self._engine.begin() as conn:
            await _upsert_on(conn, a)

    async def bind(self, a: StoredAssociation, callback: CallbackRequest | None) -> int | None:
        """Store the association and queue the onbind callback of the 3PID's pending invites,
        in one transaction: both are stored or neither is (a crash in between cannot leave a
        bound address whose invites are never sent). Returns the callback id, if one was queued.

        The upsert comes first: it takes the 3PID's row lock (PostgreSQL) or the write lock
        (SQLite), so concurrent binds of one address take turns, and the later ones find the
        invites already claimed.
        """
        async with self._engine.begin() as conn:
            await _upsert_on(conn, a)
            return await queue_callback_on(conn, callback) if callback is not None else None

    async def delete(self, medium: str, address: str, mxid: str) -> bool:
        async with self._engine.begin() as conn:
            result = await conn.execute(
                delete(assoc).where(assoc.c.medium == medium, assoc.c.address == address, assoc.c.mxid == mxid)
            )
        return result.rowcount > 0

    async def get(self, medium: str, address: str) -> StoredAssociation | None:
        if self._reader is not None:  # v1 lookup's hot path
            found = await self._reader.first(_GET_SQL, (medium, address))
            return StoredAssociation(*found) if found else None
        cols = [assoc.c[k] for k in StoredAssociation.__dataclass_fields__]
        async with self._engine.connect() as conn:
            row = (
                await conn.execute(select(*cols).where(assoc.c.medium == medium, assoc.c.address == address))
            ).mappings().first()
        return StoredAssociation(**row) if row else None

    async def mxids_by_hash(self, hashes: Sequence[str]) -> dict[str, str]:
        """lookup_hash -> mxid for the bound ones among `hashes` (the lookup index's candidates)."""
        wanted = list(set(hashes))
        if self._reader is not None:
            sql = f"SELECT lookup_hash, mxid FROM {assoc.name} WHERE lookup_hash {{among}}"
            return dict(await self._reader.all_among(sql, (), wanted))
        return dict(await self._select_among((assoc.c.lookup_hash, assoc.c.mxid), assoc.c.lookup_hash, wanted))

    async def mxids_by_address(self, medium: str, addresses: Sequence[str]) -> dict[str, str]:
        """address -> mxid for the bound ones among `addresses` of `medium` (stored forms)."""
        wanted = list(set(addresses))
        if self._reader is not None:
            sql = f"SELECT address, mxid FROM {assoc.name} WHERE medium = ? AND address {{among}}"
            return dict(await self._reader.all_among(sql, (medium,), wanted))
        return dict(await self._select_among((assoc.c.address, assoc.c.mxid), assoc.c.address, wanted, assoc.c.medium == medium))

    async def index_rows_by_id(self, ids: Sequence[int]) -> list[IndexRow]:
        """(id, medium, address, lookup_hash, mxid) of the rows with these ids that still exist."""
        wanted = list(set(ids))
        if self._reader is not None:
            sql = f"SELECT id, medium, address, lookup_hash, mxid FROM {assoc.name} WHERE id {{among}}"
            return await self._reader.all_among(sql, (), wanted)  # type: ignore[return-value]
        return await self._select_among(_INDEX_SELECT, assoc.c.id, wanted)  # type: ignore[return-value]

    async def _select_among(self, columns: tuple[Any, ...], key: Any, values: list[Any], *where: Any) -> list[tuple[Any, ...]]:
        """`columns` of the rows whose `key` is among `values` (and that match `where`): for
        in-memory SQLite, which has no hot reader (tests)."""
        out: list[tuple[Any, ...]] = []
        async with self._engine.connect() as conn:
            for chunk in chunks(values, SQLITE_IN_CHUNK):
                rows = await conn.execute(select(*columns).where(key.in_(list(chunk)), *where))
                out.extend(tuple(r) for r in rows)
        return out

    def all_hashes(self, batch: int = 2_000) -> AsyncIterator[list[tuple[str, int]]]:
        """Every (lookup_hash, id), in batches, in the order of the lookup_hash index."""
        return self._scan_in_key_order((assoc.c.lookup_hash, assoc.c.id), batch)

    def all_threepids(self, batch: int = 2_000) -> AsyncIterator[list[tuple[str, str]]]:
        """Every (medium, address), in batches, in the order of their unique index."""
        return self._scan_in_key_order((assoc.c.medium, assoc.c.address), batch)

    async def _scan_in_key_order(self, key: tuple[Any, ...], batch: int) -> AsyncIterator[list[tuple[Any, ...]]]:
        """The whole table's `key` columns (unique together), a batch per short read.

        Keyset pagination in the order of an index that covers the columns: no long read of
        a big table, and the table itself (every signed association) is not pulled through
        the page cache.
        """
        after: tuple[Any, ...] | None = None
        while True:
            query = select(*key).order_by(*key).limit(batch)
            if after is not None:
                query = query.where(tuple_(*key) > tuple_(*map(literal, after)))
            async with self._engine.connect() as conn:
                rows = [tuple(r) for r in await conn.execute(query)]
            if not rows:
                return
            after = rows[-1]
            yield rows

    async def count(self) -> int:
        async with self._engine.connect() as conn:
            return (await conn.execute(select(func.count()).select_from(assoc))).scalar() or 0

    def all_index_rows(self, batch: int = 2_000) -> AsyncIterator[list[IndexRow]]:
        """Every (id, medium, address, lookup_hash, mxid), in batches, in id order: one pass
        over the table (the lookup index's start when it holds the mxids)."""
        return self._scan_by_id(_INDEX_SELECT, batch)  # type: ignore[return-value]

    def iter_threepids(self, batch: int = 1000) -> AsyncIterator[list[tuple[int, str, str]]]:
        """(id, medium, address) in batches, for recomputing lookup hashes."""
        return self._scan_by_id((assoc.c.id, assoc.c.medium, assoc.c.address), batch)  # type: ignore[return-value]

    async def _scan_by_id(self, columns: tuple[Any, ...], batch: int) -> AsyncIterator[list[tuple[Any, ...]]]:
        """`columns` (the first one `id`) of every row, a batch per short read, in id order."""
        last_id = 0
        while True:
            async with self._engine.connect() as conn:
                query = select(*columns).where(assoc.c.id > last_id).order_by(assoc.c.id).limit(batch)
                rows = [tuple(r) for r in await conn.execute(query)]
            if not rows:
                return
            last_id = rows[-1][0]
            yield rows

    async def set_hashes(self, id_to_hash: dict[int, str]) -> None:
        async with self._engine.begin() as conn:
            for row_id, h in id_to_hash.items():
                await conn.execute(update(assoc).where(assoc.c.id == row_id).values(lookup_hash=h))
