"""Sydent's own template folder, rendered as Sydent renders it.

The reference is what the real Sydent 2.6.1 sent (tests/fixtures/sydent-2.6.1: its stock `res/`
folder, every mail it sent in `mails/*.eml`, the request behind each in `mails/index.json`). A
server pointed at that `res/` folder, configured as that Sydent was (sydent.conf: From, the
invite subjects, the web client, the 4/5 characters of the masked address), is sent the same
requests; each mail it sends must be the mail Sydent sent, byte for byte, once `normalise` has
blanked what differs by nature: dates, message ids, MIME boundaries, tokens, keys, the
validation link (our host, port and session), the homeserver's port, and line endings (we send
CRLF, Sydent bare LF). The Subject is compared decoded (we leave ASCII subjects readable,
Sydent always RFC 2047-encodes them).

Also: a brand folder holding only Sydent's legacy `%(name)s` templates renders as that Sydent
rendered them (fixture mails 16-17); a broken legacy template stops start-up naming the file;
v2 never mails in another user's name; `org.matrix.web_client_location` is honoured only as an
http(s) base URL (and, when configured, an allowed one).

Contract: docs/api-behaviour.md, "Invitations" and "Sydent's templates"; README "Templates".
"""

from __future__ import annotations

import difflib
import email.header
import json
import re
import shutil
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
from support.homeserver import HomeserverStandIn
from support.inprocess import InProcessServer
from support.server import V1, V2, IdentityApi, ServerStartError, SydentServer, User, new_secret, unique_email
from support.smtp import ReceivedMail

FIXTURES = Path(__file__).parent / "fixtures" / "sydent-2.6.1"
STOCK = FIXTURES / "res"
INDEX = json.loads((FIXTURES / "mails" / "index.json").read_text(encoding="utf-8"))["mails"]
FACTS = json.loads((FIXTURES / "facts.json").read_text(encoding="utf-8"))

# sydent.conf, as far as mails go, in our keys.
SYDENT_CONF = {
    "email": {
        "from": "Sydent Test Identity <noreply@id.sydent.test>",
        "default_brand": "vector-im",
        "invite_subject": "%(sender_display_name)s has invited you to chat on Sydent Test",
        "invite_subject_space": "%(sender_display_name)s has invited you to a space on Sydent Test",
        "web_client_location": "https://app.element.test",
    },
    "invites": {"display_name_reveal_local_part": 4, "display_name_reveal_domain": 5},
}

_BOUNDARY = re.compile(r'boundary="([^"]+)"')
_VALIDATION_LINK = re.compile(r'https?://[^\s"<>]+/validate/email/submitToken\?[^\s"<>]+')
_PRIVATE_KEY = re.compile(r"(private_key%3D)[A-Za-z0-9_-]+")
_HEADER = re.compile(r"^(Date|Message-ID|Subject): .*(?:\n[ \t].*)*$", re.M)  # with folded lines


def fixture_mails(kind: str, instance: str | None = None) -> list[dict[str, Any]]:
    return [m for m in INDEX if m["kind"] == kind and m.get("instance") == instance]


def sydent_mail(entry: dict[str, Any]) -> bytes:
    return cast("bytes", (FIXTURES / entry["file"]).read_bytes())


def normalise(raw: bytes, *, token: str | None = None, homeserver: str | None = None) -> str:
    """The message with what differs by nature blanked (see the module docstring)."""
    text = raw.decode("utf-8").replace("\r\n", "\n")
    # The SMTP client ends a message that lacks a final line break with one (smtplib, aiosmtplib).
    text = text[:-1] if text.endswith("\n") else text
    match = _BOUNDARY.search(text)
    assert match, text[:600]
    text = text.replace(match.group(1), "<BOUNDARY>")
    text = _HEADER.sub(lambda m: f"{m.group(1)}: <{m.group(1).upper()}>", text)
    text = _VALIDATION_LINK.sub("<VALIDATION LINK>", text)
    text = _PRIVATE_KEY.sub(r"\1<EPHEMERAL PRIVATE KEY>", text)
    if token:
        text = text.replace(token, "<TOKEN>")
    if homeserver:
        text = text.replace(homeserver, "<HOMESERVER>")
    return text


def subject(raw: bytes) -> str:
    text = raw.decode("utf-8").replace("\r\n", "\n")
    match = re.search(r"^Subject: (.*(?:\n[ \t].*)*)", text, re.M)
    assert match, text[:600]
    value = match.group(1)
    return str(email.header.make_header(email.header.decode_header(value)))


def assert_same_mail(ours: str, sydents: str, what: str) -> None:
    if ours != sydents:
        diff = "\n".join(
            difflib.unified_diff(sydents.splitlines(), ours.splitlines(), "Sydent 2.6.1", "ours", lineterm="", n=2)
        )
        raise AssertionError(f"{what}: our mail differs from Sydent's\n{diff}")


def sydent_brand_server(
    make_inprocess_server: Callable[..., InProcessServer], templates: Path = STOCK, **config: Any
) -> SydentServer:
    extra = json.loads(json.dumps(SYDENT_CONF))
    for section, values in config.items():
        extra.setdefault(section, {}).update(values)
    return make_inprocess_server(templates_dir=templates, terms_path=None, extra_config=extra)


def legacy_folder(tmp_path: Path) -> Path:
    """A brand folder as the fixture's second Sydent had it: only matrix-org's legacy `*.eml`
    templates and its page, no `*.j2`."""
    root = tmp_path / "legacy-res"
    (root / "matrix-org").mkdir(parents=True)
    for name in ("invite_template.eml", "verification_template.eml", "verify_response_template.html"):
        shutil.copy(STOCK / "matrix-org" / name, root / "matrix-org" / name)
    return root


def post(api: IdentityApi, entry: dict[str, Any], body: dict[str, Any], user: User | None) -> httpx.Response:
    path = entry["request"]["path"]
    headers = user.headers if user is not None and "/v2/" in path else {}
    return api.client.post(path, json=body, headers=headers)


def check_invite(api: IdentityApi, entry: dict[str, Any], user: User) -> None:
    """Send the request Sydent got for this invite mail; compare our answer and mail with its."""
    request = entry["request"]
    body = dict(request["request"])
    v2 = "/v2/" in request["path"]
    if v2:
        body["sender"] = user.user_id  # Sydent's was its own homeserver's @alice, like ours
    resp = post(api, entry, body, user)
    assert resp.status_code == request["status"] == 200, resp.text
    answer = resp.json()
    assert answer["display_name"] == request["response"]["display_name"], (entry["file"], answer)
    mail = api.smtp.wait_for(body["address"].casefold())
    theirs = sydent_mail(entry)
    expected_subject = subject(theirs)
    if not body.get("sender_display_name"):
        # Our one deliberate difference: without a display name the sender's ID stands in
        # (Sydent's Subject reads " has invited you to chat").
        expected_subject = body["sender"] + expected_subject
    assert subject(mail.raw) == expected_subject, entry["file"]
    homeserver = FACTS["homeserver_server_name"]
    assert_same_mail(
        normalise(mail.raw, token=answer["token"], homeserver=api.hs.server_name),
        normalise(theirs, token=request["response"]["token"], homeserver=homeserver),
        entry["file"],
    )


def check_validation(api: IdentityApi, entry: dict[str, Any], user: User) -> ReceivedMail:
    request = entry["request"]
    body = dict(request["request"], client_secret=new_secret())
    resp = post(api, entry, body, user)
    assert resp.status_code == 200, resp.text
    mail = api.smtp.wait_for(body["email"])
    theirs = sydent_mail(entry)
    assert subject(mail.raw) == subject(theirs), entry["file"]
    ours = normalise(mail.raw, token=mail.token)
    their_token = re.search(rb"submitToken\?token=([0-9A-Za-z]+)&", theirs)
    assert their_token is not None
    sydents = normalise(theirs, token=their_token.group(1).decode())
    # The recipient exactly as typed, as Sydent sends it.
    assert_same_mail(ours, sydents, entry["file"])
    # The link we blanked is ours and works.
    assert mail.sid == resp.json()["sid"] and mail.client_secret == body["client_secret"]
    return mail


# --- Sydent's stock folder (Jinja templates) -----------------------------------------------------------


def test_invite_mails_are_sydents(
    make_inprocess_server: Callable[..., InProcessServer], api_for: Callable[[SydentServer], IdentityApi]
) -> None:
    """Mails 09-14: rooms and spaces, both stock brands (11 asks for matrix-org), Sydent's cuts of
    long names, an invite's own web client, no optional fields, v1 and v2 (verified sender)."""
    api = api_for(sydent_brand_server(make_inprocess_server))
    alice = api.register("alice")
    entries = fixture_mails("invite")
    assert [e["file"][6:8] for e in entries] == ["09", "10", "11", "12", "13", "14"]
    for entry in entries:
        check_invite(api, entry, alice)


def test_validation_mails_are_sydents(
    make_inprocess_server: Callable[..., InProcessServer], api_for: Callable[[SydentServer], IdentityApi]
) -> None:
    """Mails 01-07 and 15 (v2), both stock brands (02 asks for matrix-org). Mail 08 is Sydent
    mailing again for a repeated send_attempt, which the spec forbids: we send nothing."""
    api = api_for(sydent_brand_server(make_inprocess_server))
    alice = api.register("alice")
    entries = [e for e in fixture_mails("validation") if not e["file"].startswith("mails/08-")]
    assert len(entries) == 8
    for entry in entries:
        check_validation(api, entry, alice)


def test_the_response_page_is_sydents(
    make_inprocess_server: Callable[..., InProcessServer], api_for: Callable[[SydentServer], IdentityApi]
) -> None:
    api = api_for(sydent_brand_server(make_inprocess_server))
    address = unique_email("page")
    session = api.start_email_session(address, v1=True)
    for brand in ("vector-im", "matrix-org"):
        resp = api.client.get(
            f"{V2}/validate/email/submitToken",
            params={"sid": session.sid, "client_secret": session.client_secret, "token": "wrong", "brand": brand},
        )
        stock = (STOCK / brand / "verify_response_template.html").read_text(encoding="utf-8")
        before, _, after = stock.partition("%(message)s")
        assert resp.text.startswith(before) and resp.text.endswith(after), (brand, resp.text)


# --- a folder with only Sydent's legacy templates ------------------------------------------------------


def test_a_legacy_only_brand_renders_as_sydent_did(
    make_inprocess_server: Callable[..., InProcessServer],
    api_for: Callable[[SydentServer], IdentityApi],
    tmp_path: Path,
) -> None:
    """Fixture mails 16 and 17 came from a Sydent whose only brand folder held the legacy
    `*.eml` templates: we render the same, never the packaged default in their place."""
    server = sydent_brand_server(make_inprocess_server, legacy_folder(tmp_path), email={"default_brand": "matrix-org"})
    api = api_for(server)
    user = api.register("alice")
    (validation,) = fixture_mails("validation", "legacy-eml")
    (invite,) = fixture_mails("invite", "legacy-eml")
    check_validation(api, validation, user)
    check_invite(api, invite, user)
    # The legacy page too.
    session = api.start_email_session(unique_email("legacypage"), v1=True)
    page = api.client.get(
        f"{V1}/validate/email/submitToken",
        params={"sid": session.sid, "client_secret": session.client_secret, "token": "x"},
    ).text
    assert page.startswith('<!DOCTYPE html>\n<html>\n<head>\n<meta charset="utf-8" />\n<title></title>'), page


def test_a_legacy_template_takes_no_escaped_value_from_the_request(
    make_inprocess_server: Callable[..., InProcessServer],
    api_for: Callable[[SydentServer], IdentityApi],
    tmp_path: Path,
) -> None:
    """Sydent's legacy invite template prints `sender_display_name_forhtml` into its HTML part;
    Sydent lets a request field of that name replace the escaped value (markup in a mail from
    us). Here the request's field is dropped and the escaped display name is shown."""
    api = api_for(
        sydent_brand_server(make_inprocess_server, legacy_folder(tmp_path), email={"default_brand": "matrix-org"})
    )
    address = unique_email("forhtml")
    resp = api.client.post(
        f"{V1}/store-invite",
        json={
            "medium": "email",
            "address": address,
            "room_id": "!r:hs.test",
            "sender": "@s:hs.test",
            "sender_display_name": "<b>Eve</b>",
            "room_name": "Lobby",
            "sender_display_name_forhtml": '<a href="https://evil.example.test">Your bank</a>',
            "bracketed_room_name_forhtml": "<script>alert(1)</script>",
        },
    )
    assert resp.status_code == 200, resp.text
    mail = api.smtp.wait_for(address)
    page = mail.message.get_body(preferencelist=("html",)).get_content()  # type: ignore[union-attr]
    assert "evil.example.test" not in page and "<script>" not in page and "<b>" not in page, page
    assert '&lt;b&gt;Eve&lt;/b&gt; <span class="low-contrast"></span> has invited you' in page, page
    assert "(Lobby) " in page


@pytest.mark.parametrize(
    "broken",
    [
        "Subject: %(subject_header_value)s\n\nA 100% sure invitation from %(sender_display_name)s\n",
        "Subject: %(subject_header_value)s\n\nEverything we know: %s\n",
        "Subject: %(subject_header_value)s\n\n%(token\n",
        "Subject: {{ subject_header_value }}\n\n{{ token }}\n",
    ],
    ids=["bare-percent", "positional", "unclosed", "jinja-without-j2"],
)
def test_a_broken_legacy_template_stops_start_up_naming_the_file(
    make_server: Callable[..., SydentServer], tmp_path: Path, broken: str
) -> None:
    """A brand other than the default one, too. (A positional `%s` would print every variable,
    the invitation's private key among them.)"""
    root = legacy_folder(tmp_path)
    shutil.copytree(root / "matrix-org", root / "acme")
    (root / "acme" / "invite_template.eml").write_text(broken, encoding="utf-8")
    server = make_server(
        start=False, templates_dir=root, terms_path=None, extra_config={"email": {"default_brand": "matrix-org"}}
    )
    with pytest.raises(ServerStartError) as failed:
        server.start()
    assert str(root / "acme" / "invite_template.eml") in str(failed.value)


# --- the sender, verified or not ----------------------------------------------------------------


def test_v2_refuses_to_invite_in_someone_elses_name(
    api: IdentityApi, user: User, homeserver: HomeserverStandIn
) -> None:
    """@frank's token with `sender: @mallory` (or any other user, here or on another server):
    403 M_UNAUTHORIZED, as Sydent; no mail, nothing stored."""
    others = ("@mallory:hs.test", homeserver.user_id("mallory"), user.user_id.upper(), f"@{user.localpart}:hs.test")
    for sender in others:
        address = unique_email("impersonated")
        body = {
            "medium": "email",
            "address": address,
            "room_id": "!r:hs.test",
            "sender": sender,
            "sender_display_name": "Frank",
        }
        resp = api.client.post(f"{V2}/store-invite", json=body, headers=user.headers)
        assert resp.status_code == 403 and resp.json()["errcode"] == "M_UNAUTHORIZED", (sender, resp.text)
        api.smtp.assert_no_mail(address, wait=0.2)
    # Nothing stored: binding the last address hands no invitation over.
    invitee = api.register()
    _, assoc = api.bind_email(address, invitee)
    assert "invites" not in assoc or assoc["invites"] == [], assoc


def test_v1_names_no_verified_sender(
    make_inprocess_server: Callable[..., InProcessServer], api_for: Callable[[SydentServer], IdentityApi]
) -> None:
    """Sydent's templates show `bracketed_verified_sender` as the verified sender: on v1 it is
    empty, even when the request sends one of its own."""
    api = api_for(sydent_brand_server(make_inprocess_server))
    address = unique_email("v1sender")
    body = {
        "medium": "email",
        "address": address,
        "room_id": "!r:hs.test",
        "sender": "@mallory:hs.test",
        "sender_display_name": "Your Bank",
        "bracketed_verified_sender": "(@security:bank.test) ",
    }
    resp = api.client.post(f"{V1}/store-invite", json=body)
    assert resp.status_code == 200, resp.text
    mail = api.smtp.wait_for(address)
    assert "Your Bank has invited you into a room" in mail.text, mail.text
    for shown in ("@security:bank.test", "@mallory:hs.test"):
        assert shown not in mail.raw.decode("utf-8"), shown


# --- org.matrix.web_client_location -------------------------------------------------------------------


def join_link_base(mail: ReceivedMail) -> str:
    match = re.search(r"(\S+)/#/room/", mail.text)
    assert match, mail.text
    return match.group(1)


@pytest.mark.parametrize(
    "location",
    [
        "javascript:alert(1)//",
        "data:text/html,<script>alert(1)</script>",
        "ftp://files.example.test",
        "https://app.element.io@evil.example.test",
        "https://evil.example.test/?next=",
        "https://evil.example.test/#",
        "https://\u0435lement.example.test",
        "https://evil.example.test/ phishing",
        "//evil.example.test",
        "https:",
        "https://evil.example.test:99999",
        "https://" + "e" * 250 + ".test",
    ],
)
def test_a_web_client_location_that_is_no_http_base_url_is_ignored(api: IdentityApi, user: User, location: str) -> None:
    address = unique_email("wcl")
    body = {
        "medium": "email",
        "address": address,
        "room_id": "!r:hs.test",
        "sender": user.user_id,
        "org.matrix.web_client_location": location,
    }
    resp = api.client.post(f"{V2}/store-invite", json=body, headers=user.headers)
    assert resp.status_code == 200, resp.text
    mail = api.smtp.wait_for(address)
    assert join_link_base(mail) == "https://app.element.io"  # email.web_client_location
    assert "evil" not in mail.raw.decode("utf-8") and "javascript" not in mail.raw.decode("utf-8")


def test_web_client_locations_can_be_limited(
    make_inprocess_server: Callable[..., InProcessServer], api_for: Callable[[SydentServer], IdentityApi]
) -> None:
    server = make_inprocess_server(
        terms_path=None,
        extra_config={
            "email": {
                "allowed_web_client_locations": ["https://chat.example.test", "https://Element.Example.test/web/"]
            }
        },
    )
    api = api_for(server)
    for location, expected in [
        ("https://chat.example.test", "https://chat.example.test"),
        ("https://element.example.test/web", "https://element.example.test/web"),
        ("https://other.example.test", "https://app.element.io"),
        ("http://chat.example.test", "https://app.element.io"),
    ]:
        address = unique_email("allowed")
        resp = api.client.post(
            f"{V1}/store-invite",
            json={
                "medium": "email",
                "address": address,
                "room_id": "!r:hs.test",
                "sender": "@s:hs.test",
                "org.matrix.web_client_location": location,
            },
        )
        assert resp.status_code == 200, resp.text
        assert join_link_base(api.smtp.wait_for(address)) == expected, location


def test_a_bad_allowed_web_client_location_stops_start_up(make_server: Callable[..., SydentServer]) -> None:
    server = make_server(start=False, extra_config={"email": {"allowed_web_client_locations": ["chat.example.test"]}})
    with pytest.raises(ServerStartError, match=re.escape("email.allowed_web_client_locations[0]")):
        server.start()


# --- the masked address (display_name) ----------------------------------------------------------------


def test_display_name_is_masked_as_sydent(api: IdentityApi, user: User) -> None:
    """Sydent's defaults, 3 and 3, on the address as typed."""
    suffix = unique_email("x").split("@")[0].split(".")[1][:8]
    for address, expected in [
        (f"David.{suffix}@Example.test", "Dav...@Exa..."),
        (f"ab{suffix}@xy.test", f"ab{suffix[0]}...@xy...."),
    ]:
        resp = api.client.post(
            f"{V1}/store-invite",
            json={"medium": "email", "address": address, "room_id": "!r:hs.test", "sender": "@s:hs.test"},
        )
        assert resp.status_code == 200, resp.text
        assert resp.json()["display_name"] == expected, address
        api.smtp.wait_for(address.casefold())


def test_display_name_lengths_are_settable(
    make_inprocess_server: Callable[..., InProcessServer], api_for: Callable[[SydentServer], IdentityApi]
) -> None:
    api = api_for(
        make_inprocess_server(
            terms_path=None,
            extra_config={"invites": {"display_name_reveal_local_part": 1, "display_name_reveal_domain": 0}},
        )
    )
    resp = api.client.post(
        f"{V1}/store-invite",
        json={
            "medium": "email",
            "address": "florence@bobsburgers.example.test",
            "room_id": "!r:hs.test",
            "sender": "@s:hs.test",
        },
    )
    assert resp.status_code == 200 and resp.json()["display_name"] == "f...@...", resp.text


def test_link_values_are_url_quoted(
    make_inprocess_server: Callable[..., InProcessServer], api_for: Callable[[SydentServer], IdentityApi]
) -> None:
    """Any room ID as sent (matrix-is-tester's `$aroom:fake.test`, or one with `&` and `#`) stays
    one query value in the join link of Sydent's template."""
    api = api_for(sydent_brand_server(make_inprocess_server))
    address = unique_email("roomid")
    room_id = "$a&room=#x:fake.test"
    resp = api.client.post(
        f"{V1}/store-invite", json={"medium": "email", "address": address, "room_id": room_id, "sender": "@s:hs.test"}
    )
    assert resp.status_code == 200, resp.text
    link = re.search(r"https://app\.element\.test/#/room/(\S+)", api.smtp.wait_for(address).text)
    assert link, "no join link"
    room, _, query = link.group(1).partition("?")
    assert urllib.parse.unquote(room) == room_id
    assert urllib.parse.parse_qs(query)["email"] == [address]
