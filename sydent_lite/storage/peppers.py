"""The lookup pepper schedule (table `lookup_peppers`, migration 0009) and the rehash's writes.

Every worker reads the schedule; the times in it are what make them switch together. What is
written here, and under which lock, is what keeps a rotation and concurrent binds from missing
each other (services.peppers explains the whole protocol):

- `start_rotation` inserts the new pepper's row holding the lock every bind takes (on
  PostgreSQL the change log's EXCLUSIVE lock, which the association trigger takes; on SQLite
  the write lock). A bind re-reads the live peppers after its upsert, under that lock
  (`live_peppers_on`): either it committed before the rotation started (and the rehash, which
  starts after, reads its row), or it sees the new pepper and writes that hash too.
- `write_hashes` fills one slot for a batch of rows; the address of a row id never changes
  (a rebind is an upsert on (medium, address)), so a rehash write and a concurrent bind of the
  same row write the same value.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from sqlalchemy import bindparam, delete, func, insert, select, text, update
from sqlalchemy.ext.asyncio import AsyncConnection

from sydent_lite.storage.database import Database
from sydent_lite.storage.dialect import insert_for
from sydent_lite.storage.tables import associations as assoc
from sydent_lite.storage.tables import lookup_peppers as peppers
from sydent_lite.storage.tables import server_state

# The two hash columns of `associations`, by slot.
SLOT_COLUMNS = ("lookup_hash", "lookup_hash_b")
# server_state keys from before the schedule existed (services.hashing): still how a pepper
# set by hand, or by an import, is recognised (`lookup_pepper` != `lookup_hashes_pepper`).
PEPPER_KEY = "lookup_pepper"
HASHED_WITH_KEY = "lookup_hashes_pepper"


@dataclass(frozen=True)
class PepperRow:
    id: int
    pepper: str
    slot: int
    created_ms: int
    activates_ms: int | None
    retires_ms: int | None
    rehashed_through: int
    claimed_by: str
    claimed_until_ms: int

    def retired(self, now: int) -> bool:
        return self.retires_ms is not None and self.retires_ms <= now


_COLUMNS = tuple(peppers.c[name] for name in PepperRow.__dataclass_fields__)


def latest_per_slot(rows: Sequence[PepperRow], now: int) -> list[PepperRow | None]:
    """The live pepper of each slot: the slot's newest row, unless it is retired."""
    out: list[PepperRow | None] = [None, None]
    for row in sorted(rows, key=lambda r: r.id):
        out[row.slot] = row
    return [row if row is not None and not row.retired(now) else None for row in out]


async def _take_write_lock(conn: AsyncConnection) -> None:
    """The lock binds take (their trigger's, on PostgreSQL; SQLite's write lock), taken now."""
    if conn.dialect.name == "postgresql":
        await conn.execute(text("LOCK TABLE association_changes IN EXCLUSIVE MODE"))
    else:  # a write, even of nothing, takes SQLite's write lock for the transaction
        await conn.execute(update(peppers).where(peppers.c.id == -1).values(slot=0))


async def live_peppers_on(conn: AsyncConnection, now: int) -> tuple[str | None, str | None]:
    """The pepper of each slot that a bind must hash for (inside the bind's transaction)."""
    rows = await _rows_on(conn)
    return tuple(row.pepper if row is not None else None for row in latest_per_slot(rows, now))  # type: ignore[return-value]


async def _set_state_keys(conn: AsyncConnection, pepper: str) -> None:
    for name in (PEPPER_KEY, HASHED_WITH_KEY):
        stmt = insert_for(conn, server_state).values(name=name, value=pepper)
        await conn.execute(stmt.on_conflict_do_update(index_elements=["name"], set_={"value": pepper}))


async def _rows_on(conn: AsyncConnection) -> list[PepperRow]:
    return [PepperRow(*r) for r in await conn.execute(select(*_COLUMNS).order_by(peppers.c.id))]


class PepperStore:
    def __init__(self, database: Database) -> None:
        self._db = database
        self.dialect = database.dialect

    async def rows(self) -> list[PepperRow]:
        """The whole schedule, oldest first (a handful of rows: every worker polls it)."""
        async with self._db.connect() as conn:
            return await _rows_on(conn)

    async def create_first(self, pepper: str, now: int) -> None:
        """The first pepper, current from `now`, in slot 0 (unless one exists: first writer wins)."""
        async with self._db.begin() as conn:
            await _take_write_lock(conn)
            if not await _rows_on(conn):
                await conn.execute(insert(peppers).values(pepper=pepper, slot=0, created_ms=now, activates_ms=now))

    async def set_current_pepper(self, pepper: str, now: int) -> None:
        """Make `pepper` the only live pepper, current from `now`, in slot 0 (`lookup_hash`).

        For a pepper brought from elsewhere (import-sydent: Sydent's). Every other pepper is
        retired at once; the caller writes (or has written) every association's
        `lookup_hash` with it, e.g. with `recompute_slot(0, ...)` of services.hashing. The old
        server_state keys are set too, so that nothing recomputes the hashes again at start.
        """
        async with self._db.begin() as conn:
            await _take_write_lock(conn)
            await conn.execute(delete(peppers))
            await conn.execute(insert(peppers).values(pepper=pepper, slot=0, created_ms=now, activates_ms=now))
            await _set_state_keys(conn, pepper)

    async def start_rotation(self, pepper: str, now: int, claimer: str, lease_ms: int) -> PepperRow | None:
        """Insert `pepper` as the one being prepared, claimed by `claimer`; None if a rotation
        is already under way (a pepper prepared or scheduled but not yet current).

        Its slot is the one the current pepper does not use; a previous pepper still in its
        grace window there is retired now (the grace window ends early: its clients get
        M_INVALID_PEPPER, with the current pepper, as after any rotation).
        """
        async with self._db.begin() as conn:
            await _take_write_lock(conn)
            rows = await _rows_on(conn)
            live = [r for r in rows if not r.retired(now)]
            if any(r.activates_ms is None or r.activates_ms > now for r in live):
                return None
            current = max(live, key=lambda r: (r.activates_ms or 0, r.id))
            slot = 1 - current.slot
            await conn.execute(
                update(peppers)
                .where(peppers.c.slot == slot, (peppers.c.retires_ms.is_(None)) | (peppers.c.retires_ms > now))
                .values(retires_ms=now)
            )
            result = await conn.execute(
                insert(peppers).values(
                    pepper=pepper, slot=slot, created_ms=now, claimed_by=claimer, claimed_until_ms=now + lease_ms
                )
            )
            new_id = result.inserted_primary_key[0] if result.inserted_primary_key else None
            rows = await _rows_on(conn)
        return next(r for r in rows if r.id == new_id)

    async def claim(self, row_id: int, claimer: str, now: int, lease_ms: int) -> PepperRow | None:
        """Claim (or renew the claim of) the rehash of pepper `row_id`: it must still be being
        prepared, and unclaimed, expired or `claimer`'s. The row as claimed, or None."""
        async with self._db.begin() as conn:
            result = await conn.execute(
                update(peppers)
                .where(
                    peppers.c.id == row_id,
                    peppers.c.activates_ms.is_(None),
                    (peppers.c.retires_ms.is_(None)) | (peppers.c.retires_ms > now),
                    (peppers.c.claimed_by == claimer) | (peppers.c.claimed_until_ms < now),
                )
                .values(claimed_by=claimer, claimed_until_ms=now + lease_ms)
            )
            if result.rowcount != 1:
                return None
            found = (await conn.execute(select(*_COLUMNS).where(peppers.c.id == row_id))).first()
        return PepperRow(*found) if found else None

    async def schedule(self, row_id: int, claimer: str, activates_ms: int, grace_ms: int) -> bool:
        """The rehash is done: pepper `row_id` becomes current at `activates_ms`, and the one it
        replaces stays accepted until `activates_ms + grace_ms`. False if the claim was lost."""
        async with self._db.begin() as conn:
            await _take_write_lock(conn)
            rows = await _rows_on(conn)
            me = next((r for r in rows if r.id == row_id), None)
            if me is None or me.claimed_by != claimer or me.activates_ms is not None:
                return False
            others = [r.id for r in rows if r.id != row_id and r.retires_ms is None]
            await conn.execute(update(peppers).where(peppers.c.id == row_id).values(activates_ms=activates_ms))
            if others:
                await conn.execute(
                    update(peppers).where(peppers.c.id.in_(others)).values(retires_ms=activates_ms + grace_ms)
                )
            # The schedule stays a few rows long (every lookup reads it): retired ones go. The
            # old keys follow the schedule, so that only a pepper set from outside differs.
            await conn.execute(delete(peppers).where(peppers.c.retires_ms < activates_ms))
            await _set_state_keys(conn, me.pepper)
        return True

    # --- the associations' hash slots ---------------------------------------------------------

    async def threepids_after(self, after_id: int, batch: int) -> list[tuple[int, str, str]]:
        """(id, medium, address) of up to `batch` rows with ids above `after_id`, in id order."""
        query = (
            select(assoc.c.id, assoc.c.medium, assoc.c.address)
            .where(assoc.c.id > after_id)
            .order_by(assoc.c.id)
            .limit(batch)
        )
        async with self._db.connect() as conn:
            return [(r[0], r[1], r[2]) for r in await conn.execute(query)]

    async def write_hashes(self, slot: int, id_to_hash: Sequence[tuple[int, str]]) -> None:
        """Set slot `slot`'s hash of these rows (a row deleted meanwhile is skipped)."""
        if not id_to_hash:
            return
        async with self._db.begin() as conn:
            await _write_hashes_on(conn, slot, id_to_hash)

    async def write_rehash_batch(
        self, row_id: int, claimer: str, slot: int, id_to_hash: Sequence[tuple[int, str]], now: int, lease_ms: int
    ) -> bool:
        """One batch of a rehash and its progress (the batch's last id), in one transaction, if
        `claimer` still holds the claim (renewed). False, nothing written, if it was lost."""
        async with self._db.begin() as conn:
            result = await conn.execute(
                update(peppers)
                .where(peppers.c.id == row_id, peppers.c.claimed_by == claimer, peppers.c.activates_ms.is_(None))
                .values(rehashed_through=id_to_hash[-1][0], claimed_until_ms=now + lease_ms)
            )
            if result.rowcount != 1:
                await conn.rollback()
                return False
            await _write_hashes_on(conn, slot, id_to_hash)
        return True

    async def vacuum_associations(self, cost_delay_ms: float, cost_limit: int) -> None:
        """PostgreSQL: VACUUM `associations`, paced by its cost-based delay (nothing on SQLite,
        which updates rows in place). A rehash leaves a dead version of every row (each is a
        non-HOT update: the hash columns are indexed); the next scans (every process's load
        of the new pepper's index) would read through them and set their hint bits, and
        where autovacuum is off nothing else removes them."""
        if self.dialect != "postgresql":
            return
        async with self._db.connect() as conn:
            conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
            try:
                await conn.execute(text(f"SET vacuum_cost_delay = {float(cost_delay_ms)}"))
                await conn.execute(text(f"SET vacuum_cost_limit = {int(cost_limit)}"))
                # PARALLEL 0: one process (by default VACUUM may start a worker per index,
                # flat out, on the cores the lookups use).
                await conn.execute(text("VACUUM (PARALLEL 0) associations"))
            finally:
                await conn.execute(text("RESET vacuum_cost_delay"))
                await conn.execute(text("RESET vacuum_cost_limit"))

    async def max_association_id(self) -> int:
        async with self._db.connect() as conn:
            return (await conn.execute(select(func.max(assoc.c.id)))).scalar() or 0

    async def iter_all(self, batch: int = 1000) -> AsyncIterator[list[tuple[int, str, str]]]:
        after = 0
        while rows := await self.threepids_after(after, batch):
            yield rows
            after = rows[-1][0]


async def _write_hashes_on(conn: AsyncConnection, slot: int, id_to_hash: Sequence[tuple[int, str]]) -> None:
    column = SLOT_COLUMNS[slot]
    if conn.dialect.name == "postgresql":
        # One statement for the batch (an UPDATE per row costs a round trip each).
        await conn.execute(
            text(
                f"UPDATE associations AS a SET {column} = u.h"
                " FROM unnest(CAST(:ids AS integer[]), CAST(:hs AS text[])) AS u(id, h) WHERE a.id = u.id"
            ),
            {"ids": [i for i, _ in id_to_hash], "hs": [h for _, h in id_to_hash]},
        )
    else:
        stmt = update(assoc).where(assoc.c.id == bindparam("row_id")).values({column: bindparam("h")})
        await conn.execute(stmt, [{"row_id": i, "h": h} for i, h in id_to_hash])
