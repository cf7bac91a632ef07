"""Leaving out what Sydent still holds of a person erased here (`associations delete`).

The erasure record (storage.erasures) holds hashes of the erased 3PIDs and user IDs, with
when they were erased. A Sydent row about one of them is left out unless Sydent made it
after the erasure (the person came back and bound again on Sydent, which is new consent);
a row without a time (a terms acceptance, a token of an account without one) is left out.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from sqlalchemy.ext.asyncio import AsyncConnection

from sydent_lite.admin.sydent_import.plan import AssociationPlan
from sydent_lite.admin.sydent_import.read import SydentData
from sydent_lite.storage.erasures import MXID, erased_at, subject_hash


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


async def drop_erased(
    conn: AsyncConnection, plan: AssociationPlan, data: SydentData
) -> tuple[AssociationPlan, SydentData, ErasedSkipped]:
    """`plan` and `data` without the rows of erased people, and how many were left out."""
    threepid_hashes = {
        (medium, address): subject_hash(medium, address)
        for medium, address in [
            *((c.medium, c.address) for c in plan.chosen),
            *((s.medium, s.address) for s in data.sessions),
            *((i.medium, i.address) for i in data.invites),
        ]
    }
    users = {c.mxid for c in plan.chosen} | {t.user_id for t in data.tokens} | {u for u, _ in data.terms}
    user_hashes = {u: subject_hash(MXID, u) for u in users}
    erased = await erased_at(conn, [*threepid_hashes.values(), *user_hashes.values()])
    skipped = ErasedSkipped()
    if not erased:
        return plan, data, skipped

    def gone(erased_ts: int | None, row_ts: int | None) -> bool:
        return erased_ts is not None and (row_ts is None or row_ts <= erased_ts)

    def threepid_gone(medium: str, address: str, row_ts: int | None) -> bool:
        return gone(erased.get(threepid_hashes[(medium, address)]), row_ts)

    def user_gone(user_id: str, row_ts: int | None) -> bool:
        return gone(erased.get(user_hashes[user_id]), row_ts)

    chosen = [c for c in plan.chosen if not (threepid_gone(c.medium, c.address, c.ts) or user_gone(c.mxid, c.ts))]
    sessions = [s for s in data.sessions if not threepid_gone(s.medium, s.address, s.mtime)]
    invites = [i for i in data.invites if not threepid_gone(i.medium, i.address, i.created_ts)]
    tokens = [t for t in data.tokens if not user_gone(t.user_id, t.created_ts)]
    terms = [(u, url) for u, url in data.terms if not user_gone(u, None)]
    skipped.associations = len(plan.chosen) - len(chosen)
    skipped.sessions = len(data.sessions) - len(sessions)
    skipped.invites = len(data.invites) - len(invites)
    skipped.account_tokens = len(data.tokens) - len(tokens)
    skipped.terms_acceptances = len(data.terms) - len(terms)
    new_plan = replace(plan, chosen=chosen)
    new_data = replace(data, sessions=sessions, invites=invites, tokens=tokens, terms=terms)
    return new_plan, new_data, skipped
