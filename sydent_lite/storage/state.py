"""Named server-wide values (the lookup pepper), shared by every worker through the database."""

from __future__ import annotations

from sqlalchemy import select

from sydent_lite.storage.database import Database
from sydent_lite.storage.dialect import insert_for
from sydent_lite.storage.tables import server_state


class ServerStateStore:
    def __init__(self, database: Database) -> None:
        self._db = database

    async def get(self, name: str) -> str | None:
        async with self._db.connect() as conn:
            row = (await conn.execute(select(server_state.c.value).where(server_state.c.name == name))).first()
        return row[0] if row else None

    async def get_or_create(self, name: str, value: str) -> str:
        """Store `value` unless a value exists; return whichever is stored (first writer wins)."""
        async with self._db.begin() as conn:
            await conn.execute(insert_for(conn, server_state).values(name=name, value=value).on_conflict_do_nothing())
        stored = await self.get(name)
        assert stored is not None
        return stored

    async def set(self, name: str, value: str) -> None:
        async with self._db.begin() as conn:
            stmt = insert_for(conn, server_state).values(name=name, value=value)
            await conn.execute(stmt.on_conflict_do_update(index_elements=["name"], set_={"value": value}))
