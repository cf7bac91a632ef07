"""Invitations (store-invite, the invite mail, ephemeral keys, sign-ed25519) and onbind callbacks.

Contract: docs/api-behaviour.md, "Invitations" and "onbind callbacks"; spec v2_store_invite.yaml,
v2_invitation_signing.yaml, v2_pubkey.yaml (ephemeral), legacy-v1 store_invite.yaml and
invitation_signing.yaml, server-server third_party_invite.yaml (onbind); and
../shared/notes/homeserver-interop.md ("Third-party invites and onbind": POST, body shape, only
the invites of the bound address).
"""

from __future__ import annotations

import asyncio
import functools
import html
import json
import re
import shutil
import time
import urllib.parse
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
import signedjson.key
import signedjson.sign
from signedjson.sign import SignatureVerifyException
from support.asserts import assert_error, html_part, public_key, verify_key_from
from support.clock import advance_until
from support.db import allow_inserts, refuse_inserts, sql
from support.homeserver import ONBIND_PATH, HomeserverStandIn, RecordedRequest
from support.inprocess import InProcessServer
from support.server import (
    REPO_ROOT,
    V1,
    V2,
    IdentityApi,
    SydentServer,
    User,
    unique_email,
    wait_until,
)
from support.smtp import ReceivedMail
from unpaddedbase64 import decode_base64, encode_base64

TOKEN_RE = re.compile(r"[0-9a-zA-Z]{32}")
STORE_INVITE_KEYS = {"token", "display_name", "public_keys", "public_key"}
SIGN_KEYS = {"mxid", "sender", "token", "signatures"}

# Within Sydent's limits (room names to 30 characters, display names to 20), which cut longer ones.
HOSTILE_ROOM = '<script>a("")</script>&Café ☕'
HOSTILE_SENDER = "<img onerror=x>Zoë🎉"


# --- helpers --------------------------------------------------------------------------------------


def random_public_key() -> str:
    return encode_base64(signedjson.key.generate_signing_key("0").verify_key.encode())


def room_id(hs: HomeserverStandIn) -> str:
    return f"!room{uuid.uuid4().hex[:10]}:{hs.server_name}"


def invite_fields(hs: HomeserverStandIn, address: str, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "medium": "email",
        "address": address,
        "room_id": room_id(hs),
        "sender": hs.user_id("inviter" + uuid.uuid4().hex[:8]),
    }
    body.update(extra)
    return body


def post_store_invite(
    api: IdentityApi,
    body: dict[str, Any],
    *,
    user: User | None = None,
    v1: bool = False,
    form: bool = False,
    as_sender: bool = True,
) -> httpx.Response:
    """POST store-invite. On v2 with a user the body's `sender` becomes (in place, so the caller's
    dict says what was sent) that user, the only sender v2 accepts, unless `as_sender` is False."""
    if user is not None and not v1 and as_sender and "sender" in body:
        body["sender"] = user.user_id
    path = f"{V1 if v1 else V2}/store-invite"
    headers = user.headers if user is not None else {}
    if form:
        return api.client.post(path, data={k: str(v) for k, v in body.items()}, headers=headers)
    return api.client.post(path, json=body, headers=headers)


def store_invite(
    api: IdentityApi, body: dict[str, Any], *, user: User | None = None, v1: bool = False, form: bool = False
) -> dict[str, Any]:
    """store-invite, expecting success; returns the answer."""
    resp = post_store_invite(api, body, user=user, v1=v1, form=form)
    assert resp.status_code == 200, resp.text
    return cast("dict[str, Any]", resp.json())


def ephemeral_key(answer: dict[str, Any]) -> str:
    return cast("str", answer["public_keys"][1]["public_key"])


def assert_store_invite_answer(
    answer: dict[str, Any], server: SydentServer, client: httpx.Client, address: str
) -> None:
    assert set(answer) == STORE_INVITE_KEYS, answer
    assert isinstance(answer["token"], str) and TOKEN_RE.fullmatch(answer["token"]), answer["token"]

    # Redacted: never the address, its local part or its domain in full.
    name = answer["display_name"]
    local, _, domain = address.rpartition("@")
    assert isinstance(name, str) and name, answer
    for secret in (address, local, domain):
        assert secret not in name, (secret, name)
    assert name != address

    ours = public_key(client)
    assert answer["public_key"] == ours
    keys = answer["public_keys"]
    assert isinstance(keys, list) and len(keys) == 2, keys
    assert keys[0] == {"public_key": ours, "key_validity_url": f"{server.base_url}{V2}/pubkey/isvalid"}, keys
    assert set(keys[1]) == {"public_key", "key_validity_url"}, keys
    assert keys[1]["key_validity_url"] == f"{server.base_url}{V2}/pubkey/ephemeral/isvalid", keys
    ephemeral = keys[1]["public_key"]
    assert ephemeral != ours
    assert len(decode_base64(ephemeral)) == 32, ephemeral
    assert not set(ephemeral) & set("+/="), f"not unpadded URL-safe base64 (as Sydent's): {ephemeral}"

    # Both validity URLs answer valid for their key.
    for entry in keys:
        resp = client.get(entry["key_validity_url"], params={"public_key": entry["public_key"]})
        assert resp.status_code == 200 and resp.json() == {"valid": True}, (entry, resp.text)


def ephemeral_is_valid(client: httpx.Client, key: str, prefix: str = V2) -> bool:
    resp = client.get(f"{prefix}/pubkey/ephemeral/isvalid", params={"public_key": key})
    assert resp.status_code == 200, resp.text
    valid = resp.json()["valid"]
    assert isinstance(valid, bool)
    return valid


def verify_our_signature(obj: dict[str, Any], server: SydentServer, our_key: str) -> None:
    assert set(obj["signatures"]) == {server.server_name}, obj["signatures"]
    assert set(obj["signatures"][server.server_name]) == {"ed25519:0"}, obj["signatures"]
    signedjson.sign.verify_signed_json(obj, server.server_name, verify_key_from(our_key))  # raises if invalid


def assert_onbind_body(
    req: RecordedRequest,
    server: SydentServer,
    our_key: str,
    *,
    address: str,
    mxid: str,
    invites: dict[str, dict[str, Any]],
) -> None:
    """`invites`: token -> the store-invite body it came from."""
    assert req.method == "POST", req.method
    assert req.path == ONBIND_PATH
    body = req.json
    assert isinstance(body, dict), req.body
    assert body["medium"] == "email"
    assert body["address"] == address
    assert body["mxid"] == mxid
    sent = body["invites"]
    assert isinstance(sent, list)
    assert sorted(inv["token"] for inv in sent) == sorted(invites), (sent, list(invites))
    for inv in sent:
        origin = invites[inv["token"]]
        assert inv["sender"] == origin["sender"]
        assert inv["room_id"] == origin["room_id"]
        assert inv["mxid"] == mxid
        assert inv["medium"] == "email"
        assert inv["address"] == address
        signed = inv["signed"]
        assert set(signed) == {"mxid", "token", "signatures"}, signed
        assert signed["mxid"] == mxid
        assert signed["token"] == inv["token"]
        verify_our_signature(signed, server, our_key)
    # Our signature covers the whole body (invites included).
    verify_our_signature(body, server, our_key)
    # And it really covers it: tampering breaks it.
    tampered = dict(body, mxid="@mallory:evil.example.test")
    with pytest.raises(SignatureVerifyException):
        signedjson.sign.verify_signed_json(tampered, server.server_name, verify_key_from(our_key))


def assert_no_onbind(hs: HomeserverStandIn, mxid: str, since: float, wait: float) -> None:
    time.sleep(wait)
    extra = hs.onbind_requests(mxid, since=since)
    assert not extra, [(r.method, r.status, r.json_or_none) for r in extra]


INVITE_PROBE_TEMPLATE = (
    "From: {{ from|safe }}\n"
    "To: {{ to|safe }}\n"
    "Subject: {{ subject_header_value|safe }}\n"
    "Content-Type: text/plain; charset=UTF-8\n"
    "\n"
    "INVITE-TOKEN: {{ token|safe }}\n"
    "EPHEMERAL-PRIVATE-KEY: {{ ephemeral_private_key|safe }}\n"
)


@pytest.fixture
def probe_templates(tmp_path: Path) -> Path:
    """The default templates, with an invite template that shows the token and ephemeral private key."""
    root = tmp_path / "templates"
    shutil.copytree(REPO_ROOT / "templates" / "default", root / "default")
    (root / "default" / "invite_template.eml.j2").write_text(INVITE_PROBE_TEMPLATE, encoding="utf-8")
    return root


def probe_values(mail: ReceivedMail) -> tuple[str, str]:
    """(token, ephemeral private key) from a mail rendered by INVITE_PROBE_TEMPLATE."""
    text = mail.text
    token = re.search(r"^INVITE-TOKEN: (\S+)\r?$", text, re.M)
    private = re.search(r"^EPHEMERAL-PRIVATE-KEY: (\S+)\r?$", text, re.M)
    assert token and private, text
    return token.group(1), private.group(1)


JOIN_LINK_RE = re.compile(r"https?://\S+#/room/\S+")


def sign_url(mail: ReceivedMail) -> str:
    """The `signurl` of the join link in a real invite mail (Element's link, as Sydent builds it):
    `<base>/_matrix/identity/api/v1/sign-ed25519?token=T&private_key=K`."""
    match = JOIN_LINK_RE.search(mail.text)
    assert match is not None, f"no join link in the invite mail:\n{mail.text}"
    fragment = urllib.parse.urlsplit(match.group(0)).fragment  # /room/<room id>?email=...&signurl=...
    params = urllib.parse.parse_qs(fragment.partition("?")[2], strict_parsing=True)
    assert len(params["signurl"]) == 1, params
    return params["signurl"][0]


def sign_url_params(url: str) -> dict[str, str]:
    return dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query, strict_parsing=True))


def element_join(client: httpx.Client, url: str, mxid: str, **kwargs: Any) -> httpx.Response:
    """What matrix-js-sdk's joinRoom(roomId, {inviteSignUrl}) does: `&mxid=` appended, POST, and
    (unless told otherwise here) no body and no Content-Type."""
    full = f"{url}&{urllib.parse.urlencode({'mxid': mxid})}"
    return client.post(full, **kwargs)


# --- store-invite: authentication and the answer ----------------------------------------------------


def test_store_invite_v2_needs_token_and_terms(api: IdentityApi, homeserver: HomeserverStandIn) -> None:
    address = unique_email("invauth")
    body = invite_fields(homeserver, address)
    assert_error(post_store_invite(api, body), 401, "M_UNAUTHORIZED")
    bogus = User("@x:example.test", "not-a-token", "x")
    assert_error(post_store_invite(api, body, user=bogus), 401, "M_UNAUTHORIZED")
    newcomer = api.register(accept_terms=False)
    assert_error(post_store_invite(api, body, user=newcomer), 403, "M_TERMS_NOT_SIGNED")
    api.smtp.assert_no_mail(address)

    api.accept_all_terms(newcomer)
    store_invite(api, body, user=newcomer)
    api.smtp.wait_for(address)


def test_store_invite_v2_answer(
    api: IdentityApi, user: User, idserver: SydentServer, homeserver: HomeserverStandIn
) -> None:
    address = f"florence.{uuid.uuid4().hex[:10]}@bobsburgers{uuid.uuid4().hex[:6]}.example.test"
    answer = store_invite(api, invite_fields(homeserver, address), user=user)
    assert_store_invite_answer(answer, idserver, api.client, address)

    # Each invitation gets its own token and ephemeral key.
    again = store_invite(api, invite_fields(homeserver, address), user=user)
    assert_store_invite_answer(again, idserver, api.client, address)
    assert again["token"] != answer["token"]
    assert ephemeral_key(again) != ephemeral_key(answer)


@pytest.mark.parametrize("form", [False, True], ids=["json", "form"])
def test_store_invite_v1(api: IdentityApi, idserver: SydentServer, homeserver: HomeserverStandIn, form: bool) -> None:
    address = unique_email("invv1")
    answer = store_invite(api, invite_fields(homeserver, address, room_name="Form room"), v1=True, form=form)
    assert_store_invite_answer(answer, idserver, api.client, address)
    mail = api.smtp.wait_for(address)
    assert answer["token"] in mail.text
    assert ephemeral_is_valid(api.client, ephemeral_key(answer), V1)


def test_store_invite_address_is_case_folded(api: IdentityApi, user: User, homeserver: HomeserverStandIn) -> None:
    address = unique_email("invcase")
    shouted = address.upper()
    answer = store_invite(api, invite_fields(homeserver, shouted), user=user)
    assert TOKEN_RE.fullmatch(answer["token"])
    mail = api.smtp.wait_for(address)
    assert [r.casefold() for r in mail.rcpt_tos] == [address]


# --- the invite mail ------------------------------------------------------------------------------------


def test_invite_mail_escapes_and_keeps_non_ascii(api: IdentityApi, user: User, homeserver: HomeserverStandIn) -> None:
    address = unique_email("invmail")
    fields = invite_fields(homeserver, address, room_name=HOSTILE_ROOM, sender_display_name=HOSTILE_SENDER)
    answer = store_invite(api, fields, user=user)
    mail = api.smtp.wait_for(address)
    msg = mail.message

    assert mail.rcpt_tos == [address]
    assert address in msg["To"]
    assert msg["Subject"] == f"{HOSTILE_SENDER} has invited you to chat"
    assert msg.is_multipart()

    text = mail.text
    page = html_part(mail)
    # Text and HTML both carry the token, the room name and the sender.
    assert answer["token"] in text and answer["token"] in page
    assert HOSTILE_ROOM in text and HOSTILE_SENDER in text
    # The HTML part shows the values escaped: no markup of ours gets through.
    for raw in ("<script", "<img"):
        assert raw not in page, (raw, page)
    assert "&lt;script&gt;" in page and "&lt;img onerror=x&gt;" in page, page
    # ... and still all there once unescaped.
    assert HOSTILE_ROOM in html.unescape(page) and HOSTILE_SENDER in html.unescape(page), page
    # Non-ASCII survives in both parts.
    for word in ("Café ☕", "Zoë", "🎉"):
        assert word in text and word in page, word


def visible_text(part: str) -> str:
    """A mail part as a reader sees it, on one line: tags gone, entities decoded, spaces
    collapsed (also those the template puts inside brackets)."""
    flat = " ".join(html.unescape(re.sub(r"<[^>]+>", " ", part)).split())
    return flat.replace("( ", "(").replace(" )", ")").replace(" .", ".")


def test_default_invite_mail_calls_only_a_v2_sender_verified(
    api: IdentityApi, user: User, homeserver: HomeserverStandIn
) -> None:
    """v2: the token's user is the sender, shown in brackets under the name. v1: nobody vouches
    for the sender, and the mail says so instead of showing the claimed ID as if checked."""
    unchecked = "(not verified: this identity server could not check who sent this invitation)"
    v2_address = unique_email("invverified")
    store_invite(api, invite_fields(homeserver, v2_address, sender_display_name="Frank"), user=user)
    mail = api.smtp.wait_for(v2_address)
    for part in (mail.text, html_part(mail)):
        seen = visible_text(part)
        assert f"Frank ({user.user_id}) has invited you" in seen, seen
        assert f"on behalf of {user.user_id}." in seen and unchecked not in seen, seen

    v1_address = unique_email("invunverified")
    claimed = homeserver.user_id("the.boss")
    store_invite(api, invite_fields(homeserver, v1_address, sender=claimed, sender_display_name="The Boss"), v1=True)
    mail = api.smtp.wait_for(v1_address)
    for part in (mail.text, html_part(mail)):
        seen = visible_text(part)
        assert f"({claimed})" not in seen, seen
        assert f"The Boss {unchecked} has invited you" in seen, seen
        assert f"on behalf of someone it could not identify, who said they were {claimed}." in seen, seen


def test_invite_mail_cuts_long_names_as_sydent(api: IdentityApi, user: User, homeserver: HomeserverStandIn) -> None:
    """Sydent's limits: a display name over 20 characters keeps 19 and "…", a room name over 30
    keeps 25 and "…", in the Subject, the text and the join link alike. (They bound how much
    text of an inviter's choosing goes to any address.)"""
    address = unique_email("invlong")
    spam = "Buy cheap watches at shop.example.test today"
    fields = invite_fields(homeserver, address, room_name=spam, sender_display_name=spam)
    store_invite(api, fields, user=user)
    mail = api.smtp.wait_for(address)
    name, room = spam[:19] + "…", spam[:25] + "…"
    assert mail.message["Subject"] == f"{name} has invited you to chat"
    assert name in mail.text and room in mail.text and name in html_part(mail)
    assert "shop.example.test" not in mail.raw.decode("utf-8")
    link = JOIN_LINK_RE.search(mail.text)
    assert link is not None, mail.text
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(link.group(0)).fragment.partition("?")[2])
    assert query["room_name"] == [room] and query["inviter_name"] == [name], query


def test_invite_mail_subjects(api: IdentityApi, user: User, homeserver: HomeserverStandIn) -> None:
    space = unique_email("invspace")
    store_invite(
        api,
        invite_fields(homeserver, space, sender_display_name="Space Bob", room_type="m.space", room_name="The Space"),
        user=user,
    )
    assert api.smtp.wait_for(space).message["Subject"] == "Space Bob has invited you to a space"

    room = unique_email("invroom")
    store_invite(api, invite_fields(homeserver, room, sender_display_name="Room Bob", room_type="m.other"), user=user)
    assert api.smtp.wait_for(room).message["Subject"] == "Room Bob has invited you to chat"

    # Without a display name the sender's ID stands in.
    anonymous = unique_email("invanon")
    fields = invite_fields(homeserver, anonymous)
    store_invite(api, fields, user=user)
    mail = api.smtp.wait_for(anonymous)
    assert mail.message["Subject"] == f"{fields['sender']} has invited you to chat"
    assert fields["sender"] in mail.text


def test_invite_subjects_from_config(
    make_inprocess_server: Callable[..., InProcessServer],
    api_for: Callable[[SydentServer], IdentityApi],
    homeserver: HomeserverStandIn,
) -> None:
    server = make_inprocess_server(
        extra_config={
            "email": {
                "invite_subject": "Invitation from %(sender_display_name)s to %(room_name)s",
                "invite_subject_space": "Space %(room_name)s via %(sender_display_name)s",
            }
        }
    )
    api = api_for(server)
    room = unique_email("cfgroom")
    store_invite(api, invite_fields(homeserver, room, sender_display_name="Ann", room_name="Lobby"), v1=True)
    assert api.smtp.wait_for(room).message["Subject"] == "Invitation from Ann to Lobby"
    space = unique_email("cfgspace")
    store_invite(
        api,
        invite_fields(homeserver, space, sender_display_name="Ann", room_name="Orbit", room_type="m.space"),
        v1=True,
    )
    assert api.smtp.wait_for(space).message["Subject"] == "Space Orbit via Ann"


def test_store_invite_extra_fields_are_fine(api: IdentityApi, user: User, homeserver: HomeserverStandIn) -> None:
    address = unique_email("invextra")
    fields = invite_fields(
        homeserver,
        address,
        room_alias="#somewhere:example.org",
        room_avatar_url="mxc://example.org/s0meM3dia",
        room_join_rules="public",
        sender_avatar_url="mxc://example.org/an0th3r",
        guest_access_token="guest-token",
        guest_user_id="@guest:example.org",
        **{
            "org.example.custom": "custom value",
            "a_number": 5,
            "a_list": [1, 2],
            "an_object": {"k": "v"},
            "a_bool": True,
            "a_null": None,
        },
    )
    answer = store_invite(api, fields, user=user)
    assert TOKEN_RE.fullmatch(answer["token"])
    assert answer["token"] in api.smtp.wait_for(address).text


# --- what matrix-is-tester sends ----------------------------------------------------------------------------

# matrix-is-tester's test_store_invite body, as it sends it (room_id an event-like "$..." ID).
IS_TESTER_INVITE = {
    "medium": "email",
    "address": "ian@fake.test",
    "room_id": "$aroom:fake.test",
    "sender": "@sender:fake.test",
    "room_alias": "#alias:fake.test",
    "room_avatar_url": "mxc://fake.test/roomavatar",
    "room_name": "my excellent room",
    "sender_display_name": "Ian Sender",
    "sender_avatar_url": "mxc://fake.test/iansavatar",
}
# A template that shows what reached it, as matrix-is-tester's own (a JSON mail) lets it check.
FIELDS_PROBE_TEMPLATE = INVITE_PROBE_TEMPLATE + "".join(
    f"FIELD {name}: {{{{ {name}|safe }}}}\n"
    for name in (
        "room_id",
        "sender",
        "room_alias",
        "room_avatar_url",
        "room_name",
        "sender_display_name",
        "sender_avatar_url",
        "bracketed_verified_sender",
    )
)


def probe_fields(mail: ReceivedMail) -> dict[str, str]:
    return dict(re.findall(r"^FIELD (\w+): ?(.*?)\r?$", mail.text, re.M))


def assert_is_tester_answer(api: IdentityApi, answer: dict[str, Any], address: str) -> None:
    """matrix-is-tester's checks: a token, a display name that is not the address, and public
    keys each valid at its key_validity_url."""
    assert isinstance(answer["token"], str) and answer["token"]
    assert answer["display_name"] != address and answer["display_name"] == "i...@fak...", answer
    assert answer["public_keys"]
    for entry in answer["public_keys"]:
        resp = api.client.get(entry["key_validity_url"], params={"public_key": entry["public_key"]})
        assert resp.status_code == 200 and resp.json()["valid"] is True, (entry, resp.text)


def test_what_matrix_is_tester_sends(
    make_inprocess_server: Callable[..., InProcessServer],
    api_for: Callable[[SydentServer], IdentityApi],
    tmp_path: Path,
) -> None:
    """Its store-invite tests, on a server of their own (the suite's fixed addresses): v1 as it
    sends them; v2 the same, with the sender being the token's user."""
    root = tmp_path / "templates"
    shutil.copytree(REPO_ROOT / "templates" / "default", root / "default")
    (root / "default" / "invite_template.eml.j2").write_text(FIELDS_PROBE_TEMPLATE, encoding="utf-8")
    api = api_for(make_inprocess_server(templates_dir=root, terms_path=None))

    # test_store_invite (v1): the answer, and every field reaching the mail as sent.
    answer = store_invite(api, dict(IS_TESTER_INVITE), v1=True)
    assert_is_tester_answer(api, answer, "ian@fake.test")
    mail = api.smtp.wait_for("ian@fake.test")
    assert probe_values(mail)[0] == answer["token"]
    sent = {k: v for k, v in IS_TESTER_INVITE.items() if k not in ("medium", "address")}
    assert probe_fields(mail) == {**sent, "bracketed_verified_sender": ""}

    # v2, with the token's user as the sender: the same, and the sender verified.
    inviter = api.register("sender")
    answer = store_invite(api, dict(IS_TESTER_INVITE), user=inviter)
    assert_is_tester_answer(api, answer, "ian@fake.test")
    fields = probe_fields(api.smtp.wait_for("ian@fake.test"))
    assert fields == {**sent, "sender": inviter.user_id, "bracketed_verified_sender": f"({inviter.user_id}) "}
    # A sender on another server than the token's user's (the suite's @sender:fake.test): refused.
    body = assert_error(
        post_store_invite(api, dict(IS_TESTER_INVITE), user=inviter, as_sender=False), 403, "M_UNAUTHORIZED"
    )
    assert "sender" in body["error"]
    api.smtp.assert_no_mail("ian@fake.test")

    # test_store_invite_bound_threepid: M_THREEPID_IN_USE (not a complaint about the room ID).
    owner = api.register("some_mxid")
    api.bind_email("already_here@fake.test", owner)
    bound = {
        "medium": "email",
        "address": "already_here@fake.test",
        "room_id": "$aroom:fake.test",
        "sender": "@sender:fake.test",
    }
    body = assert_error(post_store_invite(api, dict(bound), v1=True), 400, "M_THREEPID_IN_USE")
    assert body["mxid"] == owner.user_id
    body = assert_error(post_store_invite(api, dict(bound), user=inviter), 400, "M_THREEPID_IN_USE")
    assert body["mxid"] == owner.user_id
    api.smtp.assert_no_mail("already_here@fake.test")


@pytest.mark.parametrize(
    "room_id", ["$aroom:fake.test", "#alias:fake.test", "room without sigil", "!" + "r" * 254, "é☕/?&#%"]
)
def test_store_invite_takes_any_room_id(api: IdentityApi, user: User, room_id: str) -> None:
    """Sydent takes any string: a room ID is only echoed (the mail, its join link URL-quoted, the
    onbind callback). 1-255 characters, storable ones."""
    address = unique_email("anyroom")
    answer = store_invite(api, {"medium": "email", "address": address, "room_id": room_id, "sender": "x"}, user=user)
    assert TOKEN_RE.fullmatch(answer["token"])
    link = JOIN_LINK_RE.search(api.smtp.wait_for(address).text)
    assert link is not None
    assert urllib.parse.unquote(urllib.parse.urlsplit(link.group(0)).fragment.partition("?")[0]) == f"/room/{room_id}"


@pytest.mark.parametrize("room_id", ["", "!" + "r" * 255, "!r\x00:hs.test", "!r\ud800:hs.test"])
def test_store_invite_refuses_unusable_room_ids(api: IdentityApi, user: User, room_id: str) -> None:
    address = unique_email("badroom")
    raw = json.dumps({"medium": "email", "address": address, "room_id": room_id, "sender": user.user_id})
    resp = api.client.post(
        f"{V2}/store-invite", content=raw.encode(), headers={**user.headers, "Content-Type": "application/json"}
    )
    assert_error(resp, 400, "M_INVALID_PARAM")
    api.smtp.assert_no_mail(address, wait=0.2)


# --- store-invite errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize("missing", ["medium", "address", "room_id", "sender"])
@pytest.mark.parametrize("v1", [False, True], ids=["v2", "v1"])
def test_store_invite_missing_fields(
    api: IdentityApi, user: User, homeserver: HomeserverStandIn, missing: str, v1: bool
) -> None:
    address = unique_email("invmissing")
    body = invite_fields(homeserver, address)
    del body[missing]
    body_err = assert_error(post_store_invite(api, body, user=None if v1 else user, v1=v1), 400, "M_MISSING_PARAMS")
    assert missing in body_err.get("error", ""), body_err
    api.smtp.assert_no_mail(address, wait=0.2)


def test_store_invite_msisdn_is_unrecognized(api: IdentityApi, user: User, homeserver: HomeserverStandIn) -> None:
    body = invite_fields(homeserver, "447700900123", medium="msisdn")
    assert_error(post_store_invite(api, body, user=user), 400, "M_UNRECOGNIZED")
    assert_error(post_store_invite(api, body, v1=True), 400, "M_UNRECOGNIZED")


@pytest.mark.parametrize(
    "address",
    [
        "plainaddress",
        "user@@example.test",
        "@example.test",
        "user@",
        "user@example.test\nBcc: victim@example.test",
        "v" * 65 + "@example.test",
        "=?utf-8?q?victim=40example=2Etest?=@example.test",
    ],
)
def test_store_invite_bad_email(api: IdentityApi, user: User, homeserver: HomeserverStandIn, address: str) -> None:
    assert_error(post_store_invite(api, invite_fields(homeserver, address), user=user), 400, "M_INVALID_EMAIL")
    assert_error(post_store_invite(api, invite_fields(homeserver, address), v1=True), 400, "M_INVALID_EMAIL")
    assert api.smtp.all_to("victim@example.test") == []


def test_store_invite_for_a_bound_address(api: IdentityApi, user: User, homeserver: HomeserverStandIn) -> None:
    address = unique_email("invbound")
    owner = api.register()
    api.bind_email(address, owner)
    for candidate in (address, address.upper()):
        for v1 in (False, True):
            resp = post_store_invite(api, invite_fields(homeserver, candidate), user=None if v1 else user, v1=v1)
            body = assert_error(resp, 400, "M_THREEPID_IN_USE")
            assert body.get("mxid") == owner.user_id, body
    api.smtp.assert_no_mail(address)


def test_store_invite_smtp_failure(api: IdentityApi, user: User, homeserver: HomeserverStandIn) -> None:
    address = unique_email("invsmtp")
    api.smtp.refuse()
    assert_error(post_store_invite(api, invite_fields(homeserver, address), user=user), 400, "M_EMAIL_SEND_ERROR")
    api.smtp.down()
    assert_error(post_store_invite(api, invite_fields(homeserver, address), v1=True), 400, "M_EMAIL_SEND_ERROR")
    api.smtp.accept()
    assert not api.smtp.pending(address)

    # Nothing was stored: binding the address sends no onbind callback.
    invitee = api.register()
    since = time.time()
    api.bind_email(address, invitee)
    assert_no_onbind(homeserver, invitee.user_id, since, wait=2.0)


# --- ephemeral keys and sign-ed25519 ----------------------------------------------------------------------


def test_ephemeral_isvalid(api: IdentityApi, user: User, homeserver: HomeserverStandIn) -> None:
    answer = store_invite(api, invite_fields(homeserver, unique_email("invkey")), user=user)
    key = ephemeral_key(answer)
    for prefix in (V2, V1):
        assert ephemeral_is_valid(api.client, key, prefix) is True
        assert ephemeral_is_valid(api.client, random_public_key(), prefix) is False
        # Our long-term key is not an ephemeral key; a mangled key is not valid.
        assert ephemeral_is_valid(api.client, public_key(api.client), prefix) is False
        assert ephemeral_is_valid(api.client, key[:-2], prefix) is False


def check_sign_answer(
    resp: httpx.Response,
    server: SydentServer,
    *,
    mxid: str,
    sender: str,
    token: str,
    ephemeral_public: str,
    our_key: str,
) -> None:
    assert resp.status_code == 200, resp.text
    signed = resp.json()
    assert set(signed) == SIGN_KEYS, signed
    assert signed["mxid"] == mxid and signed["sender"] == sender and signed["token"] == token, signed
    assert set(signed["signatures"]) == {server.server_name}, signed
    assert set(signed["signatures"][server.server_name]) == {"ed25519:0"}, signed
    signedjson.sign.verify_signed_json(signed, server.server_name, verify_key_from(ephemeral_public))
    # Signed with the ephemeral key, not our long-term one.
    with pytest.raises(SignatureVerifyException):
        signedjson.sign.verify_signed_json(signed, server.server_name, verify_key_from(our_key))


def test_sign_ed25519(
    make_inprocess_server: Callable[..., InProcessServer],
    api_for: Callable[[SydentServer], IdentityApi],
    homeserver: HomeserverStandIn,
    probe_templates: Path,
) -> None:
    server = make_inprocess_server(templates_dir=probe_templates)
    api = api_for(server)
    our_key = public_key(api.client)
    address = unique_email("invsign")
    fields = invite_fields(homeserver, address)
    answer = store_invite(api, fields, v1=True)
    token, private_key = probe_values(api.smtp.wait_for(address))
    assert token == answer["token"]
    ephemeral_public = ephemeral_key(answer)
    # The private key the mail carries belongs to the ephemeral public key.
    seed = signedjson.key.decode_signing_key_base64("ed25519", "0", private_key)
    assert encode_base64(seed.verify_key.encode(), urlsafe=True) == ephemeral_public

    mxid = homeserver.user_id("accepter")
    expected = {
        "mxid": mxid,
        "sender": fields["sender"],
        "token": token,
        "ephemeral_public": ephemeral_public,
        "our_key": our_key,
    }
    body = {"mxid": mxid, "token": token, "private_key": private_key}

    # v1: no authentication; JSON and form.
    check_sign_answer(api.client.post(f"{V1}/sign-ed25519", json=body), server, **expected)
    check_sign_answer(api.client.post(f"{V1}/sign-ed25519", data=body), server, **expected)

    # v2: token needed.
    assert_error(api.client.post(f"{V2}/sign-ed25519", json=body), 401, "M_UNAUTHORIZED")
    user = api.register()
    check_sign_answer(api.client.post(f"{V2}/sign-ed25519", json=body, headers=user.headers), server, **expected)

    # Unknown token.
    unknown = dict(body, token="T" * 32)
    assert_error(api.client.post(f"{V1}/sign-ed25519", json=unknown), 404, "M_UNRECOGNIZED")
    assert_error(api.client.post(f"{V2}/sign-ed25519", json=unknown, headers=user.headers), 404, "M_UNRECOGNIZED")
    # Bad private key.
    for bad in ("not base64!", "AAAA"):
        assert_error(
            api.client.post(f"{V2}/sign-ed25519", json=dict(body, private_key=bad), headers=user.headers),
            400,
            "M_INVALID_PARAM",
        )
    # Missing fields (private_key too, on v1 and v2: spec, Sydent).
    for missing in ("mxid", "token", "private_key"):
        partial = {k: v for k, v in body.items() if k != missing}
        err = assert_error(
            api.client.post(f"{V2}/sign-ed25519", json=partial, headers=user.headers), 400, "M_MISSING_PARAMS"
        )
        assert missing in err["error"], err
        assert_error(api.client.post(f"{V1}/sign-ed25519", json=partial), 400, "M_MISSING_PARAMS")


def test_sign_ed25519_v2_on_the_shared_server(
    api: IdentityApi, user: User, idserver: SydentServer, homeserver: HomeserverStandIn
) -> None:
    address = unique_email("invsign2")
    fields = invite_fields(homeserver, address)
    answer = store_invite(api, fields, user=user)
    private_key = sign_url_params(sign_url(api.smtp.wait_for(address)))["private_key"]
    mxid = homeserver.user_id("joiner")
    body = {"mxid": mxid, "token": answer["token"], "private_key": private_key}
    resp = api.client.post(f"{V2}/sign-ed25519", json=body, headers=user.headers)
    check_sign_answer(
        resp,
        idserver,
        mxid=mxid,
        sender=fields["sender"],
        token=answer["token"],
        ephemeral_public=ephemeral_key(answer),
        our_key=public_key(api.client),
    )
    # Terms apply to v2 signing too.
    newcomer = api.register(accept_terms=False)
    resp = api.client.post(f"{V2}/sign-ed25519", json=body, headers=newcomer.headers)
    assert_error(resp, 403, "M_TERMS_NOT_SIGNED")


def test_element_join_posts_the_mailed_sign_url(
    api: IdentityApi, user: User, idserver: SydentServer, homeserver: HomeserverStandIn
) -> None:
    address = unique_email("invelement")
    fields = invite_fields(homeserver, address, room_name="Element room")
    answer = store_invite(api, fields, user=user)
    url = sign_url(api.smtp.wait_for(address))
    assert url.startswith(f"{idserver.base_url}{V1}/sign-ed25519?"), url
    assert sign_url_params(url).keys() == {"token", "private_key"}, url
    mxid = homeserver.user_id("element" + uuid.uuid4().hex[:6])
    expected = {
        "mxid": mxid,
        "sender": fields["sender"],
        "token": answer["token"],
        "ephemeral_public": ephemeral_key(answer),
        "our_key": public_key(api.client),
    }

    # matrix-js-sdk: no body, no Content-Type; the parameters in the query string only.
    resp = element_join(api.client, url, mxid)
    assert "content-type" not in resp.request.headers and resp.request.content == b""
    check_sign_answer(resp, idserver, **expected)
    # Older clients: the JSON body `null`.
    check_sign_answer(
        element_join(api.client, url, mxid, content=b"null", headers={"Content-Type": "application/json"}),
        idserver,
        **expected,
    )
    # Body values win over the query string.
    other = homeserver.user_id("bodywins" + uuid.uuid4().hex[:6])
    check_sign_answer(element_join(api.client, url, mxid, json={"mxid": other}), idserver, **dict(expected, mxid=other))
    # The same on v2, with its authentication.
    v2_url = url.replace(f"{V1}/sign-ed25519", f"{V2}/sign-ed25519")
    assert_error(element_join(api.client, v2_url, mxid), 401, "M_UNAUTHORIZED")
    check_sign_answer(element_join(api.client, v2_url, mxid, headers=user.headers), idserver, **expected)
    # Other endpoints keep their body rules.
    assert_error(
        api.client.post(f"{V1}/store-invite", content=b"null", headers={"Content-Type": "application/json"}),
        400,
        "M_BAD_JSON",
    )


def test_sign_ed25519_needs_the_invites_own_private_key(
    api: IdentityApi, user: User, idserver: SydentServer, homeserver: HomeserverStandIn
) -> None:
    # The attack: the invite token is public (the state key of m.room.third_party_invite), so
    # Mallory, with an account of her own, asks us to sign the invitation for herself.
    address = unique_email("invvictim")
    answer = store_invite(api, invite_fields(homeserver, address), user=user)
    victim_url = sign_url(api.smtp.wait_for(address))
    token = answer["token"]
    mallory = api.register()
    mxid = mallory.user_id

    for prefix, headers in ((V2, mallory.headers), (V1, {})):
        path = f"{prefix}/sign-ed25519"
        err = assert_error(
            api.client.post(path, json={"mxid": mxid, "token": token}, headers=headers), 400, "M_MISSING_PARAMS"
        )
        assert "private_key" in err["error"], err
        forged = encode_base64(signedjson.key.generate_signing_key("0").encode())
        assert_error(
            api.client.post(path, json={"mxid": mxid, "token": token, "private_key": forged}, headers=headers),
            400,
            "M_INVALID_PARAM",
        )
        # Nor does the private key of another invitation (Mallory's own) sign this one.
        own = unique_email("invmallory")
        store_invite(api, invite_fields(homeserver, own), user=mallory)
        own_key = sign_url_params(sign_url(api.smtp.wait_for(own)))["private_key"]
        assert_error(
            api.client.post(path, json={"mxid": mxid, "token": token, "private_key": own_key}, headers=headers),
            400,
            "M_INVALID_PARAM",
        )

    # The invitee, with the link from the mail, still joins.
    resp = element_join(api.client, victim_url, homeserver.user_id("invitee"))
    assert resp.status_code == 200, resp.text
    signedjson.sign.verify_signed_json(resp.json(), idserver.server_name, verify_key_from(ephemeral_key(answer)))


def test_the_database_holds_no_ephemeral_private_key(
    make_inprocess_server: Callable[..., InProcessServer],
    api_for: Callable[[SydentServer], IdentityApi],
    homeserver: HomeserverStandIn,
) -> None:
    server = make_inprocess_server()
    api = api_for(server)
    address = unique_email("invnokey")
    store_invite(api, invite_fields(homeserver, address), v1=True)
    private_key = sign_url_params(sign_url(api.smtp.wait_for(address)))["private_key"]

    async def read() -> tuple[list[str], str]:
        from sqlalchemy import inspect, text

        from sydent_lite.storage.database import open_database

        database = open_database(server.database_url)
        try:
            async with database.connect() as conn:
                columns = await conn.run_sync(lambda c: [col["name"] for col in inspect(c).get_columns("invites")])
                names = await conn.run_sync(lambda c: inspect(c).get_table_names())
                rows = [repr((await conn.execute(text(f'SELECT * FROM "{name}"'))).all()) for name in names]
            return columns, "\n".join(rows)
        finally:
            await database.dispose()

    columns, everything = asyncio.run(read())
    assert "ephemeral_public_key" in columns
    assert not [c for c in columns if "private" in c], columns
    assert private_key not in everything


def test_invites_expire(
    make_inprocess_server: Callable[..., InProcessServer],
    api_for: Callable[[SydentServer], IdentityApi],
    homeserver: HomeserverStandIn,
) -> None:
    server = make_inprocess_server(extra_config={"invites": {"expiry_seconds": 3600}})
    api = api_for(server)
    user = api.register()
    address = unique_email("invexpire")
    answer = store_invite(api, invite_fields(homeserver, address), user=user)
    url = sign_url(api.smtp.wait_for(address))  # the invite mail, out of the way of the validation mail
    key = ephemeral_key(answer)
    server.clock.advance(3599)
    assert ephemeral_is_valid(api.client, key) is True
    server.clock.advance(2)
    assert ephemeral_is_valid(api.client, key) is False
    assert_error(element_join(api.client, url, user.user_id), 404, "M_UNRECOGNIZED")
    # Expired but not yet cleaned up (that runs every few minutes): binding queues and sends nothing.
    assert sql(server.database_url, "SELECT token FROM invites WHERE address = ?", address) != []
    since = time.time()
    api.bind_email(address, user)
    queued = sql(server.database_url, "SELECT callback_id, delivered_ts FROM invites WHERE address = ?", address)
    assert queued == [{"callback_id": None, "delivered_ts": None}]
    assert_no_onbind(homeserver, user.user_id, since, wait=0.5)


# --- the whole flow: invite, bind, onbind ----------------------------------------------------------------------


def test_invite_then_bind_sends_onbind(
    api: IdentityApi, user: User, idserver: SydentServer, homeserver: HomeserverStandIn
) -> None:
    our_key = public_key(api.client)
    address = unique_email("invitee")
    other_address = unique_email("bystander")

    # Two invitations for the address (two rooms, two senders), one for another address.
    first = invite_fields(homeserver, address, room_name="First room", sender_display_name="Alice")
    second = invite_fields(homeserver, address.upper(), room_name="Second room")  # case-folded
    elsewhere = invite_fields(homeserver, other_address, room_name="Elsewhere")
    a1 = store_invite(api, first, user=user)
    a2 = store_invite(api, second, user=user)
    b1 = store_invite(api, elsewhere, user=user)

    # The invitee gets the mails, with the invitation codes.
    mails = [api.smtp.wait_for(address), api.smtp.wait_for(address)]
    for mail, answer in zip(mails, (a1, a2), strict=True):
        assert mail.rcpt_tos == [address]
        assert answer["token"] in mail.text
    assert b1["token"] in api.smtp.wait_for(other_address).text

    # The invitee joins the identity server and binds the address.
    invitee = api.register()
    assert homeserver.onbind_requests(invitee.user_id) == []
    since = time.time()
    api.bind_email(address, invitee)
    req = homeserver.wait_for_onbind(invitee.user_id)
    assert_onbind_body(
        req, idserver, our_key, address=address, mxid=invitee.user_id, invites={a1["token"]: first, a2["token"]: second}
    )
    assert b1["token"] not in req.body.decode()

    # Delivered once; a later bind of the same address sends nothing again.
    time.sleep(1.0)
    assert len(homeserver.onbind_requests(invitee.user_id, since=since)) == 1
    since = time.time()
    api.bind_email(address, invitee)
    assert_no_onbind(homeserver, invitee.user_id, since, wait=2.0)

    # The other address, bound by someone else, gets only its own invitation.
    bystander = api.register()
    api.bind_email(other_address, bystander)
    req = homeserver.wait_for_onbind(bystander.user_id)
    assert_onbind_body(
        req, idserver, our_key, address=other_address, mxid=bystander.user_id, invites={b1["token"]: elsewhere}
    )
    for token in (a1["token"], a2["token"]):
        assert token not in req.body.decode()


def test_bind_without_invites_sends_no_onbind(api: IdentityApi, homeserver: HomeserverStandIn) -> None:
    user = api.register()
    since = time.time()
    api.bind_email(unique_email("noinvite"), user)
    assert_no_onbind(homeserver, user.user_id, since, wait=1.5)


# --- durability --------------------------------------------------------------------------------------------

FAST_RETRY = {"invites": {"onbind_retry_initial_seconds": 0.5, "onbind_retry_max_seconds": 1}}


def test_onbind_is_retried_until_the_homeserver_accepts(
    make_inprocess_server: Callable[..., InProcessServer],
    api_for: Callable[[SydentServer], IdentityApi],
    homeserver: HomeserverStandIn,
) -> None:
    # In this process, on a fake clock: the backoff is seen in the server's own time.
    server = make_inprocess_server(
        extra_config={"invites": {"onbind_retry_initial_seconds": 5, "onbind_retry_max_seconds": 20}}
    )
    clock = server.clock
    api = api_for(server)
    our_key = public_key(api.client)
    inviter = api.register()
    address = unique_email("retry")
    fields = invite_fields(homeserver, address)
    answer = store_invite(api, fields, user=inviter)
    assert answer["token"] in api.smtp.wait_for(address).text  # the invite mail
    invitee = api.register()
    homeserver.fail_onbind(invitee.user_id, times=3, status=503)

    def calls() -> list[RecordedRequest]:
        return [c for c in homeserver.onbind_requests(invitee.user_id) if c.status is not None]

    def callback() -> dict[str, Any]:
        rows = sql(server.database_url, "SELECT attempts, next_attempt_ts FROM onbind_callbacks")
        assert len(rows) == 1, rows
        return rows[0]

    def attempts_are(n: int) -> bool:
        return bool(callback()["attempts"] == n)

    def calls_exceed(n: int) -> bool:
        return len(calls()) > n

    try:
        api.bind_email(address, invitee)
        wait_until(lambda: len(calls()) == 1, what="the first onbind attempt")
        # Backoff, not a tight loop: each failure puts the next attempt off by the configured
        # delay, doubling up to the maximum, and nothing is sent before it is due.
        for failures, delay_s in enumerate([5, 10, 20], start=1):
            wait_until(functools.partial(attempts_are, failures), what=f"failure {failures} recorded")
            due = callback()["next_attempt_ts"]
            assert due - clock.time_ms() in range(delay_s * 1000 - 1000, delay_s * 1000 + 1), (due, clock.time_ms())
            advance_until(clock, functools.partial(calls_exceed, failures), step=0.5, what=f"attempt {failures + 1}")
            assert clock.time_ms() >= due, "sent before it was due"
        success = homeserver.wait_for_onbind(invitee.user_id)
        assert [c.status for c in calls()] == [503, 503, 503, 200]
        assert calls()[3] is success
        # Every attempt carries the same invitation.
        for call in calls():
            assert_onbind_body(
                call, server, our_key, address=address, mxid=invitee.user_id, invites={answer["token"]: fields}
            )
        # Accepted: the callback is gone, and no further attempts well past the maximum backoff.
        wait_until(lambda: sql(server.database_url, "SELECT id FROM onbind_callbacks") == [], what="callback done")
        for _ in range(10):
            clock.advance(10)
            time.sleep(0.02)
        assert len(homeserver.onbind_requests(invitee.user_id)) == 4
    finally:
        homeserver.reset_onbind(invitee.user_id)


def test_onbind_survives_a_restart(
    make_server: Callable[..., SydentServer],
    api_for: Callable[[SydentServer], IdentityApi],
    homeserver: HomeserverStandIn,
) -> None:
    server = make_server(extra_config=FAST_RETRY)
    api = api_for(server)
    our_key = public_key(api.client)
    inviter = api.register()
    address = unique_email("restart")
    fields = invite_fields(homeserver, address)
    answer = store_invite(api, fields, user=inviter)
    assert answer["token"] in api.smtp.wait_for(address).text  # the invite mail
    invitee = api.register()
    homeserver.set_onbind_status(invitee.user_id, 503)
    try:
        api.bind_email(address, invitee)
        wait_until(
            lambda: any(c.status == 503 for c in homeserver.onbind_requests(invitee.user_id)),
            what="a first (refused) onbind attempt",
        )
        server.stop()
        time.sleep(0.3)  # let any in-flight request land before counting
        assert all(c.status == 503 for c in homeserver.onbind_requests(invitee.user_id))
        homeserver.set_onbind_status(invitee.user_id, None)
        stopped_at = time.time()
        time.sleep(1.0)
        assert homeserver.onbind_requests(invitee.user_id, since=stopped_at) == [], "calls while stopped"

        server.start()
        success = homeserver.wait_for_onbind(invitee.user_id, timeout=20.0)
        assert success.time > stopped_at
        assert_onbind_body(
            success, server, our_key, address=address, mxid=invitee.user_id, invites={answer["token"]: fields}
        )
        # Exactly once: nothing more after the homeserver accepted it, even across another restart.
        time.sleep(3.0)
        server.restart()
        time.sleep(2.0)
        delivered = [c for c in homeserver.onbind_requests(invitee.user_id) if c.status == 200]
        assert delivered == [success], [(c.status, c.time) for c in homeserver.onbind_requests(invitee.user_id)]
        assert homeserver.onbind_requests(invitee.user_id, since=success.time + 0.001) == []
    finally:
        homeserver.reset_onbind(invitee.user_id)


# --- a bind and its callback: one transaction -----------------------------------------------------------------


def test_a_bind_whose_callback_cannot_be_queued_stores_nothing(
    make_inprocess_server: Callable[..., InProcessServer],
    api_for: Callable[[SydentServer], IdentityApi],
    homeserver: HomeserverStandIn,
) -> None:
    """The association and the callback of the address's pending invites commit together.

    A `kill -9` between the two can no longer happen: there is no "between" (one transaction),
    so what can be tested is that transaction's atomicity. The callback's INSERT is made to fail
    for real (a trigger): the bind answers a Matrix error and leaves no association behind
    (before, the binding was stored, the invites never queued, and the answer was a 500 anyway).
    """
    server = make_inprocess_server()
    api = api_for(server)
    our_key = public_key(api.client)
    address = unique_email("atomic")
    fields = invite_fields(homeserver, address)
    token = store_invite(api, fields, v1=True)["token"]
    api.smtp.wait_for(address)  # the invite mail
    invitee = api.register()
    session = api.validated_email_session(address, user=invitee)

    refuse_inserts(server.database_url, "onbind_callbacks")
    try:
        resp = api.bind(session, invitee.user_id, user=invitee)
        assert_error(resp, 500, "M_UNKNOWN")
        assert api.v1_lookup("email", address).json() == {}
        assert api.lookup_email(invitee, address) is None
        assert sql(server.database_url, "SELECT mxid FROM associations WHERE address = ?", address) == []
        assert sql(server.database_url, "SELECT callback_id FROM invites WHERE token = ?", token) == [
            {"callback_id": None}
        ]
    finally:
        allow_inserts(server.database_url, "onbind_callbacks")

    # Nothing half-done stands in the way: the same bind, tried again, binds and delivers.
    resp = api.bind(session, invitee.user_id, user=invitee)
    assert resp.status_code == 200, resp.text
    assert api.lookup_email(invitee, address) == invitee.user_id
    req = homeserver.wait_for_onbind(invitee.user_id)
    assert_onbind_body(req, server, our_key, address=address, mxid=invitee.user_id, invites={token: fields})


def test_invites_a_crash_left_unqueued_are_delivered_at_start(
    make_server: Callable[..., SydentServer],
    api_for: Callable[[SydentServer], IdentityApi],
    homeserver: HomeserverStandIn,
) -> None:
    """An older version committed the association, then queued the callback in a second
    transaction: a crash in between left a bound address with unqueued invites and no callback,
    for ever. The database is put in that state; the next start queues and delivers them once
    (expired invites and ones already delivered, e.g. imported from Sydent, stay unsent)."""
    server = make_server()
    api = api_for(server)
    our_key = public_key(api.client)
    address = unique_email("crashed")
    pending = invite_fields(homeserver, address)
    tokens = {
        name: store_invite(api, invite_fields(homeserver, address) if name != "pending" else pending, v1=True)["token"]
        for name in ("pending", "expired", "imported")
    }
    for _ in tokens:
        api.smtp.wait_for(address)  # the invite mails
    invitee = api.register()
    homeserver.set_onbind_status(invitee.user_id, 503)  # the bind's own callback is not delivered
    try:
        _, association = api.bind_email(address, invitee)
        homeserver.wait_for_onbind(invitee.user_id, successful=False)
        server.stop()
        url = server.database_url
        # What the crash left: the association, the invites unqueued, no callback.
        sql(url, "DELETE FROM onbind_callbacks")
        sql(url, "UPDATE invites SET callback_id = NULL WHERE address = ?", address)
        sql(url, "UPDATE invites SET created_ts = 1 WHERE token = ?", tokens["expired"])
        sql(url, "UPDATE invites SET delivered_ts = 1 WHERE token = ?", tokens["imported"])
        homeserver.set_onbind_status(invitee.user_id, None)
        restarted = time.time()
        server.start()

        req = homeserver.wait_for_onbind(invitee.user_id)
        assert req.time >= restarted
        assert_onbind_body(
            req, server, our_key, address=address, mxid=invitee.user_id, invites={tokens["pending"]: pending}
        )
        # The association as it was bound (from its stored signed JSON), not a new one.
        assert {k: req.json[k] for k in ("ts", "not_before", "not_after")} == {
            k: association[k] for k in ("ts", "not_before", "not_after")
        }
        # Once: delivered, not queued again by the next start.
        time.sleep(1.0)
        server.restart()
        time.sleep(1.5)
        assert [r.status for r in homeserver.onbind_requests(invitee.user_id, since=restarted)] == [200]
        assert sql(url, "SELECT count(*) AS n FROM onbind_callbacks")[0]["n"] == 0
        rows = sql(url, "SELECT token, delivered_ts FROM invites WHERE address = ?", address)
        delivered = {r["token"]: r["delivered_ts"] for r in rows}
        # The delivered invite is deleted (invites.delete_tokens_on_bind); the one Sydent had
        # already sent was not in the callback and stays.
        assert tokens["pending"] not in delivered and delivered[tokens["imported"]] == 1
    finally:
        homeserver.reset_onbind(invitee.user_id)


def test_empty_ephemeral_key_is_never_valid(client: httpx.Client) -> None:
    # Invites imported from Sydent store "" as their ephemeral key: "" must not match them.
    for prefix in (V2, "/_matrix/identity/api/v1"):
        resp = client.get(f"{prefix}/pubkey/ephemeral/isvalid", params={"public_key": ""})
        assert resp.status_code == 200 and resp.json() == {"valid": False}
