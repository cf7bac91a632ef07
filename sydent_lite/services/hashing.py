"""Lookup hashing (spec "Association lookup"): the sha256 lookup hash, and the pepper at start."""

from __future__ import annotations

import base64
import hashlib
import logging

from sydent_lite.secrets_util import now_ms, random_string
from sydent_lite.storage.associations import AssociationStore
from sydent_lite.storage.peppers import HASHED_WITH_KEY, PEPPER_KEY, PepperStore
from sydent_lite.storage.state import ServerStateStore

logger = logging.getLogger(__name__)

__all__ = ["HASHED_WITH_KEY", "PEPPER_KEY", "hash_for_live_peppers", "load_pepper", "lookup_hash", "recompute_slot"]


def lookup_hash(address: str, medium: str, pepper: str) -> str:
    digest = hashlib.sha256(f"{address} {medium} {pepper}".encode()).digest()
    # Unpadded URL-safe base64 (spec).
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


async def recompute_slot(peppers: PepperStore, slot: int, pepper: str) -> int:
    """Write every association's hash of hash slot `slot` with `pepper` (in batches)."""
    count = 0
    async for batch in peppers.iter_all():
        await peppers.write_hashes(slot, [(i, lookup_hash(a, m, pepper)) for i, m, a in batch])
        count += len(batch)
    return count


async def load_pepper(state: ServerStateStore, associations: AssociationStore, now: int | None = None) -> str:
    """The current pepper, with the schedule made on first start (services.peppers).

    A pepper set from outside the schedule, the old way (server_state `lookup_pepper` set by
    hand or by an import, to a pepper the schedule has never had, or differing from
    `lookup_hashes_pepper`), becomes the only live pepper, every hash recomputed for it
    (PepperStore.set_current_pepper is the direct way).
    """
    from sydent_lite.services.peppers import view_of

    now = now_ms() if now is None else now
    store = PepperStore(associations.database)
    pepper = await state.get_or_create(PEPPER_KEY, random_string(32))
    rows = await store.rows()
    if not rows and await state.get(HASHED_WITH_KEY) == pepper:
        # Upgraded from before the schedule: the stored hashes are this pepper's.
        await store.create_first(pepper, now)
        rows = await store.rows()
    elif await state.get(HASHED_WITH_KEY) != pepper or all(r.pepper != pepper for r in rows):
        if rows:
            logger.info("lookup pepper set from outside the schedule: recomputing lookup hashes")
        count = await recompute_slot(store, 0, pepper)
        await store.set_current_pepper(pepper, now)
        if count:
            logger.info("recomputed %d lookup hashes", count)
        return pepper
    return view_of(rows, now).current.pepper


async def hash_for_live_peppers(associations: AssociationStore, now: int | None = None) -> int:
    """After rows were written with only `lookup_hash` under the current pepper (an import):
    unless that is where every live pepper's hashes belong (one live pepper, in slot 0), write
    every live pepper's slot again. Returns the rows rewritten (0: nothing needed)."""
    from sydent_lite.storage.peppers import latest_per_slot

    now = now_ms() if now is None else now
    store = PepperStore(associations.database)
    live = latest_per_slot(await store.rows(), now)
    if live[1] is None and live[0] is not None:
        return 0
    count = 0
    for row in live:
        if row is not None:
            count = await recompute_slot(store, row.slot, row.pepper)
    return count
