"""Email and HTML page templates, in Sydent's folder layout.

`<templates_dir>/<brand>/verification_template.eml.j2` is a Jinja2 template rendering a whole
RFC 5322 message (headers included); `<templates_dir>/<brand>/verify_response_template.html` is
a Python %-format string with `%(message)s`. Keeping Sydent's layout and variable names lets an
operator point `email.templates_dir` at an existing Sydent template folder.
"""

from __future__ import annotations

import email
import email.base64mime
import email.policy
import email.quoprimime
import html
import io
import re
import secrets
from email.generator import BytesGenerator
from email.header import Header
from email.utils import formataddr, formatdate, make_msgid, parseaddr
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, PrefixLoader, TemplateError, Undefined

from sydent_lite import resources
from sydent_lite.config import ConfigError

EMAIL_TEMPLATE = "verification_template.eml.j2"
PAGE_TEMPLATE = "verify_response_template.html"
INVITE_TEMPLATE = "invite_template.eml.j2"
LANDING_TEMPLATE = "landing_page.html.j2"

# A brand comes from the client (requestToken `brand`, submitToken `?brand=`), so it is only
# ever used as a single plain folder name: no separators, no dot-files, no "..".
_SAFE_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
# Anything that could end a header line, for the email parser or for a mail client that splits
# on Unicode line breaks: ASCII control characters (TAB aside) and U+0085/U+2028/U+2029.
_HEADER_BREAKERS = re.compile(r"[\x00-\x08\x0a-\x1f\x7f\x85\u2028\u2029]")
# Only these are line breaks in a rendered message (str.splitlines() knows more, e.g. U+2028,
# which must stay inside its line).
_LINE_BREAK = re.compile(r"\r\n|\r|\n")
# RFC 5322 2.1.1: at most 998 octets per line, CRLF aside; SMTP servers refuse longer ones.
MAX_LINE_OCTETS = 998
# A readable (unencoded) header value keeps its words under this, leaving room for the name.
_MAX_PLAIN_HEADER_LINE = 900
# Reading a rendered message back to re-encode it: headers kept as written unless a line is too long.
_REENCODE_POLICY = email.policy.SMTP.clone(max_line_length=MAX_LINE_OCTETS)
_IDENTITY_ENCODINGS = ("7bit", "8bit", "binary")


def is_safe_name(name: str) -> bool:
    return bool(_SAFE_NAME.fullmatch(name)) and not name.startswith(".") and ".." not in name


def _check_header_value(field: str, value: str) -> None:
    if _HEADER_BREAKERS.search(value):
        raise ValueError(f"the {field} header value contains a line break or control character")


def _encode_header(value: str) -> str:
    """RFC 2047-encode a header value that needs it; plain ASCII stays readable (folded if long).

    Text containing `=?` is encoded too: mail readers decode whatever looks like an encoded word,
    so a display name written as `=?utf-8?q?...?=` would show as what it decodes to. Inside our
    encoded word its `=` and `?` are encoded themselves, and a reader shows the text as typed.
    A word too long to fold at spaces is encoded too (encoded words can be split anywhere).
    """
    if value.isascii() and "=?" not in value:
        plain = Header(value, "us-ascii").encode()
        if all(len(line) <= _MAX_PLAIN_HEADER_LINE for line in plain.splitlines()):
            return plain
    return Header(value, "utf-8").encode()


def fit_line_limit(message: bytes) -> bytes:
    """`message` (CRLF line endings) as it is if every line fits in 998 octets; else with each
    unencoded part that has a longer line re-encoded, text as quoted-printable (soft line
    breaks: the reader sees the same text), anything else as base64. A header line that is too
    long is folded. Whatever a template writes, no line can make SMTP refuse the message, and
    messages within the limit (nearly all) are sent byte for byte as the template made them.
    """
    if all(len(line) <= MAX_LINE_OCTETS for line in message.split(b"\r\n")):
        return message
    parsed = email.message_from_bytes(message, policy=_REENCODE_POLICY)
    for part in parsed.walk():
        if part.is_multipart():
            continue
        if str(part.get("Content-Transfer-Encoding", "7bit")).strip().lower() not in _IDENTITY_ENCODINGS:
            continue  # already encoded by the template: its lines are its own
        data = part.get_payload(decode=True)
        if not isinstance(data, bytes) or all(len(line) <= MAX_LINE_OCTETS for line in data.splitlines()):
            continue
        if part.get_content_maintype() == "text":
            # body_encode works on characters 0-255: latin-1 maps each octet to one of them.
            encoded, cte = email.quoprimime.body_encode(data.decode("latin-1"), eol="\r\n"), "quoted-printable"
        else:
            encoded, cte = email.base64mime.body_encode(data, eol="\r\n"), "base64"
        part.set_payload(encoded)
        if "Content-Transfer-Encoding" in part:
            part.replace_header("Content-Transfer-Encoding", cte)
        else:
            part["Content-Transfer-Encoding"] = cte
    out = io.BytesIO()
    BytesGenerator(out, policy=_REENCODE_POLICY).flatten(parsed)
    return out.getvalue()


def _from_header(from_: str) -> str:
    # A non-ASCII display name must be RFC 2047-encoded; an ASCII From is used as configured.
    if from_.isascii():
        return from_
    name, addr = parseaddr(from_)
    return formataddr((name, addr), charset="utf-8") if addr else from_


def _msgid_domain(from_: str) -> str:
    domain = parseaddr(from_)[1].rpartition("@")[2].strip("<>")
    try:
        # make_msgid would otherwise call socket.getfqdn(), which can block on DNS.
        return domain.encode("idna").decode("ascii") if domain else "localhost"
    except UnicodeError:
        return "localhost"


class TemplateStore:
    """Finds, compiles (once) and renders the templates of every brand."""

    def __init__(self, templates_dir: Path | None, default_brand: str) -> None:
        self.root = (templates_dir if templates_dir is not None else resources.templates_dir()).resolve()
        if not self.root.is_dir():
            raise ConfigError(f"config key 'email.templates_dir': {self.root} is not a folder")
        if not is_safe_name(default_brand):
            raise ConfigError(f"config key 'email.default_brand' is not a plain folder name: {default_brand!r}")
        self.default_brand = default_brand
        # auto_reload off: templates are read and compiled once, then served from Jinja's cache.
        # Autoescape on, as in Sydent, so Sydent templates that rely on it stay safe; undefined
        # variables render empty so Sydent templates using variables we lack still work.
        # A template the operator's folder lacks (say, a Sydent folder from before invites had
        # a template) comes from the packaged default brand rather than failing.
        self._packaged = (resources.templates_dir() / "default").resolve()
        self._env = Environment(
            loader=PrefixLoader({"custom": FileSystemLoader(str(self.root)), "packaged": FileSystemLoader(str(self._packaged))}),
            autoescape=True,
            auto_reload=False,
            undefined=Undefined,
            keep_trailing_newline=True,
        )
        self._pages: dict[tuple[str, str], str] = {}
        # Fail at start-up, not on the first request, on a missing or broken default template.
        if not (self.root / default_brand).is_dir():
            # A typo in default_brand or templates_dir, not a folder that lacks a file.
            raise ConfigError(f"template folder {self.root / default_brand} (email.default_brand) is missing")
        for name in (EMAIL_TEMPLATE, PAGE_TEMPLATE, INVITE_TEMPLATE):
            if not self._path(default_brand, name).is_file():
                raise ConfigError(f"template {self.root / default_brand / name} is missing")
        for name in (EMAIL_TEMPLATE, INVITE_TEMPLATE):
            try:
                self._env.get_template(self._jinja_name(default_brand, name))
            except TemplateError as e:
                raise ConfigError(f"template {self._path(default_brand, name)} is broken: {e}") from None
        try:
            self._page(default_brand, PAGE_TEMPLATE) % {"message": ""}
        except (KeyError, ValueError, TypeError) as e:
            raise ConfigError(
                f"template {self.root / default_brand / PAGE_TEMPLATE} is not a valid %-format string "
                f"with %(message)s (write a literal % as %%): {e!r}"
            ) from None

    def _has(self, brand: str, template_name: str) -> bool:
        return (self.root / brand / template_name).is_file()

    def _path(self, brand: str, template_name: str) -> Path:
        """The file for a resolved brand: its own, else the packaged default's."""
        own = self.root / brand / template_name
        return own if own.is_file() else self._packaged / template_name

    def _jinja_name(self, brand: str, template_name: str) -> str:
        if self._has(brand, template_name):
            return f"custom/{brand}/{template_name}"
        return f"packaged/{template_name}"

    def resolve_brand(self, brand: str | None, template_name: str | None = None) -> str:
        """`brand` if it is a safe folder name with that template (or, without a template name,
        an existing folder); otherwise the default brand."""
        if not brand or not is_safe_name(brand) or (template_name and not is_safe_name(template_name)):
            return self.default_brand
        folder = self.root / brand
        exists = folder.joinpath(template_name).is_file() if template_name else folder.is_dir()
        return brand if exists else self.default_brand

    def render_email(
        self,
        template_name: str,
        brand: str | None,
        *,
        to: str,
        from_: str,
        subject: str,
        variables: dict[str, Any],
    ) -> bytes:
        """The complete message as UTF-8 bytes with CRLF line endings, ready to send verbatim."""
        if not is_safe_name(template_name):
            raise ValueError(f"bad template name {template_name!r}")
        _check_header_value("To", to)
        _check_header_value("From", from_)
        _check_header_value("Subject", subject)
        brand = self.resolve_brand(brand, template_name)
        # Ours are applied last: a caller's variable must not replace a checked header value.
        context: dict[str, Any] = {
            **variables,
            "to": to,
            "from": _from_header(from_),
            "subject": subject,
            "subject_header_value": _encode_header(subject),
            "date": formatdate(usegmt=True),
            "messageid": make_msgid(domain=_msgid_domain(from_)),
            # Random per message so no user-supplied text can contain (and so break) it.
            "multipart_boundary": secrets.token_hex(16),
        }
        text = self._env.get_template(self._jinja_name(brand, template_name)).render(context)
        return fit_line_limit(_LINE_BREAK.sub("\r\n", text).encode("utf-8"))

    def _page(self, brand: str, template_name: str) -> str:
        key = (brand, template_name)
        page = self._pages.get(key)
        if page is None:
            page = self._path(brand, template_name).read_text(encoding="utf-8")
            self._pages[key] = page  # bounded: only files that exist get here
        return page

    def render_html(self, template_name: str, brand: str | None, variables: dict[str, Any]) -> str:
        """A Jinja2 HTML page (autoescaped), e.g. the landing page."""
        if not is_safe_name(template_name):
            raise ValueError(f"bad template name {template_name!r}")
        brand = self.resolve_brand(brand, template_name)
        return self._env.get_template(self._jinja_name(brand, template_name)).render(variables)

    def render_page(self, template_name: str, brand: str | None, message: str) -> str:
        """The page with `message` (HTML-escaped) in place of `%(message)s`."""
        if not is_safe_name(template_name):
            raise ValueError(f"bad template name {template_name!r}")
        brand = self.resolve_brand(brand, template_name)
        return self._page(brand, template_name) % {"message": html.escape(message, quote=True)}
