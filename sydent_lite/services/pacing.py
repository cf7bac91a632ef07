"""Background work that shares a worker with lookups: a duty cycle.

A worker's event loop, PostgreSQL and (on a small host) everything else share a couple of
cores: a background job that runs flat out (loading the lookup index of a million
associations is a table scan and seconds of CPU; a rehash is a million row updates in the
database) takes a large share of the machine from lookups for as long as it runs. Paced, the
job works in steps and after each one sleeps (1 - share) / share times as long as the step
took, so that it is at work at most `share` of the time. A step's time is its wall time: the
database's part, and whatever the event loop ran meanwhile (lookups), count too, so a busy
process is left more to itself.

A deadline bounds the stretching (an upcoming pepper's index must be loaded before the pepper
is current): once the rest of the work (estimated from the share done so far), twice over, no
longer fits before it at this pace, the sleeps shrink to what fits, down to none. `hurry`
ends the pacing (someone is waiting for the result).
"""

from __future__ import annotations

import asyncio

from sydent_lite.clock import Clock


class Pace:
    def __init__(self, clock: Clock, share: float, deadline: float | None = None) -> None:
        """`share` (0 < share <= 1): the most of the time the job is at work; `deadline`: the
        `clock.monotonic()` by which it should be done (None: no hurry)."""
        self._clock = clock
        self.share = share
        self.deadline = deadline
        self._resumed = clock.monotonic()
        self._busy = 0.0
        self._steps = 0
        self.slept = 0.0  # seconds, in all (for the logs)
        self._sleeper: asyncio.Task[object] | None = None  # the task in a pause, if one is
        self._woken = False

    def begin(self) -> None:
        """The work starts now (it was set up earlier)."""
        self._resumed = self._clock.monotonic()

    def seconds_to_deadline(self) -> float | None:
        """How long until the deadline (None: there is none); for a pace taken on elsewhere."""
        return None if self.deadline is None else self.deadline - self._clock.monotonic()

    def hurry(self) -> None:
        """From now on flat out (a pause under way ends now)."""
        self.share = 1.0
        if self._sleeper is not None and not self._woken:
            self._woken = True
            self._sleeper.cancel()

    async def step(self, done: float = 0.0) -> None:
        """Called after each step of the work; `done`: the share of the whole done so far (0
        if unknown, when a deadline cannot be kept either; 1: all done, no pause). Always
        yields to the event loop."""
        now = self._clock.monotonic()
        took = max(0.0, now - self._resumed)
        self._busy += took
        self._steps += 1
        pause = took * (1 - self.share) / self.share if self.share < 1 and done < 1 else 0.0
        if pause > 0 and self.deadline is not None:
            if 0 < done < 1:
                rest = self._busy * (1 - done) / done
                steps_left = max(1.0, self._steps * (1 - done) / done)
                pause = min(pause, max(0.0, (self.deadline - now - 2 * rest) / steps_left))
            elif now >= self.deadline:
                pause = 0.0
        self.slept += pause
        if pause <= 0:
            await self._clock.sleep(0)  # one pass of the event loop
        else:  # a pause that `hurry` ends early (by cancelling this sleep, and only it)
            self._sleeper = asyncio.current_task()
            try:
                await self._clock.sleep(pause)
            except asyncio.CancelledError:
                if not self._woken or self._sleeper is None or self._sleeper.uncancel() > 0:
                    raise  # a cancellation of the job itself
            finally:
                self._sleeper, self._woken = None, False
        self._resumed = self._clock.monotonic()
