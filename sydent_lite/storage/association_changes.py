"""Reading the association change log (written by database triggers, see migration 0004)."""

from __future__ import annotations

from typing import NamedTuple

from sqlalchemy import delete, func, select

from sydent_lite.storage.database import Database
from sydent_lite.storage.dialect import insert_for
from sydent_lite.storage.tables import association_changes as changes
from sydent_lite.storage.tables import server_state

# server_state key: every change with an id up to this one has been deleted from the log.
PRUNED_THROUGH = "association_changes_pruned_through"
# The most changes one read returns.
CHANGES_PER_READ = 10_000


class Change(NamedTuple):
    """One row of the log: association `association_id` now has (`present`) or no longer has
    `lookup_hash` (hash slot 0) and `lookup_hash_b` (slot 1; "" for none)."""

    id: int
    lookup_hash: str
    association_id: int
    present: bool
    lookup_hash_b: str = ""


class AssociationChangeStore:
    def __init__(self, database: Database) -> None:
        self._db = database
        self._reader = reader = database.reader
        # Before every lookup: the hot reader.
        self._since_sql = (
            "SELECT id, lookup_hash, association_id, present, lookup_hash_b FROM association_changes"
            f" WHERE id > {reader.param(1)} ORDER BY id LIMIT {reader.param(2)}"
        )

    async def latest_id(self) -> int:
        async with self._db.connect() as conn:
            return (await conn.execute(select(func.max(changes.c.id)))).scalar() or 0

    async def since(self, last_id: int, limit: int = CHANGES_PER_READ) -> list[Change]:
        """The changes after last_id, oldest first."""
        rows = await self._reader.all(self._since_sql, (last_id, limit))
        # SQLite stores `present` as 0 or 1.
        return [Change(i, h, association_id, bool(present), hb) for i, h, association_id, present, hb in rows]

    async def pruned_through(self) -> int:
        query = select(server_state.c.value).where(server_state.c.name == PRUNED_THROUGH)
        async with self._db.connect() as conn:
            row = (await conn.execute(query)).first()
        return int(row[0]) if row else 0

    async def prune(self, older_than_ms: int) -> int:
        """Delete changes made before older_than_ms; remember the last id deleted."""
        async with self._db.begin() as conn:
            through = (
                await conn.execute(select(func.max(changes.c.id)).where(changes.c.created_ms < older_than_ms))
            ).scalar()
            if through is None:
                return 0
            result = await conn.execute(delete(changes).where(changes.c.id <= through))
            stmt = insert_for(conn, server_state).values(name=PRUNED_THROUGH, value=str(through))
            await conn.execute(stmt.on_conflict_do_update(index_elements=["name"], set_={"value": str(through)}))
        return result.rowcount
