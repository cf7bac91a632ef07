"""What people see: the landing page, and every packaged template under hostile input."""

from __future__ import annotations

import email
import email.policy
from collections.abc import Callable
from html.parser import HTMLParser
from pathlib import Path

import httpx
import pytest
from support.inprocess import InProcessServer
from support.server import DEFAULT_TERMS, V1, V2, IdentityApi, SydentServer, new_secret, unique_email, write_terms

from sydent_lite.resources import templates_dir
from sydent_lite.templating import EMAIL_TEMPLATE, INVITE_TEMPLATE, PAGE_TEMPLATE, TemplateStore

HOSTILE = '<script>alert("x")</script><img src=x onerror=alert(1)>&amp; "quoted" \'single\''
NON_ASCII = "Zoë Ünïcødé room 🎉 日本語"
BRANDS = sorted(p.name for p in templates_dir().iterdir() if p.is_dir())


class _Tags(HTMLParser):
    """Collects the element names and attributes of an HTML document."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))


def tags(html: str) -> list[tuple[str, dict[str, str | None]]]:
    parser = _Tags()
    parser.feed(html)
    return parser.tags


def assert_safe_html(html: str) -> None:
    found = tags(html)
    names = [t for t, _ in found]
    assert "script" not in names, "a <script> element got through"
    assert not any(t == "img" for t in names), "an image (remote content) got through"
    assert not any(k.startswith("on") for _, attrs in found for k in attrs), "an event handler got through"


def test_landing_page(idserver: SydentServer, client: httpx.Client) -> None:
    resp = client.get("/")
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/html")
    page = resp.text
    assert idserver.server_name in page
    # The terms and privacy policy, linked in English.
    for doc in DEFAULT_TERMS["docs"].values():
        assert f'href="{doc["langs"]["en"]["url"]}"' in page
    # The server's public key, as /pubkey publishes it.
    public_key = client.get("/_matrix/identity/v2/pubkey/ed25519:0").json()["public_key"]
    assert public_key in page and "ed25519:0" in page
    assert '<meta name="viewport"' in page
    assert_safe_html(page)


def test_landing_page_escapes_terms(make_inprocess_server: Callable[..., InProcessServer], tmp_path: Path) -> None:
    terms = {
        "master_version": "1",
        "docs": {
            "tos": {
                "version": HOSTILE,
                "langs": {"en": {"name": HOSTILE, "url": 'https://terms.test/"><script>alert(1)</script>'}},
            }
        },
    }
    server = make_inprocess_server(terms_path=write_terms(tmp_path / "terms.yaml", terms))
    with server.new_client() as client:
        page = client.get("/").text
    assert_safe_html(page)
    assert "&lt;script&gt;" in page


def _render(store: TemplateStore, name: str, brand: str) -> email.message.EmailMessage:
    variables = {
        "token": "TOKEN123",
        "link": "https://id.test/_matrix/identity/v2/validate/email/submitToken?a=1&b=2",
        "server_name": "id.test",
        "ipaddress": "203.0.113.9",
        "sender": "@evil:hs.test",
        "sender_display_name": HOSTILE + NON_ASCII,
        "room_name": HOSTILE + NON_ASCII * 20,
        "room_type": "m.space",
        "join_link": "https://app.test/#/room/%21r%3Ahs.test?email=a%40b.test",
        "bracketed_room_name": " (" + HOSTILE + ")",
        "web_client_location": "https://app.test",
        "ephemeral_private_key": "KEY",
        "room_id": "!r:hs.test",
    }
    raw = store.render_email(
        name,
        brand,
        to="invitee@example.test",
        from_="Id <id@id.test>",
        subject=NON_ASCII + " subject",
        variables=variables,
    )
    for line in raw.split(b"\r\n"):
        assert len(line) <= 998, "SMTP refuses lines over 998 octets"
    return email.message_from_bytes(raw, policy=email.policy.default)


@pytest.mark.parametrize("brand", BRANDS)
@pytest.mark.parametrize("name", [EMAIL_TEMPLATE, INVITE_TEMPLATE])
def test_every_email_template_parses_and_escapes(brand: str, name: str) -> None:
    message = _render(TemplateStore(None, "default"), name, brand)
    assert not message.defects, message.defects
    assert message["To"] == "invitee@example.test"
    assert NON_ASCII in str(message["Subject"])
    plain = message.get_body(preferencelist=("plain",))
    html = message.get_body(preferencelist=("html",))
    assert plain is not None and html is not None, "multipart: plain text and HTML"
    assert "TOKEN123" in plain.get_content() and "TOKEN123" in html.get_content()
    html_text = html.get_content()
    assert_safe_html(html_text)
    assert "<script>" not in html_text
    if name == INVITE_TEMPLATE:
        assert NON_ASCII in html_text and "&lt;script&gt;" in html_text


@pytest.mark.parametrize("brand", BRANDS)
def test_every_response_page_escapes(brand: str) -> None:
    page = TemplateStore(None, "default").render_page(PAGE_TEMPLATE, brand, HOSTILE + NON_ASCII * 50)
    assert_safe_html(page)
    assert NON_ASCII in page and '<meta name="viewport"' in page


def csp_directives(resp: httpx.Response) -> dict[str, set[str]]:
    policy = resp.headers.get("content-security-policy", "")
    out: dict[str, set[str]] = {}
    for directive in filter(None, (d.strip() for d in policy.split(";"))):
        name, *values = directive.split()
        out[name.lower()] = set(values)
    return out


def assert_page_headers(resp: httpx.Response) -> None:
    """No scripts, no framing, no form targets or base URL, no Referer; inline styles and https
    images allowed (what the packaged and Sydent-style branded pages use)."""
    assert resp.headers["content-type"].startswith("text/html"), resp.headers
    csp = csp_directives(resp)
    assert csp.get("default-src") == {"'none'"}, csp
    assert "script-src" not in csp and "script-src-elem" not in csp, csp  # scripts fall back to 'none'
    assert csp.get("frame-ancestors") == {"'none'"}, csp
    assert csp.get("base-uri") == {"'none'"} and csp.get("form-action") == {"'none'"}, csp
    assert csp.get("style-src") == {"'unsafe-inline'"}, csp
    assert "https:" in csp.get("img-src", set()), csp
    assert resp.headers.get("x-frame-options") == "DENY"
    assert resp.headers.get("referrer-policy") == "no-referrer"
    assert resp.headers.get("x-content-type-options") == "nosniff"


def test_landing_page_headers(client: httpx.Client) -> None:
    assert_page_headers(client.get("/"))


@pytest.mark.parametrize("api_path", [V1, V2])
def test_validation_pages_headers(api: IdentityApi, api_path: str) -> None:
    # The page behind the mailed link (its URL holds the token): success, and each failure.
    session = api.start_email_session(unique_email("page"), client_secret=new_secret(), v1=True)
    params = {"sid": session.sid, "client_secret": session.client_secret, "token": session.token}
    path = f"{api_path}/validate/email/submitToken"
    wrong = api.client.get(path, params={**params, "token": "wrong"})
    assert wrong.status_code == 400
    assert_page_headers(wrong)
    assert_page_headers(api.client.get(path, params={"sid": "nope", "client_secret": "x", "token": "y"}))
    assert_page_headers(api.client.get(path))  # incomplete link
    ok = api.client.get(path, params=params)
    assert ok.status_code == 200, ok.text
    assert_page_headers(ok)


def test_next_link_redirect_sends_no_referrer(api: IdentityApi) -> None:
    session = api.start_email_session(
        unique_email("page"), client_secret=new_secret(), v1=True, next_link="https://app.example.test/welcome"
    )
    resp = api.client.get(
        f"{V1}/validate/email/submitToken",
        params={"sid": session.sid, "client_secret": session.client_secret, "token": session.token},
    )
    assert resp.status_code == 302 and resp.headers["location"] == f"https://app.example.test/welcome?sid={session.sid}"
    assert resp.headers.get("referrer-policy") == "no-referrer"
