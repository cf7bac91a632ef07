"""The record of erasures: what `associations delete` removed, as hashes only.

An import from Sydent consults it so that an erased person stays erased (Sydent's database
still holds them). A subject is "<medium>\\0<address>" (the stored form) or "mxid\\0<user id>";
only its SHA-256 is kept.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection

from sydent_lite.storage.batching import chunks
from sydent_lite.storage.dialect import insert_for
from sydent_lite.storage.tables import erasures

MXID = "mxid"
_CHUNK = 500


def subject_hash(kind: str, value: str) -> str:
    """kind: a medium ("email", "msisdn") with the stored address, or MXID with a user ID."""
    return hashlib.sha256(f"{kind}\x00{value}".encode()).hexdigest()


async def record_erasures(conn: AsyncConnection, hashes: Iterable[str], now: int) -> None:
    """Remember these subjects as erased at `now` (the latest erasure wins)."""
    rows = [{"subject_hash": h, "erased_ts": now} for h in dict.fromkeys(hashes)]
    for chunk in chunks(rows, _CHUNK):
        stmt = insert_for(conn, erasures)
        await conn.execute(
            stmt.on_conflict_do_update(index_elements=["subject_hash"], set_={"erased_ts": stmt.excluded.erased_ts}),
            list(chunk),
        )


async def erased_at(conn: AsyncConnection, hashes: Iterable[str]) -> dict[str, int]:
    """{subject hash: when it was erased} for the subjects among `hashes` that were erased."""
    out: dict[str, int] = {}
    for chunk in chunks(list(dict.fromkeys(hashes)), _CHUNK):
        rows = await conn.execute(
            select(erasures.c.subject_hash, erasures.c.erased_ts).where(erasures.c.subject_hash.in_(chunk))
        )
        out.update((row.subject_hash, row.erased_ts) for row in rows)
    return out
