"""Access tokens and terms acceptance."""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncEngine

from sydent_lite.storage.dialect import insert_for
from sydent_lite.storage.readers import hot_reader
from sydent_lite.storage.tables import accepted_terms, accounts


class AccountStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._reader = hot_reader(engine)

    async def add_token(self, token_hash: str, user_id: str, ts: int) -> None:
        async with self._engine.begin() as conn:
            await conn.execute(accounts.insert().values(token_hash=token_hash, user_id=user_id, created_ts=ts))

    async def user_for_token(self, token_hash: str) -> str | None:
        if self._reader is not None:  # every authenticated request: the fast path
            found = await self._reader.first("SELECT user_id FROM accounts WHERE token_hash = ?", (token_hash,))
            return found[0] if found else None
        async with self._engine.connect() as conn:
            row = (await conn.execute(select(accounts.c.user_id).where(accounts.c.token_hash == token_hash))).first()
        return row[0] if row else None

    async def delete_token(self, token_hash: str) -> bool:
        async with self._engine.begin() as conn:
            result = await conn.execute(delete(accounts).where(accounts.c.token_hash == token_hash))
        return result.rowcount > 0

    async def accepted_urls(self, user_id: str) -> set[str]:
        async with self._engine.connect() as conn:
            rows = await conn.execute(select(accepted_terms.c.url).where(accepted_terms.c.user_id == user_id))
            return {r[0] for r in rows}

    async def add_accepted_urls(self, user_id: str, urls: Iterable[str]) -> None:
        values = [{"user_id": user_id, "url": u} for u in set(urls)]
        if not values:
            return
        async with self._engine.begin() as conn:
            await conn.execute(insert_for(conn, accepted_terms).values(values).on_conflict_do_nothing())
