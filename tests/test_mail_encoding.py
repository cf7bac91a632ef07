"""User text in mails, end to end: store-invite and requestToken against a real server, the mail
read back from the SMTP sink the way a mail reader would (Python's email package).

- A value shaped like an RFC 2047 encoded word (`=?utf-8?q?...?=`) is shown as typed, never
  decoded into something else (the Subject of an invite carries the inviter's display name).
- Values long enough to push a line past the 998 octets SMTP allows (a 255-character room ID
  with a long address) no longer make the send fail: the affected parts are sent
  quoted-printable, and the reader gets the whole text back.

Contract: docs/api-behaviour.md, "Invitations" and "Mail".
"""

from __future__ import annotations

import html
import uuid
from urllib.parse import parse_qs, quote, urlsplit

import httpx
from support.asserts import html_part
from support.homeserver import HomeserverStandIn
from support.server import V2, IdentityApi, User, new_secret
from support.smtp import ReceivedMail

# At most 20 characters: a longer display name is cut (as Sydent does), which would break it.
ENCODED_WORD = "=?utf-8?q?My_bank?="


def store_invite(api: IdentityApi, user: User, fields: dict[str, str]) -> httpx.Response:
    return api.client.post(f"{V2}/store-invite", json=fields, headers=user.headers)


def long_address() -> str:
    # 254 characters, the most an address may have: a 64-octet local part (the most RFC 5321
    # allows) at a 189-character domain.
    local = ("i" + uuid.uuid4().hex + "x" * 64)[:64]
    address = f"{local}@{'b' * 63}.{'c' * 63}.{'d' * 48}.example.test"
    assert len(address) == 254
    return address


def assert_lines_fit(mail: ReceivedMail) -> None:
    longest = max(len(line) for line in mail.raw.split(b"\r\n"))
    assert longest <= 998, f"a line of {longest} octets"


def test_encoded_word_in_a_display_name_is_shown_as_typed(
    api: IdentityApi, user: User, homeserver: HomeserverStandIn
) -> None:
    address = f"ew.{uuid.uuid4().hex[:12]}@example.test"
    fields = {
        "medium": "email",
        "address": address,
        "room_id": f"!r{uuid.uuid4().hex[:8]}:{homeserver.server_name}",
        "sender": user.user_id,
        "sender_display_name": ENCODED_WORD,
    }
    resp = store_invite(api, user, fields)
    assert resp.status_code == 200, resp.text
    mail = api.smtp.wait_for(address)
    # What a mail reader shows: the literal text, not "My bank has invited you to chat".
    assert mail.message["Subject"] == f"{ENCODED_WORD} has invited you to chat"
    assert ENCODED_WORD in mail.text


def test_invite_with_the_longest_room_id_and_a_long_address_is_delivered(
    api: IdentityApi, user: User, homeserver: HomeserverStandIn
) -> None:
    address = long_address()
    # 255 characters, most of which a URL must percent-encode (several times their length).
    room_id = "!" + ("é:ü/" * 64)[:254]
    assert len(room_id) == 255
    fields = {
        "medium": "email",
        "address": address,
        "room_id": room_id,
        "sender": user.user_id,
        "sender_display_name": "Long Room Alice",
        "room_name": "A room",
    }
    resp = store_invite(api, user, fields)
    assert resp.status_code == 200, resp.text
    mail = api.smtp.wait_for(address)
    assert_lines_fit(mail)
    # The whole join link is in the text and the HTML part, as long as it is.
    text = mail.text
    expected_start = f"/#/room/{quote(room_id, safe='')}?"
    links = [word for word in text.split() if expected_start in word]
    assert len(links) == 1, text
    link = links[0]
    assert len(link) > 998
    query = parse_qs(urlsplit(link.split("#", 1)[1]).query)
    assert query["email"] == [address]
    sign_url = urlsplit(query["signurl"][0])
    assert parse_qs(sign_url.query)["token"] == [resp.json()["token"]]
    assert link in html.unescape(html_part(mail))


def test_validation_mail_for_a_long_address_with_a_long_next_link(api: IdentityApi, user: User) -> None:
    address = long_address()
    next_link = "https://app.example.test/after?" + "n" * 2000
    session = api.start_email_session(address, user=user, next_link=next_link, client_secret=new_secret())
    assert session.mail is not None
    assert_lines_fit(session.mail)
    assert next_link.encode() not in session.mail.raw  # next_link is where the page sends people, not mail
    assert session.mail.message["To"] == address
    resp = api.submit_token(session, user=user)
    assert resp.status_code == 200 and resp.json() == {"success": True}, resp.text
