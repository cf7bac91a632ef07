"""A clock that tests move on by hand (Synapse's tests: `self.reactor.advance(...)`).

It stands in for `sydent_lite.clock.Clock` in a server run in the test process
(`support.inprocess`): expiry, backoff and retry rules are then tested by advancing it, not by
sleeping. It never exists in a subprocess server, so no production process can be given it.

The server's event loop runs on a thread of its own, so `advance()` (called from the test)
hands the wake-ups to that loop thread-safely.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

from sydent_lite.clock import Clock


class FakeClock(Clock):
    def __init__(self, start_ms: int | None = None) -> None:
        # Wall time starts at the real time: tokens and signatures from the homeserver stand-in
        # carry real timestamps.
        self._ms = start_ms if start_ms is not None else int(time.time() * 1000)
        self._monotonic = 1000.0
        self._lock = threading.Lock()
        self._sleepers: list[tuple[float, asyncio.AbstractEventLoop, asyncio.Future[None]]] = []

    def time_ms(self) -> int:
        return self._ms

    def monotonic(self) -> float:
        return self._monotonic

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        with self._lock:
            entry = (self._monotonic + seconds, loop, future)
            self._sleepers.append(entry)
        try:
            await future
        finally:
            with self._lock:
                if entry in self._sleepers:
                    self._sleepers.remove(entry)

    def advance(self, seconds: float) -> None:
        """Move time on by `seconds`; whatever sleeps until then wakes (soon after)."""
        with self._lock:
            self._ms += round(seconds * 1000)
            self._monotonic += seconds
            due = [entry for entry in self._sleepers if entry[0] <= self._monotonic]
            for entry in due:
                self._sleepers.remove(entry)
        for _, loop, future in due:
            loop.call_soon_threadsafe(_wake, future)

    @property
    def sleepers(self) -> int:
        """How many sleeps are waiting for time to move on."""
        with self._lock:
            return len(self._sleepers)


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def advance_until(
    clock: FakeClock, predicate: Callable[[], bool], *, step: float, timeout: float = 20.0, what: str = "condition"
) -> float:
    """Move `clock` on by `step` seconds at a time, with a short real pause after each for the
    server to act, until `predicate` holds; returns how far the clock moved (seconds). The
    server may wake up a little after the moment it asked for, never before: the step bounds
    by how much."""
    moved = 0.0
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not reached within {timeout}s (the clock moved {moved:.1f}s)")
        clock.advance(step)
        moved += step
        time.sleep(0.02)
    return moved
