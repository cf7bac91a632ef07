"""Validation sessions (requestToken / submitToken)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from sqlalchemy import case, delete, update

from sydent_lite.storage.database import Database
from sydent_lite.storage.tables import validation_sessions as vs


@dataclass
class ValidationSession:
    sid: str
    medium: str
    address: str
    client_secret_hash: str
    token_hash: str
    send_attempt: int
    next_link: str | None
    brand: str | None
    created_ts: int
    mtime: int
    validated: bool
    validated_at: int | None
    failed_attempts: int = 0


_COLUMNS = [f.name for f in fields(ValidationSession)]
_VALIDATED = _COLUMNS.index("validated")


def _session(row: tuple[Any, ...] | None) -> ValidationSession | None:
    if row is None:
        return None
    values = list(row)
    values[_VALIDATED] = bool(values[_VALIDATED])  # SQLite stores a boolean as 0 or 1
    return ValidationSession(*values)


class SessionStore:
    def __init__(self, database: Database) -> None:
        self._db = database
        # One statement that commits on its own: below SQLAlchemy (storage.readers: `write`).
        self._insert = database.insert_sql(vs, _COLUMNS)
        # Reads of one row, on the hot reader (every requestToken and submitToken makes one).
        p = database.reader.param
        select_sql = f"SELECT {', '.join(_COLUMNS)} FROM {vs.name} WHERE "
        self._by_sid = select_sql + f"sid = {p(1)}"
        self._newest = (
            select_sql
            + f"medium = {p(1)} AND address = {p(2)} AND client_secret_hash = {p(3)} ORDER BY created_ts DESC LIMIT 1"
        )

    async def get(self, sid: str) -> ValidationSession | None:
        return _session(await self._db.reader.first(self._by_sid, [sid]))

    async def find(self, medium: str, address: str, client_secret_hash: str) -> ValidationSession | None:
        """The newest session for this (medium, address, client_secret)."""
        return _session(await self._db.reader.first(self._newest, [medium, address, client_secret_hash]))

    async def create(self, session: ValidationSession) -> None:
        await self._db.write(self._insert, list(session.__dict__.values()))

    async def set_send_attempt(
        self, sid: str, send_attempt: int, mtime: int, next_link: str | None, brand: str | None, token_hash: str
    ) -> None:
        """A resend: its new token replaces the old one (only the newest is valid)."""
        async with self._db.begin() as conn:
            await conn.execute(
                update(vs)
                .where(vs.c.sid == sid)
                .values(send_attempt=send_attempt, mtime=mtime, next_link=next_link, brand=brand, token_hash=token_hash)
            )

    async def take_attempt(self, sid: str, max_attempts: int) -> bool:
        """Count one token attempt against an unvalidated session, before the token is compared;
        False when the session has none left (or was validated meanwhile).

        One conditional UPDATE: the database serialises it on the row, so however many workers
        compare tokens at once, no more than max_attempts comparisons are ever made.
        """
        async with self._db.begin() as conn:
            result = await conn.execute(
                update(vs)
                .where(vs.c.sid == sid, vs.c.validated.is_(False), vs.c.failed_attempts < max_attempts)
                .values(failed_attempts=vs.c.failed_attempts + 1)
            )
        return result.rowcount == 1

    async def mark_validated(self, sid: str, ts: int) -> None:
        """Validated by a right token: the attempt taken for it was no failure, so it is given back."""
        async with self._db.begin() as conn:
            await conn.execute(
                update(vs)
                .where(vs.c.sid == sid, vs.c.validated.is_(False))
                .values(
                    validated=True,
                    validated_at=ts,
                    mtime=ts,
                    failed_attempts=case((vs.c.failed_attempts > 0, vs.c.failed_attempts - 1), else_=0),
                )
            )

    async def delete_expired(self, before_mtime: int) -> int:
        async with self._db.begin() as conn:
            result = await conn.execute(delete(vs).where(vs.c.mtime < before_mtime))
        return result.rowcount
