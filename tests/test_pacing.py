"""services.pacing: a background job's duty cycle and its deadline, on a fake clock."""

from __future__ import annotations

import asyncio
import contextlib

from support.clock import FakeClock

from sydent_lite.services.pacing import Pace


def run_steps(pace: Pace, clock: FakeClock, steps: int, step_seconds: float) -> list[float]:
    """`steps` steps of work of `step_seconds` each (the clock moves on by as much), each
    followed by the pace's pause (the clock moved on through it); the pauses."""

    async def run() -> list[float]:
        pauses = []
        for i in range(1, steps + 1):
            clock.advance(step_seconds)
            before = pace.slept
            step = asyncio.create_task(pace.step(i / steps))
            await asyncio.sleep(0)  # it decides its pause and starts it
            pauses.append(pace.slept - before)
            clock.advance(pauses[-1])
            await asyncio.wait_for(step, 10)
        return pauses

    return asyncio.run(run())


def test_a_paced_job_works_at_most_its_share_of_the_time() -> None:
    clock = FakeClock()
    start = clock.monotonic()
    pauses = run_steps(Pace(clock, 0.25), clock, 10, 1.0)
    assert pauses == [3.0] * 9 + [0.0]  # three times each step; none after the last
    assert clock.monotonic() - start == 37.0


def test_a_deadline_shortens_the_pauses_to_what_fits() -> None:
    clock = FakeClock()
    start = clock.monotonic()
    pauses = run_steps(Pace(clock, 0.25, deadline=start + 20), clock, 10, 1.0)
    assert clock.monotonic() - start <= 20  # 10 s of work and 30 s of pauses would not fit
    assert sum(pauses) > 0 and all(p < 3.0 for p in pauses)
    # Past its deadline a job does not pause at all; hurried, neither.
    late = Pace(clock, 0.25, deadline=clock.monotonic() - 1)
    assert run_steps(late, clock, 3, 1.0) == [0.0, 0.0, 0.0]
    hurried = Pace(clock, 0.25)
    hurried.hurry()
    assert run_steps(hurried, clock, 3, 1.0) == [0.0, 0.0, 0.0]


def test_hurry_ends_the_pause_under_way_and_a_cancel_still_cancels() -> None:
    clock = FakeClock()

    async def run() -> None:
        pace = Pace(clock, 0.25)
        clock.advance(1.0)
        step = asyncio.create_task(pace.step(0.5))
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert pace.slept == 3.0 and not step.done()  # paused for 3 s of the fake clock
        pace.hurry()
        await asyncio.wait_for(step, 10)  # ended without the clock moving on
        assert not step.cancelled()
        clock.advance(1.0)  # flat out from now on
        await asyncio.wait_for(pace.step(0.6), 10)
        assert pace.slept == 3.0

        slow = Pace(clock, 0.25)
        clock.advance(1.0)
        paused = asyncio.create_task(slow.step(0.5))
        await asyncio.sleep(0)
        paused.cancel()  # the job itself cancelled mid-pause: cancelled, not swallowed
        with contextlib.suppress(asyncio.CancelledError):
            await paused
        assert paused.cancelled()

    asyncio.run(run())
