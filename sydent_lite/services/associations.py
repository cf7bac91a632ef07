"""Associations: bind, unbind and every kind of lookup (spec "Association lookup", v1 lookups)."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from itertools import compress
from operator import itemgetter
from typing import Any

from sydent_lite.clock import SYSTEM_CLOCK, Clock
from sydent_lite.errors import ErrorCode, MatrixError, invalid_param
from sydent_lite.services.hashing import lookup_hash
from sydent_lite.services.onbind_queue import OnbindQueue
from sydent_lite.services.peppers import LookupPeppers
from sydent_lite.signing import ServerSigner
from sydent_lite.storage.associations import AssociationStore, LivePeppers, StoredAssociation
from sydent_lite.threepids import stored_address, stored_addresses

logger = logging.getLogger(__name__)

# As Sydent: an association is asserted valid for a hundred years from binding.
ASSOCIATION_LIFETIME_MS = 100 * 365 * 24 * 60 * 60 * 1000
DEFAULT_MAX_LOOKUP_ADDRESSES = 10_000  # config lookup.max_addresses


class AssociationService:
    def __init__(
        self,
        store: AssociationStore,
        signer: ServerSigner,
        peppers: LookupPeppers,
        onbind: OnbindQueue | None = None,
        max_addresses: int = DEFAULT_MAX_LOOKUP_ADDRESSES,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        """`peppers`: the schedule, and the lookup index of each pepper answered for."""
        self._store = store
        self._clock = clock
        self._max_addresses = max_addresses
        self._peppers = peppers
        self._signer = signer
        # Queues the onbind callback of the bound address's pending invites, in the bind's transaction.
        self._onbind = onbind

    async def bind(self, medium: str, address: str, mxid: str) -> dict[str, Any]:
        """Bind the (validated) 3PID to `mxid`, replacing any other binding of it; returns the
        signed association. Its pending invites are queued for the homeserver with it."""
        ts = self._clock.time_ms()
        signed = self._signer.sign(
            {
                "medium": medium,
                "address": address,
                "mxid": mxid,
                "ts": ts,
                "not_before": ts,
                "not_after": ts + ASSOCIATION_LIFETIME_MS,
            }
        )
        signed_json = json.dumps(signed)

        def hashed_for(peppers: LivePeppers) -> StoredAssociation:
            # A hash for every live pepper (services.peppers), each in its pepper's slot.
            a, b = (lookup_hash(address, medium, p) if p is not None else "" for p in peppers)
            return StoredAssociation(
                medium=medium,
                address=address,
                lookup_hash=a,
                lookup_hash_b=b,
                mxid=mxid,
                ts=ts,
                not_before=ts,
                not_after=ts + ASSOCIATION_LIFETIME_MS,
                signed_json=signed_json,
            )

        live = self._peppers.live_peppers()
        callback = self._onbind.request_for(signed) if self._onbind is not None else None
        queued = await self._store.bind(hashed_for(live), callback, live, hashed_for, ts)
        logger.info("bound an %s address to a user of %s", medium, mxid.split(":", 1)[-1])
        if queued is not None and self._onbind is not None:
            self._onbind.queued()
        return signed

    async def unbind(self, medium: str, address: str, mxid: str) -> bool:
        removed = await self._store.delete(medium, address, mxid)
        if removed:
            logger.info("unbound an %s address", medium)
        return removed

    @property
    def pepper(self) -> str:
        """The current lookup pepper (hash_details)."""
        return self._peppers.current_pepper

    async def signed_association_json(self, medium: str, address: str) -> str | None:
        """The signed association exactly as stored (JSON text: v1 lookup sends it as is)."""
        return await self._store.signed_json(medium, address)

    async def bulk_lookup(self, threepids: Sequence[Sequence[str]]) -> list[list[str]]:
        """[medium, address as given] pairs -> [medium, address as given, mxid] of the bound ones.

        v1 callers may not have case-folded their email addresses: the stored forms are looked up.
        """
        index, _pepper = await self._peppers.current_index()
        await index.catch_up()
        media = set(map(itemgetter(0), threepids))
        if len(media) == 1:  # the usual case: the whole batch at once, no Python code per pair
            medium = media.pop()
            stored = stored_addresses(medium, list(map(itemgetter(1), threepids)))
            found = {medium: await index.mxids_by_address(medium, stored)}
        else:
            stored = [stored_address(m, a) for m, a in threepids]
            found = {}
            for medium in media:
                addresses = [s for (m, _), s in zip(threepids, stored, strict=True) if m == medium]
                found[medium] = await index.mxids_by_address(medium, addresses)
        if not any(found.values()):
            return []
        if len(found) == 1:
            # Python code only for the bound ones (~1 in 10): the rest are sorted out in C.
            ((medium, bound),) = found.items()
            hits = compress(zip(threepids, stored, strict=True), map(bound.__contains__, stored))
            return [[medium, a, bound[s]] for (_, a), s in hits]
        return [[m, a, found[m][s]] for (m, a), s in zip(threepids, stored, strict=True) if s in found[m]]

    async def hashed_lookup(self, algorithm: str, pepper: str, addresses: list[str]) -> dict[str, str]:
        if algorithm not in ("sha256", "none"):
            raise invalid_param(f"Unsupported algorithm {algorithm!r}; see /hash_details")
        resolved = await self._peppers.index_for(pepper)
        if resolved is None:
            # As Sydent: what a retry needs (the pepper is no secret: hash_details gives it to every
            # user), so a client need not ask hash_details again. The algorithm is the one asked
            # for, known to be supported (checked above).
            raise MatrixError(
                400,
                ErrorCode.INVALID_PEPPER,
                "Unknown or invalid pepper - has it been rotated?",
                algorithm=algorithm,
                lookup_pepper=self._peppers.current_pepper,
            )
        if len(addresses) > self._max_addresses:
            raise MatrixError(400, ErrorCode.TOO_LARGE, f"At most {self._max_addresses} addresses per lookup")
        index, pepper = resolved
        await index.catch_up()
        if algorithm == "sha256":
            return await index.mxids(addresses)
        # "none": "<address> <medium>" in clear; hash it ourselves and use the same index.
        by_hash: dict[str, str] = {}
        for query in addresses:
            address, sep, medium = query.rpartition(" ")
            if sep and address:
                by_hash[lookup_hash(address, medium, pepper)] = query
        found = await index.mxids(list(by_hash))
        return {by_hash[h]: mxid for h, mxid in found.items()}
