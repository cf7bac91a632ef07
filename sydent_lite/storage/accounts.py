"""Access tokens and terms acceptance."""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import delete, select

from sydent_lite.storage.database import Database
from sydent_lite.storage.dialect import insert_for
from sydent_lite.storage.tables import accepted_terms, accounts


class AccountStore:
    def __init__(self, database: Database) -> None:
        self._db = database
        self._reader = database.reader
        # Every authenticated request: the hot reader.
        self._user_for_token_sql = f"SELECT user_id FROM accounts WHERE token_hash = {self._reader.param(1)}"

    async def add_token(self, token_hash: str, user_id: str, ts: int) -> None:
        async with self._db.begin() as conn:
            await conn.execute(accounts.insert().values(token_hash=token_hash, user_id=user_id, created_ts=ts))

    async def user_for_token(self, token_hash: str) -> str | None:
        found = await self._reader.first(self._user_for_token_sql, (token_hash,))
        return found[0] if found else None

    async def delete_token(self, token_hash: str) -> bool:
        async with self._db.begin() as conn:
            result = await conn.execute(delete(accounts).where(accounts.c.token_hash == token_hash))
        return result.rowcount > 0

    async def accepted_urls(self, user_id: str) -> set[str]:
        async with self._db.connect() as conn:
            rows = await conn.execute(select(accepted_terms.c.url).where(accepted_terms.c.user_id == user_id))
            return {r[0] for r in rows}

    async def add_accepted_urls(self, user_id: str, urls: Iterable[str]) -> None:
        values = [{"user_id": user_id, "url": u} for u in set(urls)]
        if not values:
            return
        async with self._db.begin() as conn:
            await conn.execute(insert_for(conn, accepted_terms).values(values).on_conflict_do_nothing())
