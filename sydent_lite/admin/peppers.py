"""`sydent-lite pepper rotate|show`: the lookup pepper schedule, by hand (services.peppers)."""

from __future__ import annotations

import sys
import time
from dataclasses import replace

from sydent_lite.clock import SYSTEM_CLOCK
from sydent_lite.config import Config
from sydent_lite.context import operator_context, rotation_settings
from sydent_lite.secrets_util import now_ms, random_string
from sydent_lite.services.hashing import load_pepper
from sydent_lite.services.pacing import Pace
from sydent_lite.services.peppers import REHASH_SHARE, prepare_pepper, start_or_resume, view_of
from sydent_lite.storage.associations import AssociationStore
from sydent_lite.storage.peppers import PepperRow, PepperStore
from sydent_lite.storage.state import ServerStateStore


def _when(ms: int | None) -> str:
    if ms is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ms / 1000))


def _describe(rows: list[PepperRow], now: int) -> list[str]:
    """The schedule's live rows, without the peppers themselves (they stay out of logs)."""
    view = view_of(rows, now)
    lines = []
    for role, row in (("current", view.current), ("previous", view.previous), ("next", view.next)):
        if row is not None:
            lines.append(
                f"{role}: pepper {row.id} (slot {row.slot}), current from {_when(row.activates_ms)},"
                f" accepted until {_when(row.retires_ms) if row.retires_ms else 'a rotation'}"
            )
    if view.preparing is not None:
        lines.append(
            f"preparing: pepper {view.preparing.id}, rehashed through association {view.preparing.rehashed_through}"
        )
    return lines


async def show(config: Config) -> list[str]:
    async with operator_context(config) as ctx:
        await load_pepper(ServerStateStore(ctx.database), AssociationStore(ctx.database))
        return _describe(await PepperStore(ctx.database).rows(), now_ms())


async def rotate(config: Config, activate_in: int | None) -> tuple[int, list[str]]:
    """Prepare a new pepper now (or finish a stalled rehash), and schedule it. (exit status, lines)"""
    settings = rotation_settings(config)
    if activate_in is not None:
        settings = replace(settings, activation_delay_seconds=activate_in)
    async with operator_context(config) as ctx:
        await load_pepper(ServerStateStore(ctx.database), AssociationStore(ctx.database))
        store = PepperStore(ctx.database)
        claimer = "cli-" + random_string(12)
        row = await start_or_resume(store, claimer)
        if row is None:
            return 1, ["a rotation is already under way:", *_describe(await store.rows(), now_ms())]
        total = await store.max_association_id()

        def progress(done: int) -> None:
            if sys.stderr.isatty():
                print(f"\rrehashed {done} associations (ids up to {total})", end="", file=sys.stderr)

        # Paced like the server's own rotation: the servers' lookups share the database.
        pause = Pace(SYSTEM_CLOCK, REHASH_SHARE).step
        scheduled = await prepare_pepper(store, row, claimer, settings, progress=progress, pause=pause)
        if sys.stderr.isatty():
            print(file=sys.stderr)
        if scheduled is None:
            return 1, ["another process took the rehash over; see `sydent-lite pepper show`"]
        rows = await store.rows()
        return 0, [
            f"pepper {scheduled.id} prepared; current from {_when(scheduled.activates_ms)}",
            *_describe(rows, now_ms()),
        ]
