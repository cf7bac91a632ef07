"""Rate limits shared by every process, and X-Forwarded-For from trusted proxies only.

Limits are token buckets kept where every worker sees them: the database (`rate_limit_buckets`)
or Redis (`rate_limits.redis_url`). So a burst of 3 is 3 requests in all, however they are
spread over processes, and the 4th is 429 M_LIMIT_EXCEEDED with `retry_after_ms` on any of
them. Limited: requestToken per client IP and per address, store-invite per client IP and
per invited address, lookups per user (v2) or client IP (v1), in requests and in addresses
(a lookup of N addresses costs N), and /account/register per client IP and per homeserver
host, before it calls the homeserver. The client IP is the peer's address, or
X-Forwarded-For's when the peer is a configured proxy; an IPv6 client counts by its /64.

The multi-process tests run on PostgreSQL (`DatabaseFactory("postgres")`) and Redis
(127.0.0.1:6379 unless SYDENT_LITE_TEST_REDIS says otherwise; `off` skips them).
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
from starlette.requests import Request
from support.db import DatabaseFactory, ScratchDatabase, _run, run_sql
from support.homeserver import OPENID_USERINFO_PATH, HomeserverStandIn
from support.inprocess import InProcessServer
from support.server import V1, V2, IdentityApi, SydentServer, User, sha256_address, unique_email
from support.smtp import SmtpSink

from sydent_lite.errors import MatrixError
from sydent_lite.http.client_ip import client_ip
from sydent_lite.services.ratelimit import (
    MemoryRateLimitStore,
    RateLimiter,
    RedisRateLimitStore,
    client_subject,
    storage_key,
)

REDIS_ENV = "SYDENT_LITE_TEST_REDIS"
DEFAULT_REDIS = "redis://127.0.0.1:6379"


def redis_url(db: int) -> str:
    """A Redis database of its own for a test, emptied first (skips when Redis is not there)."""
    base = os.environ.get(REDIS_ENV, DEFAULT_REDIS).strip()
    if base.lower() == "off":
        pytest.skip(f"Redis tests switched off ({REDIS_ENV}=off)")
    url = f"{base.rstrip('/')}/{db}"

    async def flush() -> None:
        import redis.asyncio as aioredis

        client = aioredis.Redis.from_url(url, socket_connect_timeout=3)
        try:
            await client.flushdb()
        finally:
            await client.aclose()

    try:
        _run(flush())
    except Exception as e:
        if os.environ.get("CI"):
            pytest.fail(f"Redis at {url} is not reachable: {e} (CI is set: the Redis tests must run)", pytrace=False)
        pytest.skip(f"Redis at {url} is not reachable: {e}")
    return url


def redis_keys(url: str) -> list[str]:
    async def keys() -> list[str]:
        import redis.asyncio as aioredis

        client = aioredis.Redis.from_url(url)
        try:
            return [k.decode() if isinstance(k, bytes) else k for k in await client.keys("*")]
        finally:
            await client.aclose()

    return cast("list[str]", _run(keys()))


# --- two processes on one database ---------------------------------------------------------------


@pytest.fixture
def pg(tmp_path: Path) -> Iterator[DatabaseFactory]:
    factory = DatabaseFactory("postgres", tmp_path / "pg")
    yield factory
    factory.cleanup()


Pair = tuple[SydentServer, SydentServer, ScratchDatabase]


@pytest.fixture
def pair_factory(
    pg: DatabaseFactory,
    smtp_sink: SmtpSink,
    homeserver: HomeserverStandIn,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> Iterator[Callable[..., Pair]]:
    """`pair(extra_config, extra_config_b=None)`: servers A and B on one fresh PostgreSQL
    database, both started (B with its own config when given)."""
    servers: list[SydentServer] = []
    request.node.extra_sydent_servers = servers

    def make(extra_config: dict[str, Any], extra_config_b: dict[str, Any] | None = None) -> Pair:
        db = pg.create()
        made = []
        for label, extra in (("A", extra_config), ("B", extra_config_b or extra_config)):
            server = SydentServer(
                tmp_path / f"{label}{len(servers)}",
                database_url=db.url,
                smtp_port=smtp_sink.port,
                ca_file=homeserver.ca_path,
                extra_config=extra,
                name=f"sydent_lite {label}",
            )
            servers.append(server)
            made.append(server)
        made[0].start()  # creates the schema and the pepper
        made[1].start()
        return made[0], made[1], db

    yield make
    for server in servers:
        server.stop()


def limits(**values: Any) -> dict[str, Any]:
    return {"rate_limits": {"enabled": True, **values}}


def assert_limited(resp: httpx.Response) -> None:
    assert resp.status_code == 429, resp.text
    body = resp.json()
    assert body["errcode"] == "M_LIMIT_EXCEEDED", body
    assert isinstance(body["retry_after_ms"], int) and body["retry_after_ms"] > 0, body


def v1_lookup(server: SydentServer, headers: dict[str, str] | None = None) -> httpx.Response:
    with server.new_client() as c:
        return c.get(
            f"{V1}/lookup", params={"medium": "email", "address": "nobody@example.test"}, headers=headers or {}
        )


def request_token(server: SydentServer, email: str, headers: dict[str, str] | None = None) -> httpx.Response:
    with server.new_client() as c:
        return c.post(
            f"{V1}/validate/email/requestToken",
            headers=headers or {},
            json={"email": email, "client_secret": "s" + uuid.uuid4().hex, "send_attempt": 1},
        )


def test_limits_hold_across_processes_in_the_database(pair_factory: Callable[..., Pair], smtp: SmtpSink) -> None:
    a, b, db = pair_factory(
        limits(
            lookup_per_token_burst=3,
            lookup_per_token_per_minute=1.0,
            request_token_per_ip_burst=3,
            request_token_per_ip_per_minute=1.0,
        )
    )
    # v1 lookup, per client IP: 3 in all over A and B, then 429 on either.
    answers = [v1_lookup(s) for s in (a, b, a)]
    assert [r.status_code for r in answers] == [200, 200, 200], [r.text for r in answers]
    assert_limited(v1_lookup(b))
    assert_limited(v1_lookup(a))
    # requestToken, per client IP: the same.
    codes = [request_token(s, unique_email("shared")).status_code for s in (b, a, b)]
    assert codes == [200, 200, 200]
    assert_limited(request_token(a, unique_email("shared")))
    assert_limited(request_token(b, unique_email("shared")))
    # The buckets live in the database, under hashed keys (no addresses in clear).
    keys = [r["key"] for r in run_sql(db, "SELECT key FROM rate_limit_buckets")]
    assert any(k.startswith("lookup:") for k in keys) and any(k.startswith("rt-ip:") for k in keys), keys
    assert not any("@" in k or "127.0.0.1" in k for k in keys), keys


def test_limits_hold_across_processes_in_redis(pair_factory: Callable[..., Pair], smtp: SmtpSink) -> None:
    url = redis_url(11)
    a, b, db = pair_factory(
        limits(
            redis_url=url,
            lookup_per_token_burst=3,
            lookup_per_token_per_minute=1.0,
            request_token_per_address_burst=2,
            request_token_per_address_per_hour=1.0,
        )
    )
    answers = [v1_lookup(s) for s in (b, a, b)]
    assert [r.status_code for r in answers] == [200, 200, 200], [r.text for r in answers]
    assert_limited(v1_lookup(a))
    assert_limited(v1_lookup(b))
    # requestToken per address (2 per hour): once on each, then 429 on either.
    email = unique_email("redis")
    assert [request_token(s, email).status_code for s in (a, b)] == [200, 200]
    assert_limited(request_token(a, email))
    assert_limited(request_token(b, email))
    keys = redis_keys(url)
    assert any(":lookup:" in k for k in keys) and any(":rt-addr:" in k for k in keys), keys
    assert not any("@" in k for k in keys), keys
    # Nothing in the database: Redis holds the buckets.
    assert run_sql(db, "SELECT key FROM rate_limit_buckets") == []


def store_invite(
    server: SydentServer, hs: HomeserverStandIn, address: str, headers: dict[str, str] | None = None
) -> httpx.Response:
    body = {
        "medium": "email",
        "address": address,
        "room_id": f"!r{uuid.uuid4().hex[:8]}:{hs.server_name}",
        "sender": hs.user_id("inviter"),
    }
    with server.new_client() as c:
        return c.post(f"{V1}/store-invite", json=body, headers=headers or {})


def test_store_invite_limits_per_ip_and_per_address(
    pair_factory: Callable[..., Pair], smtp: SmtpSink, homeserver: HomeserverStandIn
) -> None:
    a, b, _ = pair_factory(
        limits(
            store_invite_per_address_burst=2,
            store_invite_per_address_per_hour=1.0,
            store_invite_per_ip_burst=4,
            store_invite_per_ip_per_minute=1.0,
        )
    )
    address = unique_email("invited")
    assert store_invite(a, homeserver, address).status_code == 200
    assert store_invite(b, homeserver, address.upper()).status_code == 200  # one address, however spelt
    assert_limited(store_invite(a, homeserver, address))
    # Another address still has its budget, until the per-IP budget (4, one spent on the 429) runs out.
    assert store_invite(b, homeserver, unique_email("other")).status_code == 200
    assert_limited(store_invite(a, homeserver, unique_email("third")))
    assert_limited(store_invite(b, homeserver, unique_email("fourth")))


def test_lookup_limits_per_token(
    pair_factory: Callable[..., Pair], smtp: SmtpSink, homeserver: HomeserverStandIn
) -> None:
    a, b, _ = pair_factory(limits(lookup_per_token_burst=2, lookup_per_token_per_minute=1.0))
    api_a = IdentityApi(a, smtp, homeserver, a.new_client())
    api_b = IdentityApi(b, smtp, homeserver, b.new_client())
    try:
        first, second = api_a.register(), api_b.register()
        pepper = api_a.hash_details(first)["lookup_pepper"]  # hash_details is not a lookup

        def lookup(api: IdentityApi, user: User) -> httpx.Response:
            return api.lookup(user, ["abc"], pepper=pepper)

        assert [lookup(api_a, first).status_code, lookup(api_b, first).status_code] == [200, 200]
        assert_limited(lookup(api_b, first))
        assert_limited(lookup(api_a, first))
        # Another token (same client IP) has its own budget.
        assert lookup(api_b, second).status_code == 200
        # bulk_lookup (v1, per client IP) is limited too.
        codes = []
        for api in (api_a, api_b, api_a):
            codes.append(
                api.client.post(f"{V1}/bulk_lookup", json={"threepids": [["email", "x@example.test"]]}).status_code
            )
        assert codes == [200, 200, 429]
    finally:
        api_a.client.close()
        api_b.client.close()


def test_forwarded_for_only_from_trusted_proxies(pair_factory: Callable[..., Pair], smtp: SmtpSink) -> None:
    # A trusts the proxy on 127.0.0.0/8 (where the test runs), B trusts only some other network.
    base = limits(lookup_per_token_burst=2, lookup_per_token_per_minute=1.0)
    a, b, _ = pair_factory(
        {**base, "listen": {"trusted_proxies": ["127.0.0.0/8", "10.0.0.0/8"]}},
        {**base, "listen": {"trusted_proxies": ["192.0.2.0/24"]}},
    )

    def xff(value: str) -> dict[str, str]:
        return {"X-Forwarded-For": value}

    # Through the trusted proxy: each forwarded client has its own budget ...
    assert [v1_lookup(a, xff("203.0.113.7")).status_code for _ in range(2)] == [200, 200]
    assert_limited(v1_lookup(a, xff("203.0.113.7")))
    assert v1_lookup(a, xff("203.0.113.8")).status_code == 200
    # ... read right to left: entries the client wrote itself (left of it) mean nothing, and
    # trusted proxies in the chain are skipped.
    assert_limited(v1_lookup(a, xff("198.51.100.1, 203.0.113.7")))
    assert_limited(v1_lookup(a, xff("203.0.113.7, 10.1.2.3")))
    assert v1_lookup(a, xff("203.0.113.9, 10.1.2.3")).status_code == 200
    # A malformed chain counts against the proxy's own address (the peer), not a made-up one.
    assert [v1_lookup(a, xff("not-an-ip")).status_code for _ in range(2)] == [200, 200]
    assert_limited(v1_lookup(a, xff("garbage")))
    assert_limited(v1_lookup(a))  # the peer 127.0.0.1 itself: the same bucket
    # B does not trust 127.0.0.1: the header is ignored, every request is the peer's.
    # (Its bucket for 127.0.0.1 is the one A just emptied: one database, one budget.)
    assert_limited(v1_lookup(b, xff("203.0.113.50")))
    assert_limited(v1_lookup(b, xff("203.0.113.51")))


# --- the pieces on their own -----------------------------------------------------------------------


def make_request(peer: str | None, forwarded: list[str] | None = None) -> Request:
    headers = [(b"x-forwarded-for", v.encode()) for v in forwarded or []]
    scope = {
        "type": "http",
        "method": "GET",
        "path": "/",
        "headers": headers,
        "query_string": b"",
        "client": (peer, 1234) if peer is not None else None,
    }
    return Request(scope)


@pytest.mark.parametrize(
    ("peer", "forwarded", "trusted", "expected"),
    [
        ("203.0.113.5", ["198.51.100.1"], [], "203.0.113.5"),  # no proxies configured
        ("203.0.113.5", ["198.51.100.1"], ["10.0.0.0/8"], "203.0.113.5"),  # peer is no proxy of ours
        ("10.0.0.2", ["198.51.100.1"], ["10.0.0.0/8"], "198.51.100.1"),
        ("10.0.0.2", ["1.1.1.1, 198.51.100.1"], ["10.0.0.0/8"], "198.51.100.1"),  # right-most wins
        ("10.0.0.2", ["198.51.100.1, 10.9.9.9"], ["10.0.0.0/8"], "198.51.100.1"),  # skip our proxies
        ("10.0.0.2", ["198.51.100.1", "10.9.9.9"], ["10.0.0.0/8"], "198.51.100.1"),  # repeated headers
        ("10.0.0.2", ["junk, 198.51.100.1"], ["10.0.0.0/8"], "198.51.100.1"),  # junk left of the client
        ("10.0.0.2", ["198.51.100.1, junk"], ["10.0.0.0/8"], "10.0.0.2"),  # junk where our proxy wrote
        ("10.0.0.2", ["198.51.100.1:4567"], ["10.0.0.0/8"], "10.0.0.2"),  # ports are not addresses
        ("10.0.0.2", [], ["10.0.0.0/8"], "10.0.0.2"),
        ("10.0.0.2", ["10.0.0.9"], ["10.0.0.0/8"], "10.0.0.9"),  # started at a proxy
        ("::ffff:10.0.0.2", ["2001:db8::7"], ["10.0.0.0/8"], "2001:db8::7"),  # dual-stack peer
        ("::1", ["2001:db8::7"], ["::1/128"], "2001:db8::7"),
        (None, ["198.51.100.1"], ["10.0.0.0/8"], "unknown"),
    ],
)
def test_client_ip(peer: str | None, forwarded: list[str], trusted: list[str], expected: str) -> None:
    assert client_ip(make_request(peer, forwarded), trusted) == expected


async def _concurrent_checks(limiter: RateLimiter, key: str, n: int, burst: int, cost: int = 1) -> list[int | None]:
    async def one() -> int | None:
        try:
            await limiter.check(key, 0.001, burst, cost)
            return None
        except MatrixError as e:
            assert e.status == 429 and e.errcode == "M_LIMIT_EXCEEDED"
            return cast("int | None", e.to_json()["retry_after_ms"])

    return list(await asyncio.gather(*(one() for _ in range(n))))


@pytest.mark.postgres
async def test_database_store_is_atomic_under_concurrency(pg: DatabaseFactory) -> None:
    from sydent_lite.config import RateLimitConfig
    from sydent_lite.storage.database import migrate, open_database

    db = pg.create()
    databases = [open_database(db.url), open_database(db.url)]  # as two processes would have
    try:
        await migrate(databases[0])
        limiters = [RateLimiter.from_config(RateLimitConfig(), e) for e in databases]
        results = await asyncio.gather(*(_concurrent_checks(lim, "conc:key", 15, 5) for lim in limiters))
        flat = [r for rs in results for r in rs]
        assert flat.count(None) == 5, flat  # exactly the burst, no lost updates
        assert all(r is not None and r > 0 for r in flat if r is not None)
    finally:
        for e in databases:
            await e.dispose()


async def test_sqlite_store(tmp_path: Path) -> None:
    from sydent_lite.config import RateLimitConfig
    from sydent_lite.storage.database import migrate, open_database

    database = open_database(f"sqlite:///{tmp_path / 'rl.sqlite'}")
    try:
        await migrate(database)
        limiter = RateLimiter.from_config(RateLimitConfig(), database)
        results = await _concurrent_checks(limiter, "conc:key", 12, 4)
        assert results.count(None) == 4, results
        # Refill: 1000 per second makes a token due at once.
        await limiter.check("fast:key", 1000.0, 1)
        await asyncio.sleep(0.01)
        await limiter.check("fast:key", 1000.0, 1)
    finally:
        await database.dispose()


async def test_redis_store_is_atomic_under_concurrency() -> None:
    url = await asyncio.to_thread(redis_url, 12)
    limiters = [RateLimiter(True, RedisRateLimitStore(url)) for _ in range(2)]
    try:
        results = await asyncio.gather(*(_concurrent_checks(lim, "conc:key", 15, 5) for lim in limiters))
        flat = [r for rs in results for r in rs]
        assert flat.count(None) == 5, flat
        keys = await asyncio.to_thread(redis_keys, url)
        assert keys == [RedisRateLimitStore.PREFIX + storage_key("conc:key")]
    finally:
        for lim in limiters:
            await lim.aclose()


async def test_redis_unreachable_lets_requests_through() -> None:
    limiter = RateLimiter(True, RedisRateLimitStore("redis://127.0.0.1:1/0"))
    try:
        for _ in range(3):
            await limiter.check("down:key", 0.001, 1)  # no exception: fail open, logged
    finally:
        await limiter.aclose()


async def test_disabled_limiter_never_limits() -> None:
    limiter = RateLimiter(False)
    for _ in range(5):
        await limiter.check("off:key", 0.001, 1)


# --- costs: a request that takes many tokens at once ------------------------------------------------


async def test_a_cost_is_taken_whole_or_not_at_all_and_leases_count_towards_it() -> None:
    limiter = RateLimiter(True, MemoryRateLimitStore())
    rate, burst = 0.0001, 2000  # no refill worth speaking of; leases of 100 single tokens
    for _ in range(150):
        await limiter.check("k", rate, burst)  # two leases taken from the bucket, 50 left in hand
    await limiter.check("k", rate, burst, 1800)  # the 50 in hand plus 1,750 from the bucket
    with pytest.raises(MatrixError) as refused:
        await limiter.check("k", rate, burst, 51)  # 50 left: none of them is taken
    assert refused.value.status == 429 and refused.value.to_json()["retry_after_ms"] > 0
    await limiter.check("k", rate, burst, 50)
    with pytest.raises(MatrixError):
        await limiter.check("k", rate, burst)  # 2,000 in all, and not one more


async def test_a_cost_above_the_burst_is_refused_clearly() -> None:
    limiter = RateLimiter(True, MemoryRateLimitStore())
    with pytest.raises(MatrixError) as refused:
        await limiter.check("k", 1.0, 100, 101)
    assert (refused.value.status, refused.value.errcode) == (400, "M_TOO_LARGE")
    await limiter.check("k", 1.0, 100, 100)  # nothing was taken by the refusal


async def test_costs_are_atomic_in_sqlite(tmp_path: Path) -> None:
    from sydent_lite.config import RateLimitConfig
    from sydent_lite.storage.database import migrate, open_database

    database = open_database(f"sqlite:///{tmp_path / 'rl.sqlite'}")
    try:
        await migrate(database)
        limiters = [RateLimiter.from_config(RateLimitConfig(), database) for _ in range(2)]  # as two processes
        results = await asyncio.gather(*(_concurrent_checks(lim, "cost:key", 6, 1000, 300) for lim in limiters))
        flat = [r for rs in results for r in rs]
        assert flat.count(None) == 3, flat  # 3 x 300 of 1,000; the 100 left pay for no fourth
    finally:
        await database.dispose()


@pytest.mark.postgres
async def test_costs_are_atomic_in_postgres(pg: DatabaseFactory) -> None:
    from sydent_lite.config import RateLimitConfig
    from sydent_lite.storage.database import migrate, open_database

    db = pg.create()
    databases = [open_database(db.url), open_database(db.url)]
    try:
        await migrate(databases[0])
        limiters = [RateLimiter.from_config(RateLimitConfig(), e) for e in databases]
        results = await asyncio.gather(*(_concurrent_checks(lim, "cost:key", 8, 1000, 300) for lim in limiters))
        flat = [r for rs in results for r in rs]
        assert flat.count(None) == 3, flat
    finally:
        for e in databases:
            await e.dispose()


async def test_costs_are_atomic_in_redis() -> None:
    url = await asyncio.to_thread(redis_url, 13)
    limiters = [RateLimiter(True, RedisRateLimitStore(url)) for _ in range(2)]
    try:
        results = await asyncio.gather(*(_concurrent_checks(lim, "cost:key", 8, 1000, 300) for lim in limiters))
        flat = [r for rs in results for r in rs]
        assert flat.count(None) == 3, flat
    finally:
        for lim in limiters:
            await lim.aclose()


async def test_the_default_address_budget_takes_a_whole_address_book() -> None:
    from sydent_lite.config import RateLimitConfig

    rl = RateLimitConfig()
    limiter = RateLimiter(True, MemoryRateLimitStore())
    # 10,000 addresses at once (the most a lookup may carry), then the same again: emails,
    # then phone numbers of one contact book.
    rate = rl.lookup_addresses_per_minute / 60
    for _ in range(2):
        await limiter.check("lookup-addr:user:@a:hs", rate, rl.lookup_addresses_burst, 10_000)


# --- IPv6 clients by /64 -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "subject"),
    [
        ("203.0.113.7", "203.0.113.7"),
        ("::ffff:203.0.113.7", "203.0.113.7"),  # a dual-stack socket's view of an IPv4 client
        ("2001:db8:1:2::1", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:ffff:ffff:ffff:ffff", "2001:db8:1:2::/64"),
        ("2001:DB8:1:2:0:0:0:9", "2001:db8:1:2::/64"),
        ("2001:db8:1:3::1", "2001:db8:1:3::/64"),
        ("::1", "::/64"),
        ("unknown", "unknown"),
    ],
)
def test_client_subject(address: str, subject: str) -> None:
    assert client_subject(address) == subject


def xff(value: str) -> dict[str, str]:
    return {"X-Forwarded-For": value}


def test_ipv6_clients_are_limited_by_their_64(
    make_inprocess_server: Callable[..., InProcessServer], homeserver: HomeserverStandIn, smtp: SmtpSink
) -> None:
    # Every per-client-IP limit, burst 2. The clients are behind our proxy (the test runs on
    # 127.0.0.1), which names them in X-Forwarded-For as nginx would.
    server = make_inprocess_server(
        extra_config={
            **limits(
                request_token_per_ip_burst=2,
                request_token_per_ip_per_minute=1.0,
                store_invite_per_ip_burst=2,
                store_invite_per_ip_per_minute=1.0,
                lookup_per_token_burst=2,
                lookup_per_token_per_minute=1.0,
                register_per_ip_burst=2,
                register_per_ip_per_minute=1.0,
            ),
            "listen": {"trusted_proxies": ["127.0.0.0/8"]},
        }
    )

    def register(headers: dict[str, str]) -> httpx.Response:
        with server.new_client() as c:
            return c.post(
                f"{V2}/account/register", json=homeserver.openid_token("u" + uuid.uuid4().hex[:12]), headers=headers
            )

    def bulk(headers: dict[str, str]) -> httpx.Response:
        with server.new_client() as c:
            return c.post(f"{V1}/bulk_lookup", json={"threepids": [["email", "x@example.test"]]}, headers=headers)

    calls: dict[str, Callable[[dict[str, str]], httpx.Response]] = {
        "requestToken": lambda h: request_token(server, unique_email("v6"), h),
        "store-invite": lambda h: store_invite(server, homeserver, unique_email("v6"), h),
        "lookup": lambda h: v1_lookup(server, h),
        "register": register,
    }
    for i, (name, call) in enumerate(calls.items()):
        # One /64 per endpoint (lookup and bulk_lookup share a bucket); any address in it.
        net = f"2001:db8:{i}:77"
        assert call(xff(f"{net}::1")).status_code == 200, name
        assert call(xff(f"{net}:ffff:ffff:ffff:fffe")).status_code == 200, name
        assert_limited(call(xff(f"{net}:1234:5678:9abc:def0")))
        if name == "lookup":
            assert_limited(bulk(xff(f"{net}::2")))
        # Another /64 is another client.
        assert call(xff(f"2001:db8:{i}:78::1")).status_code == 200, name


# --- /account/register: no reflector -------------------------------------------------------------


def register_at(
    server: SydentServer,
    hs: HomeserverStandIn,
    *,
    headers: dict[str, str] | None = None,
    server_name: str | None = None,
) -> tuple[httpx.Response, str]:
    body = hs.openid_token("u" + uuid.uuid4().hex[:12])
    if server_name is not None:
        body["matrix_server_name"] = server_name
    with server.new_client() as c:
        return c.post(f"{V2}/account/register", json=body, headers=headers or {}), body["access_token"]


def userinfo_calls(hs: HomeserverStandIn, tokens: set[str]) -> int:
    return sum(r.query_value("access_token") in tokens for r in hs.requests_to(OPENID_USERINFO_PATH, "GET"))


def test_register_is_limited_per_client_before_any_outbound_request(
    make_inprocess_server: Callable[..., InProcessServer], homeserver: HomeserverStandIn
) -> None:
    server = make_inprocess_server(extra_config=limits(register_per_ip_burst=3, register_per_ip_per_minute=1.0))
    answers, tokens = [], set()
    for _ in range(8):
        resp, token = register_at(server, homeserver)
        answers.append(resp)
        tokens.add(token)
    assert [r.status_code for r in answers[:3]] == [200, 200, 200], [r.text for r in answers]
    for resp in answers[3:]:
        assert_limited(resp)
    # The refused registrations never reached the homeserver.
    assert userinfo_calls(homeserver, tokens) == 3


def test_register_is_limited_per_homeserver_however_spelt(
    make_inprocess_server: Callable[..., InProcessServer], homeserver: HomeserverStandIn
) -> None:
    server = make_inprocess_server(
        extra_config={
            **limits(register_per_server_burst=3, register_per_server_per_minute=1.0),
            "listen": {"trusted_proxies": ["127.0.0.0/8"]},
        }
    )
    # Three clients register with the homeserver: its budget is spent.
    for i in range(3):
        resp, _ = register_at(server, homeserver, headers=xff(f"203.0.113.{i + 1}"))
        assert resp.status_code == 200, resp.text
    # Anyone else, naming that host in any spelling or on any port, is refused before we call it.
    tokens = set()
    for i, name in enumerate(
        [homeserver.server_name, "127.0.0.1:1", f"[::ffff:127.0.0.1]:{homeserver.port}", "127.0.0.1"]
    ):
        resp, token = register_at(server, homeserver, headers=xff(f"198.51.100.{i + 1}"), server_name=name)
        assert_limited(resp)
        tokens.add(token)
    assert userinfo_calls(homeserver, tokens) == 0
    # Another homeserver has its own budget (here: one that cannot be reached, so 401).
    resp, _ = register_at(server, homeserver, headers=xff("198.51.100.9"), server_name="localhost:1")
    assert resp.status_code == 401, resp.text


# --- lookups: per user, and per address ----------------------------------------------------------


def test_lookup_limit_is_per_user_so_registering_again_is_no_new_budget(
    make_inprocess_server: Callable[..., InProcessServer], api_for: Callable[[SydentServer], IdentityApi]
) -> None:
    server = make_inprocess_server(extra_config=limits(lookup_per_token_burst=2, lookup_per_token_per_minute=1.0))
    api = api_for(server)
    first = api.register()
    pepper = api.hash_details(first)["lookup_pepper"]
    assert [api.lookup(first, ["abc"], pepper=pepper).status_code for _ in range(2)] == [200, 200]
    assert_limited(api.lookup(first, ["abc"], pepper=pepper))
    again = api.register(first.localpart)  # a fresh token for the same user
    assert again.token != first.token
    assert_limited(api.lookup(again, ["abc"], pepper=pepper))
    # Another user, from the same address, has a budget of their own.
    assert api.lookup(api.register(), ["abc"], pepper=pepper).status_code == 200


def bulk_lookup(server: SydentServer, n: int, headers: dict[str, str] | None = None) -> httpx.Response:
    pairs = [["email", f"n{i}.{uuid.uuid4().hex[:6]}@example.test"] for i in range(n)]
    with server.new_client() as c:
        return c.post(f"{V1}/bulk_lookup", json={"threepids": pairs}, headers=headers or {})


def small_address_budget() -> dict[str, Any]:
    # The burst may not be below lookup.max_addresses (config): lower both.
    return {**limits(lookup_addresses_burst=1000, lookup_addresses_per_minute=1.0), "lookup": {"max_addresses": 1000}}


def assert_too_large(resp: httpx.Response) -> None:
    assert resp.status_code == 400, resp.text
    assert resp.json()["errcode"] == "M_TOO_LARGE", resp.text


def test_v1_lookups_count_addresses_per_client(make_inprocess_server: Callable[..., InProcessServer]) -> None:
    # The per-request limit (100 in a burst) is nowhere near: the addresses are what count.
    server = make_inprocess_server(extra_config=small_address_budget())
    assert bulk_lookup(server, 600).status_code == 200
    assert_limited(bulk_lookup(server, 600))  # 400 left, and none of them taken
    assert bulk_lookup(server, 400).status_code == 200
    assert_limited(v1_lookup(server))  # a single lookup costs one, from the same budget
    # A lookup larger than the whole budget could never pass: a clear refusal, not a 429.
    assert_too_large(bulk_lookup(server, 1001))


def test_v2_lookups_count_addresses_per_user(
    make_inprocess_server: Callable[..., InProcessServer], api_for: Callable[[SydentServer], IdentityApi]
) -> None:
    server = make_inprocess_server(extra_config=small_address_budget())
    api = api_for(server)
    user = api.register()
    pepper = api.hash_details(user)["lookup_pepper"]

    def hashes(n: int) -> list[str]:
        return [sha256_address(f"h{i}.{uuid.uuid4().hex[:6]}@example.test", "email", pepper) for i in range(n)]

    assert api.lookup(user, hashes(700), pepper=pepper).status_code == 200
    assert_limited(api.lookup(user, hashes(301), pepper=pepper))
    assert_limited(api.lookup(api.register(user.localpart), hashes(301), pepper=pepper))  # a new token: same user
    assert api.lookup(user, hashes(300), pepper=pepper).status_code == 200
    assert api.lookup(api.register(), hashes(700), pepper=pepper).status_code == 200  # another user
    assert_too_large(api.lookup(user, hashes(1001), pepper=pepper))


def test_address_budget_holds_across_processes(pair_factory: Callable[..., Pair], smtp: SmtpSink) -> None:
    a, b, _ = pair_factory(small_address_budget())
    assert bulk_lookup(a, 600).status_code == 200
    assert_limited(bulk_lookup(b, 600))
    assert bulk_lookup(b, 400).status_code == 200
    assert_limited(bulk_lookup(a, 1))
