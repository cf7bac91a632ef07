"""A 429 says which limit tripped: in its `error`, and as the `limit` label of
`sydent_rate_limited_total` (the limit's name, never the address or user it counted).

Contract: docs/deployment.md, "Metrics and logs"; the names are the limits' config key stems
(`rate_limits.<name>_*`). errcode and retry_after_ms are as before.
"""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest
from support.server import V1, SydentServer, new_secret, unique_email
from support.smtp import SmtpSink, free_port
from test_observability import scrape, series, value

from sydent_lite.errors import MatrixError
from sydent_lite.services.ratelimit import LIMITS, RateLimiter, limit_of


def refused(resp: httpx.Response, names: str) -> None:
    """A 429 M_LIMIT_EXCEEDED whose error names the limit, with a positive retry_after_ms."""
    assert resp.status_code == 429, resp.text
    body = resp.json()
    assert body["errcode"] == "M_LIMIT_EXCEEDED", body
    assert isinstance(body["retry_after_ms"], int) and body["retry_after_ms"] > 0, body
    assert names in body["error"], body


def request_token(client: httpx.Client, address: str) -> httpx.Response:
    body = {"client_secret": new_secret(), "email": address, "send_attempt": 1}
    return client.post(f"{V1}/validate/email/requestToken", json=body)


def test_each_429_names_its_limit_in_the_error_and_the_metric(
    make_server: Callable[..., SydentServer], smtp: SmtpSink
) -> None:
    metrics_port = free_port()
    server = make_server(
        terms_path=None,
        extra_config={
            "metrics": {"enabled": True, "host": "127.0.0.1", "port": metrics_port},
            "rate_limits": {
                "enabled": True,
                "request_token_per_address_burst": 1,
                "request_token_per_address_per_hour": 1.0,
                "request_token_per_ip_burst": 3,
                "request_token_per_ip_per_minute": 1.0,
                "store_invite_per_address_burst": 1,
                "store_invite_per_address_per_hour": 1.0,
                "lookup_per_token_burst": 2,
                "lookup_per_token_per_minute": 1.0,
            },
        },
    )
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    _, before = scrape(url)
    # Every known limit has its series before anything was refused.
    assert {s["limit"] for s in series(before, "sydent_rate_limited_total")} >= {x.name for x in LIMITS.values()}

    twice = unique_email("twice")
    invited = unique_email("invited")
    with server.new_client() as client:
        # requestToken per address: the second request for the same address.
        assert request_token(client, twice).status_code == 200
        refused(request_token(client, twice), "requestToken per address")
        # requestToken per client address (checked first: the refused request above took from it too).
        assert request_token(client, unique_email("a")).status_code == 200
        refused(request_token(client, unique_email("b")), "requestToken per client address")
        # store-invite per invited address.
        invite = {"medium": "email", "address": invited, "room_id": "!r:hs.test", "sender": "@s:hs.test"}
        assert client.post(f"{V1}/store-invite", json=invite).status_code == 200
        refused(client.post(f"{V1}/store-invite", json=invite), "store-invite per address")
        # lookups per client address (v1).
        lookups = [client.get(f"{V1}/lookup", params={"medium": "email", "address": twice}) for _ in range(3)]
        assert [r.status_code for r in lookups[:2]] == [200, 200]
        refused(lookups[2], "lookup requests per user (v2) or client address (v1)")

    _, after = scrape(url)
    name = "sydent_rate_limited_total"
    assert value(after, name, limit="request_token_per_address") == 1
    assert value(after, name, limit="request_token_per_ip") == 1
    assert value(after, name, limit="store_invite_per_address") == 1
    assert value(after, name, limit="lookup_per_token") == 1
    assert value(after, name, limit="submit_token_per_ip") == 0
    # Label values are limit names only: no address reaches the scrape.
    assert {s["limit"] for s in series(after, name)} == {x.name for x in LIMITS.values()}
    text = httpx.get(url, timeout=10).text
    for address in (twice, invited, "127.0.0.1"):
        assert address not in text


async def test_the_limit_is_named_by_the_keys_kind_never_by_its_subject() -> None:
    assert limit_of("rt-addr:alice@example.org").name == "request_token_per_address"
    assert limit_of("lookup-addr:ip:192.0.2.1").name == "lookup_addresses"
    # A limit added without a row in LIMITS: its kind, a constant of the code.
    assert limit_of("si-inviter:@mallory:evil.example").name == "si-inviter"
    # Whatever else: "other", so no subject can become a label value.
    for key in ("alice@example.org", "Alice:x", "rt addr:bob", ":bob", "x" * 40 + ":y"):
        assert limit_of(key).name == "other", key

    limiter = RateLimiter(True)
    await limiter.check("st-addr:email bob@example.org", 1.0, 1)
    with pytest.raises(MatrixError) as e:
        await limiter.check("st-addr:email bob@example.org", 1.0, 1)
    assert (e.value.status, e.value.errcode) == (429, "M_LIMIT_EXCEEDED")
    assert e.value.error == "Too many requests for this address: submitToken per address"
    assert "bob" not in e.value.error and e.value.extra["retry_after_ms"] > 0
