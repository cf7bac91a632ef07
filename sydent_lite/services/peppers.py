"""Lookup peppers: which ones a process answers for, and their rotation.

The schedule lives in the database (storage.peppers, table `lookup_peppers`); every process
reads it every couple of seconds and derives each pepper's role from the times in it and its
own clock, so every worker on every host switches at the same wall-clock moment (give or take
the hosts' clock offsets):

- *preparing*: its hashes are being written into the hash slot it owns (storage.peppers:
  `lookup_hash` or `lookup_hash_b`), by one process at a time (a claim renewed per batch; a
  stalled rehash is taken over where it stopped). Nobody answers for it.
- *next*: every hash written; `activates_ms` is set `lookup.pepper_activation_delay_seconds`
  ahead, so that each process has loaded a lookup index for it before anyone hands it out.
  A process that has loaded it already accepts lookups with it (a host whose clock runs ahead
  may hand it out a little early); hash_details does not give it yet.
- *current*: from `activates_ms` on. hash_details gives it; M_INVALID_PEPPER names it. A
  process that had not loaded it by then (it was down, or slow) holds its lookups for that
  pepper until it has, rather than answer from nothing.
- *previous*: the one it replaced, still answered exactly until `retires_ms` (activation +
  `lookup.previous_pepper_grace_seconds`, written when the next one was scheduled: every worker
  uses the same end whatever its own config says). Then *retired*: M_INVALID_PEPPER.

At most two peppers are live at once (one per hash slot): a rotation starts only after the
previous one's grace window (a rotation started earlier, by hand, ends that window at once).

The rehash never blocks anything: it reads ids in order, a batch at a time, and writes only
the new slot's column (no change-log row: migration 0009). Binds keep hashing for every live
pepper; one that raced the start of a rotation sees it (storage.peppers) and writes the new
hash itself, so every row ends up with it, written by the rehash or by its bind.

Memory: during the window from loading the next pepper to the previous one's retirement, a
process holds two lookup indexes: 64 bytes an association more (two slot filters), plus the
in-memory mxid table on PostgreSQL (~85 bytes more): ~150 bytes an association (150 MB at
1,000,000) for activation delay + grace, by default five minutes plus an hour a day.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from sydent_lite.clock import SYSTEM_CLOCK, Clock
from sydent_lite.secrets_util import now_ms, random_string
from sydent_lite.services.hashing import lookup_hash
from sydent_lite.services.lookup_confirmers import CandidateConfirmer
from sydent_lite.services.lookup_index import LookupIndex
from sydent_lite.services.pacing import Pace
from sydent_lite.storage.association_changes import AssociationChangeStore
from sydent_lite.storage.associations import AssociationStore, LivePeppers
from sydent_lite.storage.peppers import PepperRow, PepperStore, latest_per_slot

logger = logging.getLogger(__name__)

SCHEDULE_POLL_SECONDS = 2.0
PEPPER_LENGTH = 32
# Small batches: each is a burst of PostgreSQL work (0.1-0.2 s at 2,000 rows on a busy 2-core
# host), and the lookups beside it see the bursts, not only the average.
REHASH_BATCH = 2000
# A rehash claim lasts this long unless renewed (every batch): a process that died mid-way is
# taken over after it.
CLAIM_MS = 60_000
# The rehash is at work at most this share of the time (services.pacing): its updates are
# PostgreSQL's work, and PostgreSQL serves every worker's lookups too. At half, the lookup
# bench's quiet 2 s slices fell to 0.59 of steady, at a fifth to 0.78 (bench/RESULTS.md);
# nothing waits for a rehash.
REHASH_SHARE = 0.2
# An upcoming pepper's index is loaded at a moment drawn in this first share of the time left
# before it is current, and paced to use at most UPCOMING_LOAD_SHARE of its worker's event
# loop (services.pacing; the deadline makes it use more if that would not fit). Lower than a
# rebuild's BACKGROUND_LOAD_SHARE: every worker loads it within the same few minutes.
UPCOMING_LOAD_WINDOW = 0.1
UPCOMING_LOAD_SHARE = 0.15
# The VACUUM after a rehash (PostgreSQL): half autovacuum's default pace, a cost limit of 200
# per 4 ms of sleep (vacuum_cost_delay; a manual VACUUM runs flat out by default).
VACUUM_COST_DELAY_MS = 4.0
VACUUM_COST_LIMIT = 200


@dataclass(frozen=True)
class RotationSettings:
    """lookup.pepper_rotation_seconds (0: never on its own), previous_pepper_grace_seconds and
    pepper_activation_delay_seconds (config)."""

    rotation_seconds: int = 0
    grace_seconds: int = 3600
    activation_delay_seconds: int = 300


@dataclass(frozen=True)
class PepperView:
    """The roles of the schedule's rows at one moment."""

    current: PepperRow
    previous: PepperRow | None
    next: PepperRow | None
    preparing: PepperRow | None


def view_of(rows: list[PepperRow], now: int) -> PepperView:
    live = [r for r in rows if not r.retired(now)]
    activated = [r for r in live if r.activates_ms is not None and r.activates_ms <= now]
    if not activated:  # a schedule written by a host whose clock runs ahead of ours
        activated = sorted((r for r in live if r.activates_ms is not None), key=lambda r: r.activates_ms or 0)[:1]
    if not activated:
        raise RuntimeError("the lookup pepper schedule has no current pepper")
    current = max(activated, key=lambda r: (r.activates_ms or 0, r.id))
    previous = next((r for r in activated if r is not current), None)
    upcoming = next((r for r in live if r.activates_ms is not None and r.activates_ms > now and r is not current), None)
    preparing = next((r for r in live if r.activates_ms is None), None)
    return PepperView(current, previous, upcoming, preparing)


async def prepare_pepper(
    store: PepperStore,
    row: PepperRow,
    claimer: str,
    settings: RotationSettings,
    clock: Callable[[], int] = now_ms,
    progress: Callable[[int], None] | None = None,
    pause: Callable[[], Awaitable[None]] | None = None,
) -> PepperRow | None:
    """Write pepper `row`'s hash of every association into its slot (from where a previous
    rehash stopped), then schedule it. Returns the scheduled row, or None if the claim was lost
    (another process took over)."""
    after = row.rehashed_through
    done = 0
    while True:
        batch = await store.threepids_after(after, REHASH_BATCH)
        if not batch:
            break
        hashes = [(i, lookup_hash(a, m, row.pepper)) for i, m, a in batch]
        if not await store.write_rehash_batch(row.id, claimer, row.slot, hashes, clock(), CLAIM_MS):
            logger.warning("lookup pepper rehash: the claim was lost; another process continues it")
            return None
        after = batch[-1][0]
        done += len(batch)
        if progress is not None:
            progress(done)
        await (pause() if pause is not None else asyncio.sleep(0))
    vacuum_started = clock()
    if not await _vacuum_holding_claim(store, row, claimer, clock):
        logger.warning("lookup pepper rehash: the claim was lost while vacuuming; another process continues it")
        return None
    vacuum_seconds = (clock() - vacuum_started) / 1000
    activates = clock() + settings.activation_delay_seconds * 1000
    if not await store.schedule(row.id, claimer, activates, settings.grace_seconds * 1000):
        return None
    logger.info(
        "lookup pepper %d prepared (%d hashes written, then %.1f s of VACUUM); current in %d s",
        row.id,
        done,
        vacuum_seconds,
        settings.activation_delay_seconds,
    )
    return next((r for r in await store.rows() if r.id == row.id), None)


async def _vacuum_holding_claim(store: PepperStore, row: PepperRow, claimer: str, clock: Callable[[], int]) -> bool:
    """Vacuum the table after the rehash (storage.peppers; PostgreSQL), before the pepper is
    scheduled, so that the processes' loads of its index read a clean table, renewing the
    claim meanwhile (a paced VACUUM of a million rows takes minutes). False if the claim was
    lost. A failed VACUUM is only logged: it cleans up, nothing depends on it."""
    vacuum = asyncio.ensure_future(store.vacuum_associations(VACUUM_COST_DELAY_MS, VACUUM_COST_LIMIT))
    try:
        while True:
            done, _ = await asyncio.wait({vacuum}, timeout=CLAIM_MS / 1000 / 4)
            if done:
                if (error := vacuum.exception()) is not None:
                    logger.warning("lookup pepper rehash: VACUUM of the associations failed", exc_info=error)
                return True
            if await store.claim(row.id, claimer, clock(), CLAIM_MS) is None:
                return False
    finally:
        if not vacuum.done():
            vacuum.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await vacuum


async def start_or_resume(store: PepperStore, claimer: str, clock: Callable[[], int] = now_ms) -> PepperRow | None:
    """The pepper to prepare: a new one, or one whose rehash stalled (its claim expired).
    None if a rotation is already under way elsewhere. Whether one is due is the caller's
    question (the scheduler checks the period; `pepper rotate` does not)."""
    now = clock()
    view = view_of(await store.rows(), now)
    if view.preparing is not None:
        return await store.claim(view.preparing.id, claimer, now, CLAIM_MS)
    if view.next is not None:
        return None
    return await store.start_rotation(random_string(PEPPER_LENGTH), now, claimer, CLAIM_MS)


class LookupPeppers:
    """What one process knows of the peppers: the schedule, and a lookup index per pepper it
    answers for. Also the scheduled rotation (lookup.pepper_rotation_seconds)."""

    def __init__(
        self,
        store: PepperStore,
        associations: AssociationStore,
        changes: AssociationChangeStore,
        make_confirmer: Callable[[str, int], CandidateConfirmer],
        settings: RotationSettings,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self._store = store
        self._associations = associations
        self._changes = changes
        self._make_confirmer = make_confirmer
        self.settings = settings
        self._time = clock
        self._clock = clock.time_ms
        self._rows: list[PepperRow] = []
        self._indexes: dict[int, LookupIndex] = {}
        self._loading: dict[int, asyncio.Task[LookupIndex]] = {}
        self._paces: dict[int, Pace] = {}  # of the loads in the background
        self._rehash: asyncio.Task[PepperRow | None] | None = None
        self._claimer = random_string(16)
        # When this process loads each upcoming pepper's index (see step).
        self._load_at: dict[int, int] = {}

    # --- the schedule ---------------------------------------------------------------------------

    async def refresh_schedule(self) -> None:
        self._rows = await self._store.rows()

    def view(self) -> PepperView:
        return view_of(self._rows, self._clock())

    @property
    def current_pepper(self) -> str:
        return self.view().current.pepper

    def live_peppers(self) -> LivePeppers:
        """The pepper of each hash slot a bind must hash for."""
        a, b = latest_per_slot(self._rows, self._clock())
        return (a.pepper if a else None, b.pepper if b else None)

    # --- the indexes ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Read the schedule and load an index for every pepper answered for (at start-up)."""
        await self.refresh_schedule()
        for row in self._wanted():
            await self._index(row)

    def _wanted(self) -> list[PepperRow]:
        now = self._clock()
        return [r for r in self._rows if r.activates_ms is not None and not r.retired(now)]

    def _index(self, row: PepperRow) -> Awaitable[LookupIndex]:
        if (index := self._indexes.get(row.id)) is not None:
            done: asyncio.Future[LookupIndex] = asyncio.get_running_loop().create_future()
            done.set_result(index)
            return done
        task = self._loading.get(row.id)
        if task is None:
            task = self._loading[row.id] = asyncio.create_task(self._load(row))
        elif (pace := self._paces.get(row.id)) is not None:
            pace.hurry()  # a paced load in the background, and now lookups wait for it
        return asyncio.shield(task)

    async def _load(self, row: PepperRow, pace: Pace | None = None) -> LookupIndex:
        """`pace`: in the background, beside the indexes answering (None: flat out)."""
        index = LookupIndex(self._changes, self._associations, self._make_confirmer(row.pepper, row.slot), self._time)
        try:
            # Not blocking lookups: the new index answers nothing until it is in _indexes.
            await index.load(block_lookups=pace is None, pace=pace)
        except BaseException:
            logger.warning("loading the lookup index of pepper %d failed; will retry", row.id, exc_info=True)
            raise
        finally:
            self._loading.pop(row.id, None)
            self._paces.pop(row.id, None)
        self._indexes[row.id] = index
        return index

    async def index_for(self, pepper: str) -> tuple[LookupIndex, str] | None:
        """The index answering lookups made with `pepper`, and that pepper; None if it is not
        accepted (never was, or retired)."""
        view = self.view()
        for row in (view.current, view.previous, view.next):
            if row is None or not hmac.compare_digest(row.pepper.encode(), pepper.encode()):
                continue
            if row is view.next and row.id not in self._indexes:
                return None  # not ours yet: nobody hands it out before every process has it
            if row.id not in self._indexes:
                logger.warning("lookup pepper %d is current but its index is still loading: lookups wait", row.id)
            return await self._index(row), row.pepper
        return None

    async def current_index(self) -> tuple[LookupIndex, str]:
        row = self.view().current
        return await self._index(row), row.pepper

    @property
    def indexes(self) -> dict[int, LookupIndex]:
        return self._indexes

    # --- background -----------------------------------------------------------------------------

    async def run(self) -> None:
        """Poll the schedule: load the indexes of new peppers, drop retired ones, keep each index
        current, and rotate when it is time."""
        while True:
            await self._time.sleep(SCHEDULE_POLL_SECONDS)
            try:
                await self.step()
            except Exception:
                logger.exception("lookup pepper refresh failed; will retry")

    async def step(self) -> None:
        await self.refresh_schedule()
        wanted = {r.id: r for r in self._wanted()}
        now = self._clock()
        for row in wanted.values():
            if row.id in self._indexes or row.id in self._loading:
                continue
            # An upcoming pepper's index is loaded at a moment drawn early in the time left
            # before it is current, so that the processes do not all start at once (a load is
            # a scan of the table and ~0.35 s of CPU per 100,000), and paced (services.pacing)
            # to finish before the pepper is current, using at most UPCOMING_LOAD_SHARE of the
            # event loop if that leaves time enough.
            left = (row.activates_ms or now) - now
            window = max(0, left) * UPCOMING_LOAD_WINDOW
            load_at = self._load_at.setdefault(row.id, now + int(random.uniform(0, window)))
            if now >= load_at:
                # In the background: lookups go on meanwhile (a failure is logged, retried next time).
                deadline = self._time.monotonic() + max(0, left) / 1000
                pace = self._paces[row.id] = Pace(self._time, UPCOMING_LOAD_SHARE, deadline)
                self._loading[row.id] = asyncio.create_task(self._load(row, pace))
        for row_id in [i for i in self._load_at if i not in wanted]:
            del self._load_at[row_id]
        for row_id in [i for i in self._indexes if i not in wanted]:
            del self._indexes[row_id]
            logger.info("lookup pepper %d retired: its index is dropped", row_id)
        for index in list(self._indexes.values()):
            await index.maintain()
        if self.settings.rotation_seconds > 0 and (self._rehash is None or self._rehash.done()):
            await self._maybe_rotate()

    async def _maybe_rotate(self) -> None:
        now = self._clock()
        view = self.view()
        if view.next is not None:
            return
        if view.preparing is None:
            due = (view.current.activates_ms or 0) + self.settings.rotation_seconds * 1000
            if now < due or (view.previous is not None and view.previous.retires_ms is not None):
                return
        elif view.preparing.claimed_until_ms >= now and view.preparing.claimed_by != self._claimer:
            return
        row = await start_or_resume(self._store, self._claimer, self._clock)
        if row is None:
            return
        logger.info("lookup pepper rotation: preparing pepper %d", row.id)
        pause = Pace(self._time, REHASH_SHARE).step
        self._rehash = asyncio.create_task(
            prepare_pepper(self._store, row, self._claimer, self.settings, self._clock, pause=pause)
        )

    async def aclose(self) -> None:
        tasks = [t for t in (self._rehash, *self._loading.values()) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def prune(self) -> int:
        confirmer = self._make_confirmer("", 0)
        return await LookupIndex(self._changes, self._associations, confirmer, self._time).prune()
