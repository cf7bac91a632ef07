"""Reading sydent.conf as Sydent 2.6.1 reads it (`sydent/config/__init__.py`).

Sydent builds a `configparser.ConfigParser()` (basic interpolation, option names
lower-cased, multi-line values continued by indentation), puts its `CONFIG_DEFAULTS` into
each section and then reads the file over them. We do the same, so a value means here what it
meant to Sydent: a key Sydent's file leaves out has Sydent's default, an empty value is
empty. Relative paths are Sydent's working directory's (`base_dir`).
"""

from __future__ import annotations

import configparser
from dataclasses import dataclass
from pathlib import Path

from sydent_lite.admin.sydent_import.errors import SydentImportError

# sydent/config/__init__.py CONFIG_DEFAULTS (2.6.1), without the environment overrides
# (SYDENT_SERVER_NAME, SYDENT_PID_FILE, SYDENT_DB_PATH): the import does not run in Sydent's
# environment. Option names as configparser stores them (lower case).
SYDENT_DEFAULTS: dict[str, dict[str, str]] = {
    "general": {
        "server.name": "",
        "log.path": "",
        "log.level": "INFO",
        "pidfile.path": "sydent.pid",
        "terms.path": "",
        "address_lookup_limit": "10000",
        "templates.path": "res",
        "brand.default": "matrix-org",
        "enable_v1_associations": "true",
        "delete_tokens_on_bind": "true",
        "ip.blacklist": "",
        "ip.whitelist": "",
        "homeserver_allow_list": "",
        "enable_v1_access": "true",
    },
    "db": {"db.file": "sydent.db"},
    "http": {
        "clientapi.http.bind_address": "::",
        "clientapi.http.port": "8090",
        "internalapi.http.bind_address": "::1",
        "internalapi.http.port": "",
        "replication.https.certfile": "",
        "replication.https.cacert": "",
        "replication.https.bind_address": "::",
        "replication.https.port": "4434",
        "obey_x_forwarded_for": "False",
        "federation.verifycerts": "True",
        "client_http_base": "",
    },
    "email": {
        "email.from": "Sydent Validation <noreply@{hostname}>",
        "email.subject": "Your Validation Token",
        "email.invite.subject": "%(sender_display_name)s has invited you to chat",
        "email.invite.subject_space": "%(sender_display_name)s has invited you to a space",
        "email.smtphost": "localhost",
        "email.smtpport": "25",
        "email.smtpusername": "",
        "email.smtppassword": "",
        "email.hostname": "",
        "email.tlsmode": "0",
        "email.default_web_client_location": "https://app.element.io",
        "email.third_party_invite_username_obfuscate_characters": "3",
        "email.third_party_invite_domain_obfuscate_characters": "3",
    },
    "sms": {"bodytemplate": "Your code is {token}", "username": "", "password": ""},
    "crypto": {"ed25519.signingkey": ""},
}

# Read with raw=True by Sydent (their %(name)s is for the invite, not for configparser).
RAW_OPTIONS = {("email", "email.invite.subject"), ("email", "email.invite.subject_space")}


@dataclass
class SydentConf:
    """sydent.conf with Sydent's defaults under it."""

    path: Path
    base_dir: Path  # Sydent's working directory: relative paths are its
    parser: configparser.ConfigParser
    in_file: set[tuple[str, str]]  # (section, option) the file itself sets

    def get(self, section: str, option: str, fallback: str | None = None) -> str | None:
        """The value as Sydent's `cfg.get` returns it; `fallback` where Sydent gives one."""
        if not self.parser.has_option(section, option):
            return fallback
        try:
            return self.parser.get(section, option, raw=(section, option) in RAW_OPTIONS)
        except configparser.InterpolationError as e:
            raise SydentImportError(f"{self.path}: [{section}] {option}: {e.message}") from None

    def path_value(self, value: str) -> Path:
        """A path from the file, as Sydent would open it (relative: Sydent's working directory)."""
        p = Path(value).expanduser()
        return p if p.is_absolute() else self.base_dir / p

    def options(self, section: str) -> list[str]:
        return self.parser.options(section) if self.parser.has_section(section) else []

    def sections(self) -> list[str]:
        return self.parser.sections()


def read_sydent_conf(path: Path, base_dir: Path | None = None) -> SydentConf:
    """sydent.conf as Sydent reads it; `base_dir` defaults to the file's folder."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no Sydent config file at {path}")
    only_file = configparser.ConfigParser(interpolation=None)
    cfg = configparser.ConfigParser()
    try:
        text = path.read_text(encoding="utf-8")
        only_file.read_string(text, source=str(path))
        for section, entries in SYDENT_DEFAULTS.items():
            cfg.add_section(section)
            for option, value in entries.items():
                cfg.set(section, option, value)
        cfg.read_string(text, source=str(path))
    except PermissionError:
        raise SydentImportError(f"cannot read {path}: permission denied (run the import as a user who can)") from None
    except (OSError, UnicodeDecodeError, configparser.Error) as e:
        raise SydentImportError(f"cannot read {path} as Sydent does: {e}") from None
    in_file = {(s, o) for s in only_file.sections() for o in only_file.options(s)}
    return SydentConf(path, Path(base_dir) if base_dir else path.resolve().parent, cfg, in_file)
