"""Token-bucket rate limiting, shared by every worker.

A bucket holds up to `burst` tokens and refills at `rate_per_second`; each request takes its
cost in tokens (one, or e.g. the number of addresses a lookup asks about), all or none, or is
answered 429 M_LIMIT_EXCEEDED with `retry_after_ms` (when enough tokens are due). A cost above
the burst could never be paid: that request is refused with 400 M_TOO_LARGE instead.

The buckets live where every process sees them: in Redis when `rate_limits.redis_url` is set
(one Lua script per check, atomic on the Redis server), else in the database
(`rate_limit_buckets`, one transaction per check holding the bucket's row lock; see
sydent_lite.storage.ratelimits). A process-local store remains for tools and tests that have
neither.

Bucket keys are hashed before they are stored: they carry email addresses and phone numbers,
which have no business sitting in a rate-limit table or in Redis.

Limits per client address count an IPv6 client by its /64 (`client_subject`): one host or home
network is normally given a whole /64, so counting each of its addresses alone would give it
2**64 budgets.

A key's kind (the part before its first ':', e.g. `rt-addr`) names the limit it counts for
(`LIMITS`): a 429 says which limit tripped in its `error`, and counts under that limit's name
in `sydent_rate_limited_total{limit}`. The name is the limit's config keys' stem
(`rate_limits.<name>_*`), so an operator reading either knows what to tune; it never carries
the key's subject (an address, a user).
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import logging
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Protocol

from sydent_lite.clock import SYSTEM_CLOCK, Clock
from sydent_lite.errors import ErrorCode, MatrixError
from sydent_lite.observability import metrics
from sydent_lite.token_bucket import refill, take_amount

if TYPE_CHECKING:  # pragma: no cover
    from sydent_lite.config import RateLimitConfig
    from sydent_lite.storage.database import Database

logger = logging.getLogger(__name__)

_MAX_KEYS = 100_000
# Without a configuration to derive it from: buckets untouched this long are full again.
_DEFAULT_HORIZON_MS = 24 * 60 * 60 * 1000


@dataclass(frozen=True)
class Limit:
    """One rate limit as operators and clients see it."""

    name: str  # the metric label and the config keys' stem: rate_limits.<name>_*
    refusal: str  # the 429's `error`: what tripped, never whose


# Bucket key kind -> its limit. Subjects: a client address (an IPv4 address or IPv6 /64), a 3PID
# address, a user (v2 lookups), a homeserver host.
LIMITS: dict[str, Limit] = {
    "rt-ip": Limit(
        "request_token_per_ip", "Too many requests from this client address: requestToken per client address"
    ),
    "rt-addr": Limit("request_token_per_address", "Too many requests for this address: requestToken per address"),
    "st-ip": Limit("submit_token_per_ip", "Too many requests from this client address: submitToken per client address"),
    "st-addr": Limit("submit_token_per_address", "Too many requests for this address: submitToken per address"),
    "si-ip": Limit(
        "store_invite_per_ip", "Too many requests from this client address: store-invite per client address"
    ),
    "si-addr": Limit("store_invite_per_address", "Too many requests for this address: store-invite per address"),
    "si-sender": Limit("store_invite_per_sender", "Too many invitations from this user: store-invite per sender"),
    "sms-country": Limit("sms_per_country", "Too many text messages to this country: SMS per country"),
    "lookup": Limit("lookup_per_token", "Too many lookups: lookup requests per user (v2) or client address (v1)"),
    "lookup-addr": Limit(
        "lookup_addresses", "Too many addresses looked up: addresses per user (v2) or client address (v1)"
    ),
    "reg-ip": Limit("register_per_ip", "Too many requests from this client address: register per client address"),
    "reg-server": Limit("register_per_server", "Too many requests for this homeserver: register per homeserver"),
}
_KIND = re.compile(r"[a-z][a-z0-9-]{0,31}")
_OTHER = Limit("other", "Too many requests")

for _limit in LIMITS.values():
    metrics.RATE_LIMITED.labels(limit=_limit.name)  # the series exist from the start (at 0)


def limit_of(key: str) -> Limit:
    """The limit a bucket key counts for. A kind without a row in LIMITS (a limit added since)
    is named by its kind: a constant in the code, so label values stay bounded; a key without
    a kind is "other", whatever it holds."""
    kind, colon, _ = key.partition(":")
    if kind in LIMITS:
        return LIMITS[kind]
    if colon and _KIND.fullmatch(kind):
        return Limit(kind, f"Too many requests: {kind}")
    return _OTHER


class RateLimitStore(Protocol):
    async def take(
        self, key: str, rate_per_second: float, burst: int, want: int = 1, need: int = 1
    ) -> tuple[int, float]:
        """Refill the bucket; if it holds `need` whole tokens, take up to `want` (at least `need`),
        else none, in one atomic step; (tokens taken, tokens left)."""

    async def aclose(self) -> None: ...


@lru_cache(maxsize=4096)
def client_subject(ip: str) -> str:
    """The client an address stands for in per-IP limits: an IPv4 address, or an IPv6 /64.

    An IPv4-mapped IPv6 address (`::ffff:192.0.2.1`, a dual-stack socket's view of an IPv4 peer)
    is that IPv4 address. Anything that is not an address is used as it is.
    """
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return ip
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


def storage_key(key: str) -> str:
    """`kind:sha256(key)`: bounded length, no addresses in clear, still readable by kind."""
    kind = key.split(":", 1)[0][:32]
    return f"{kind}:{hashlib.sha256(key.encode('utf-8', 'surrogatepass')).hexdigest()}"


def horizon_ms(limits: Iterable[tuple[float, int]]) -> int:
    """The longest time an emptied bucket takes to refill: older buckets are as good as full."""
    longest = 0.0
    for rate_per_second, burst in limits:
        if rate_per_second <= 0:
            return _DEFAULT_HORIZON_MS * 7
        longest = max(longest, burst / rate_per_second)
    return max(int(longest * 1000) + 60_000, 60 * 60 * 1000)


class MemoryRateLimitStore:
    """This process's memory only: right for a single process, wrong for several."""

    def __init__(self, clock: Clock = SYSTEM_CLOCK) -> None:
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, last refill, ms)

    async def take(
        self, key: str, rate_per_second: float, burst: int, want: int = 1, need: int = 1
    ) -> tuple[int, float]:
        now = self._clock.monotonic() * 1000
        tokens, last = self._buckets.get(key, (float(burst), now))
        tokens = refill(tokens, now - last, rate_per_second, burst)
        taken = take_amount(tokens, want, need)
        tokens -= taken
        if len(self._buckets) >= _MAX_KEYS and key not in self._buckets:
            self._buckets.clear()  # bounded memory; a reset only ever lets requests through
        self._buckets[key] = (tokens, now)
        return taken, tokens

    async def aclose(self) -> None:
        return None


# KEYS[1]: bucket; ARGV: rate per ms, burst, expiry (ms), want, need. Returns {taken, tokens left}:
# all of `need` (up to `want`) or nothing.
# The Redis server's clock is the one clock every worker on every host agrees on.
_REDIS_TAKE = """
if redis.replicate_commands then pcall(redis.replicate_commands) end
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(state[1])
local ts = tonumber(state[2])
if tokens == nil or ts == nil then
  tokens = burst
  ts = now
end
local elapsed = now - ts
if elapsed < 0 then elapsed = 0 end
tokens = math.min(burst, tokens + elapsed * rate)
local taken = 0
if math.floor(tokens) >= tonumber(ARGV[5]) then
  taken = math.min(tonumber(ARGV[4]), math.floor(tokens))
end
tokens = tokens - taken
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(math.max(now, ts)))
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return {taken, tostring(tokens)}
"""


class RedisRateLimitStore:
    """Buckets as Redis hashes, updated by one Lua script (atomic: no WATCH, no lost update).

    When Redis cannot be reached the request is let through and the failure logged: a rate
    limiter that takes the identity server down with it protects nobody.
    """

    PREFIX = "sydent_lite:ratelimit:"

    def __init__(self, url: str, horizon_ms: int = _DEFAULT_HORIZON_MS) -> None:
        import redis.asyncio as aioredis

        self._redis = aioredis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
        self._script = self._redis.register_script(_REDIS_TAKE)
        self._horizon_ms = horizon_ms

    async def take(
        self, key: str, rate_per_second: float, burst: int, want: int = 1, need: int = 1
    ) -> tuple[int, float]:
        import redis.exceptions

        try:
            taken, tokens = await self._script(
                keys=[self.PREFIX + key], args=[repr(rate_per_second / 1000.0), burst, self._horizon_ms, want, need]
            )
        except redis.exceptions.RedisError as e:
            logger.error("rate-limit store (Redis) unavailable, request not limited: %s", e)
            return need, float(burst)
        return int(taken), float(tokens)

    async def ping(self) -> None:
        await self._redis.ping()

    async def aclose(self) -> None:
        await self._redis.aclose()


# Leases: a process takes up to burst/LEASE_DIVISOR tokens from the shared bucket at once
# (at most MAX_LEASE requests' worth) and spends them locally for up to LEASE_SECONDS, so a
# busy key costs one shared-store write per lease rather than per request. Small buckets
# (burst < 2 x divisor) lease one token at a time: their limit holds exactly across workers.
# MAX_LEASE only matters for bursts above 2,000 x cost; with 100 there, a key taking thousands
# of requests a second cost a store write (~1 ms on SQLite) every 100 requests, a tenth of the
# CPU of a v1 lookup. A request costing more than a lease holds takes its cost from the store.
LEASE_DIVISOR = 20
MAX_LEASE = 1000
LEASE_SECONDS = 1.0
_MAX_LEASES = 10_000


class RateLimiter:
    def __init__(self, enabled: bool, store: RateLimitStore | None = None, clock: Clock = SYSTEM_CLOCK) -> None:
        self.enabled = enabled
        self._clock = clock
        self.store: RateLimitStore = store if store is not None else MemoryRateLimitStore(clock)
        self._leases: dict[str, tuple[int, float]] = {}  # key -> (tokens in hand, expiry)
        self._taking: dict[str, asyncio.Future[None]] = {}  # key -> the store take under way

    @classmethod
    def from_config(
        cls, config: RateLimitConfig, database: Database | None = None, clock: Clock = SYSTEM_CLOCK
    ) -> RateLimiter:
        """Redis when `redis_url` is set, else the database (else, with neither, this process)."""
        if not config.enabled:
            return cls(False, clock=clock)
        horizon = horizon_ms(
            [
                (config.request_token_per_ip_per_minute / 60, config.request_token_per_ip_burst),
                (config.request_token_per_address_per_hour / 3600, config.request_token_per_address_burst),
                (config.submit_token_per_address_per_day / 86400, config.submit_token_per_address_burst),
                (config.submit_token_per_ip_per_minute / 60, config.submit_token_per_ip_burst),
                (config.store_invite_per_ip_per_minute / 60, config.store_invite_per_ip_burst),
                (config.store_invite_per_address_per_hour / 3600, config.store_invite_per_address_burst),
                (config.lookup_per_token_per_minute / 60, config.lookup_per_token_burst),
                (config.lookup_addresses_per_minute / 60, config.lookup_addresses_burst),
                (config.register_per_ip_per_minute / 60, config.register_per_ip_burst),
                (config.register_per_server_per_minute / 60, config.register_per_server_burst),
            ]
        )
        if config.redis_url:
            return cls(True, RedisRateLimitStore(config.redis_url, horizon), clock)
        if database is not None:
            from sydent_lite.storage.ratelimits import DatabaseRateLimitStore

            return cls(True, DatabaseRateLimitStore(database, horizon, clock), clock)
        return cls(True, clock=clock)

    async def check(self, key: str, rate_per_second: float, burst: int, cost: int = 1) -> None:
        """Take `cost` tokens for `key` (all or none) or raise 429 M_LIMIT_EXCEEDED with
        retry_after_ms, naming the limit (`limit_of(key)`); 400 M_TOO_LARGE when `cost` exceeds
        what the bucket can ever hold."""
        if not self.enabled or cost <= 0:
            return
        if cost > burst:
            raise MatrixError(
                400, ErrorCode.TOO_LARGE, f"Too large for this server's rate limit: at most {burst} at once"
            )
        while True:
            if self._spend_lease(key, cost):
                return
            # One shared-store take per key at a time in this process: the requests that
            # arrive meanwhile wait for its lease instead of each writing to the store.
            pending = self._taking.get(key)
            if pending is None:
                break
            await asyncio.shield(pending)
        done = asyncio.get_running_loop().create_future()
        self._taking[key] = done
        try:
            # What the lease still holds counts towards the cost; the store gives the rest.
            in_hand, expires = self._leases.pop(key, (0, 0.0))
            if self._clock.monotonic() >= expires:
                in_hand = 0
            need = cost - in_hand
            want = max(need, min(MAX_LEASE * cost, burst // LEASE_DIVISOR))
            taken, tokens = await self.store.take(storage_key(key), rate_per_second, burst, want, need)
            left = in_hand + taken - cost if taken else in_hand
            if left > 0:
                if len(self._leases) >= _MAX_LEASES:
                    self._leases.clear()  # bounded; dropping leases only makes the limit stricter
                self._leases[key] = (left, self._clock.monotonic() + LEASE_SECONDS if taken else expires)
        finally:
            del self._taking[key]
            done.set_result(None)
        if taken:
            return
        missing = need - tokens
        retry_ms = max(1, math.ceil(missing / rate_per_second * 1000)) if rate_per_second > 0 else 60_000
        limit = limit_of(key)
        metrics.RATE_LIMITED.labels(limit=limit.name).inc()
        raise MatrixError(429, ErrorCode.LIMIT_EXCEEDED, limit.refusal, retry_after_ms=retry_ms)

    def _spend_lease(self, key: str, cost: int) -> bool:
        in_hand, expires = self._leases.get(key, (0, 0.0))
        if in_hand >= cost and self._clock.monotonic() < expires:
            self._leases[key] = (in_hand - cost, expires)
            return True
        return False

    async def aclose(self) -> None:
        await self.store.aclose()
