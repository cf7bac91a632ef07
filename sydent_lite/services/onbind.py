"""Delivering onbind callbacks: durable, retried with backoff, each sent once by one worker."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging

from sydent_lite.config import InviteConfig
from sydent_lite.federation.client import (
    FederationClient,
    FederationError,
    OutboundPolicyError,
)
from sydent_lite.secrets_util import now_ms
from sydent_lite.storage.invites import InviteStore, PendingCallback

logger = logging.getLogger(__name__)

ONBIND_PATH = "/_matrix/federation/v1/3pid/onbind"
# With nothing due, look at the queue this often anyway (another worker may have queued).
IDLE_POLL_SECONDS = 30.0


class OnbindDelivery:
    def __init__(self, config: InviteConfig, store: InviteStore, federation: FederationClient, request_timeout: float) -> None:
        self._config = config
        self._store = store
        self._federation = federation
        # A claim outlives any one delivery attempt; a crashed worker's claims lapse after it.
        self._lease_ms = int((2 * request_timeout + 30) * 1000)
        self._wake = asyncio.Event()

    def notify(self) -> None:
        """Something was queued: deliver now rather than at the next poll."""
        self._wake.set()

    def retry_delay_ms(self, attempts: int) -> int:
        delay = self._config.onbind_retry_initial_seconds * (2 ** min(attempts - 1, 30))
        return int(min(delay, self._config.onbind_retry_max_seconds) * 1000)

    async def run(self) -> None:
        while True:
            try:
                await self.deliver_due()
                next_ts = await self._store.next_due_ts()
            except Exception:
                logger.exception("onbind delivery pass failed; will retry")
                next_ts = None
            timeout = IDLE_POLL_SECONDS
            if next_ts is not None:
                timeout = min(IDLE_POLL_SECONDS, max(0.05, (next_ts - now_ms()) / 1000))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)
            self._wake.clear()

    async def deliver_due(self) -> None:
        now = now_ms()
        claimed = [cb for cb in await self._store.due_callbacks(now) if await self._store.claim(cb.id, now, now + self._lease_ms)]
        await asyncio.gather(*(self._deliver(cb) for cb in claimed))

    async def _deliver(self, callback: PendingCallback) -> None:
        try:
            status, _ = await self._federation.request_json(
                "POST", callback.destination, ONBIND_PATH, json_body=json.loads(callback.body)
            )
            problem = None if 200 <= status < 300 else f"HTTP {status}"
        except (FederationError, OutboundPolicyError) as e:
            problem = str(e)
        if problem is None:
            await self._store.mark_delivered(callback.id, now_ms())
            logger.info("onbind callback %d delivered to %s", callback.id, callback.destination)
            return
        attempts = callback.attempts + 1
        delay = self.retry_delay_ms(attempts)
        await self._store.reschedule(callback.id, attempts, now_ms() + delay)
        logger.info(
            "onbind callback %d to %s failed (%s, attempt %d); retrying in %.1fs",
            callback.id, callback.destination, problem, attempts, delay / 1000,
        )
