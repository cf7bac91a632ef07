"""Leaving out what Sydent still holds of a person erased here (`associations delete`).

The erasure record (storage.erasures) holds hashes of the erased 3PIDs and user IDs, with
when they were erased. A Sydent row about one of them is left out unless Sydent made it
after the erasure (the person came back and bound again on Sydent, which is new consent);
a row without a time (a terms acceptance, a token of an account without one) is left out.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from sqlalchemy import exists, select, text
from sqlalchemy.ext.asyncio import AsyncConnection

from sydent_lite.admin.sydent_import.plan import ChosenAssociation
from sydent_lite.admin.sydent_import.read import SydentData
from sydent_lite.storage.erasures import MXID, erased_at, subject_hash
from sydent_lite.storage.tables import erasures


@dataclass
class ErasedSkipped:
    """Rows left out because their person was erased here, per kind (the command prints them)."""

    associations: int = 0
    sessions: int = 0
    invites: int = 0
    account_tokens: int = 0
    terms_acceptances: int = 0

    @property
    def total(self) -> int:
        return self.associations + self.sessions + self.invites + self.account_tokens + self.terms_acceptances


def _gone(erased_ts: int | None, row_ts: int | None) -> bool:
    return erased_ts is not None and (row_ts is None or row_ts <= erased_ts)


async def any_erased(conn: AsyncConnection) -> bool:
    """Whether anyone was erased here; if not, the associations need no check (2 SHA-256 and a
    query per association). On PostgreSQL no erasure commits until the import has (SQLite has
    one writer at a time): one made meanwhile then deletes what the import wrote."""
    if conn.dialect.name == "postgresql":
        await conn.execute(text("LOCK TABLE erasures IN SHARE MODE"))
    return bool((await conn.execute(select(exists().select_from(erasures)))).scalar())


async def drop_erased_associations(
    conn: AsyncConnection, chosen: list[ChosenAssociation]
) -> tuple[list[ChosenAssociation], int]:
    """A batch of planned associations without those of erased people, and how many were left out."""
    threepid_hashes = {(c.medium, c.address): subject_hash(c.medium, c.address) for c in chosen}
    user_hashes = {c.mxid: subject_hash(MXID, c.mxid) for c in chosen}
    erased = await erased_at(conn, [*threepid_hashes.values(), *user_hashes.values()])
    if not erased:
        return chosen, 0
    kept = [
        c
        for c in chosen
        if not (
            _gone(erased.get(threepid_hashes[(c.medium, c.address)]), c.ts)
            or _gone(erased.get(user_hashes[c.mxid]), c.ts)
        )
    ]
    return kept, len(chosen) - len(kept)


async def drop_erased(conn: AsyncConnection, data: SydentData) -> tuple[SydentData, ErasedSkipped]:
    """`data` (every table but the associations) without the rows of erased people, and how
    many were left out."""
    threepid_hashes = {
        (medium, address): subject_hash(medium, address)
        for medium, address in [
            *((s.medium, s.address) for s in data.sessions),
            *((i.medium, i.address) for i in data.invites),
        ]
    }
    users = {t.user_id for t in data.tokens} | {u for u, _ in data.terms}
    user_hashes = {u: subject_hash(MXID, u) for u in users}
    erased = await erased_at(conn, [*threepid_hashes.values(), *user_hashes.values()])
    skipped = ErasedSkipped()
    if not erased:
        return data, skipped

    def threepid_gone(medium: str, address: str, row_ts: int | None) -> bool:
        return _gone(erased.get(threepid_hashes[(medium, address)]), row_ts)

    def user_gone(user_id: str, row_ts: int | None) -> bool:
        return _gone(erased.get(user_hashes[user_id]), row_ts)

    sessions = [s for s in data.sessions if not threepid_gone(s.medium, s.address, s.mtime)]
    invites = [i for i in data.invites if not threepid_gone(i.medium, i.address, i.created_ts)]
    tokens = [t for t in data.tokens if not user_gone(t.user_id, t.created_ts)]
    terms = [(u, url) for u, url in data.terms if not user_gone(u, None)]
    skipped.sessions = len(data.sessions) - len(sessions)
    skipped.invites = len(data.invites) - len(invites)
    skipped.account_tokens = len(data.tokens) - len(tokens)
    skipped.terms_acceptances = len(data.terms) - len(terms)
    return replace(data, sessions=sessions, invites=invites, tokens=tokens, terms=terms), skipped
