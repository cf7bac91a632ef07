"""The token-bucket arithmetic, shared by every rate-limit store (services.ratelimit,
storage.ratelimits; the Redis store's Lua script spells the same in Lua)."""

from __future__ import annotations


def refill(tokens: float, elapsed_ms: float, rate_per_second: float, burst: int) -> float:
    """The bucket's level after `elapsed_ms` at `rate_per_second`, at most `burst` (a clock that
    went backwards adds nothing)."""
    return min(float(burst), tokens + max(0.0, elapsed_ms) * rate_per_second / 1000.0)


def take_amount(tokens: float, want: int, need: int) -> int:
    """What a take gets from a bucket at `tokens`: all of `need` (and up to `want`), or nothing."""
    whole = int(tokens)
    return min(want, whole) if whole >= need else 0
