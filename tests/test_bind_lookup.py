"""Associations (bind, unbind), lookups (v2 hashed, v1 plain and bulk), and keys.

Contract: docs/api-behaviour.md, "Associations", "Lookup", "Keys"; spec v2_associations.yaml,
v2_lookup.yaml, v2_pubkey.yaml and the identity service prose (sha256 algorithm).
"""

from __future__ import annotations

import json
import random
import string
import time
from typing import Any

import httpx
import pytest
import signedjson.key
import signedjson.sign
from support.asserts import assert_error, assert_signed_association, public_key
from support.homeserver import HomeserverStandIn
from support.server import (
    V1,
    V2,
    EmailSession,
    IdentityApi,
    SydentServer,
    User,
    new_secret,
    sha256_address,
    unique_email,
)
from unpaddedbase64 import decode_base64, encode_base64


def none_address(address: str, medium: str = "email") -> str:
    return f"{address} {medium}"


# --- the spec's hashing --------------------------------------------------------------------------


def test_sha256_test_vectors_from_the_spec() -> None:
    assert sha256_address("alice@example.com", "email", "matrixrocks") == "4kenr7N9drpCJ4AfalmlGQVsOn3o2RHjkADUpXJWZUc"
    assert sha256_address("bob@example.com", "email", "matrixrocks") == "LJwSazmv46n0hlMlsb_iYxI0_HXEqy_yj6Jm636cdT8"
    assert sha256_address("18005552067", "msisdn", "matrixrocks") == "nlo35_T5fzSGZzJApqu8lgIudJvmOQtDaHtr-I4rU7I"


def test_batch_case_folding_matches_one_at_a_time() -> None:
    """bulk_lookup folds a whole batch of addresses in one call: the same as one at a time,
    for awkward strings too (the separator inside an address, non-ASCII, characters whose
    folding changes their length, final sigma), and ASCII batches, folded already or not."""
    rng = random.Random(7)
    for alphabet in ("abcXYZ@.+-_ \n\tßİΣςé\u00ad\U0001f600", "abcXYZ@.+-_ \n\t", "abc@.+-_ \n"):
        check_folding(rng, alphabet)


def check_folding(rng: random.Random, alphabet: str) -> None:
    from sydent_lite.threepids import casefold_all

    for _ in range(1000):
        addresses = [
            "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 14))) for _ in range(rng.randrange(0, 9))
        ]
        assert casefold_all(addresses) == [a.casefold() for a in addresses], addresses


# --- full flow ---------------------------------------------------------------------------------------


def test_full_flow_bind_and_lookup(api: IdentityApi, idserver: SydentServer, client: httpx.Client) -> None:
    user = api.register()
    email = unique_email("flow")
    session = api.start_email_session(email, user=user)
    resp = api.submit_token(session, user=user)
    assert resp.status_code == 200 and resp.json() == {"success": True}, resp.text

    resp = api.bind(session, user.user_id, user=user)
    assert resp.status_code == 200, resp.text
    assoc = resp.json()
    assert_signed_association(assoc, idserver, client, address=email, mxid=user.user_id)

    details = api.hash_details(user)
    pepper = details["lookup_pepper"]
    assert isinstance(pepper, str) and pepper
    assert set(details["algorithms"]) == {"none", "sha256"}
    assert api.hash_details(user)["lookup_pepper"] == pepper  # stable

    bound = sha256_address(email, "email", pepper)
    unbound = sha256_address(unique_email("nobody"), "email", pepper)
    resp = api.lookup(user, [bound, unbound], "sha256", pepper)
    assert resp.status_code == 200, resp.text
    assert resp.json() == {"mappings": {bound: user.user_id}}

    resp = api.lookup(user, [none_address(email), none_address("nobody@example.test")], "none", pepper)
    assert resp.status_code == 200, resp.text
    assert resp.json() == {"mappings": {none_address(email): user.user_id}}

    # The same (hashed) address under another medium is not a match.
    resp = api.lookup(user, [sha256_address(email, "msisdn", pepper)], "sha256", pepper)
    assert resp.json() == {"mappings": {}}

    # v1 lookup returns the signed association unchanged.
    assert api.v1_lookup("email", email).json() == assoc


def test_hash_details_token_in_query(api: IdentityApi, user: User) -> None:
    resp = api.client.get(f"{V2}/hash_details", params={"access_token": user.token})
    assert resp.status_code == 200, resp.text
    assert resp.json()["lookup_pepper"] == api.hash_details(user)["lookup_pepper"]


def test_lookup_and_hash_details_need_a_token(api: IdentityApi) -> None:
    assert_error(api.client.get(f"{V2}/hash_details"), 401, "M_UNAUTHORIZED")
    body = {"algorithm": "sha256", "pepper": "x", "addresses": []}
    assert_error(api.client.post(f"{V2}/lookup", json=body), 401, "M_UNAUTHORIZED")


# --- keys ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", [V2, V1])
def test_pubkey(client: httpx.Client, prefix: str) -> None:
    resp = client.get(f"{prefix}/pubkey/ed25519:0")
    assert resp.status_code == 200, resp.text
    key = resp.json()["public_key"]
    assert len(decode_base64(key)) == 32
    assert key == public_key(client)

    resp = client.get(f"{prefix}/pubkey/isvalid", params={"public_key": key})
    assert resp.status_code == 200 and resp.json() == {"valid": True}, resp.text

    other = encode_base64(signedjson.key.generate_signing_key("0").verify_key.encode())
    for candidate in (other, "not base64 at all", key[:-2]):
        resp = client.get(f"{prefix}/pubkey/isvalid", params={"public_key": candidate})
        assert resp.status_code == 200 and resp.json() == {"valid": False}, (candidate, resp.text)

    assert_error(client.get(f"{prefix}/pubkey/isvalid"), 400, "M_MISSING_PARAMS")
    assert_error(client.get(f"{prefix}/pubkey/ed25519:1"), 404, "M_NOT_FOUND")
    assert_error(client.get(f"{prefix}/pubkey/curve25519:0"), 404, "M_NOT_FOUND")

    resp = client.get(f"{prefix}/pubkey/ephemeral/isvalid", params={"public_key": key})
    assert resp.status_code == 200 and resp.json() == {"valid": False}, resp.text


# --- bind errors -----------------------------------------------------------------------------------------


def test_bind_needs_a_token_on_v2(api: IdentityApi, user: User) -> None:
    session = api.validated_email_session(unique_email("bindnoauth"), user=user)
    assert_error(api.bind(session, user.user_id), 401, "M_UNAUTHORIZED")
    assert api.v1_lookup("email", session.email).json() == {}


def test_bind_someone_elses_mxid_on_v2(api: IdentityApi, user: User, homeserver: HomeserverStandIn) -> None:
    session = api.validated_email_session(unique_email("other"), user=user)
    for mxid in (homeserver.user_id("somebody_else"), "@" + user.localpart + ":evil.example.test"):
        assert_error(api.bind(session, mxid, user=user), 403, "M_UNAUTHORIZED")
    assert api.v1_lookup("email", session.email).json() == {}
    # Binding to oneself still works with the same session.
    assert api.bind(session, user.user_id, user=user).status_code == 200


@pytest.mark.parametrize("v1", [False, True], ids=["v2", "v1"])
def test_bind_unvalidated_session(api: IdentityApi, user: User, v1: bool) -> None:
    who = None if v1 else user
    session = api.start_email_session(unique_email("unvalidated"), user=who, v1=v1)
    assert_error(api.bind(session, user.user_id, user=who, v1=v1), 400, "M_SESSION_NOT_VALIDATED")
    assert api.v1_lookup("email", session.email).json() == {}


@pytest.mark.parametrize("v1", [False, True], ids=["v2", "v1"])
def test_bind_unknown_session_or_wrong_secret(api: IdentityApi, user: User, v1: bool) -> None:
    who = None if v1 else user
    session = api.validated_email_session(unique_email("wrongsecret"), user=who, v1=v1)
    assert_error(
        api.bind(session, user.user_id, user=who, v1=v1, client_secret=new_secret()), 404, "M_NO_VALID_SESSION"
    )
    assert_error(api.bind(session, user.user_id, user=who, v1=v1, sid="D" * 24), 404, "M_NO_VALID_SESSION")
    assert api.v1_lookup("email", session.email).json() == {}


@pytest.mark.parametrize(
    "mxid", ["not-an-mxid", "@no-server-part", "alice:example.test", "#room:example.test", "@alice:example.test\n"]
)
def test_bind_invalid_mxid(api: IdentityApi, mxid: str) -> None:
    session = api.validated_email_session(unique_email("badmxid"), v1=True)
    assert_error(api.bind(session, mxid, v1=True), 400, "M_INVALID_PARAM")
    assert api.v1_lookup("email", session.email).json() == {}


# --- v1 ---------------------------------------------------------------------------------------------------


def test_v1_bind_then_lookup_returns_the_same_object(api: IdentityApi, idserver: SydentServer) -> None:
    email = unique_email("v1bind")
    mxid = "@v1user:example.org"
    session = api.validated_email_session(email, v1=True)
    resp = api.bind(session, mxid, v1=True)
    assert resp.status_code == 200, resp.text
    assoc = resp.json()
    assert_signed_association(assoc, idserver, api.client, address=email, mxid=mxid)

    time.sleep(0.05)
    resp = api.v1_lookup("email", email)
    assert resp.status_code == 200, resp.text
    assert resp.json() == assoc  # ts, not_before, not_after and signatures unchanged

    nobody = unique_email("nobody")
    resp = api.client.post(
        f"{V1}/bulk_lookup", json={"threepids": [["email", email], ["email", nobody], ["msisdn", "447700900001"]]}
    )
    assert resp.status_code == 200, resp.text
    assert resp.json() == {"threepids": [["email", email, mxid]]}

    resp = api.v1_lookup("email", nobody)
    assert resp.status_code == 200 and resp.json() == {}, resp.text


def test_bulk_lookup_keeps_order_duplicates_and_addresses_as_given(api: IdentityApi, user: User) -> None:
    emails = [unique_email("bulk") for _ in range(3)]
    for email in emails:
        api.bind_email(email, user)
    given = [emails[0].upper(), emails[1], emails[2].title()]
    plain = [
        ["email", given[0]],
        ["email", unique_email("nobody")],
        ["email", given[1]],
        ["msisdn", given[2]],
        ["email", given[2]],
        ["email", given[1]],
    ]
    expected = [
        ["email", given[0], user.user_id],
        ["email", given[1], user.user_id],
        ["email", given[2], user.user_id],
        ["email", given[1], user.user_id],
    ]
    resp = api.client.post(f"{V1}/bulk_lookup", json={"threepids": plain})
    assert resp.status_code == 200, resp.text
    assert resp.json() == {"threepids": expected}

    # Strings no stored address can hold (NUL, a lone surrogate, a line break) match nothing and
    # spoil nothing for the pairs around them.
    hostile = [
        ["email", "nul\u0000@example.test"],
        ["email", "\ud800@example.test"],
        ["email\n", given[0]],
        ["email", f"{given[0]}\n{given[1]}"],
    ]
    body = json.dumps({"threepids": plain[:3] + hostile + plain[3:]})  # ASCII: the surrogate as \\ud800
    resp = api.client.post(f"{V1}/bulk_lookup", content=body, headers={"Content-Type": "application/json"})
    assert resp.status_code == 200, resp.text
    assert resp.json() == {"threepids": expected}
    resp = api.client.post(f"{V1}/bulk_lookup", json={"threepids": []})
    assert resp.status_code == 200 and resp.json() == {"threepids": []}, resp.text


def test_v1_lookup_missing_params(api: IdentityApi) -> None:
    assert_error(api.client.get(f"{V1}/lookup", params={"medium": "email"}), 400, "M_MISSING_PARAMS")
    assert_error(api.client.get(f"{V1}/lookup", params={"address": "a@example.test"}), 400, "M_MISSING_PARAMS")


# --- rebinding, unbinding ------------------------------------------------------------------------------------


def test_rebinding_replaces_the_association(api: IdentityApi) -> None:
    email = unique_email("rebind")
    alice = api.register()
    bob = api.register()
    api.bind_email(email, alice)
    assert api.lookup_email(alice, email) == alice.user_id

    _, second = api.bind_email(email, bob)
    assert second["mxid"] == bob.user_id
    assert api.lookup_email(alice, email) == bob.user_id
    assert api.lookup_email(bob, email) == bob.user_id
    assert api.v1_lookup("email", email).json() == second
    resp = api.client.post(f"{V1}/bulk_lookup", json={"threepids": [["email", email]]})
    assert resp.json() == {"threepids": [["email", email, bob.user_id]]}

    # And back again, with a v1 bind.
    session = api.validated_email_session(email, v1=True)
    third = api.bind(session, alice.user_id, v1=True).json()
    assert api.lookup_email(bob, email) == alice.user_id
    assert api.v1_lookup("email", email).json() == third


def unbind_body(session: EmailSession, mxid: str, address: str | None = None) -> dict[str, Any]:
    return {
        "sid": session.sid,
        "client_secret": session.client_secret,
        "mxid": mxid,
        "threepid": {"medium": "email", "address": address or session.email},
    }


@pytest.mark.parametrize("prefix", [V2, V1])
def test_unbind_with_session(api: IdentityApi, prefix: str) -> None:
    user = api.register()
    email = unique_email("unbind")
    session, _ = api.bind_email(email, user)
    keep_email = unique_email("keep")
    api.bind_email(keep_email, user)

    # No bearer token needed: the session proves ownership of the address.
    resp = api.client.post(f"{prefix}/3pid/unbind", json=unbind_body(session, user.user_id))
    assert resp.status_code == 200, resp.text
    assert resp.json() == {}

    assert api.lookup_email(user, email) is None
    assert api.v1_lookup("email", email).json() == {}
    pepper = api.hash_details(user)["lookup_pepper"]
    assert api.lookup(user, [none_address(email)], "none", pepper).json() == {"mappings": {}}
    # Other bindings of the same user stay.
    assert api.lookup_email(user, keep_email) == user.user_id


def test_unbind_for_another_mxid_leaves_the_binding(api: IdentityApi) -> None:
    user = api.register()
    email = unique_email("unbindother")
    session, assoc = api.bind_email(email, user)
    resp = api.client.post(f"{V2}/3pid/unbind", json=unbind_body(session, "@someone:example.test"))
    assert resp.status_code == 200, resp.text
    assert api.v1_lookup("email", email).json() == assoc


def test_unbind_session_for_another_address_is_forbidden(api: IdentityApi) -> None:
    user = api.register()
    email = unique_email("victimaddr")
    _, assoc = api.bind_email(email, user)
    attacker = api.validated_email_session(unique_email("attacker"), v1=True)
    resp = api.client.post(f"{V2}/3pid/unbind", json=unbind_body(attacker, user.user_id, address=email))
    assert_error(resp, 403, "M_FORBIDDEN")
    assert api.v1_lookup("email", email).json() == assoc


def test_unbind_with_unvalidated_session_is_forbidden(api: IdentityApi) -> None:
    user = api.register()
    email = unique_email("unvalidatedunbind")
    _, assoc = api.bind_email(email, user)
    pending = api.start_email_session(email, v1=True)  # same address, never validated
    resp = api.client.post(f"{V2}/3pid/unbind", json=unbind_body(pending, user.user_id))
    assert_error(resp, 403, "M_FORBIDDEN")
    assert api.v1_lookup("email", email).json() == assoc


def test_unbind_without_session_or_signature_is_forbidden(api: IdentityApi) -> None:
    # Without sid/client_secret the request must be homeserver-signed (X-Matrix); see
    # tests/test_xmatrix_unbind.py. No header at all: 403.
    user = api.register()
    email = unique_email("hsunbind")
    _, assoc = api.bind_email(email, user)
    body = {"mxid": user.user_id, "threepid": {"medium": "email", "address": email}}
    for prefix in (V2, V1):
        assert_error(api.client.post(f"{prefix}/3pid/unbind", json=body), 403, "M_FORBIDDEN")
    assert api.v1_lookup("email", email).json() == assoc


# --- lookup errors ---------------------------------------------------------------------------------------------


def test_lookup_wrong_pepper(api: IdentityApi, user: User) -> None:
    pepper = api.hash_details(user)["lookup_pepper"]
    for algorithm in ("sha256", "none"):
        address = sha256_address("x@example.test", "email", pepper) if algorithm == "sha256" else "x@example.test email"
        for wrong in (pepper + "x", pepper[:-1], "matrixrocks"):
            resp = api.lookup(user, [address], algorithm, wrong)
            err = assert_error(resp, 400, "M_INVALID_PEPPER")
            # As Sydent: what a retry needs, without another /hash_details round trip.
            assert err["algorithm"] == algorithm and err["lookup_pepper"] == pepper, err
        retry = api.lookup(user, [address], err["algorithm"], err["lookup_pepper"])
        assert retry.status_code == 200, retry.text


def test_lookup_bad_requests(api: IdentityApi, user: User) -> None:
    pepper = api.hash_details(user)["lookup_pepper"]
    assert_error(api.lookup(user, [], "md5", pepper), 400, "M_INVALID_PARAM")
    assert_error(api.lookup(user, [], "sha512", pepper), 400, "M_INVALID_PARAM")
    for addresses in ("a", [1, 2], [None], {"a": "b"}, [["x"]]):
        resp = api.client.post(
            f"{V2}/lookup", headers=user.headers, json={"algorithm": "sha256", "pepper": pepper, "addresses": addresses}
        )
        assert_error(resp, 400, "M_INVALID_PARAM")
    for missing in ("algorithm", "pepper", "addresses"):
        body = {"algorithm": "sha256", "pepper": pepper, "addresses": []}
        del body[missing]
        err = assert_error(api.client.post(f"{V2}/lookup", headers=user.headers, json=body), 400, "M_MISSING_PARAMS")
        assert missing in err["error"]


def _short_addresses(n: int) -> list[str]:
    alphabet = string.ascii_letters + string.digits
    rng = random.Random(n)
    out: set[str] = set()
    while len(out) < n:
        out.add("".join(rng.choice(alphabet) for _ in range(3)))
    return sorted(out)


def test_lookup_size_limit(api: IdentityApi, user: User) -> None:
    import json

    pepper = api.hash_details(user)["lookup_pepper"]
    headers = {**user.headers, "Content-Type": "application/json"}
    for n, ok in ((10_000, True), (10_001, False)):
        body = json.dumps(
            {"algorithm": "sha256", "pepper": pepper, "addresses": _short_addresses(n)}, separators=(",", ":")
        ).encode()
        assert len(body) < 64 * 1024  # the count is what is being tested, not the body size
        resp = api.client.post(f"{V2}/lookup", content=body, headers=headers)
        if ok:
            assert resp.status_code == 200 and resp.json() == {"mappings": {}}, resp.text[:300]
        else:
            assert_error(resp, 400, "M_TOO_LARGE")


def test_lookup_many_with_some_bound(api: IdentityApi, user: User) -> None:
    """A large batch (beyond SQL parameter limits if sent as one query) finds the bound ones."""
    emails = [unique_email("many") for _ in range(2)]
    for email in emails:
        api.bind_email(email, user)
    pepper = api.hash_details(user)["lookup_pepper"]
    filler = [sha256_address(f"filler{i}@example.test", "email", pepper) for i in range(1200)]
    wanted = [sha256_address(e, "email", pepper) for e in emails]
    resp = api.lookup(user, [*filler[:600], wanted[0], *filler[600:], wanted[1]], "sha256", pepper)
    assert resp.status_code == 200, resp.text[:300]
    assert resp.json() == {"mappings": {wanted[0]: user.user_id, wanted[1]: user.user_id}}


# --- email case folding ------------------------------------------------------------------------------------


def test_email_addresses_are_case_folded(api: IdentityApi, user: User) -> None:
    token = new_secret()[-10:]
    given = f"Alice.{token}@Example.TEST"
    folded = given.casefold()
    assert folded == f"alice.{token}@example.test"

    session = api.validated_email_session(given, user=user)
    resp = api.get_validated(session, user=user)
    assert resp.json()["address"] == folded, resp.text
    resp = api.bind(session, user.user_id, user=user)
    assert resp.status_code == 200, resp.text
    assert resp.json()["address"] == folded

    pepper = api.hash_details(user)["lookup_pepper"]
    h_folded = sha256_address(folded, "email", pepper)
    h_given = sha256_address(given, "email", pepper)
    resp = api.lookup(user, [h_folded, h_given], "sha256", pepper)
    assert resp.json() == {"mappings": {h_folded: user.user_id}}  # v2 matches exactly
    resp = api.lookup(user, [none_address(folded), none_address(given)], "none", pepper)
    assert resp.json() == {"mappings": {none_address(folded): user.user_id}}

    # v1 lookups fold the address they are given.
    assert api.v1_lookup("email", given).json()["address"] == folded
    assert api.v1_lookup("email", folded).json()["mxid"] == user.user_id

    # A session for the same address in another case is the same 3PID: rebinding replaces.
    other = api.register()
    session2 = api.validated_email_session(folded.upper().replace("@EXAMPLE.TEST", "@example.test"), user=other)
    assert api.bind(session2, other.user_id, user=other).status_code == 200
    assert api.lookup_email(user, folded) == other.user_id


# --- persistence --------------------------------------------------------------------------------------------


def test_restart_keeps_bindings_pepper_key_and_tokens(
    api: IdentityApi, idserver: SydentServer, homeserver: HomeserverStandIn
) -> None:
    user = api.register()
    email = unique_email("restart")
    _, assoc = api.bind_email(email, user)
    pepper = api.hash_details(user)["lookup_pepper"]
    key = public_key(api.client)
    key_file = idserver.signing_key_path.read_bytes()
    pending = api.start_email_session(unique_email("restartpending"), user=user)

    idserver.restart()

    with idserver.new_client() as client:
        after = IdentityApi(idserver, api.smtp, homeserver, client)
        assert public_key(client) == key
        assert idserver.signing_key_path.read_bytes() == key_file
        assert after.hash_details(user)["lookup_pepper"] == pepper  # the token survived too
        assert after.lookup_email(user, email) == user.user_id
        assert after.v1_lookup("email", email).json() == assoc
        # A session started before the restart can be completed after it.
        resp = after.submit_token(pending, user=user)
        assert resp.status_code == 200 and resp.json() == {"success": True}, resp.text
        resp = client.get(f"{V2}/pubkey/isvalid", params={"public_key": key})
        assert resp.json() == {"valid": True}
