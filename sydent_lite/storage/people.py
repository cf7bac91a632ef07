"""Everything stored about a person: one 3PID, or one Matrix user and all their 3PIDs.

The operator's view across the tables (`sydent-lite associations show|delete`): the one place
that knows which tables hold a 3PID or a user ID. A table that gains such a column gains a
line in `delete_person` (and a count in `Removed`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TypeAlias

from sqlalchemy import ColumnElement, delete, select
from sqlalchemy.ext.asyncio import AsyncConnection

from sydent_lite.secrets_util import now_ms
from sydent_lite.storage.database import Database
from sydent_lite.storage.erasures import MXID, record_erasures, subject_hash
from sydent_lite.storage.tables import (
    accepted_terms,
    accounts,
    associations,
    invites,
    onbind_callbacks,
    validation_sessions,
)


@dataclass(frozen=True)
class ThreePid:
    medium: str
    address: str  # the stored form (threepids.normalise_address)


@dataclass(frozen=True)
class MatrixUser:
    mxid: str


Person: TypeAlias = ThreePid | MatrixUser


@dataclass(frozen=True)
class Binding:
    """One stored association, as an operator sees it."""

    medium: str
    address: str
    mxid: str
    ts: int


@dataclass
class Removed:
    """What `delete_person` removed: the bindings themselves, and how many rows of the rest."""

    associations: list[Binding] = field(default_factory=list)
    invites: int = 0
    callbacks: int = 0
    sessions: int = 0
    tokens: int = 0
    terms: int = 0


def _of(person: Person) -> tuple[ColumnElement[bool], ...]:
    if isinstance(person, MatrixUser):
        return (associations.c.mxid == person.mxid,)
    return associations.c.medium == person.medium, associations.c.address == person.address


async def _bindings_on(conn: AsyncConnection, person: Person) -> list[Binding]:
    query = select(associations.c.medium, associations.c.address, associations.c.mxid, associations.c.ts)
    rows = await conn.execute(query.where(*_of(person)).order_by(associations.c.ts))
    return [Binding(**row) for row in rows.mappings()]


async def _delete_threepid_on(conn: AsyncConnection, threepid: ThreePid, removed: Removed) -> None:
    medium, address = threepid.medium, threepid.address
    await conn.execute(delete(associations).where(associations.c.medium == medium, associations.c.address == address))
    pending = select(invites.c.callback_id).where(
        invites.c.medium == medium,
        invites.c.address == address,
        invites.c.callback_id.is_not(None),
        invites.c.delivered_ts.is_(None),  # a delivered invite's callback id may be reused (SQLite)
    )
    callback_ids = [row[0] for row in await conn.execute(pending)]
    if callback_ids:
        result = await conn.execute(delete(onbind_callbacks).where(onbind_callbacks.c.id.in_(callback_ids)))
        removed.callbacks += result.rowcount
    result = await conn.execute(delete(invites).where(invites.c.medium == medium, invites.c.address == address))
    removed.invites += result.rowcount
    result = await conn.execute(
        delete(validation_sessions).where(
            validation_sessions.c.medium == medium, validation_sessions.c.address == address
        )
    )
    removed.sessions += result.rowcount


class PeopleStore:
    def __init__(self, database: Database) -> None:
        self._database = database

    async def associations_of(self, person: Person) -> list[Binding]:
        """The person's bindings, oldest first."""
        async with self._database.connect() as conn:
            return await _bindings_on(conn, person)

    async def delete_person(self, person: Person) -> Removed:
        """Everything stored about the person, in one transaction: each 3PID's association,
        pending invites (with their undelivered onbind callbacks) and validation sessions;
        for a Matrix user, all their 3PIDs so, and their access tokens and terms acceptances.
        The erasure is recorded (hashed: storage.erasures)."""
        async with self._database.begin() as conn:
            removed = Removed(associations=await _bindings_on(conn, person))
            if isinstance(person, MatrixUser):
                threepids = [ThreePid(b.medium, b.address) for b in removed.associations]
            else:
                threepids = [person]
            for threepid in threepids:
                await _delete_threepid_on(conn, threepid, removed)
            if isinstance(person, MatrixUser):
                result = await conn.execute(delete(accounts).where(accounts.c.user_id == person.mxid))
                removed.tokens = result.rowcount
                result = await conn.execute(delete(accepted_terms).where(accepted_terms.c.user_id == person.mxid))
                removed.terms = result.rowcount
            # Kept (hashed) so that an import from Sydent, which still holds the person, skips them.
            erased = [subject_hash(t.medium, t.address) for t in threepids]
            if isinstance(person, MatrixUser):
                erased.append(subject_hash(MXID, person.mxid))
            await record_erasures(conn, erased, now_ms())
        return removed
