"""Email and HTML page templates, in Sydent's folder layout.

`<templates_dir>/<brand>/verification_template.eml.j2` is a Jinja2 template rendering a whole
RFC 5322 message (headers included), as is `invite_template.eml.j2`; a brand may instead hold
Sydent's older `%(name)s` files (`verification_template.eml`, `invite_template.eml`), rendered
as Sydent renders them. `<templates_dir>/<brand>/verify_response_template.html` is a Python
%-format string with `%(message)s`. Keeping Sydent's layout, variable names and rendering lets
an operator point `email.templates_dir` at an existing Sydent template folder.
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
import urllib.parse
from dataclasses import dataclass, field
from email.generator import BytesGenerator
from email.header import Header
from email.utils import formataddr, formatdate, make_msgid, parseaddr
from functools import lru_cache
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, Template, TemplateError, Undefined

from sydent_lite import resources
from sydent_lite.config import ConfigError

EMAIL_TEMPLATE = "verification_template.eml.j2"
PAGE_TEMPLATE = "verify_response_template.html"
INVITE_TEMPLATE = "invite_template.eml.j2"
LANDING_TEMPLATE = "landing_page.html.j2"
# The mail templates, by the name of their legacy form (the Jinja one adds `.j2`).
MAIL_TEMPLATES = ("verification_template.eml", "invite_template.eml")

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


# Both are of the configured From (a brand's or the server's): parsed once, not per message.
@lru_cache(maxsize=64)
def _from_header(from_: str) -> str:
    # A non-ASCII display name must be RFC 2047-encoded; an ASCII From is used as configured.
    if from_.isascii():
        return from_
    name, addr = parseaddr(from_)
    return formataddr((name, addr), charset="utf-8") if addr else from_


@lru_cache(maxsize=64)
def _msgid_domain(from_: str) -> str:
    domain = parseaddr(from_)[1].rpartition("@")[2].strip("<>")
    try:
        # make_msgid would otherwise call socket.getfqdn(), which can block on DNS.
        return domain.encode("idna").decode("ascii") if domain else "localhost"
    except UnicodeError:
        return "localhost"


# --- Sydent's legacy `%(name)s` templates ----------------------------------------------------------

# A %-format specifier: `%%`, `%(name)...` or a positional one (`%s`, `% x` ...), which a legacy
# template must not hold: with a mapping, `%s` alone would print every variable (keys included).
_PERCENT_SPEC = re.compile(r"%(%|\()?")


_VARIANTS = ("_forhtml", "_forurl")


class _Blank(dict[str, object]):
    """A %-format mapping in which a variable nobody set reads as "" (as Jinja's Undefined)."""

    def __missing__(self, key: str) -> str:
        return ""


def check_legacy_template(text: str, path: Path) -> None:
    """Raise ConfigError unless `text` is a %-format template with named variables only."""
    if "{{" in text or "{%" in text:
        raise ConfigError(f"template {path} looks like a Jinja template: name it {path.name}.j2")
    for match in _PERCENT_SPEC.finditer(text):
        if match.group(1) is None:
            line = text.count("\n", 0, match.start()) + 1
            raise ConfigError(
                f"template {path} (Sydent's legacy %(name)s format) has a '%' on line {line} that is not "
                "%(name)s: write a literal % as %%"
            )
    try:
        text % _Blank()
    except (ValueError, TypeError) as e:
        raise ConfigError(
            f"template {path} is not a valid %(name)s template (Sydent's legacy format; write a literal % as %%): {e}"
        ) from None


def legacy_variables(context: dict[str, Any]) -> _Blank:
    """Sydent's substitutions for a legacy template: every variable, and its `<name>_forhtml`
    (HTML-escaped) and `<name>_forurl` (URL-quoted, `/` kept) forms, as Sydent's sendEmail.

    A variable named like a variant (a store-invite field `room_name_forhtml`, say) is dropped:
    in Sydent it can replace the escaped form and put its markup into the HTML part."""
    out = _Blank()
    for key, value in context.items():
        if isinstance(value, str) and not key.endswith(_VARIANTS):
            out[key] = value
            out[key + "_forhtml"] = html.escape(value)
            out[key + "_forurl"] = urllib.parse.quote(value)
    out["multipart_boundary"] = context["multipart_boundary"]
    return out


# --- the store -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _MailTemplate:
    """One brand's mail template: Jinja (`<name>.j2`) or Sydent's legacy `%(name)s` file."""

    path: Path
    jinja: Template | None = None
    legacy: str | None = None

    def render(self, context: dict[str, Any]) -> str:
        if self.jinja is not None:
            return self.jinja.render(context)
        assert self.legacy is not None
        return self.legacy % legacy_variables(context)


@dataclass
class _Brand:
    mails: dict[str, _MailTemplate] = field(default_factory=dict)  # by MAIL_TEMPLATES name
    pages: dict[str, str] = field(default_factory=dict)  # %(message)s pages, by file name
    html: dict[str, Template] = field(default_factory=dict)  # Jinja pages, by file name


def mail_template_name(name: str) -> str:
    """`invite_template.eml.j2` or `invite_template.eml` -> `invite_template.eml`."""
    return name[: -len(".j2")] if name.endswith(".j2") else name


class TemplateStore:
    """Finds, checks and compiles every brand's templates at start-up, then renders them.

    The brands are the folders of `templates_dir` (with plain names) as they are at start-up,
    as in Sydent. A broken template of any brand stops start-up, naming the file. For each mail,
    a brand's `<name>.j2` (Jinja) wins over its legacy `<name>` (`%(var)s`, Sydent's older
    format); a brand with neither uses the default brand's, then the packaged default's.
    """

    def __init__(self, templates_dir: Path | None, default_brand: str) -> None:
        self._packaged = (resources.templates_dir() / "default").resolve()
        self.root = (templates_dir if templates_dir is not None else resources.templates_dir()).resolve()
        if not self.root.is_dir():
            raise ConfigError(f"config key 'email.templates_dir': {self.root} is not a folder")
        if not is_safe_name(default_brand):
            raise ConfigError(f"config key 'email.default_brand' is not a plain folder name: {default_brand!r}")
        self.default_brand = default_brand
        if not (self.root / default_brand).is_dir():
            # A typo in default_brand or templates_dir, not a folder that lacks a file.
            raise ConfigError(f"template folder {self.root / default_brand} (email.default_brand) is missing")
        # Autoescape on, as in Sydent, so Sydent templates that rely on it stay safe; undefined
        # variables render empty so Sydent templates using variables we lack still work;
        # auto_reload off: each template is compiled once, here. An operator's folder gets
        # Sydent's other settings too (its templates' final newline is dropped, as Sydent does);
        # the packaged templates keep theirs.
        common: dict[str, Any] = {"autoescape": True, "auto_reload": False, "undefined": Undefined}
        packaged_env = Environment(loader=FileSystemLoader(str(self._packaged)), keep_trailing_newline=True, **common)
        custom_env = Environment(loader=FileSystemLoader(str(self.root)), keep_trailing_newline=False, **common)
        # What a brand lacks (say, a Sydent folder from before invites had a template) comes
        # from the default brand, then from the packaged default.
        self._fallback = self._load(self._packaged, "", packaged_env)
        self._brands: dict[str, _Brand] = {}
        for folder in sorted(self.root.iterdir()):
            if folder.is_dir() and is_safe_name(folder.name):
                env = packaged_env if folder.resolve() == self._packaged else custom_env
                prefix = "" if env is packaged_env else f"{folder.name}/"
                self._brands[folder.name] = self._load(folder, prefix, env)

    @staticmethod
    def _load(folder: Path, prefix: str, env: Environment) -> _Brand:
        brand = _Brand()
        for name in MAIL_TEMPLATES:
            jinja_path, legacy_path = folder / f"{name}.j2", folder / name
            if jinja_path.is_file():
                brand.mails[name] = _MailTemplate(jinja_path, jinja=_compile(env, prefix + jinja_path.name, jinja_path))
            elif legacy_path.is_file():
                text = _read(legacy_path)
                check_legacy_template(text, legacy_path)
                brand.mails[name] = _MailTemplate(legacy_path, legacy=text)
        page_path = folder / PAGE_TEMPLATE
        if page_path.is_file():
            page = _read(page_path)
            try:
                page % {"message": ""}
            except (KeyError, ValueError, TypeError) as e:
                raise ConfigError(
                    f"template {page_path} is not a valid %-format string "
                    f"with %(message)s (write a literal % as %%): {e!r}"
                ) from None
            brand.pages[PAGE_TEMPLATE] = page
        landing_path = folder / LANDING_TEMPLATE
        if landing_path.is_file():
            brand.html[LANDING_TEMPLATE] = _compile(env, prefix + LANDING_TEMPLATE, landing_path)
        return brand

    def resolve_brand(self, brand: str | None, template_name: str | None = None) -> str:
        """`brand` if it is a brand folder with that template (or, without a template name, a
        brand folder at all); otherwise the default brand."""
        if not brand or not is_safe_name(brand) or brand not in self._brands:
            return self.default_brand
        if template_name is None:
            return brand
        found = self._brands[brand]
        name = mail_template_name(template_name)
        has = name in found.mails or template_name in found.pages or template_name in found.html
        return brand if has else self.default_brand

    def _find(self, brand: str | None, template_name: str) -> _Brand:
        """The brand that serves `template_name` for a request naming `brand`: the brand
        itself, else the default brand, else the packaged default."""
        return self._brands[self.resolve_brand(brand, template_name)]

    def mail_template_path(self, template_name: str, brand: str | None) -> Path:
        """The file a mail for `brand` is rendered from (for logs and tests)."""
        return self._mail_template(template_name, brand).path

    def _mail_template(self, template_name: str, brand: str | None) -> _MailTemplate:
        name = mail_template_name(template_name)
        found = self._find(brand, name).mails.get(name) or self._fallback.mails.get(name)
        if found is None:
            raise ValueError(f"no template {template_name!r}")
        return found

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
        """The complete message as UTF-8 bytes with CRLF line endings, ready to send verbatim.

        `template_name`: `verification_template.eml` or `invite_template.eml`, with or without
        `.j2`; the brand's Jinja template is used if it has one, else its legacy one.
        """
        if not is_safe_name(template_name):
            raise ValueError(f"bad template name {template_name!r}")
        _check_header_value("To", to)
        _check_header_value("From", from_)
        _check_header_value("Subject", subject)
        template = self._mail_template(template_name, brand)
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
        text = template.render(context)
        return fit_line_limit(_LINE_BREAK.sub("\r\n", text).encode("utf-8"))

    def render_html(self, template_name: str, brand: str | None, variables: dict[str, Any]) -> str:
        """A Jinja2 HTML page (autoescaped), e.g. the landing page."""
        if not is_safe_name(template_name):
            raise ValueError(f"bad template name {template_name!r}")
        template = self._find(brand, template_name).html.get(template_name) or self._fallback.html[template_name]
        return template.render(variables)

    def render_page(self, template_name: str, brand: str | None, message: str) -> str:
        """The page with `message` (HTML-escaped) in place of `%(message)s`."""
        if not is_safe_name(template_name):
            raise ValueError(f"bad template name {template_name!r}")
        page = self._find(brand, template_name).pages.get(template_name) or self._fallback.pages[template_name]
        return page % {"message": html.escape(message, quote=True)}


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"template {path} is not UTF-8: {e}") from None
    except OSError as e:
        raise ConfigError(f"template {path} cannot be read: {e.strerror}") from None


def _compile(env: Environment, name: str, path: Path) -> Template:
    try:
        return env.get_template(name)
    except TemplateError as e:
        raise ConfigError(f"template {path} is broken: {e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"template {path} is not UTF-8: {e}") from None
