"""Queueing onbind callbacks: the signed body that tells the invitee's homeserver about the
pending invites of the address just bound (server-server API `3pid/onbind`), and the repair
of binds that an older version stored without queueing it.

A bind queues its callback in its own transaction (`AssociationStore.bind`). Versions before
that committed the association first and queued the callback in a second transaction: a crash
in between left a bound address whose invites were never sent. `repair` finds those and queues
what is missing, from the signed association as stored.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

from sydent_lite.clock import SYSTEM_CLOCK, Clock
from sydent_lite.config import InviteConfig
from sydent_lite.signing import ServerSigner
from sydent_lite.storage.invites import BoundAddress, CallbackRequest, InviteStore, StoredInvite
from sydent_lite.threepids import user_id_server

logger = logging.getLogger(__name__)

# Bound addresses looked at per read of the repair.
REPAIR_BATCH = 500


class OnbindQueue:
    def __init__(
        self,
        signer: ServerSigner,
        config: InviteConfig,
        store: InviteStore,
        on_queued: Callable[[], None] | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self._signer = signer
        self._expiry_ms = config.expiry_seconds * 1000
        self._store = store
        self._clock = clock
        # Told when a callback was queued (the delivery loop, to send it now).
        self._on_queued = on_queued

    def request_for(self, signed_association: dict[str, Any]) -> CallbackRequest:
        """What the bind of `signed_association` queues for the address's pending invites."""
        medium, address, mxid = signed_association["medium"], signed_association["address"], signed_association["mxid"]

        def build_body(pending: list[StoredInvite]) -> str:
            body = {k: v for k, v in signed_association.items() if k != "signatures"}
            body["invites"] = [
                {
                    "medium": medium,
                    "address": address,
                    "mxid": mxid,
                    "room_id": inv.room_id,
                    "sender": inv.sender,
                    "token": inv.token,
                    "signed": self._signer.sign({"mxid": mxid, "token": inv.token}),
                }
                for inv in pending
            ]
            return json.dumps(self._signer.sign(body))

        now = self._clock.time_ms()
        return CallbackRequest(
            medium=medium,
            address=address,
            destination=user_id_server(mxid),
            build_body=build_body,
            now=now,
            not_before_ts=now - self._expiry_ms,
        )

    def queued(self) -> None:
        if self._on_queued is not None:
            self._on_queued()

    async def repair(self) -> int:
        """Queue the callbacks that bound addresses with unqueued, undelivered, unexpired invites
        are missing; returns how many. Idempotent; safe in several workers at once."""
        queued = 0
        while True:
            batch = await self._store.bound_without_callback(self._clock.time_ms() - self._expiry_ms, REPAIR_BATCH)
            queued_now = 0
            for bound in batch:
                request = self._request_for_stored(bound)
                if request is not None and await self._store.queue_missed_callback(bound, request) is not None:
                    queued_now += 1
            queued += queued_now
            # A short batch was the last; one where nothing could be queued would come back as is.
            if len(batch) < REPAIR_BATCH or queued_now == 0:
                break
        if queued:
            logger.warning("queued %d onbind callbacks that earlier binds had left unqueued", queued)
            self.queued()
        return queued

    def _request_for_stored(self, bound: BoundAddress) -> CallbackRequest | None:
        try:
            signed = json.loads(bound.signed_json)
            if not isinstance(signed, dict) or (signed.get("medium"), signed.get("mxid")) != (bound.medium, bound.mxid):
                raise ValueError("not the signed association of this row")
            # The body is signed anew; the address as stored is the one its invites are kept under
            # (an association imported from Sydent may have signed another spelling of it).
            return self.request_for({**signed, "address": bound.address})
        except (ValueError, KeyError) as e:
            logger.error("cannot queue the onbind callback of a bound %s address: %s", bound.medium, e)
            return None
