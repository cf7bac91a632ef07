"""Delivering onbind callbacks: durable, retried with backoff, each sent once by one worker, and
each destination on its own, so that no homeserver can delay another's invites.

A dispatcher finds the destinations (the bound Matrix IDs' servers) that have callbacks due and
gives each a task of its own, up to `invites.onbind_max_destinations` at once. A destination's
task sends at most `invites.onbind_max_in_flight_per_destination` callbacks at a time; when one
fails (error, timeout, not 2xx) the destination backs off (`invites.onbind_retry_initial_seconds`
doubling up to `invites.onbind_retry_max_seconds`; a success resets it) before any of its
callbacks is tried again, and its task ends until then. Every callback keeps its own retry time
in the database as well. A tarpit therefore holds at most its own few connections, for at most
one timeout each, then waits; everyone else's callbacks go out meanwhile.

Failures are logged at INFO while they may be a passing glitch, and at WARNING from a
callback's WARN_AFTER_ATTEMPTS-th failed attempt on (counted in the database, so across
restarts and workers): with the default backoff (5 s doubling) that is about 75 s and four
retries after its first failure, and then at most once per retry (an hour apart at most by
default). Each line names the callback's id, the destination and the count; never the body,
which carries the invites' tokens.

Workers coordinate through the database only: a callback is claimed (a lease on `claimed_until`)
right before it is sent, so two workers never send the same one, and a dead worker's claims lapse.
The backoff of a destination is this worker's own.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, field

from sydent_lite.clock import SYSTEM_CLOCK, Clock
from sydent_lite.config import InviteConfig
from sydent_lite.federation.client import (
    FederationClient,
    FederationError,
    OutboundPolicyError,
)
from sydent_lite.storage.invites import InviteStore, PendingCallback

logger = logging.getLogger(__name__)

ONBIND_PATH = "/_matrix/federation/v1/3pid/onbind"
# With nothing due, look at the queue this often anyway (another worker may have queued).
IDLE_POLL_SECONDS = 30.0
# Never wake more often than this (a callback due "now" that cannot be sent yet).
MIN_POLL_SECONDS = 0.05
# A destination whose queue could not be read (database trouble) is left alone this long.
ERROR_PAUSE_SECONDS = 5.0
# A callback that has failed this many times is no glitch: its failures are logged at WARNING.
WARN_AFTER_ATTEMPTS = 5


@dataclass
class _Destination:
    """What this worker knows of one destination."""

    failures: int = 0  # consecutive failed attempts (those begun after the previous failure)
    failed_at: int = 0  # ms of the last failure counted
    retry_at: int = 0  # ms: none of its callbacks is tried before then
    task: asyncio.Task[None] | None = None  # serving it now
    wake: asyncio.Event = field(default_factory=asyncio.Event)  # it has more due

    def backing_off(self, now: int) -> bool:
        return self.retry_at > now


class OnbindDelivery:
    def __init__(
        self,
        config: InviteConfig,
        store: InviteStore,
        federation: FederationClient,
        request_timeout: float,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self._config = config
        self._clock = clock
        self._store = store
        self._federation = federation
        # A claim outlives any one delivery attempt; a crashed worker's claims lapse after it.
        self._lease_ms = int((2 * request_timeout + 30) * 1000)
        # An attempt (server-name resolution, then the request) ends well within its lease.
        self._attempt_timeout = 2 * request_timeout + 10
        self._per_destination = config.onbind_max_in_flight_per_destination
        self._max_destinations = config.onbind_max_destinations
        self._destinations: dict[str, _Destination] = {}
        self._wake = asyncio.Event()

    def notify(self) -> None:
        """Something was queued (or a destination's task ended): look at the queue now."""
        self._wake.set()

    def retry_delay_ms(self, attempts: int) -> int:
        delay = self._config.onbind_retry_initial_seconds * (2 ** min(attempts - 1, 30))
        return int(min(delay, self._config.onbind_retry_max_seconds) * 1000)

    async def run(self) -> None:
        try:
            while True:
                self._wake.clear()
                try:
                    await self._dispatch()
                    timeout = await self._time_to_next_pass()
                except Exception:
                    logger.exception("onbind delivery pass failed; will retry")
                    timeout = IDLE_POLL_SECONDS
                await self._clock.wait_for(self._wake, timeout)
        finally:
            tasks = [d.task for d in self._destinations.values() if d.task is not None]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    # --- the dispatcher -----------------------------------------------------------------------

    async def _dispatch(self) -> None:
        """Start a task for each destination with callbacks due, neither served nor backing off."""
        now = self._clock.time_ms()
        self._forget_settled(now)
        served = sum(1 for d in self._destinations.values() if d.task is not None)
        backing_off = sum(1 for d in self._destinations.values() if d.task is None and d.backing_off(now))
        free = self._max_destinations - served
        # Enough rows that `free` of them are new destinations, if there are that many.
        limit = max(free, 0) + served + backing_off
        for name in await self._store.due_destinations(now, limit):
            state = self._destinations.get(name)
            if state is not None and state.task is not None:
                state.wake.set()  # more is due: it sends it when it has room
            elif state is not None and state.backing_off(now):
                continue
            elif free > 0:
                state = self._destinations.setdefault(name, _Destination())
                state.task = asyncio.create_task(self._serve(name, state), name=f"onbind {name}")
                free -= 1

    async def _time_to_next_pass(self) -> float:
        now = self._clock.time_ms()
        wake_at = [d.retry_at for d in self._destinations.values() if d.task is None and d.backing_off(now)]
        next_due = await self._store.next_due_ts(now)
        if next_due is not None:
            wake_at.append(next_due)
        if not wake_at:
            return IDLE_POLL_SECONDS
        return min(IDLE_POLL_SECONDS, max(MIN_POLL_SECONDS, (min(wake_at) - now) / 1000))

    def _forget_settled(self, now: int) -> None:
        """Drop what is known of idle destinations that are not failing (bounded memory)."""
        retry_max_ms = self._config.onbind_retry_max_seconds * 1000
        for name, state in list(self._destinations.items()):
            idle = state.task is None and not state.backing_off(now)
            if idle and (state.failures == 0 or now > state.retry_at + retry_max_ms):
                del self._destinations[name]

    # --- one destination ------------------------------------------------------------------------

    async def _serve(self, destination: str, state: _Destination) -> None:
        in_flight: set[asyncio.Task[None]] = set()
        try:
            while True:
                state.wake.clear()
                room = self._per_destination - len(in_flight)
                if room > 0 and not state.backing_off(self._clock.time_ms()):
                    for callback in await self._store.due_callbacks_to(destination, self._clock.time_ms(), room):
                        # Claimed right before it is sent: another worker may have taken it.
                        now = self._clock.time_ms()
                        if await self._store.claim(callback.id, now, now + self._lease_ms):
                            in_flight.add(asyncio.create_task(self._deliver(callback, state)))
                if not in_flight:
                    return  # nothing due, or backing off: the dispatcher comes back for it
                woken = asyncio.create_task(state.wake.wait())
                try:
                    await asyncio.wait({*in_flight, woken}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    woken.cancel()
                in_flight = {t for t in in_flight if not t.done()}
        except Exception:
            logger.exception("onbind delivery to %s failed; will retry", destination)
            state.retry_at = max(state.retry_at, self._clock.time_ms() + int(ERROR_PAUSE_SECONDS * 1000))
        finally:
            for task in in_flight:
                task.cancel()
            await asyncio.gather(*in_flight, return_exceptions=True)
            state.task = None
            self.notify()  # its slot is free

    async def _deliver(self, callback: PendingCallback, state: _Destination) -> None:
        started = self._clock.time_ms()
        try:
            async with asyncio.timeout(self._attempt_timeout):
                status, _ = await self._federation.request_json(
                    "POST", callback.destination, ONBIND_PATH, json_body=json.loads(callback.body)
                )
            problem = None if 200 <= status < 300 else f"HTTP {status}"
        except TimeoutError:
            problem = "timed out"
        except (FederationError, OutboundPolicyError, ValueError) as e:
            problem = str(e)
        try:
            if problem is None:
                state.failures, state.retry_at = 0, 0
                await self._store.mark_delivered(
                    callback.id, self._clock.time_ms(), delete_invites=self._config.delete_tokens_on_bind
                )
                logger.info("onbind callback %d delivered to %s", callback.id, callback.destination)
                return
            now = self._clock.time_ms()
            # Attempts begun before the last failure counted belong to the same outage.
            if started >= state.failed_at:
                state.failures += 1
                state.failed_at = now
                state.retry_at = now + self.retry_delay_ms(state.failures)
            attempts = callback.attempts + 1
            delay = self.retry_delay_ms(attempts)
            await self._store.reschedule(callback.id, attempts, now + delay)
            logger.log(
                logging.WARNING if attempts >= WARN_AFTER_ATTEMPTS else logging.INFO,
                "onbind callback %d to %s failed %d time%s (%s); retrying in %.1fs, the destination in %.1fs",
                callback.id,
                callback.destination,
                attempts,
                "" if attempts == 1 else "s",
                problem,
                delay / 1000,
                (state.retry_at - now) / 1000,
            )
        except Exception:
            # The claim lapses and the callback is tried again.
            logger.exception("could not record the outcome of onbind callback %d", callback.id)
