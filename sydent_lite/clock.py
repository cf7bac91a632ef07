"""The one place services read the time from (as Synapse's `hs.get_clock()`).

Services take a `Clock` (wired in `context.py`) instead of calling `time.time()` or
`asyncio.sleep()` themselves, so that tests can stand a fake one in its place and move time
on: an expiry, a backoff or a retry is then tested without waiting for it.
"""

from __future__ import annotations

import asyncio
import time


class Clock:
    """The real clock."""

    def time_ms(self) -> int:
        """Wall-clock milliseconds since the epoch: what is stored and compared across processes."""
        return int(time.time() * 1000)

    def monotonic(self) -> float:
        """Seconds that only go forward: for intervals within this process (leases, refills)."""
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    async def wait_for(self, event: asyncio.Event, timeout: float) -> bool:
        """Wait until `event` is set (True) or `timeout` seconds have passed (False)."""
        waiter = asyncio.ensure_future(event.wait())
        sleeper = asyncio.ensure_future(self.sleep(timeout))
        try:
            await asyncio.wait({waiter, sleeper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
            sleeper.cancel()
        return event.is_set()


SYSTEM_CLOCK = Clock()
