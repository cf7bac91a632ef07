"""Sydent's SMS settings over real sockets, on SQLite and PostgreSQL (the buckets are in the
database): `sms.allowed_countries` (with refused_countries: Sydent's smsrule.<cc>),
`rate_limits.sms_per_country_per_hour` (Sydent's country.ratelimit.*) and several
`sms.originators` per country, picked as Sydent picks them.
"""

from __future__ import annotations

import json
import secrets
from pathlib import Path
from typing import Any

import httpx
from support.server import V1, IdentityApi, new_secret, wait_until


def gb() -> str:
    return f"+4477009{secrets.randbelow(100000):05d}"


def fr() -> str:
    return f"+336{secrets.randbelow(10**8):08d}"


def de() -> str:
    return f"+49151{secrets.randbelow(10**8):08d}"


def us() -> str:
    return f"+1202555{secrets.randbelow(100) + 100:04d}"


def request_token(api: IdentityApi, number: str, send_attempt: int = 1, secret: str | None = None) -> httpx.Response:
    body = {
        "client_secret": secret or new_secret(),
        "country": "",
        "phone_number": number,
        "send_attempt": send_attempt,
    }
    return api.client.post(f"{V1}/validate/msisdn/requestToken", json=body)


def sent_to(outbox: Path, number: str) -> list[dict[str, Any]]:
    found = []
    for path in sorted(outbox.glob("*")):
        try:
            sms = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # being written
        if str(sms.get("to", "")).lstrip("+") == number.lstrip("+"):
            found.append(sms)
    return found


def sms_server(make_server: Any, api_for: Any, tmp_path: Path, **extra: Any) -> tuple[IdentityApi, Path]:
    outbox = tmp_path / "sms_outbox"
    outbox.mkdir(exist_ok=True)
    sms = {"provider": "file", "outbox": str(outbox), **extra.pop("sms", {})}
    api: IdentityApi = api_for(make_server(extra_config={"sms": sms, **extra}))
    return api, outbox


def assert_sent(api: IdentityApi, outbox: Path, number: str) -> dict[str, Any]:
    resp = request_token(api, number)
    assert resp.status_code == 200, resp.text
    wait_until(lambda: len(sent_to(outbox, number)) == 1, timeout=5, what=f"an SMS to {number}")
    return sent_to(outbox, number)[0]


def assert_refused(api: IdentityApi, outbox: Path, number: str, status: int, errcode: str) -> None:
    resp = request_token(api, number)
    assert resp.status_code == status and resp.json()["errcode"] == errcode, resp.text
    assert sent_to(outbox, number) == []


def test_allowed_countries_admit_only_themselves(make_server: Any, api_for: Any, tmp_path: Path) -> None:
    api, outbox = sms_server(make_server, api_for, tmp_path, sms={"allowed_countries": ["gb", "FR"]})
    assert_sent(api, outbox, gb())
    assert_sent(api, outbox, fr())
    assert_refused(api, outbox, us(), 400, "M_DESTINATION_REJECTED")
    assert_refused(api, outbox, de(), 400, "M_DESTINATION_REJECTED")


def test_refused_countries_win_over_allowed_ones(make_server: Any, api_for: Any, tmp_path: Path) -> None:
    api, outbox = sms_server(
        make_server, api_for, tmp_path, sms={"allowed_countries": ["GB", "FR"], "refused_countries": ["FR"]}
    )
    assert_sent(api, outbox, gb())
    assert_refused(api, outbox, fr(), 400, "M_DESTINATION_REJECTED")


def test_limit_per_country(make_server: Any, api_for: Any, tmp_path: Path) -> None:
    # SMS pumping: many fresh numbers of one (expensive) country, from many addresses. Only
    # the per-country limit is tight here.
    api, outbox = sms_server(
        make_server,
        api_for,
        tmp_path,
        rate_limits={
            "enabled": True,
            "request_token_per_ip_burst": 100,
            "sms_per_country_per_hour": {"fr": 2, "default": 1},
        },
    )
    assert_sent(api, outbox, fr())
    assert_sent(api, outbox, fr())
    assert_refused(api, outbox, fr(), 429, "M_LIMIT_EXCEEDED")
    # "default": each other country a bucket of its own, of that size.
    assert_sent(api, outbox, de())
    assert_refused(api, outbox, de(), 429, "M_LIMIT_EXCEEDED")
    assert_sent(api, outbox, gb())


def test_a_retry_that_sends_nothing_costs_nothing(make_server: Any, api_for: Any, tmp_path: Path) -> None:
    api, outbox = sms_server(
        make_server, api_for, tmp_path, rate_limits={"enabled": True, "sms_per_country_per_hour": {"GB": 1}}
    )
    number, secret = gb(), new_secret()
    assert request_token(api, number, 1, secret).status_code == 200
    # The same send_attempt again: the same session, no SMS, so no token taken.
    resp = request_token(api, number, 1, secret)
    assert resp.status_code == 200, resp.text
    # A new send attempt would send: the country's one SMS an hour is spent.
    resp = request_token(api, number, 2, secret)
    assert resp.status_code == 429 and resp.json()["errcode"] == "M_LIMIT_EXCEEDED", resp.text
    assert len(sent_to(outbox, number)) == 1


def sydent_pick(number: str, originators: list[str]) -> str:
    """Sydent's msisdnvalidator.getOriginator: the sum of the E.164 digits modulo the count."""
    return originators[sum(int(d) for d in number.lstrip("+")) % len(originators)]


def test_several_originators_per_country(make_server: Any, api_for: Any, tmp_path: Path) -> None:
    uk = ["long:+447700900001", "long:+447700900002", "alpha:MatrixUK"]
    api, outbox = sms_server(
        make_server,
        api_for,
        tmp_path,
        # A list, and Sydent's comma-separated string.
        sms={"originators": {"44": uk, "default": "short:11111, short:22222"}},
    )
    # Consecutive numbers: digit sums one apart, so each of the three gets another sender.
    used = set()
    for number in ("+447700900010", "+447700900011", "+447700900012"):
        sms = assert_sent(api, outbox, number)
        originator = f"{sms['originator']['type']}:{sms['originator']['text']}"
        assert originator == sydent_pick(number, uk), (number, originator)
        used.add(originator)
    assert used == set(uk)
    for number in (fr(), de()):
        sms = assert_sent(api, outbox, number)
        assert f"{sms['originator']['type']}:{sms['originator']['text']}" == sydent_pick(
            number, ["short:11111", "short:22222"]
        )


def test_one_number_always_gets_the_same_originator(make_server: Any, api_for: Any, tmp_path: Path) -> None:
    uk = ["long:+447700900001", "long:+447700900002"]
    api, outbox = sms_server(make_server, api_for, tmp_path, sms={"originators": {"44": uk}})
    number, secret = gb(), new_secret()
    for attempt in (1, 2, 3):
        assert request_token(api, number, attempt, secret).status_code == 200
    wait_until(lambda: len(sent_to(outbox, number)) == 3, timeout=5, what="three SMS")
    assert {sms["originator"]["text"] for sms in sent_to(outbox, number)} == {sydent_pick(number, uk).split(":")[1]}
