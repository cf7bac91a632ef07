"""Requests exactly as the real clients send them (../shared/notes/real-clients.md and
homeserver-interop.md): matrix-js-sdk's `send_attempt` as a string and its bodies without a
Content-Type, Synapse's `?access_token=` on hash_details, a whole address book in one lookup
(Element Android), and matrix-js-sdk lower-casing addresses before hashing (which the server
does not bend to).

Contract: docs/api-behaviour.md, "Requests and errors", "Validation sessions", "Lookup" and
"Where clients differ from the spec"; config.example.yaml, `lookup.max_addresses`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import httpx
import pytest
from support.asserts import assert_error
from support.homeserver import HomeserverStandIn
from support.inprocess import InProcessServer
from support.server import (
    V1,
    V2,
    IdentityApi,
    SydentServer,
    User,
    new_secret,
    sha256_address,
    unique_email,
    wait_until,
)
from support.smtp import ReceivedMail

# The lookups' body cap with the default lookup.max_addresses (10,000): 64 KiB + 128 bytes an
# address, as docs/api-behaviour.md states it.
LOOKUP_BODY_CAP = 64 * 1024 + 10_000 * 128


def post_without_content_type(
    client: httpx.Client,
    path: str,
    body: Any,
    headers: dict[str, str] | None = None,
    params: dict[str, str] | None = None,
) -> httpx.Response:
    """A JSON body with no Content-Type header at all, as matrix-js-sdk sends some requests."""
    resp = client.post(path, content=json.dumps(body).encode(), headers=headers or {}, params=params)
    assert "content-type" not in resp.request.headers, resp.request.headers
    return resp


def post_json(client: httpx.Client, path: str, body: Any, headers: dict[str, str] | None = None) -> httpx.Response:
    return client.post(
        path, content=json.dumps(body).encode(), headers={"Content-Type": "application/json", **(headers or {})}
    )


# --- send_attempt as a string (matrix-js-sdk) --------------------------------------------------------


@pytest.mark.parametrize("v1", [False, True], ids=["v2", "v1"])
def test_email_send_attempt_as_a_digit_string(api: IdentityApi, user: User, v1: bool) -> None:
    email = unique_email("jsattempt")
    secret = new_secret()
    resp = api.request_email_token(email, secret, "1", user=None if v1 else user, v1=v1)  # type: ignore[arg-type]
    assert resp.status_code == 200, resp.text
    sid = resp.json()["sid"]
    first = api.smtp.wait_for(email)
    # The same attempt again, as a string or as the number, and with a leading zero: the same
    # session and no new mail ("01" is the decimal number 1).
    for again in ("1", 1, "01"):
        resp = api.request_email_token(email, secret, again, user=None if v1 else user, v1=v1)  # type: ignore[arg-type]
        assert resp.status_code == 200 and resp.json() == {"sid": sid}, resp.text
    api.smtp.assert_no_mail(email, wait=0.2)
    # A greater one, as a string: a new mail for the same session.
    resp = api.request_email_token(email, secret, "2", user=None if v1 else user, v1=v1)  # type: ignore[arg-type]
    assert resp.status_code == 200 and resp.json() == {"sid": sid}, resp.text
    second = api.smtp.wait_for(email)
    assert second.sid == sid and second.token != first.token


def test_email_send_attempt_negative_string_is_a_number_too(api: IdentityApi) -> None:
    email = unique_email("negattempt")
    secret = new_secret()
    resp = api.request_email_token(email, secret, "-1", v1=True)  # type: ignore[arg-type]
    assert resp.status_code == 200, resp.text
    sid = resp.json()["sid"]
    api.smtp.wait_for(email)
    resp = api.request_email_token(email, secret, 0, v1=True)  # 0 > -1: a resend
    assert resp.status_code == 200 and resp.json() == {"sid": sid}, resp.text
    assert api.smtp.wait_for(email).sid == sid


@pytest.mark.parametrize(
    "value",
    [
        " 1",
        "1 ",
        "\t1",
        "1.0",
        "1e0",
        "+1",
        "--1",
        "-",
        "",
        "0x1",
        "1_000",
        "²",
        "١",  # noqa: RUF001 - an Arabic-Indic digit is the point
        "１",  # noqa: RUF001 - a fullwidth digit is the point
        "99999999999999999999",
        1.0,
        True,
        None,
        [1],
        {"n": 1},
    ],
    ids=[
        "space-before",
        "space-after",
        "tab",
        "decimal-point",
        "exponent",
        "plus",
        "double-minus",
        "minus-only",
        "empty",
        "hex",
        "underscore",
        "superscript-two",
        "arabic-indic-one",
        "fullwidth-one",
        "out-of-range",
        "json-float",
        "json-true",
        "json-null",
        "list",
        "object",
    ],
)
def test_email_send_attempt_that_is_no_decimal_integer_is_refused(api: IdentityApi, value: Any) -> None:
    email = unique_email("badattempt")
    body = {"email": email, "client_secret": new_secret(), "send_attempt": value}
    resp = post_json(api.client, f"{V1}/validate/email/requestToken", body)
    assert_error(resp, 400, "M_MISSING_PARAMS" if value is None else "M_INVALID_PARAM")
    api.smtp.assert_no_mail(email, wait=0.1)


# --- no Content-Type ---------------------------------------------------------------------------------


def test_requests_without_content_type_are_read_as_json(
    api: IdentityApi, register: Callable[..., User], homeserver: HomeserverStandIn
) -> None:
    client = api.client
    # POST /terms, from a user who has not accepted them yet.
    user = register(accept_terms=False)
    urls = [policy["en"]["url"] for policy in api.terms()["policies"].values()]
    resp = post_without_content_type(client, f"{V2}/terms", {"user_accepts": urls}, user.headers)
    assert resp.status_code == 200 and resp.json() == {}, resp.text

    # requestToken, v2 and v1 (send_attempt a string, as matrix-js-sdk sends it).
    email = unique_email("nocontenttype")
    secret = new_secret()
    body = {"email": email, "client_secret": secret, "send_attempt": "1"}
    resp = post_without_content_type(client, f"{V2}/validate/email/requestToken", body, user.headers)
    assert resp.status_code == 200, resp.text
    sid = resp.json()["sid"]
    mail = api.smtp.wait_for(email)
    v1_email = unique_email("nocontenttype1")
    resp = post_without_content_type(
        client,
        f"{V1}/validate/email/requestToken",
        {"email": v1_email, "client_secret": new_secret(), "send_attempt": "1"},
    )
    assert resp.status_code == 200, resp.text
    api.smtp.wait_for(v1_email)

    # submitToken and bind.
    resp = post_without_content_type(
        client,
        f"{V2}/validate/email/submitToken",
        {"sid": sid, "client_secret": secret, "token": mail.token},
        user.headers,
    )
    assert resp.status_code == 200 and resp.json() == {"success": True}, resp.text
    resp = post_without_content_type(
        client, f"{V2}/3pid/bind", {"sid": sid, "client_secret": secret, "mxid": user.user_id}, user.headers
    )
    assert resp.status_code == 200 and resp.json()["address"] == email, resp.text

    # lookup (v2) and bulk_lookup (v1) find it.
    pepper = api.hash_details(user)["lookup_pepper"]
    h = sha256_address(email, "email", pepper)
    resp = post_without_content_type(
        client, f"{V2}/lookup", {"algorithm": "sha256", "pepper": pepper, "addresses": [h]}, user.headers
    )
    assert resp.status_code == 200 and resp.json() == {"mappings": {h: user.user_id}}, resp.text
    resp = post_without_content_type(client, f"{V1}/bulk_lookup", {"threepids": [["email", email]]})
    assert resp.status_code == 200 and resp.json() == {"threepids": [["email", email, user.user_id]]}, resp.text

    # store-invite (v2), for an address nobody has bound.
    invitee = unique_email("nocontenttypeinvite")
    invite = {
        "medium": "email",
        "address": invitee,
        "room_id": f"!nocontenttype:{homeserver.server_name}",
        "sender": user.user_id,
    }
    resp = post_without_content_type(client, f"{V2}/store-invite", invite, user.headers)
    assert resp.status_code == 200, resp.text
    assert isinstance(resp.json()["token"], str)
    api.smtp.wait_for(invitee)


# --- ?access_token= (Synapse's hash_details) -------------------------------------------------------


def test_hash_details_with_the_token_in_the_query_string(api: IdentityApi, user: User) -> None:
    client = api.client
    pepper = api.hash_details(user)["lookup_pepper"]
    resp = client.get(f"{V2}/hash_details", params={"access_token": user.token})  # as Synapse calls it
    assert resp.status_code == 200 and resp.json()["lookup_pepper"] == pepper, resp.text
    # Both given: the header wins, whichever of the two is the good one.
    resp = client.get(f"{V2}/hash_details", params={"access_token": "not-a-token"}, headers=user.headers)
    assert resp.status_code == 200 and resp.json()["lookup_pepper"] == pepper, resp.text
    resp = client.get(
        f"{V2}/hash_details", params={"access_token": user.token}, headers={"Authorization": "Bearer not-a-token"}
    )
    assert_error(resp, 401, "M_UNAUTHORIZED")
    assert_error(client.get(f"{V2}/hash_details", params={"access_token": "not-a-token"}), 401, "M_UNAUTHORIZED")


# --- a whole address book in one lookup (Element Android) ----------------------------------------------


@pytest.fixture
def bound(api: IdentityApi) -> Iterator[tuple[User, list[str]]]:
    """A user with three bound email addresses."""
    user = api.register()
    emails = [unique_email(f"book{i}") for i in range(3)]
    for email in emails:
        api.bind_email(email, user)
    yield user, emails


def book(n: int, tag: str) -> list[str]:
    """n realistic, distinct, unbound addresses (~35 characters each)."""
    return [f"firstname.lastname{i}.{tag}@example.test" for i in range(n)]


T = TypeVar("T")


def spread(filler: list[T], wanted: list[T]) -> list[T]:
    """filler with the wanted ones at its start, middle and end."""
    out = list(filler)
    for position, item in zip((0, len(out) // 2, len(out)), wanted, strict=False):
        out.insert(position, item)
    return out


def test_v2_lookup_of_10000_hashes(api: IdentityApi, bound: tuple[User, list[str]]) -> None:
    user, emails = bound
    pepper = api.hash_details(user)["lookup_pepper"]
    wanted = [sha256_address(e, "email", pepper) for e in emails]
    filler = [sha256_address(a, "email", pepper) for a in book(10_000 - len(wanted), new_secret()[-8:])]
    addresses = spread(filler, wanted)
    assert len(addresses) == 10_000 and len(set(addresses)) == 10_000
    body = {"algorithm": "sha256", "pepper": pepper, "addresses": addresses}
    assert len(json.dumps(body)) > 400_000  # a ~470 KB body, 7 times the small cap
    resp = post_json(api.client, f"{V2}/lookup", body, user.headers)
    assert resp.status_code == 200, resp.text[:300]
    assert resp.json() == {"mappings": dict.fromkeys(wanted, user.user_id)}

    # Pretty-printed, as some clients serialise it: the same.
    pretty = json.dumps(body, indent=4).encode()
    resp = api.client.post(f"{V2}/lookup", content=pretty, headers={**user.headers, "Content-Type": "application/json"})
    assert resp.status_code == 200 and resp.json() == {"mappings": dict.fromkeys(wanted, user.user_id)}, resp.text[:300]

    # One more: refused for its count, not its size.
    resp = post_json(api.client, f"{V2}/lookup", {**body, "addresses": [*addresses, filler[0]]}, user.headers)
    err = assert_error(resp, 400, "M_TOO_LARGE")
    assert "10000" in err["error"], err


def test_v2_lookup_of_10000_addresses_in_the_clear(api: IdentityApi, bound: tuple[User, list[str]]) -> None:
    user, emails = bound
    pepper = api.hash_details(user)["lookup_pepper"]
    wanted = [f"{e} email" for e in emails]
    addresses = spread([f"{a} email" for a in book(10_000 - len(wanted), new_secret()[-8:])], wanted)
    body = {"algorithm": "none", "pepper": pepper, "addresses": addresses}
    resp = post_json(api.client, f"{V2}/lookup", body, user.headers)
    assert resp.status_code == 200, resp.text[:300]
    assert resp.json() == {"mappings": dict.fromkeys(wanted, user.user_id)}


def test_v1_bulk_lookup_of_10000_pairs(api: IdentityApi, bound: tuple[User, list[str]]) -> None:
    user, emails = bound
    pairs = spread(
        [["email", a] for a in book(10_000 - len(emails), new_secret()[-8:])], [["email", e] for e in emails]
    )
    assert len(pairs) == 10_000
    resp = post_json(api.client, f"{V1}/bulk_lookup", {"threepids": pairs})
    assert resp.status_code == 200, resp.text[:300]
    assert resp.json() == {"threepids": [["email", e, user.user_id] for e in emails]}

    resp = post_json(api.client, f"{V1}/bulk_lookup", {"threepids": [*pairs, ["email", "one.more@example.test"]]})
    err = assert_error(resp, 400, "M_TOO_LARGE")
    assert "10000" in err["error"], err


def test_lookup_bodies_over_the_derived_cap_are_413(api: IdentityApi, user: User) -> None:
    pepper = api.hash_details(user)["lookup_pepper"]
    headers = {**user.headers, "Content-Type": "application/json"}
    # Within the address count, over the bytes: long padding in a field nobody reads.
    for path, body in (
        (f"{V2}/lookup", {"algorithm": "sha256", "pepper": pepper, "addresses": ["a" * 43]}),
        (f"{V1}/bulk_lookup", {"threepids": [["email", "a@example.test"]]}),
    ):
        just_under = json.dumps({**body, "padding": ""}).encode()
        fill = LOOKUP_BODY_CAP - len(just_under)
        at_cap = json.dumps({**body, "padding": "x" * fill}).encode()
        assert len(at_cap) == LOOKUP_BODY_CAP
        resp = api.client.post(path, content=at_cap, headers=headers)
        assert resp.status_code == 200, (path, resp.text[:300])
        over = json.dumps({**body, "padding": "x" * (fill + 1)}).encode()
        assert_error(api.client.post(path, content=over, headers=headers), 413, "M_TOO_LARGE")

        def chunks(data: bytes = over) -> Iterator[bytes]:  # no Content-Length: counted as it comes
            for i in range(0, len(data), 65536):
                yield data[i : i + 65536]

        assert_error(api.client.post(path, content=chunks(), headers=headers), 413, "M_TOO_LARGE")


@pytest.mark.parametrize(
    "path,shape",
    [
        (f"{V2}/lookup", lambda pepper, n: {"algorithm": "sha256", "pepper": pepper, "addresses": [{}] * n}),
        (f"{V2}/lookup", lambda pepper, n: {"algorithm": "sha256", "pepper": pepper, "addresses": [0] * n}),
        (f"{V1}/bulk_lookup", lambda pepper, n: {"threepids": [[]] * n}),
        (f"{V1}/bulk_lookup", lambda pepper, n: {"threepids": [[0, 0]] * (n // 2)}),
    ],
    ids=["v2-objects", "v2-numbers", "v1-empty-lists", "v1-number-pairs"],
)
def test_lookup_bodies_of_many_tiny_values_are_refused_before_parsing(
    api: IdentityApi, user: User, path: str, shape: Callable[[str, int], Any]
) -> None:
    """Within the byte cap, but made of hundreds of thousands of values (each one a Python object
    to build: ~30 MB and ~90 ms of the event loop per request): refused for the count of
    entries, unparsed. Read as JSON they would be 400 M_INVALID_PARAM, not M_TOO_LARGE."""
    pepper = api.hash_details(user)["lookup_pepper"]
    body = json.dumps(shape(pepper, 300_000), separators=(",", ":")).encode()
    assert 64 * 1024 < len(body) <= LOOKUP_BODY_CAP, len(body)
    resp = api.client.post(path, content=body, headers={**user.headers, "Content-Type": "application/json"})
    assert_error(resp, 400, "M_TOO_LARGE")


def test_lookup_max_addresses_setting(
    make_inprocess_server: Callable[..., InProcessServer], api_for: Callable[[SydentServer], IdentityApi]
) -> None:
    server = make_inprocess_server(extra_config={"lookup": {"max_addresses": 100}})
    api = api_for(server)
    user = api.register()
    pepper = api.hash_details(user)["lookup_pepper"]
    hashes = [sha256_address(a, "email", pepper) for a in book(101, "setting")]
    assert api.lookup(user, hashes[:100], pepper=pepper).status_code == 200
    assert_error(api.lookup(user, hashes, pepper=pepper), 400, "M_TOO_LARGE")
    pairs = [["email", a] for a in book(101, "setting")]
    assert post_json(api.client, f"{V1}/bulk_lookup", {"threepids": pairs[:100]}).status_code == 200
    assert_error(post_json(api.client, f"{V1}/bulk_lookup", {"threepids": pairs}), 400, "M_TOO_LARGE")
    # The body cap follows: 64 KiB + 100 x 128 bytes.
    cap = 64 * 1024 + 100 * 128
    base = {"algorithm": "sha256", "pepper": pepper, "addresses": hashes[:100]}
    fill = cap - len(json.dumps({**base, "padding": ""}))
    for extra, status in ((0, 200), (1, 413)):
        resp = post_json(api.client, f"{V2}/lookup", {**base, "padding": "x" * (fill + extra)}, user.headers)
        assert resp.status_code == status, resp.text[:300]


# --- where the client is wrong: lower-casing instead of case-folding ----------------------------------------


def test_lower_cased_hash_does_not_find_a_case_folded_address(api: IdentityApi, user: User) -> None:
    """matrix-js-sdk lower-cases an address before hashing it; the spec case-folds. For `ß` the
    two differ (`ß`.lower() is `ß`, its case fold `ss`): the server keeps to the spec."""
    tag = new_secret()[-8:]
    typed = f"Strauß.{tag}@Example.TEST"
    folded, lowered = typed.casefold(), typed.lower()
    assert folded == f"strauss.{tag}@example.test" and lowered == f"strauß.{tag}@example.test"

    secret = new_secret()
    resp = api.request_email_token(typed, secret, user=user)
    assert resp.status_code == 200, resp.text
    sid = resp.json()["sid"]
    mail = take_mail_to_either(api, typed, folded)
    resp = api.client.post(
        f"{V2}/validate/email/submitToken",
        headers=user.headers,
        json={"sid": sid, "client_secret": secret, "token": mail.token},
    )
    assert resp.status_code == 200, resp.text
    resp = api.client.post(
        f"{V2}/3pid/bind", headers=user.headers, json={"sid": sid, "client_secret": secret, "mxid": user.user_id}
    )
    assert resp.status_code == 200 and resp.json()["address"] == folded, resp.text

    pepper = api.hash_details(user)["lookup_pepper"]
    h_folded, h_lowered = (sha256_address(a, "email", pepper) for a in (folded, lowered))
    resp = api.lookup(user, [h_lowered, h_folded], pepper=pepper)
    assert resp.status_code == 200 and resp.json() == {"mappings": {h_folded: user.user_id}}, resp.text


def take_mail_to_either(api: IdentityApi, *addresses: str) -> ReceivedMail:
    """The validation mail, whichever form of the address it was sent to."""
    wait_until(lambda: any(api.smtp.pending(a) for a in addresses), what=f"a mail to one of {addresses}")
    for address in addresses:
        if api.smtp.pending(address):
            return api.smtp.wait_for(address)
    raise AssertionError("unreachable")  # pragma: no cover
