"""Validation sessions (requestToken / submitToken)."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import delete, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from sydent_lite.storage.tables import validation_sessions as vs


@dataclass
class ValidationSession:
    sid: str
    medium: str
    address: str
    client_secret_hash: str
    token: str
    send_attempt: int
    next_link: str | None
    brand: str | None
    created_ts: int
    mtime: int
    validated: bool
    validated_at: int | None


class SessionStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    async def get(self, sid: str) -> ValidationSession | None:
        async with self._engine.connect() as conn:
            row = (await conn.execute(select(vs).where(vs.c.sid == sid))).mappings().first()
        return ValidationSession(**row) if row else None

    async def find(self, medium: str, address: str, client_secret_hash: str) -> ValidationSession | None:
        """The newest session for this (medium, address, client_secret)."""
        query = (
            select(vs)
            .where(vs.c.medium == medium, vs.c.address == address, vs.c.client_secret_hash == client_secret_hash)
            .order_by(vs.c.created_ts.desc())
            .limit(1)
        )
        async with self._engine.connect() as conn:
            row = (await conn.execute(query)).mappings().first()
        return ValidationSession(**row) if row else None

    async def create(self, session: ValidationSession) -> None:
        async with self._engine.begin() as conn:
            await conn.execute(vs.insert().values(**session.__dict__))

    async def set_send_attempt(self, sid: str, send_attempt: int, mtime: int, next_link: str | None, brand: str | None) -> None:
        async with self._engine.begin() as conn:
            await conn.execute(
                update(vs)
                .where(vs.c.sid == sid)
                .values(send_attempt=send_attempt, mtime=mtime, next_link=next_link, brand=brand)
            )

    async def mark_validated(self, sid: str, ts: int) -> None:
        async with self._engine.begin() as conn:
            await conn.execute(
                update(vs).where(vs.c.sid == sid, vs.c.validated.is_(False)).values(validated=True, validated_at=ts, mtime=ts)
            )

    async def delete_expired(self, before_mtime: int) -> int:
        async with self._engine.begin() as conn:
            result = await conn.execute(delete(vs).where(vs.c.mtime < before_mtime))
        return result.rowcount
