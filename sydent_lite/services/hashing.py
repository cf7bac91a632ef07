"""Lookup hashing (spec "Association lookup"): the pepper and the sha256 lookup hash."""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
from collections.abc import Sequence

from sydent_lite.secrets_util import random_string
from sydent_lite.storage.associations import AssociationStore
from sydent_lite.storage.state import ServerStateStore

logger = logging.getLogger(__name__)

PEPPER_KEY = "lookup_pepper"
# The pepper the stored lookup_hash column was computed with.
HASHED_WITH_KEY = "lookup_hashes_pepper"


def lookup_hash(address: str, medium: str, pepper: str) -> str:
    digest = hashlib.sha256(f"{address} {medium} {pepper}".encode()).digest()
    # Unpadded URL-safe base64 (spec); the stdlib call directly, as bulk_lookup hashes 1,000 a request.
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


_URLSAFE = str.maketrans("+/", "-_")
_DIGEST = type(hashlib.sha256()).digest


def lookup_hashes(medium: str, addresses: Sequence[str], pepper: str) -> list[str]:
    """`lookup_hash(address, medium, pepper)` of each address, computed as one batch.

    bulk_lookup hashes 1,000 addresses a request, and a Python loop around `lookup_hash` spent
    more time in the interpreter than in SHA-256. Here every step runs over the whole batch in
    C: the inputs are made by one `replace` on the joined addresses and split apart again (an
    address holding the separator takes the slow road), hashed through `map`, and the digests
    base64-encoded together: each is followed by a zero byte, so every 33 bytes make exactly
    44 characters, of which the first 43 are that digest's unpadded encoding (its last
    character holds the digest's last 4 bits and two zero bits, as unpadded base64 does).
    """
    if not addresses:
        return []
    suffix = f" {medium} {pepper}"
    joined = "\n".join(addresses)
    if joined.count("\n") == len(addresses) - 1 and "\n" not in suffix:
        inputs = (joined.replace("\n", suffix + "\n") + suffix).encode().split(b"\n")
    else:
        inputs = [(address + suffix).encode() for address in addresses]
    digests = b"\0".join(map(_DIGEST, map(hashlib.sha256, inputs))) + b"\0"
    text = binascii.b2a_base64(digests, newline=False).decode("ascii").translate(_URLSAFE)
    return [text[i : i + 43] for i in range(0, len(text), 44)]


def casefold_all(addresses: Sequence[str]) -> list[str]:
    """[a.casefold() for a in addresses], in one call: case folding is per character."""
    joined = "\n".join(addresses)
    if joined.count("\n") != len(addresses) - 1:
        return [a.casefold() for a in addresses]
    return joined.casefold().split("\n") if addresses else []


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
