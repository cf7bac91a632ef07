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

__all__ = ["HASHED_WITH_KEY", "PEPPER_KEY", "load_pepper", "lookup_hash", "recompute_slot"]


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

    A pepper set the old way (server_state `lookup_pepper` changed by hand, so that it differs
    from `lookup_hashes_pepper`) becomes the only live pepper, every hash recomputed for it.
    """
    from sydent_lite.services.peppers import view_of

    now = now_ms() if now is None else now
    store = PepperStore(associations.database)
    pepper = await state.get_or_create(PEPPER_KEY, random_string(32))
    if await state.get(HASHED_WITH_KEY) != pepper:
        if await store.rows():
            logger.info("lookup pepper set by hand: recomputing lookup hashes")
        count = await recompute_slot(store, 0, pepper)
        await store.set_current_pepper(pepper, now)
        if count:
            logger.info("recomputed %d lookup hashes", count)
        return pepper
    rows = await store.rows()
    if not rows:  # upgraded from before the schedule: the stored hashes are this pepper's
        await store.create_first(pepper, now)
        rows = await store.rows()
    return view_of(rows, now).current.pepper
