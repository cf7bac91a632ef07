"""Validation sessions (requestToken / submitToken)."""

from __future__ import annotations

from dataclasses import dataclass, fields

from sqlalchemy import bindparam, case, delete, select, update

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


# requestToken's statements, built once (building them per call cost more CPU than running
# them on SQLite, profiled).
_NEWEST = (
    select(vs)
    .where(
        vs.c.medium == bindparam("medium"),
        vs.c.address == bindparam("address"),
        vs.c.client_secret_hash == bindparam("secret"),
    )
    .order_by(vs.c.created_ts.desc())
    .limit(1)
)
_BY_SID = select(vs).where(vs.c.sid == bindparam("sid"))


class SessionStore:
    def __init__(self, database: Database) -> None:
        self._db = database
        # One statement that commits on its own: below SQLAlchemy (storage.readers: `write`).
        self._insert = database.insert_sql(vs, [f.name for f in fields(ValidationSession)])

    async def get(self, sid: str) -> ValidationSession | None:
        async with self._db.connect() as conn:
            row = (await conn.execute(_BY_SID, {"sid": sid})).mappings().first()
        return ValidationSession(**row) if row else None

    async def find(self, medium: str, address: str, client_secret_hash: str) -> ValidationSession | None:
        """The newest session for this (medium, address, client_secret)."""
        params = {"medium": medium, "address": address, "secret": client_secret_hash}
        async with self._db.connect() as conn:
            row = (await conn.execute(_NEWEST, params)).mappings().first()
        return ValidationSession(**row) if row else None

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
