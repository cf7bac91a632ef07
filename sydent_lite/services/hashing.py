"""Lookup hashing (spec "Association lookup"): the pepper and the sha256 lookup hash."""

from __future__ import annotations

import base64
import hashlib
import logging

from sydent_lite.secrets_util import random_string
from sydent_lite.storage.associations import AssociationStore
from sydent_lite.storage.state import ServerStateStore

logger = logging.getLogger(__name__)

PEPPER_KEY = "lookup_pepper"
# The pepper the stored lookup_hash column was computed with.
HASHED_WITH_KEY = "lookup_hashes_pepper"


def lookup_hash(address: str, medium: str, pepper: str) -> str:
    digest = hashlib.sha256(f"{address} {medium} {pepper}".encode()).digest()
    # Unpadded URL-safe base64 (spec).
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


async def load_pepper(state: ServerStateStore, associations: AssociationStore) -> str:
    """The current pepper (created on first start), with every stored hash computed under it."""
    pepper = await state.get_or_create(PEPPER_KEY, random_string(32))
    hashed_with = await state.get(HASHED_WITH_KEY)
    if hashed_with != pepper:
        if hashed_with is not None:
            logger.info("lookup pepper changed: recomputing lookup hashes")
        count = 0
        async for batch in associations.iter_threepids():
            await associations.set_hashes({i: lookup_hash(a, m, pepper) for i, m, a in batch})
            count += len(batch)
        await state.set(HASHED_WITH_KEY, pepper)
        if count:
            logger.info("recomputed %d lookup hashes", count)
    return pepper
