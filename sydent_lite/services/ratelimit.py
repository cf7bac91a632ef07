"""Token-bucket rate limiting, in this process's memory (shared stores come with multi-worker support)."""

from __future__ import annotations

import math
import time

from sydent_lite.errors import MatrixError

_MAX_KEYS = 100_000


class RateLimiter:
    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, last refill time)

    def check(self, key: str, rate_per_second: float, burst: int) -> None:
        """Take one token for `key` or raise 429 M_LIMIT_EXCEEDED with retry_after_ms."""
        if not self.enabled:
            return
        now = time.monotonic()
        tokens, last = self._buckets.get(key, (float(burst), now))
        tokens = min(float(burst), tokens + (now - last) * rate_per_second)
        if tokens < 1.0:
            retry_ms = math.ceil((1.0 - tokens) / rate_per_second * 1000) if rate_per_second > 0 else 60_000
            self._buckets[key] = (tokens, now)
            raise MatrixError(429, "M_LIMIT_EXCEEDED", "Too many requests; try again later", retry_after_ms=retry_ms)
        if len(self._buckets) >= _MAX_KEYS and key not in self._buckets:
            self._buckets.clear()  # bounded memory; a reset only ever lets requests through
        self._buckets[key] = (tokens - 1.0, now)
