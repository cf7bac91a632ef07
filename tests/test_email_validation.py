"""Email validation sessions: requestToken, the mail, submitToken (POST and the mailed link),
getValidated3pid, expiry and branded templates.

Contract: docs/api-behaviour.md, "Validation sessions"; spec v2_email_associations.yaml,
v1 email_associations.yaml.
"""

from __future__ import annotations

import json
import re
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path

import pytest
from support.asserts import assert_error, assert_html
from support.inprocess import InProcessServer
from support.server import (
    EMAIL_FROM,
    V1,
    EmailSession,
    IdentityApi,
    SydentServer,
    User,
    new_secret,
    now_ms,
    unique_email,
)
from support.smtp import ReceivedMail

from sydent_lite.http.routes.validation import next_link_with_sid

SID_RE = re.compile(r"[0-9a-zA-Z]{24}")
LINK_PATH = "/_matrix/identity/v2/validate/email/submitToken"
FIXTURES = Path(__file__).parent / "fixtures" / "sydent-2.6.1"


def link_for(server: SydentServer, session: EmailSession, **overrides: str) -> str:
    params = {"sid": session.sid, "client_secret": session.client_secret, "token": session.token, **overrides}
    return f"{server.base_url}{LINK_PATH}?{urllib.parse.urlencode(params)}"


# --- requestToken and the mail ------------------------------------------------------------------


def test_request_token_v2_sends_the_validation_mail(api: IdentityApi, user: User, idserver: SydentServer) -> None:
    email = unique_email("v2")
    secret = new_secret()
    resp = api.request_email_token(email, secret, 1, user=user)
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    sid = resp.json()["sid"]
    assert SID_RE.fullmatch(sid), sid
    assert resp.json() == {"sid": sid}

    mail = api.smtp.wait_for(email)
    assert [r.casefold() for r in mail.rcpt_tos] == [email.casefold()]
    msg = mail.message
    assert msg.is_multipart(), msg.get_content_type()
    assert str(msg["From"]) == EMAIL_FROM  # email.from from the config
    assert email in str(msg["To"])

    assert mail.link.startswith(f"{idserver.base_url}{LINK_PATH}?"), mail.link
    params = mail.link_params
    assert params["sid"] == sid
    assert params["client_secret"] == secret
    token = params["token"]
    assert token and len(token) <= 255
    assert token in mail.text  # the token is also given on its own for typing in


def test_request_token_v2_needs_a_token(api: IdentityApi) -> None:
    email = unique_email("noauth")
    assert_error(api.request_email_token(email, new_secret()), 401, "M_UNAUTHORIZED")
    api.smtp.assert_no_mail(email)


@pytest.mark.parametrize("form", [False, True], ids=["json", "form"])
def test_request_token_v1(api: IdentityApi, idserver: SydentServer, form: bool) -> None:
    email = unique_email("v1form" if form else "v1json")
    secret = new_secret()
    resp = api.request_email_token(email, secret, 1, v1=True, form=form)
    assert resp.status_code == 200, resp.text
    sid = resp.json()["sid"]
    assert SID_RE.fullmatch(sid), sid
    mail = api.smtp.wait_for(email)
    # v1 mails point at the v2 link too.
    assert mail.link.startswith(f"{idserver.base_url}{LINK_PATH}?"), mail.link
    assert mail.link_params["sid"] == sid
    assert mail.link_params["client_secret"] == secret


def test_send_attempt_semantics(api: IdentityApi, user: User) -> None:
    email = unique_email("attempt")
    secret = new_secret()
    first = api.start_email_session(email, user=user, client_secret=secret, send_attempt=1)

    for attempt in (1, 0):  # a retry, or an older attempt: same session, no new mail
        resp = api.request_email_token(email, secret, attempt, user=user)
        assert resp.status_code == 200, resp.text
        assert resp.json() == {"sid": first.sid}
        api.smtp.assert_no_mail(email, wait=0.2)

    # A greater attempt: the same session, a new token (only its hash is stored, so the old
    # one cannot be sent again); the new one replaces the old.
    resp = api.request_email_token(email, secret, 2, user=user)
    assert resp.status_code == 200, resp.text
    assert resp.json() == {"sid": first.sid}
    again = api.smtp.wait_for(email)
    assert again.sid == first.sid
    assert again.token != first.token

    resp = api.request_email_token(email, secret, 2, user=user)
    assert resp.json() == {"sid": first.sid}
    api.smtp.assert_no_mail(email, wait=0.2)

    resp = api.request_email_token(email, secret, 10, user=user)
    assert resp.json() == {"sid": first.sid}
    newest = EmailSession(email, secret, first.sid, api.smtp.wait_for(email))
    assert newest.token not in (first.token, again.token)

    # Only the newest token validates the session; the older links no longer do.
    assert_error(api.submit_token(first, user=user), 400, "M_TOKEN_INCORRECT")
    assert_html(api.client.get(again.link), 400)
    assert_error(api.get_validated(first, user=user), 400, "M_SESSION_NOT_VALIDATED")
    resp = api.submit_token(newest, user=user)
    assert resp.status_code == 200 and resp.json() == {"success": True}, resp.text


def test_new_client_secret_starts_a_new_session(api: IdentityApi, user: User) -> None:
    email = unique_email("twosecrets")
    a = api.start_email_session(email, user=user)
    b = api.start_email_session(email, user=user)
    assert a.sid != b.sid
    assert a.token != b.token
    # Each token belongs to its own session.
    assert_error(api.submit_token(a, b.token, user=user), 400, "M_TOKEN_INCORRECT")
    assert api.submit_token(b, user=user).json() == {"success": True}


@pytest.mark.parametrize(
    "email",
    [
        "plainaddress",
        "@example.test",
        "user@",
        "user@@example.test",
        "user name@example.test",
        "user@exa mple.test",
        "user@example.test\nBcc: victim@example.test",
        # RFC 5321: a local part is at most 64 octets (characters are not octets).
        "a" * 65 + "@example.test",
        "é" * 33 + "@example.test",
        # RFC 2047 encoded words: a relay or mail client that decodes one reads another mailbox.
        "=?utf-8?q?x?=@victim.org",
        "=?utf-8?q?victim=40example=2Etest?=@example.test",
        "=?UTF-8?B?dmljdGltQGV4YW1wbGUudGVzdA==?=@example.test",
        "pre=?iso-8859-1?q?x?=post@example.test",
    ],
    ids=lambda e: e[:40],
)
def test_invalid_email(api: IdentityApi, user: User, email: str) -> None:
    assert_error(api.request_email_token(email, new_secret(), v1=True), 400, "M_INVALID_EMAIL")
    assert_error(api.request_email_token(email, new_secret(), user=user), 400, "M_INVALID_EMAIL")
    assert api.smtp.all_to("victim@example.test") == []
    assert api.smtp.all_to("victim@victim.org") == []


def test_local_part_of_64_octets_is_fine(api: IdentityApi) -> None:
    email = ("é" * 30 + new_secret()[-4:]) + "@example.test"  # 64 octets, 34 characters
    assert len(email.split("@")[0].encode("utf-8")) == 64
    resp = api.request_email_token(email, new_secret(), v1=True)
    assert resp.status_code == 200, resp.text
    api.smtp.wait_for(email)


@pytest.mark.parametrize("email", ["user{}@localhost", "first.last+tag{}@sub.example.test", "x{}@intranet.local"])
def test_unusual_but_valid_emails(api: IdentityApi, email: str) -> None:
    email = email.format(new_secret()[-8:])
    resp = api.request_email_token(email, new_secret(), v1=True)
    assert resp.status_code == 200, resp.text
    api.smtp.wait_for(email)


@pytest.mark.parametrize("secret", ["has space", "x" * 256, "ünicode", "semi;colon", "slash/", ""])
def test_invalid_client_secret(api: IdentityApi, secret: str) -> None:
    email = unique_email("badsecret")
    resp = api.request_email_token(email, secret, v1=True)
    if secret == "":  # present but empty: the doc's regex says invalid; "missing" is defensible too
        assert resp.status_code == 400 and resp.json()["errcode"] in ("M_INVALID_PARAM", "M_MISSING_PARAMS")
    else:
        assert_error(resp, 400, "M_INVALID_PARAM")
    api.smtp.assert_no_mail(email, wait=0.1)


def test_longest_client_secret_is_fine(api: IdentityApi) -> None:
    email = unique_email("longsecret")
    secret = "aZ0.=_-" * 36 + "abc"  # 255 characters, every allowed kind
    assert len(secret) == 255
    resp = api.request_email_token(email, secret, v1=True)
    assert resp.status_code == 200, resp.text
    assert api.smtp.wait_for(email).client_secret == secret


def test_smtp_refusing_is_email_send_error(api: IdentityApi, user: User) -> None:
    email = unique_email("refused")
    secret = new_secret()
    api.smtp.refuse()
    assert_error(api.request_email_token(email, secret, 1, user=user), 400, "M_EMAIL_SEND_ERROR")
    api.smtp.accept()
    # Once mail flows again, asking again (a higher attempt) gets the mail out.
    resp = api.request_email_token(email, secret, 2, user=user)
    assert resp.status_code == 200, resp.text
    assert api.smtp.wait_for(email).sid == resp.json()["sid"]


def test_retry_with_same_attempt_after_a_failed_send_sends_the_mail(api: IdentityApi) -> None:
    email = unique_email("retrysame")
    secret = new_secret()
    api.smtp.refuse()
    assert_error(api.request_email_token(email, secret, 1, v1=True), 400, "M_EMAIL_SEND_ERROR")
    api.smtp.accept()
    resp = api.request_email_token(email, secret, 1, v1=True)  # the very same request again
    assert resp.status_code == 200, resp.text
    assert api.smtp.wait_for(email).sid == resp.json()["sid"]


def test_smtp_down_is_email_send_error(api: IdentityApi) -> None:
    email = unique_email("down")
    api.smtp.down()
    try:
        assert_error(api.request_email_token(email, new_secret(), v1=True), 400, "M_EMAIL_SEND_ERROR")
    finally:
        api.smtp.accept()


# --- the mailbox as typed, the 3PID case-folded --------------------------------------------------


def raw_headers(mail: ReceivedMail, name: str) -> list[str]:
    """The values of header `name` exactly as sent (UTF-8, no decoding of any kind)."""
    head = mail.normalised().split("\n\n", 1)[0]
    prefix = f"{name.lower()}:"
    return [line[len(prefix) :].strip() for line in head.split("\n") if line.lower().startswith(prefix)]


def test_mail_goes_to_the_address_as_typed_and_the_folded_one_is_bound(api: IdentityApi, user: User) -> None:
    # Folding is for matching 3PIDs: "Strauß.x@" folds to "strauss.x@", another mailbox.
    typed = f"Strauß.{new_secret()[-8:]}@Example.TEST"
    folded = typed.casefold()
    assert folded.startswith("strauss.") and folded.endswith("@example.test")
    secret = new_secret()
    resp = api.request_email_token(typed, secret, 1, user=user)
    assert resp.status_code == 200, resp.text
    sid = resp.json()["sid"]
    first = api.smtp.wait_for(typed)
    assert first.rcpt_tos == [typed]  # the envelope, exactly as typed (SMTPUTF8)
    assert raw_headers(first, "To") == [typed]
    assert first.sid == sid

    # A resend of the session goes to the typed mailbox too; its new token is the valid one.
    resp = api.request_email_token(typed, secret, 2, user=user)
    assert resp.status_code == 200 and resp.json() == {"sid": sid}, resp.text
    resend = api.smtp.wait_for(typed)
    assert resend.rcpt_tos == [typed]
    assert raw_headers(resend, "To") == [typed]
    assert not [m for m in api.smtp.all_to(folded) if m.rcpt_tos != [typed]]  # never the folded mailbox

    session = EmailSession(typed, secret, sid, resend)
    assert api.submit_token(session, user=user).json() == {"success": True}
    # getValidated3pid, bind and lookups speak of the 3PID: the case-folded address.
    assert api.get_validated(session, user=user).json()["address"] == folded
    resp = api.bind(session, user.user_id, user=user)
    assert resp.status_code == 200, resp.text
    assert resp.json()["address"] == folded
    assert api.lookup_email(user, folded) == user.user_id
    assert api.lookup_email(user, typed) is None  # v2 lookups match the stored form exactly
    assert api.v1_lookup("email", typed).json()["address"] == folded


def test_case_variants_are_one_session(api: IdentityApi) -> None:
    local = f"bob.{new_secret()[-8:]}"
    secret = new_secret()
    first = api.start_email_session(f"Bob.{local[4:]}@Example.test", v1=True, client_secret=secret)
    # The same client secret and the same 3PID in another case: the same session, no new mail ...
    resp = api.request_email_token(f"{local}@example.test", secret, 1, v1=True)
    assert resp.status_code == 200 and resp.json() == {"sid": first.sid}, resp.text
    api.smtp.assert_no_mail(first.email, wait=0.2)
    # ... and a resend goes to the mailbox typed in that request.
    shouted = f"{local.upper()}@EXAMPLE.TEST"
    resp = api.request_email_token(shouted, secret, 2, v1=True)
    assert resp.status_code == 200 and resp.json() == {"sid": first.sid}, resp.text
    resend = api.smtp.wait_for(shouted)
    assert resend.rcpt_tos == [shouted] and resend.sid == first.sid


def test_case_variants_share_the_per_address_limit(
    make_inprocess_server: Callable[..., InProcessServer], api_for: Callable[[SydentServer], IdentityApi]
) -> None:
    server = make_inprocess_server(
        terms_path=None,
        extra_config={
            "rate_limits": {
                "enabled": True,
                "request_token_per_ip_burst": 50,
                "request_token_per_address_burst": 2,
                "request_token_per_address_per_hour": 1.0,
            }
        },
    )
    api = api_for(server)
    local = f"alice.{new_secret()[-8:]}"
    # Each a new session (a new client secret), each mailed to its own spelling ...
    for typed in (f"{local.title()}@Example.test", f"{local}@example.test"):
        resp = api.request_email_token(typed, new_secret(), v1=True)
        assert resp.status_code == 200, resp.text
        assert api.smtp.wait_for(typed).rcpt_tos == [typed]
    # ... but one person for the limits: a third spelling is over the same address's budget.
    shouted = f"{local.upper()}@EXAMPLE.TEST"
    limited = assert_error(api.request_email_token(shouted, new_secret(), v1=True), 429, "M_LIMIT_EXCEEDED")
    assert limited["retry_after_ms"] > 0, limited
    api.smtp.assert_no_mail(shouted, wait=0.2)
    other = unique_email("limit-other")
    assert api.request_email_token(other, new_secret(), v1=True).status_code == 200
    api.smtp.wait_for(other)


# --- submitToken (POST) --------------------------------------------------------------------------


def test_submit_token_v2(api: IdentityApi, user: User) -> None:
    session = api.start_email_session(unique_email("submit"), user=user)
    resp = api.submit_token(session, user=user)
    assert resp.status_code == 200, resp.text
    assert resp.json() == {"success": True}
    # Submitting the right token again is still a success.
    resp = api.submit_token(session, user=user)
    assert resp.status_code == 200 and resp.json() == {"success": True}, resp.text


def test_submit_token_v1_json_and_form(api: IdentityApi) -> None:
    session = api.start_email_session(unique_email("submitv1"), v1=True)
    resp = api.submit_token(session, v1=True)
    assert resp.status_code == 200 and resp.json() == {"success": True}, resp.text

    session = api.start_email_session(unique_email("submitv1form"), v1=True)
    resp = api.client.post(
        f"{V1}/validate/email/submitToken",
        data={"sid": session.sid, "client_secret": session.client_secret, "token": session.token},
    )
    assert resp.status_code == 200 and resp.json() == {"success": True}, resp.text


def test_wrong_token_and_wrong_secret_look_the_same(api: IdentityApi, user: User) -> None:
    session = api.start_email_session(unique_email("wrong"), user=user)
    wrong_token = api.submit_token(session, session.token + "x", user=user)
    wrong_secret = api.submit_token(session, user=user, client_secret=new_secret())
    wrong_both = api.submit_token(session, "nope", user=user, client_secret=new_secret())
    for resp in (wrong_token, wrong_secret, wrong_both):
        assert_error(resp, 400, "M_TOKEN_INCORRECT")
    assert wrong_token.json() == wrong_secret.json() == wrong_both.json()

    # Still not validated; the right token still works.
    assert_error(api.get_validated(session, user=user), 400, "M_SESSION_NOT_VALIDATED")
    resp = api.submit_token(session, user=user)
    assert resp.status_code == 200 and resp.json() == {"success": True}, resp.text


def test_submit_token_unknown_sid(api: IdentityApi, user: User) -> None:
    session = api.start_email_session(unique_email("unknownsid"), user=user)
    resp = api.submit_token(session, user=user, sid="A" * 24)
    assert_error(resp, 404, "M_NO_VALID_SESSION")
    assert_error(api.submit_token(session, v1=True, sid="nosuchsession"), 404, "M_NO_VALID_SESSION")


# --- submitToken (GET, the mailed link) ------------------------------------------------------------


def test_mailed_link_validates(api: IdentityApi, user: User) -> None:
    session = api.start_email_session(unique_email("link"), user=user)
    assert_error(api.get_validated(session, user=user), 400, "M_SESSION_NOT_VALIDATED")
    resp = api.client.get(session.mail.link)  # a browser: no token, no JSON
    html = assert_html(resp, 200)
    assert "<" in html
    resp = api.get_validated(session, user=user)
    assert resp.status_code == 200, resp.text
    assert resp.json()["address"] == session.email


def test_link_with_wrong_token_or_unknown_session(api: IdentityApi, idserver: SydentServer) -> None:
    session = api.start_email_session(unique_email("badlink"), v1=True)
    assert_html(api.client.get(link_for(idserver, session, token=session.token + "x")), 400)
    assert_html(api.client.get(link_for(idserver, session, client_secret=new_secret())), 400)
    assert_html(api.client.get(link_for(idserver, session, sid="B" * 24)), 404)
    assert_error(api.get_validated(session, v1=True), 400, "M_SESSION_NOT_VALIDATED")


# Element Web's registration next_link (matrix-react-sdk makeRegistrationUrl): a hash route
# whose own query Element reads, `sid` included (MatrixChat.startRegistration).
ELEMENT_NEXT_LINK = (
    "https://app.element.test/#/register?client_secret=c1&hs_url=https%3A%2F%2Fhs.test"
    "&is_url=https%3A%2F%2Fid.test&session_id=s1"
)


@pytest.mark.parametrize(
    ("next_link", "expected"),
    [
        ("http://localhost:8080/welcome", "http://localhost:8080/welcome?sid={sid}"),
        ("https://client.example.test/done?step=2&x=%20y", "https://client.example.test/done?step=2&x=%20y&sid={sid}"),
        ("https://client.example.test/done?step=2#top", "https://client.example.test/done?step=2&sid={sid}#top"),
        ("https://client.example.test/done#top", "https://client.example.test/done?sid={sid}#top"),
        (ELEMENT_NEXT_LINK, ELEMENT_NEXT_LINK + "&sid={sid}"),
        (
            "https://app.element.test/#/register/email-validated",
            "https://app.element.test/#/register/email-validated?sid={sid}",
        ),
        ("https://client.example.test/done?sid=forged&a=1", "https://client.example.test/done?a=1&sid={sid}"),
    ],
    ids=["no-query", "query", "query-and-anchor", "anchor", "element-route", "route-no-query", "sid-given"],
)
def test_link_redirects_to_next_link_with_the_sid(api: IdentityApi, user: User, next_link: str, expected: str) -> None:
    session = api.start_email_session(unique_email("next"), user=user, next_link=next_link)
    resp = api.client.get(session.mail.link)
    assert resp.status_code == 302, resp.text
    assert resp.headers["location"] == expected.format(sid=session.sid)
    assert resp.headers["referrer-policy"] == "no-referrer"
    assert api.get_validated(session, user=user).status_code == 200
    # Clicked again (a validated session): the same redirect.
    assert api.client.get(session.mail.link).headers["location"] == expected.format(sid=session.sid)


def test_next_link_gets_the_sid_where_sydent_puts_it() -> None:
    # Sydent 2.6.1 mailed this next_link (Element's hash route) inside its link, sid appended.
    facts = json.loads((FIXTURES / "facts.json").read_text())["sessions"]["pending"]
    mailed = urllib.parse.parse_qs(urllib.parse.urlsplit(facts["link"]).query)["nextLink"][0]
    assert next_link_with_sid(facts["request"]["next_link"], facts["sid"]) == mailed


@pytest.mark.parametrize(
    "next_link",
    [
        "javascript:alert(document.cookie)",
        "JavaScript:alert(1)",
        "data:text/html,<script>alert(1)</script>",
        "//evil.example.test/phish",
        "ftp://files.example.test/x",
    ],
)
def test_link_never_redirects_to_other_schemes(api: IdentityApi, user: User, next_link: str) -> None:
    email = unique_email("badnext")
    resp = api.request_email_token(email, new_secret(), user=user, next_link=next_link)
    assert resp.status_code == 200, resp.text  # accepted, but ignored
    mail = api.smtp.wait_for(email)
    page = assert_html(api.client.get(mail.link), 200)
    assert "<script>alert" not in page


def test_post_submit_ignores_next_link(api: IdentityApi, user: User) -> None:
    session = api.start_email_session(unique_email("postnext"), user=user, next_link="https://client.example.test/x")
    resp = api.submit_token(session, user=user)
    assert resp.status_code == 200 and resp.json() == {"success": True}, resp.text


# --- getValidated3pid -------------------------------------------------------------------------------


@pytest.mark.parametrize("v1", [False, True], ids=["v2", "v1"])
def test_get_validated_3pid(api: IdentityApi, user: User, v1: bool) -> None:
    who = None if v1 else user
    email = unique_email("validated")
    session = api.start_email_session(email, user=who, v1=v1)

    assert_error(api.get_validated(session, user=who, v1=v1), 400, "M_SESSION_NOT_VALIDATED")
    assert_error(api.get_validated(session, user=who, v1=v1, client_secret=new_secret()), 404, "M_NO_VALID_SESSION")
    assert_error(api.get_validated(session, user=who, v1=v1, sid="C" * 24), 404, "M_NO_VALID_SESSION")

    time.sleep(0.6)  # so that creation and validation times clearly differ
    before = now_ms()
    resp = api.submit_token(session, user=who, v1=v1)
    after = now_ms()
    assert resp.status_code == 200, resp.text

    resp = api.get_validated(session, user=who, v1=v1)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["medium"] == "email"
    assert body["address"] == email
    validated_at = body["validated_at"]
    assert isinstance(validated_at, int)
    assert before - 50 <= validated_at <= after + 50, (before, validated_at, after)

    # Asking again later, or submitting again, does not move it.
    time.sleep(0.2)
    api.submit_token(session, user=who, v1=v1)
    assert api.get_validated(session, user=who, v1=v1).json()["validated_at"] == validated_at
    # A wrong secret is still refused for a validated session.
    assert_error(api.get_validated(session, user=who, v1=v1, client_secret=new_secret()), 404, "M_NO_VALID_SESSION")


def test_get_validated_3pid_needs_a_token_on_v2(api: IdentityApi, user: User) -> None:
    session = api.validated_email_session(unique_email("gv"), user=user)
    assert_error(api.get_validated(session), 401, "M_UNAUTHORIZED")


def test_get_validated_3pid_missing_params(api: IdentityApi) -> None:
    resp = api.client.get(f"{V1}/3pid/getValidated3pid", params={"sid": "abc"})
    assert_error(resp, 400, "M_MISSING_PARAMS")


# --- expiry -------------------------------------------------------------------------------------------


def test_sessions_expire(
    make_inprocess_server: Callable[..., InProcessServer], api_for: Callable[[SydentServer], IdentityApi]
) -> None:
    server = make_inprocess_server(session_lifetime=3600, terms_path=None)
    api = api_for(server)
    pending = api.start_email_session(unique_email("expire-pending"), v1=True)
    validated = api.validated_email_session(unique_email("expire-validated"), v1=True)
    server.clock.advance(3600)  # the last moment of their lifetime
    fresh_check = api.get_validated(validated, v1=True)
    assert fresh_check.status_code == 200, fresh_check.text

    server.clock.advance(1)

    assert_error(api.submit_token(pending, v1=True), 400, "M_SESSION_EXPIRED")
    assert_error(api.get_validated(validated, v1=True), 400, "M_SESSION_EXPIRED")
    assert_error(api.bind(validated, "@late:example.test", v1=True), 400, "M_SESSION_EXPIRED")
    # The mailed link tells the user too, as a page.
    resp = api.client.get(pending.mail.link)
    assert resp.status_code == 400, resp.text
    assert resp.headers["content-type"].startswith("text/html")
    # Nothing was bound.
    assert api.v1_lookup("email", validated.email).json() == {}

    # Starting over works: a new session with a new token.
    again = api.validated_email_session(pending.email, v1=True)
    assert again.sid != pending.sid
    assert api.get_validated(again, v1=True).status_code == 200


# --- guessing the token -------------------------------------------------------------------------------
# As for SMS codes (tests/test_msisdn.py, "guessing the code"): a session dies after
# sessions.max_token_attempts wrong tokens; the address's budget bounds guesses across sessions.


def test_guessing_the_token_kills_the_session(
    make_inprocess_server: Callable[..., InProcessServer], api_for: Callable[[SydentServer], IdentityApi]
) -> None:
    server = make_inprocess_server(terms_path=None)
    api = api_for(server)
    mallory = api.register()
    victim = unique_email("victim")
    # Mallory starts a session for the victim's address; the mail (and its link) goes to the victim.
    session = api.start_email_session(victim, user=mallory)
    for i in range(5):  # through the API and through the link form, v1 and v2
        if i % 2:
            assert_html(api.client.get(link_for(server, session, token=f"guess{i}")), 400)
        else:
            assert_error(api.submit_token(session, f"guess{i}", v1=True), 400, "M_TOKEN_INCORRECT")

    # Dead: the victim's own link no longer validates, and nothing Mallory does makes it.
    page = assert_html(api.client.get(session.mail.link), 400)
    assert "too many incorrect codes" in page
    err = assert_error(api.submit_token(session, user=mallory), 400, "M_SESSION_EXPIRED")
    assert "too many incorrect codes" in err["error"].lower(), err
    assert_error(api.get_validated(session, user=mallory), 400, "M_SESSION_NOT_VALIDATED")
    assert_error(api.bind(session, mallory.user_id, user=mallory), 400, "M_SESSION_NOT_VALIDATED")
    assert api.v1_lookup("email", victim).json() == {}

    # The same client secret again (even the same send_attempt): a new session and a new mail.
    resp = api.request_email_token(victim, session.client_secret, 1, user=mallory)
    assert resp.status_code == 200, resp.text
    fresh = EmailSession(victim, session.client_secret, resp.json()["sid"], api.smtp.wait_for(victim))
    assert fresh.sid != session.sid and fresh.mail.sid == fresh.sid
    assert_html(api.client.get(fresh.mail.link), 200)


def test_email_budget_is_per_address_and_taken_before_comparing(
    make_inprocess_server: Callable[..., InProcessServer], api_for: Callable[[SydentServer], IdentityApi]
) -> None:
    server = make_inprocess_server(
        terms_path=None,
        extra_config={
            "rate_limits": {
                "enabled": True,
                "request_token_per_address_burst": 50,
                "request_token_per_ip_burst": 50,
                "submit_token_per_ip_burst": 200,
                "submit_token_per_address_burst": 3,
                "submit_token_per_address_per_day": 1.0,
            }
        },
    )
    api = api_for(server)
    user = api.register()
    victim = unique_email("budget")
    first = api.start_email_session(victim, v1=True)
    assert_error(api.submit_token(first, "wrong1", v1=True), 400, "M_TOKEN_INCORRECT")
    assert_html(api.client.get(link_for(server, first, token="wrong2")), 400)
    # Another session of the same address (the address is case-folded: the same budget).
    second = api.start_email_session(victim.upper(), user=user)
    assert_error(api.submit_token(second, "wrong3", user=user), 400, "M_TOKEN_INCORRECT")

    # Spent: the right token is refused, by POST and by the link, before it is compared.
    limited = assert_error(api.submit_token(second, user=user), 429, "M_LIMIT_EXCEEDED")
    assert limited["retry_after_ms"] > 0, limited
    assert_error(api.submit_token(first, v1=True), 429, "M_LIMIT_EXCEEDED")
    assert_html(api.client.get(second.mail.link), 429)
    assert_error(api.get_validated(second, user=user), 400, "M_SESSION_NOT_VALIDATED")
    # Another address is not affected.
    other = api.start_email_session(unique_email("budget-other"), v1=True)
    assert_html(api.client.get(other.mail.link), 200)


# --- brands and templates -------------------------------------------------------------------------------

DEFAULT_EML = """\
Date: {{ date|safe }}
From: {{ from|safe }}
To: {{ to|safe }}
Message-ID: {{ messageid|safe }}
Subject: {{ subject_header_value|safe }}
MIME-Version: 1.0
Content-Type: multipart/alternative;
 boundary="{{ multipart_boundary|safe }}"

--{{ multipart_boundary|safe }}
Content-Type: text/plain; charset="utf-8"
Content-Transfer-Encoding: 8bit

CUSTOM-DEFAULT-BRAND mail for {{ to|safe }}
Your code: {{ token|safe }}
Or open: {{ link|safe }}

--{{ multipart_boundary|safe }}
Content-Type: text/html; charset="utf-8"
Content-Transfer-Encoding: 8bit

<p>CUSTOM-DEFAULT-BRAND <a href="{{ link }}">verify</a></p>

--{{ multipart_boundary|safe }}--
"""

# Renders a fixed single-part message: only the recipient, token and link vary. Lines starting
# with a dot (and a lone dot) check that the SMTP client dot-stuffs.
FIXED_EML = """\
From: Fixed Brand <brand@id.test>
To: {{ to|safe }}
Subject: Fixed brand message
MIME-Version: 1.0
Content-Type: text/plain; charset="utf-8"
Content-Transfer-Encoding: 7bit
X-Fixed-Brand: yes

Hello from the fixed brand.
.A line that starts with a dot.
..Two dots.
.
Token: {{ token|safe }}
Link: {{ link|safe }}
Bye."""

DEFAULT_PAGE = "<html><body><p>CUSTOM-DEFAULT-PAGE: %(message)s</p></body></html>\n"
FIXED_PAGE = "<html><body><p>FIXED-BRAND-PAGE: %(message)s</p></body></html>\n"


@pytest.fixture
def custom_templates(tmp_path: Path) -> Path:
    root = tmp_path / "templates"
    for brand, eml, page in (("default", DEFAULT_EML, DEFAULT_PAGE), ("fixedbrand", FIXED_EML, FIXED_PAGE)):
        (root / brand).mkdir(parents=True)
        (root / brand / "verification_template.eml.j2").write_text(eml, encoding="utf-8")
        (root / brand / "verify_response_template.html").write_text(page, encoding="utf-8")
    return root


def test_brand_template_is_sent_byte_for_byte(
    make_inprocess_server: Callable[..., InProcessServer],
    api_for: Callable[[SydentServer], IdentityApi],
    custom_templates: Path,
) -> None:
    server = make_inprocess_server(templates_dir=custom_templates, terms_path=None)
    api = api_for(server)
    email = unique_email("fixed")
    secret = new_secret()
    resp = api.request_email_token(email, secret, v1=True, brand="fixedbrand")
    assert resp.status_code == 200, resp.text
    sid = resp.json()["sid"]
    mail = api.smtp.wait_for(email)

    received = mail.normalised()
    token_match = re.search(r"^Token: (\S+)$", received, re.M)
    link_match = re.search(r"^Link: (\S+)$", received, re.M)
    assert token_match and link_match, received
    token, link = token_match.group(1), link_match.group(1)
    expected = FIXED_EML.replace("{{ to|safe }}", email).replace("{{ token|safe }}", token)
    expected = expected.replace("{{ link|safe }}", link)
    assert received.rstrip("\n") == expected.rstrip("\n")

    assert link.startswith(f"{server.base_url}{LINK_PATH}?"), link
    params = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(link).query))
    assert params["sid"] == sid and params["client_secret"] == secret and params["token"] == token

    # The mailed token is the session's token; the page comes from the same brand.
    page = assert_html(api.client.get(link), 200)
    assert "FIXED-BRAND-PAGE: " in page
    assert "CUSTOM-DEFAULT-PAGE" not in page
    assert api.get_validated(EmailSession(email, secret, sid, mail), v1=True).status_code == 200


def test_unknown_brand_falls_back_to_default(
    make_inprocess_server: Callable[..., InProcessServer],
    api_for: Callable[[SydentServer], IdentityApi],
    custom_templates: Path,
) -> None:
    server = make_inprocess_server(templates_dir=custom_templates, terms_path=None)
    api = api_for(server)
    for brand in (None, "no-such-brand", "", "..", "../templates", "default/../fixedbrand", "/etc"):
        email = unique_email("fallback")
        resp = api.request_email_token(email, new_secret(), v1=True, brand=brand)
        assert resp.status_code == 200, f"brand {brand!r}: {resp.text}"
        mail = api.smtp.wait_for(email)
        assert mail.message.is_multipart(), f"brand {brand!r}"
        assert "CUSTOM-DEFAULT-BRAND mail for " + email in mail.text, f"brand {brand!r}: {mail.text}"
        assert "X-Fixed-Brand" not in mail.normalised()
        assert mail.link_params["sid"] == resp.json()["sid"]
        page = assert_html(api.client.get(mail.link), 200)
        assert "CUSTOM-DEFAULT-PAGE: " in page, f"brand {brand!r}: {page}"


def test_brand_query_parameter_picks_the_page(
    make_inprocess_server: Callable[..., InProcessServer],
    api_for: Callable[[SydentServer], IdentityApi],
    custom_templates: Path,
) -> None:
    server = make_inprocess_server(templates_dir=custom_templates, terms_path=None)
    api = api_for(server)
    # Requested with the default brand; the link opened with ?brand=fixedbrand shows that page,
    # for failures as for success.
    session = api.start_email_session(unique_email("pagebrand"), v1=True)
    page = assert_html(api.client.get(link_for(server, session, token="wrong", brand="fixedbrand")), 400)
    assert "FIXED-BRAND-PAGE: " in page
    page = assert_html(api.client.get(link_for(server, session, brand="fixedbrand")), 200)
    assert "FIXED-BRAND-PAGE: " in page
    # Without ?brand= the default page.
    other = api.start_email_session(unique_email("pagedefault"), v1=True)
    page = assert_html(api.client.get(link_for(server, other)), 200)
    assert "CUSTOM-DEFAULT-PAGE: " in page


@pytest.mark.parametrize("where", ["query", "body"])
def test_brand_from_query_string_or_body(
    make_inprocess_server: Callable[..., InProcessServer],
    api_for: Callable[[SydentServer], IdentityApi],
    custom_templates: Path,
    where: str,
) -> None:
    # Sydent clients put `brand` in the query string; others in the JSON body. Either works.
    server = make_inprocess_server(templates_dir=custom_templates, terms_path=None)
    api = api_for(server)
    email = unique_email("brand" + where)
    body = {"email": email, "client_secret": new_secret(), "send_attempt": 1}
    params = {}
    if where == "query":
        params["brand"] = "fixedbrand"
    else:
        body["brand"] = "fixedbrand"
    resp = api.client.post(f"{V1}/validate/email/requestToken", params=params, json=body)
    assert resp.status_code == 200, resp.text
    assert "X-Fixed-Brand: yes" in api.smtp.wait_for(email).normalised()
