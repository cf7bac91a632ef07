"""Reading the association change log (written by database triggers, see migration 0004)."""

from __future__ import annotations

from sqlalchemy import delete, func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from sydent_lite.storage.dialect import insert_for
from sydent_lite.storage.readers import hot_reader
from sydent_lite.storage.tables import association_changes as changes
from sydent_lite.storage.tables import server_state

# server_state key: every change with an id up to this one has been deleted from the log.
PRUNED_THROUGH = "association_changes_pruned_through"


class AssociationChangeStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._reader = hot_reader(engine)

    async def latest_id(self) -> int:
        async with self._engine.connect() as conn:
            return (await conn.execute(select(func.max(changes.c.id)))).scalar() or 0

    async def since(self, last_id: int, limit: int = 10_000) -> list[tuple[int, str, int, bool]]:
        """(change id, lookup_hash, association id, present) after last_id, oldest first."""
        if self._reader is not None:  # before every lookup: the fast path
            return [
                (r[0], r[1], r[2], bool(r[3]))
                for r in await self._reader.all(
                    "SELECT id, lookup_hash, association_id, present FROM association_changes"
                    " WHERE id > ? ORDER BY id LIMIT ?",
                    (last_id, limit),
                )
            ]
        async with self._engine.connect() as conn:
            rows = await conn.execute(
                select(changes.c.id, changes.c.lookup_hash, changes.c.association_id, changes.c.present)
                .where(changes.c.id > last_id)
                .order_by(changes.c.id)
                .limit(limit)
            )
            return [(r[0], r[1], r[2], bool(r[3])) for r in rows]

    async def pruned_through(self) -> int:
        async with self._engine.connect() as conn:
            row = (await conn.execute(select(server_state.c.value).where(server_state.c.name == PRUNED_THROUGH))).first()
        return int(row[0]) if row else 0

    async def prune(self, older_than_ms: int) -> int:
        """Delete changes made before older_than_ms; remember the last id deleted."""
        async with self._engine.begin() as conn:
            through = (
                await conn.execute(select(func.max(changes.c.id)).where(changes.c.created_ms < older_than_ms))
            ).scalar()
            if through is None:
                return 0
            result = await conn.execute(delete(changes).where(changes.c.id <= through))
            stmt = insert_for(conn, server_state).values(name=PRUNED_THROUGH, value=str(through))
            await conn.execute(stmt.on_conflict_do_update(index_elements=["name"], set_={"value": str(through)}))
        return result.rowcount
