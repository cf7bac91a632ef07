"""Templates (email and page) and mail delivery (SMTP against a real aiosmtpd server, Maildir)."""

from __future__ import annotations

import email
import email.policy
import mailbox
import re
import socket
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any, cast

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session
from pydantic import ValidationError

from sydent_lite.config import ConfigError, EmailConfig, SmtpConfig, config_from_dict
from sydent_lite.delivery.email import (
    EmailSendError,
    MaildirEmailSender,
    SmtpEmailSender,
    make_email_sender,
    wire_size,
)
from sydent_lite.resources import migrations_dir, templates_dir
from sydent_lite.services.invites import redact_address, web_client_base
from sydent_lite.templating import (
    EMAIL_TEMPLATE,
    INVITE_TEMPLATE,
    MAX_LINE_OCTETS,
    PAGE_TEMPLATE,
    TemplateStore,
    fit_line_limit,
)

FROM = "Identity Server <noreply@id.example.test>"
LINK = "https://id.example.test/_matrix/identity/v2/validate/email/submitToken?token=tok&client_secret=cs&sid=s1"
HOSTILE = '<script>alert("x")</script>&<img src=x onerror=alert(1)>'


def render(store: TemplateStore, brand: str | None = None, **overrides: Any) -> bytes:
    kwargs: dict[str, Any] = {"to": "alice@example.test", "from_": FROM, "subject": "Confirm your email address"}
    variables = {"token": "tok123", "link": LINK, "server_name": "id.example.test", "ipaddress": "192.0.2.1"}
    variables.update(overrides.pop("variables", {}))
    kwargs.update(overrides)
    return store.render_email(EMAIL_TEMPLATE, brand, variables=variables, **kwargs)


def parse(raw: bytes) -> EmailMessage:
    return email.message_from_bytes(raw, policy=email.policy.default)


def parts(msg: EmailMessage) -> tuple[str, str]:
    plain = msg.get_body(preferencelist=("plain",))
    rich = msg.get_body(preferencelist=("html",))
    assert plain is not None and rich is not None
    return plain.get_content(), rich.get_content()


@pytest.fixture(scope="module")
def store() -> TemplateStore:
    return TemplateStore(None, "default")


# --- resources ----------------------------------------------------------------------------------


def test_resources_point_at_the_data_folders() -> None:
    assert (templates_dir() / "default" / EMAIL_TEMPLATE).is_file()
    assert (templates_dir() / "default" / PAGE_TEMPLATE).is_file()
    assert (migrations_dir() / "env.py").is_file()


# --- the default email template -----------------------------------------------------------------


def test_default_template_renders_a_valid_multipart_message(store: TemplateStore) -> None:
    raw = render(store)
    # CRLF everywhere, no bare LF or CR: SMTP sends it as is.
    assert b"\n" not in raw.replace(b"\r\n", b"")
    assert b"\r" not in raw.replace(b"\r\n", b"")
    msg = parse(raw)
    assert msg.get_content_type() == "multipart/alternative"
    assert msg["To"] == "alice@example.test"
    assert msg["From"] == FROM
    assert msg["Subject"] == "Confirm your email address"
    assert msg["Message-ID"].endswith("@id.example.test>")
    assert msg["Date"].datetime is not None
    assert msg["MIME-Version"] == "1.0"
    plain, rich = parts(msg)
    assert LINK in plain and "tok123" in plain and "id.example.test" in plain
    assert LINK.replace("&", "&amp;") in rich and "tok123" in rich
    assert "<img" not in rich and "<script" not in rich.lower()  # no remote images, no scripts
    assert not msg.defects
    for part in msg.walk():
        assert not part.defects


def test_hostile_values_are_escaped_in_html_and_headers_parse(store: TemplateStore) -> None:
    long_value = "x" * 2000
    subject = "Bestätigen Sie Ihre E-Mail-Adresse ✉ " + "lang " * 40
    raw = render(
        store,
        to="üser@exämple.test",
        from_="Sérvice d'identité <noreply@id.example.test>",
        subject=subject,
        variables={"token": HOSTILE, "server_name": HOSTILE + "é" + long_value, "link": LINK + "&x=" + HOSTILE},
    )
    msg = parse(raw)
    assert msg["Subject"] == subject
    assert msg["To"] == "üser@exämple.test"
    assert msg["From"].addresses[0].display_name == "Sérvice d'identité"
    assert msg["From"].addresses[0].addr_spec == "noreply@id.example.test"
    # Non-ASCII header values are RFC 2047-encoded (the raw To stays UTF-8: SMTPUTF8).
    header_block = raw.split(b"\r\n\r\n", 1)[0]
    assert "Bestätigen".encode() not in header_block
    plain, rich = parts(msg)
    assert HOSTILE in plain  # text/plain is not HTML: shown as typed
    assert "<script" not in rich.lower() and "<img" not in rich
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;" in rich
    assert long_value in rich and "é" in rich


def test_header_injection_is_rejected(store: TemplateStore) -> None:
    for field in ("to", "from_", "subject"):
        for bad in ("a@b.test\r\nBcc: evil@x.test", "a@b.test\nX: y", "a@b.test\rX: y", "a\u2028b", "a\x00b"):
            with pytest.raises(ValueError):
                render(store, **{field: bad})


def test_variables_cannot_override_checked_headers(store: TemplateStore) -> None:
    msg = parse(render(store, variables={"to": "evil@x.test\r\nBcc: evil@x.test", "subject_header_value": "x"}))
    assert msg["To"] == "alice@example.test"
    assert msg["Bcc"] is None
    assert msg["Subject"] == "Confirm your email address"


def test_each_message_gets_a_fresh_boundary_and_message_id(store: TemplateStore) -> None:
    a, b = parse(render(store)), parse(render(store))
    assert a.get_boundary() != b.get_boundary()
    assert a["Message-ID"] != b["Message-ID"]


@pytest.mark.parametrize(
    "subject",
    [
        "=?utf-8?q?Your_bank?= has invited you to chat",
        "Alice =?UTF-8?B?WW91ciBiYW5r?= =?iso-8859-1?q?=E9?= has invited you",
        "Zoë =?utf-8?q?x?=",
    ],
)
def test_text_shaped_like_an_encoded_word_is_shown_as_typed(store: TemplateStore, subject: str) -> None:
    # Mail readers decode anything shaped like an RFC 2047 encoded word: written raw into the
    # header, "=?utf-8?q?Your_bank?=" would be shown as "Your bank".
    msg = parse(render(store, subject=subject))
    assert msg["Subject"] == subject


def test_plain_ascii_subject_stays_readable(store: TemplateStore) -> None:
    raw = render(store, subject="Confirm your email address = yes?")
    assert b"\r\nSubject: Confirm your email address = yes?\r\n" in raw


def test_an_unbreakable_subject_still_fits_the_line_limit(store: TemplateStore) -> None:
    subject = "x" * 2000 + " and " + "y" * 1500
    raw = render(store, subject=subject)
    assert max(len(line) for line in raw.split(b"\r\n")) <= MAX_LINE_OCTETS
    assert parse(raw)["Subject"] == subject


def test_a_message_within_the_line_limit_is_left_byte_for_byte(store: TemplateStore) -> None:
    raw = render(store)
    assert fit_line_limit(raw) is raw
    assert raw.count(b"Content-Transfer-Encoding: 8bit") == 2


def test_long_lines_are_reencoded_and_read_back_the_same(store: TemplateStore) -> None:
    link = LINK + "&next=" + "%C3%A9" * 400 + "é" * 300  # 3,000 octets on one line
    raw = render(store, variables={"link": link})
    assert max(len(line) for line in raw.split(b"\r\n")) <= MAX_LINE_OCTETS
    assert b"\n" not in raw.replace(b"\r\n", b"") and b"\r" not in raw.replace(b"\r\n", b"")
    msg = parse(raw)
    assert not msg.defects and all(not part.defects for part in msg.walk())
    assert [p["Content-Transfer-Encoding"] for p in msg.walk() if not p.is_multipart()] == ["quoted-printable"] * 2
    plain, rich = parts(msg)
    assert link in plain and link.replace("&", "&amp;") in rich
    assert msg["Subject"] == "Confirm your email address" and msg["To"] == "alice@example.test"


def test_long_lines_of_a_single_part_template_are_reencoded(tmp_path: Path) -> None:
    brand = tmp_path / "plain"
    brand.mkdir()
    for name in (EMAIL_TEMPLATE, INVITE_TEMPLATE, PAGE_TEMPLATE):
        (brand / name).write_text((templates_dir() / "default" / name).read_text())
    # A Sydent-era template: one text part, no MIME headers at all.
    (brand / EMAIL_TEMPLATE).write_text(
        "From: {{ from }}\nTo: {{ to }}\nSubject: {{ subject_header_value }}\n\nOpen {{ link|safe }} now.\n"
    )
    raw = render(TemplateStore(tmp_path, "plain"), variables={"link": LINK + "&x=" + "y" * 1500})
    assert max(len(line) for line in raw.split(b"\r\n")) <= MAX_LINE_OCTETS
    msg = parse(raw)
    assert msg["Content-Transfer-Encoding"] == "quoted-printable"
    # (Jinja as in Sydent for an operator's folder: the template's final newline is dropped.)
    assert msg.get_content().replace("\r\n", "\n") == f"Open {LINK}&x={'y' * 1500} now."


# --- brands -------------------------------------------------------------------------------------


def write_brand(root: Path, brand: str, marker: str, page: bool = True) -> None:
    folder = root / brand
    folder.mkdir(parents=True)
    (folder / EMAIL_TEMPLATE).write_text(
        "From: {{ from|safe }}\nTo: {{ to|safe }}\nSubject: {{ subject_header_value|safe }}\n"
        "Content-Type: text/plain; charset=UTF-8\n\n"
        f"{marker} {{{{ link|safe }}}} {{{{ token|safe }}}} {{{{ sydent_only_variable }}}}\n",
        encoding="utf-8",
    )
    if page:
        (folder / PAGE_TEMPLATE).write_text(f"<p>{marker} 100%% %(message)s</p>", encoding="utf-8")


@pytest.fixture
def custom_dir(tmp_path: Path) -> Path:
    root = tmp_path / "templates"
    write_brand(root, "default", "DEFAULT-BRAND")
    write_brand(root, "acme", "ACME-BRAND")
    write_brand(root, "mailonly", "MAILONLY-BRAND", page=False)
    # A folder outside the templates dir that a traversal would reach.
    write_brand(tmp_path, "x", "ESCAPED")
    write_brand(root, ".hidden", "HIDDEN")
    return root


def test_custom_templates_dir_and_brand(custom_dir: Path) -> None:
    store = TemplateStore(custom_dir, "default")
    assert b"ACME-BRAND " + LINK.encode() + b" tok123" in render(store, "acme")
    assert b"DEFAULT-BRAND" in render(store, None)
    assert store.render_page(PAGE_TEMPLATE, "acme", "<ok>") == "<p>ACME-BRAND 100% &lt;ok&gt;</p>"
    # A brand with only the mail template gets the default page.
    assert b"MAILONLY-BRAND" in render(store, "mailonly")
    assert "DEFAULT-BRAND" in store.render_page(PAGE_TEMPLATE, "mailonly", "m")


@pytest.mark.parametrize("brand", ["unknown", "../x", "..", ".hidden", "acme/../../x", "/etc", "ac me", "a" * 300, ""])
def test_unknown_or_malicious_brand_falls_back_to_default(custom_dir: Path, brand: str) -> None:
    store = TemplateStore(custom_dir, "default")
    assert store.resolve_brand(brand, EMAIL_TEMPLATE) == "default"
    assert store.resolve_brand(brand) == "default"
    raw = render(store, brand)
    assert b"DEFAULT-BRAND" in raw and b"ESCAPED" not in raw and b"HIDDEN" not in raw
    assert "DEFAULT-BRAND" in store.render_page(PAGE_TEMPLATE, brand, "m")


def test_page_escapes_the_message(store: TemplateStore) -> None:
    page = store.render_page(PAGE_TEMPLATE, None, HOSTILE)
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert 'name="viewport"' in page and "<html lang=" in page


def test_bad_template_folders_fail_at_start_up(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        TemplateStore(tmp_path / "missing", "default")
    with pytest.raises(ConfigError):
        TemplateStore(tmp_path, "default")  # no default brand
    write_brand(tmp_path, "default", "D")
    with pytest.raises(ConfigError):
        TemplateStore(tmp_path, "../default")
    (tmp_path / "default" / PAGE_TEMPLATE).write_text("<p style='width: 100%'>%(message)s</p>")
    with pytest.raises(ConfigError, match="%%"):
        TemplateStore(tmp_path, "default")


# --- SMTP delivery ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return cast("int", s.getsockname()[1])


class Recorder:
    def __init__(self, refuse_at: str | None = None) -> None:
        self.refuse_at = refuse_at
        self.received: list[tuple[str, list[str], bytes]] = []
        self.mail_options: list[str] = []

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, mail_options: list[str]
    ) -> str:
        if self.refuse_at == "MAIL":
            return "550 5.7.1 sender refused"
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, rcpt_options: list[str]
    ) -> str:
        if self.refuse_at == "RCPT":
            return f"550 5.1.1 <{address}> unknown"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.refuse_at == "DATA":
            return "550 5.7.1 content refused"
        content = envelope.original_content if envelope.original_content is not None else envelope.content
        assert envelope.mail_from is not None and isinstance(content, bytes)
        self.received.append((envelope.mail_from, list(envelope.rcpt_tos), content))
        self.mail_options = list(envelope.mail_options)
        return "250 Message accepted"


def start_server(handler: Recorder, **kwargs: Any) -> Controller:
    controller = Controller(handler, hostname="127.0.0.1", port=free_port(), **kwargs)
    controller.start()
    return controller


@pytest.fixture
def smtp_server() -> Iterator[tuple[Recorder, int]]:
    handler = Recorder()
    controller = start_server(handler)
    yield handler, controller.port
    controller.stop()


def smtp_config(port: int, **kwargs: Any) -> SmtpConfig:
    return SmtpConfig(host="127.0.0.1", port=port, timeout_seconds=5.0, **kwargs)


def lf(data: bytes) -> bytes:
    return data.replace(b"\r\n", b"\n")


async def test_smtp_sends_the_rendered_bytes_verbatim(store: TemplateStore, smtp_server: tuple[Recorder, int]) -> None:
    handler, port = smtp_server
    raw = render(store, variables={"token": HOSTILE, "server_name": "ïd.example.test"})
    sender = make_email_sender(EmailConfig(transport="smtp", smtp=smtp_config(port)), FROM)
    assert isinstance(sender, SmtpEmailSender)
    await sender.send("alice@example.test", raw)
    assert len(handler.received) == 1
    mail_from, rcpt_tos, content = handler.received[0]
    assert mail_from == "noreply@id.example.test"
    assert rcpt_tos == ["alice@example.test"]
    assert lf(content).rstrip(b"\n") == lf(raw).rstrip(b"\n")


async def test_smtp_international_recipient_and_8bit_body(
    store: TemplateStore, smtp_server: tuple[Recorder, int]
) -> None:
    handler, port = smtp_server
    raw = render(store, to="üser@exämple.test", variables={"server_name": "ïd.example.test"})
    await SmtpEmailSender(smtp_config(port), FROM).send("üser@exämple.test", raw)
    _, rcpt_tos, content = handler.received[0]
    assert rcpt_tos == ["üser@exämple.test"]
    assert "SMTPUTF8" in handler.mail_options and "BODY=8BITMIME" in handler.mail_options
    assert lf(content).rstrip(b"\n") == lf(raw).rstrip(b"\n")


async def test_longest_real_values_stay_within_the_line_limit(
    store: TemplateStore, smtp_server: tuple[Recorder, int]
) -> None:
    # Token and client_secret may each be 255 characters: every line must still fit the 998
    # octets of RFC 5322, or SMTP servers (aiosmtpd included) refuse the message.
    handler, port = smtp_server
    link = (
        "https://identity.some-long-subdomain.example.test:8443/_matrix/identity/v2/validate/email/submitToken?"
        + "token="
        + "T" * 255
        + "&client_secret="
        + "c" * 255
        + "&sid="
        + "s" * 24
    )
    raw = render(store, variables={"token": "T" * 255, "link": link})
    assert max(len(line) for line in raw.split(b"\r\n")) <= 998
    await SmtpEmailSender(smtp_config(port), FROM).send("alice@example.test", raw)
    assert link in parts(parse(handler.received[0][2]))[0]


WIRE_CASES = [
    b"Subject: a\r\n\r\nbody\r\n",
    b"Subject: a\r\n\r\nno final line ending",
    b"Subject: a\n\nlone LFs\nonly\n",
    b"Subject: a\r\n\r\nlone CR\rin a line\r",
    b"Subject: a\r\n\r\n.a dot\r\n..two\r\n.\r\nmixed\n\r\r\n\n\r",
    b"",
]


@pytest.mark.parametrize("message", WIRE_CASES)
def test_wire_size_is_what_data_sends(message: bytes) -> None:
    from aiosmtplib.protocol import normalize_message_line_endings

    assert wire_size(message) == len(normalize_message_line_endings(message))


async def test_smtp_declares_the_size_the_server_receives(smtp_server: tuple[Recorder, int]) -> None:
    # RFC 1870: MAIL FROM's SIZE is the message as DATA carries it (a server may refuse a
    # message whose declared size it does not match, or one it wrongly thinks too big).
    handler, port = smtp_server
    sender = SmtpEmailSender(smtp_config(port), FROM)
    for message in WIRE_CASES[:5]:
        await sender.send("alice@example.test", message)
        assert handler.mail_options == [f"SIZE={len(handler.received[-1][2])}"], message
    await sender.aclose()
    assert len(handler.received) == 5


@pytest.mark.parametrize("stage", ["MAIL", "RCPT", "DATA"])
async def test_smtp_refusal_raises_email_send_error(store: TemplateStore, stage: str) -> None:
    handler = Recorder(refuse_at=stage)
    controller = start_server(handler)
    try:
        sender = SmtpEmailSender(smtp_config(controller.port), FROM)
        with pytest.raises(EmailSendError) as info:
            await sender.send("alice@example.test", render(store))
        assert "550" in str(info.value)
        assert "alice" not in str(info.value)  # the server's text (echoing the address) is left out
    finally:
        controller.stop()
    assert handler.received == []


async def test_nothing_listening_raises_email_send_error(store: TemplateStore) -> None:
    sender = SmtpEmailSender(smtp_config(free_port()), FROM)
    with pytest.raises(EmailSendError):
        await sender.send("alice@example.test", render(store))


async def test_starttls_not_offered_and_tls_against_plaintext_fail(
    store: TemplateStore, smtp_server: tuple[Recorder, int]
) -> None:
    handler, port = smtp_server
    for security in ("starttls", "tls"):
        sender = SmtpEmailSender(smtp_config(port, security=security), FROM)
        with pytest.raises(EmailSendError):
            await sender.send("alice@example.test", render(store))
    assert handler.received == []


@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")
@pytest.mark.filterwarnings("ignore:Session.login_data is deprecated")
async def test_smtp_login(store: TemplateStore) -> None:
    def authenticator(server, session, envelope, mechanism, auth_data):  # type: ignore[no-untyped-def]
        ok = isinstance(auth_data, LoginPassword) and auth_data.login == b"mailer" and auth_data.password == b"s3cret"
        # handled=False: aiosmtpd answers 535 itself (with True it would stay silent).
        return AuthResult(success=ok, handled=False)

    handler = Recorder()
    controller = start_server(handler, authenticator=authenticator, auth_required=True, auth_require_tls=False)
    try:
        good = SmtpEmailSender(smtp_config(controller.port, username="mailer", password="s3cret"), FROM)
        await good.send("alice@example.test", render(store))
        assert len(handler.received) == 1
        bad = SmtpEmailSender(smtp_config(controller.port, username="mailer", password="wrong-pw"), FROM)
        with pytest.raises(EmailSendError) as info:
            await bad.send("alice@example.test", render(store))
        assert "535" in str(info.value) and "wrong-pw" not in str(info.value)
        anonymous = SmtpEmailSender(smtp_config(controller.port), FROM)
        with pytest.raises(EmailSendError):
            await anonymous.send("alice@example.test", render(store))
    finally:
        controller.stop()
    assert len(handler.received) == 1


def test_unknown_transport_is_refused_by_the_config() -> None:
    # Refused where it is read; make_email_sender is only ever handed smtp or maildir.
    with pytest.raises(ConfigError, match=r"'email\.transport' must be one of smtp, maildir \(got 'smpt'\)"):
        config_from_dict({"email": {"transport": "smpt"}})
    with pytest.raises(ValidationError):
        EmailConfig(transport="smpt")  # type: ignore[arg-type]


def test_unusable_from_address_is_a_config_error() -> None:
    with pytest.raises(ConfigError):
        SmtpEmailSender(SmtpConfig(), "Identity Server")


# --- Maildir ------------------------------------------------------------------------------------


async def test_maildir_stores_one_readable_message(store: TemplateStore, tmp_path: Path) -> None:
    path = tmp_path / "data" / "outbox"  # parents do not exist yet
    sender = make_email_sender(EmailConfig(transport="maildir", maildir=str(path)), FROM)
    assert isinstance(sender, MaildirEmailSender)
    raw = render(store)
    await sender.send("alice@example.test", raw)
    box = mailbox.Maildir(path, create=False)
    keys = box.keys()
    assert len(keys) == 1
    stored = box.get_bytes(keys[0])
    assert b"\r" not in stored  # Maildir files use LF line endings
    assert stored == lf(raw)
    msg = parse(box.get_bytes(keys[0]))
    assert LINK in parts(msg)[0]


async def test_maildir_write_failure_raises_email_send_error(store: TemplateStore, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(EmailSendError):
        await MaildirEmailSender(blocker / "outbox").send("alice@example.test", render(store))


def test_template_missing_from_a_custom_folder_comes_from_the_packaged_default(tmp_path: Path) -> None:
    # An operator's Sydent folder with only the validation templates still sends invites.
    write_brand(tmp_path, "default", "D")
    store = TemplateStore(tmp_path, "default")
    raw = store.render_email(
        "invite_template.eml.j2",
        None,
        to="a@example.test",
        from_=FROM,
        subject="s",
        variables={
            "token": "TOK123",
            "join_link": "https://x.test/j",
            "sender": "@s:hs.test",
            "sender_display_name": "S",
            "room_name": "R",
            "server_name": "id.test",
        },
    )
    assert b"TOK123" in raw and b"https://x.test/j" in raw
    # ... while the folder's own templates are still used.
    assert TemplateStore(tmp_path, "default").render_page(PAGE_TEMPLATE, None, "m") != TemplateStore(
        None, "default"
    ).render_page(PAGE_TEMPLATE, None, "m")


# --- Sydent's legacy %(name)s templates -----------------------------------------------------------


def write_legacy_brand(root: Path, brand: str, body: str) -> None:
    folder = root / brand
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "verification_template.eml").write_text(
        "From: %(from)s\nTo: %(to)s\nSubject: %(subject_header_value)s\nContent-Type: text/plain; charset=UTF-8\n\n"
        + body,
        encoding="utf-8",
    )


def test_legacy_template_gets_sydents_forhtml_and_forurl_variants(tmp_path: Path) -> None:
    write_legacy_brand(tmp_path, "default", "%(link)s|%(link_forurl)s|%(link_forhtml)s|%(token)s|%(nothing)s|100%%\n")
    raw = render(TemplateStore(tmp_path, "default"), variables={"link": 'https://x.test/a b?c=1&d="é"/'})
    body = parse(raw).get_content().replace("\r\n", "\n")
    # html.escape (quote=True) and urllib.parse.quote (safe="/"), as Sydent's sendEmail; an
    # unknown variable reads as "" (Sydent: a 500); the final newline is kept, as Sydent does.
    assert body == (
        'https://x.test/a b?c=1&d="é"/|https%3A//x.test/a%20b%3Fc%3D1%26d%3D%22%C3%A9%22/|'
        "https://x.test/a b?c=1&amp;d=&quot;é&quot;/|tok123||100%\n"
    ), body


def test_legacy_variants_cannot_be_sent_in(tmp_path: Path) -> None:
    """Sydent lets a request field named `<name>_forhtml` replace the escaped form; not here."""
    write_legacy_brand(tmp_path, "default", "%(room_name_forhtml)s|%(extra_forurl)s|%(extra_forhtml_forhtml)s\n")
    raw = render(
        TemplateStore(tmp_path, "default"),
        variables={"room_name": "<b>", "room_name_forhtml": "<script>", "extra_forurl": "/../", "extra_forhtml": "<i>"},
    )
    assert parse(raw).get_content().replace("\r\n", "\n") == "&lt;b&gt;||\n"


def test_jinja_wins_over_legacy_and_legacy_wins_over_the_packaged_default(tmp_path: Path) -> None:
    write_brand(tmp_path, "default", "JINJA-DEFAULT")
    write_legacy_brand(tmp_path, "default", "LEGACY-DEFAULT %(token)s\n")
    write_legacy_brand(tmp_path, "old", "LEGACY-OLD %(token)s\n")
    store = TemplateStore(tmp_path, "default")
    assert b"JINJA-DEFAULT" in render(store) and b"LEGACY" not in render(store)
    assert b"LEGACY-OLD tok123" in render(store, "old")
    assert store.mail_template_path(EMAIL_TEMPLATE, "old") == (tmp_path / "old" / "verification_template.eml").resolve()
    # A brand without an invite template of either kind: the packaged one.
    assert store.mail_template_path(INVITE_TEMPLATE, "old") == templates_dir().resolve() / "default" / INVITE_TEMPLATE


@pytest.mark.parametrize(
    "body, why",
    [
        ("A 100% sure thing %(token)s\n", "line 6"),
        ("All we have: %s\n", "line 6"),
        ("%(token)d\n", "real number"),
        ("%(token\n", "incomplete"),
        ("{{ token }}\n", ".j2"),
    ],
)
def test_broken_legacy_template_fails_at_start_up_naming_the_file(tmp_path: Path, body: str, why: str) -> None:
    write_brand(tmp_path, "default", "D")
    write_legacy_brand(tmp_path, "other", body)
    path = (tmp_path / "other" / "verification_template.eml").resolve()
    with pytest.raises(ConfigError, match=re.escape(str(path))) as e:
        TemplateStore(tmp_path, "default")
    assert why in str(e.value)


def test_broken_templates_of_any_brand_fail_at_start_up(tmp_path: Path) -> None:
    write_brand(tmp_path, "default", "D")
    write_brand(tmp_path, "other", "O")
    (tmp_path / "other" / INVITE_TEMPLATE).write_text("{% if %}", encoding="utf-8")
    with pytest.raises(ConfigError, match=re.escape(str((tmp_path / "other" / INVITE_TEMPLATE).resolve()))):
        TemplateStore(tmp_path, "default")
    (tmp_path / "other" / INVITE_TEMPLATE).unlink()
    (tmp_path / "other" / PAGE_TEMPLATE).write_text("<p>100% %(message)s</p>", encoding="utf-8")
    with pytest.raises(ConfigError, match=re.escape(str((tmp_path / "other" / PAGE_TEMPLATE).resolve()))):
        TemplateStore(tmp_path, "default")
    (tmp_path / "other" / PAGE_TEMPLATE).write_bytes(b"<p>\xff %(message)s</p>")
    with pytest.raises(ConfigError, match="not UTF-8"):
        TemplateStore(tmp_path, "default")


def test_brands_are_the_folders_found_at_start_up(tmp_path: Path) -> None:
    write_brand(tmp_path, "default", "D")
    store = TemplateStore(tmp_path, "default")
    write_brand(tmp_path, "later", "LATER")
    assert store.resolve_brand("later", EMAIL_TEMPLATE) == "default"  # as Sydent: read once
    assert b"LATER" not in render(store, "later")


# --- invitation values (Sydent's) -------------------------------------------------------------------


@pytest.mark.parametrize(
    "address, local, domain, expected",
    [
        ("david@example.com", 3, 3, "dav...@exa..."),
        ("Invitee.Two@Example.TEST", 4, 5, "Invi...@Examp..."),
        ("ab@xy", 3, 3, "a...@x..."),
        ("ab@x.io", 3, 3, "a...@x.i..."),
        ("a@b", 3, 3, "...@..."),
        ("abcdefgh@example.com", 20, 20, "abc...@exa..."),  # never a whole part, however many are allowed
        ('"a@b"@example.com', 3, 3, '"a@...@exa...'),  # the domain is after the last @
        ("david@example.com", 0, 0, "...@..."),
    ],
)
def test_redact_address_as_sydent(address: str, local: int, domain: int, expected: str) -> None:
    assert redact_address(address, local, domain) == expected


@pytest.mark.parametrize(
    "url, ok",
    [
        ("https://app.element.io", True),
        ("http://chat.example.test:8080/element/", True),
        ("HTTPS://X.TEST", True),
        ("javascript:alert(1)", False),
        ("https://user@evil.test", False),
        ("https://x.test/?a", False),
        ("https://x.test/#", False),
        ("https://x.test/a b", False),
        ("https://\u0435.test", False),
        ("x.test", False),
        ("https://x.test:0x50", False),
        ('https://x.test/"onmouseover=', False),
        ("https://x.test/<b>", False),
        ("https://", False),
        ("https://" + "x" * 250 + ".test", False),
    ],
)
def test_web_client_base(url: str, ok: bool) -> None:
    assert (web_client_base(url) is not None) == ok
