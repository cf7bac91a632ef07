"""Every option Sydent 2.6.1 reads (`sydent/config/*.py`), and what it becomes here.

One row per option: Sydent's section and option, our key (dotted), the converter from
Sydent's value to ours, or the reason there is none. `import-sydent --sydent-config` writes
our config from it, and docs/deployment.md's table "Every Sydent 2.6.1 option" is generated
from it (`python -m sydent_lite.admin.sydent_import.settings_map`; a test keeps them equal).

A converter gets Sydent's value (as Sydent's configparser returns it) and returns our keys
with their values ({} to keep our default), adding a note where the meaning shifts.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import phonenumbers

from sydent_lite.admin.sydent_import.sydent_conf import SydentConf


class NoEquivalent(Exception):
    """This value cannot be said here; the message says why."""


@dataclass
class Conversion:
    """What a converter works with: the whole sydent.conf, and the notes it adds."""

    conf: SydentConf
    notes: list[str] = field(default_factory=list)


Converter = Callable[[str, Conversion], dict[str, Any]]


@dataclass(frozen=True)
class Setting:
    section: str
    option: str  # as configparser stores it (lower case); "<cc>" stands for a calling code
    ours: str | None  # our key(s), for the table
    convert: Converter | None
    why: str  # what the converter does beyond copying, or why there is no key


# --- converters -----------------------------------------------------------------------------------


def _bool(value: str) -> bool:
    return value.lower() == "true"  # sydent/config/general.py parse_cfg_bool


def _configparser_bool(value: str) -> bool:
    v = value.lower()
    if v in ("1", "yes", "true", "on"):
        return True
    if v in ("0", "no", "false", "off"):
        return False
    raise NoEquivalent(f"{value!r} is not a boolean to configparser (Sydent would not start)")


def _int(value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise NoEquivalent(f"{value!r} is not a whole number (Sydent would not start)") from None


def _float(value: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise NoEquivalent(f"{value!r} is not a number (Sydent would not start)") from None


def _comma_list(value: str) -> list[str]:
    # sydent/config/general.py list_from_comma_sep_string (multi-line values too)
    return [item.strip() for item in value.replace("\n", ",").split(",") if item.strip()]


def _lines(value: str) -> list[str]:
    return [line.strip() for line in value.split("\n") if line.strip()]


def copy(key: str, kind: Callable[[str], Any] = str) -> Converter:
    def convert(value: str, c: Conversion) -> dict[str, Any]:
        return {key: kind(value)}

    return convert


def non_empty(key: str, kind: Callable[[str], Any] = str) -> Converter:
    """Empty: our default (what Sydent does for empty differs and is noted in the row)."""

    def convert(value: str, c: Conversion) -> dict[str, Any]:
        return {key: kind(value)} if value.strip() else {}

    return convert


def a_path(key: str) -> Converter:
    """A file or folder Sydent opened (relative to its working directory); empty: none."""

    def convert(value: str, c: Conversion) -> dict[str, Any]:
        return {key: str(c.conf.path_value(value).resolve()) if value.strip() else None}

    return convert


def _server_name(value: str, c: Conversion) -> dict[str, Any]:
    if value:
        return {"server_name": value}
    guessed = os.uname()[1]
    c.notes.append(f"[general] server.name is empty: Sydent used the machine's name; server_name: {guessed}")
    return {"server_name": guessed}


def _log_level(value: str, c: Conversion) -> dict[str, Any]:
    level = {"WARN": "WARNING", "CRITICAL": "ERROR", "FATAL": "ERROR", "NOTSET": "DEBUG"}.get(
        value.upper(), value.upper()
    )
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise NoEquivalent(f"{value!r} is not a log level")
    return {"log_level": level}


def _address_lookup_limit(value: str, c: Conversion) -> dict[str, Any]:
    n = _int(value)
    out: dict[str, Any] = {"lookup.max_addresses": n}
    if n > 20000:  # a lookup of n addresses costs n from this bucket: it must hold one
        out["rate_limits.lookup_addresses_burst"] = n
    return out


def _ip_blocklist(value: str, c: Conversion) -> dict[str, Any]:
    ranges = _comma_list(value)
    if not ranges:
        return {}  # Sydent's DEFAULT_IP_RANGE_BLACKLIST; ours blocks all of it and more
    # Sydent always blocks 0.0.0.0 and :: besides the list (sydent/http/blacklisting_reactor.py).
    return {"federation.ip_blocklist": [*ranges, "0.0.0.0/32", "::/128"]}


def _v1_associations(value: str, c: Conversion) -> dict[str, Any]:
    # Sydent: off whenever enable_v1_access is off.
    access = c.conf.get("general", "enable_v1_access") or "true"
    return {"access.v1_associations_enabled": _bool(value) and _bool(access)}


def _metrics_port(value: str, c: Conversion) -> dict[str, Any]:
    addr = c.conf.get("general", "prometheus_addr")
    if addr is None:  # Sydent serves metrics only with both set
        return {"metrics.port": _int(value)}
    return {"metrics.enabled": True, "metrics.port": _int(value)}


def _metrics_addr(value: str, c: Conversion) -> dict[str, Any]:
    if value:
        return {"metrics.host": value}
    c.notes.append("[general] prometheus_addr is empty (every address, to Sydent): metrics.host 0.0.0.0")
    return {"metrics.host": "0.0.0.0"}


def _internal_port(value: str, c: Conversion) -> dict[str, Any]:
    if not value:
        return {"internal_api.enabled": False}
    return {"internal_api.enabled": True, "internal_api.port": _int(value)}


def _obey_xff(value: str, c: Conversion) -> dict[str, Any]:
    if not _configparser_bool(value):
        return {}
    c.notes.append(
        "[http] obey_x_forwarded_for: Sydent believed X-Forwarded-For from anyone; sydent_lite believes it only "
        "from listen.trusted_proxies, set to this machine (a proxy elsewhere: add its address)"
    )
    return {"listen.trusted_proxies": ["127.0.0.0/8", "::1/128"]}


def _public_baseurl(value: str, c: Conversion) -> dict[str, Any]:
    if value:
        return {"public_baseurl": value}
    c.notes.append("[http] client_http_base is empty: set public_baseurl (the links in mails are built from it)")
    return {}


def _email_from(value: str, c: Conversion) -> dict[str, Any]:
    if "{hostname}" in value:
        # Sydent's default, which it sends literally; the mail domain it meant is its host's.
        host = c.conf.get("email", "email.hostname") or c.conf.get("general", "server.name") or socket.getfqdn()
        c.notes.append(f"[email] email.from holds '{{hostname}}', which Sydent sends as it is: written with {host}")
        value = value.replace("{hostname}", host)
    return {"email.from": value}


def _smtp_host(value: str, c: Conversion) -> dict[str, Any]:
    return {"email.transport": "smtp", "email.smtp.host": value}


def _tls_mode(value: str, c: Conversion) -> dict[str, Any]:
    # sydent/util/emailutils.py: "SSL" or "TLS" -> SMTP_SSL, "STARTTLS", anything else plain.
    security = {"SSL": "tls", "TLS": "tls", "STARTTLS": "starttls"}.get(value, "none")
    return {"email.smtp.security": security}


def _blocked_keywords(value: str, c: Conversion) -> dict[str, Any]:
    return {"invites.blocked_keywords": [k.casefold() for k in _lines(value)]}


def _per_hour(key: str) -> Converter:
    def convert(value: str, c: Conversion) -> dict[str, Any]:
        return {key: _float(value) * 3600}

    return convert


def _country_rate(value: str, c: Conversion) -> dict[str, Any]:
    return {"rate_limits.sms_per_country_per_hour": {"default": max(1, round(_float(value) * 3600))}}


def _country_burst(value: str, c: Conversion) -> dict[str, Any]:
    _int(value)
    rate = c.conf.get("sms", "country.ratelimit.rate_hz")
    if rate is not None and _int(value) != max(1, round(_float(rate) * 3600)):
        c.notes.append(
            f"[sms] country.ratelimit.burst = {value}: our burst per country is the hourly number "
            "(rate_limits.sms_per_country_per_hour)"
        )
    return {}


def _sms_username(value: str, c: Conversion) -> dict[str, Any]:
    if not value:
        return {}
    return {"sms.provider": "openmarket", "sms.openmarket.username": value}


def _originators(value: str, c: Conversion, cc: str) -> dict[str, Any]:
    # sydent/config/sms.py: "type:text, type:text"; checked again by our config.
    listed = [item.strip() for item in value.split(",")]
    return {f"sms.originators.{cc}": listed[0] if len(listed) == 1 else listed}


def _sms_rule(value: str, c: Conversion, cc: str) -> dict[str, Any]:
    if value not in ("allow", "reject"):
        raise NoEquivalent(f"{value!r} is neither allow nor reject (Sydent would not start)")
    try:
        regions = sorted(phonenumbers.region_codes_for_country_code(int(cc)))
    except ValueError:
        regions = []
    regions = [r for r in regions if r != "001"]  # non-geographic
    if not regions:
        raise NoEquivalent(f"{cc} is not a country calling code")
    key = "sms.allowed_countries" if value == "allow" else "sms.refused_countries"
    c.notes.append(f"[sms] smsrule.{cc} = {value}: calling code {cc} is {', '.join(regions)} ({key})")
    return {key: regions}


# --- the table ------------------------------------------------------------------------------------

_REPLICATION = (
    "sydent_lite does not replicate associations between identity servers (nothing listens for peers, "
    "nothing is pushed); associations Sydent got from peers are imported with their signatures"
)
_DEPRECATED_TEMPLATE = "deprecated in Sydent 2.6.1; brand folders under `email.templates_dir` instead"

SETTINGS: tuple[Setting, ...] = (
    Setting("general", "server.name", "server_name", _server_name, "empty: the machine's name, as Sydent"),
    Setting(
        "general",
        "log.path",
        None,
        None,
        "journald: the service logs to standard error, which systemd keeps (`journalctl -u sydent-lite`)",
    ),
    Setting("general", "log.level", "log_level", _log_level, "WARN -> WARNING, CRITICAL -> ERROR"),
    Setting("general", "pidfile.path", None, None, "systemd knows the process (`Type=exec`): no pid file"),
    Setting("general", "terms.path", "terms_path", a_path("terms_path"), "empty: no terms, as Sydent"),
    Setting("general", "address_lookup_limit", "lookup.max_addresses", _address_lookup_limit, ""),
    Setting("general", "templates.path", "email.templates_dir", a_path("email.templates_dir"), "Sydent's folder as is"),
    Setting("general", "brand.default", "email.default_brand", copy("email.default_brand"), ""),
    Setting(
        "general",
        "enable_v1_associations",
        "access.v1_associations_enabled",
        _v1_associations,
        "off when enable_v1_access is off, as Sydent",
    ),
    Setting(
        "general",
        "delete_tokens_on_bind",
        "invites.delete_tokens_on_bind",
        copy("invites.delete_tokens_on_bind", _bool),
        "",
    ),
    Setting(
        "general",
        "ip.blacklist",
        "federation.ip_blocklist",
        _ip_blocklist,
        "empty: our default (all of Sydent's default ranges and more); 0.0.0.0 and :: added, as Sydent",
    ),
    Setting("general", "ip.whitelist", "federation.ip_allowlist", copy("federation.ip_allowlist", _comma_list), ""),
    Setting(
        "general",
        "homeserver_allow_list",
        "access.homeserver_allow_list",
        copy("access.homeserver_allow_list", _comma_list),
        "",
    ),
    Setting("general", "enable_v1_access", "access.v1_enabled", copy("access.v1_enabled", _bool), ""),
    Setting("general", "prometheus_port", "metrics.port, metrics.enabled", _metrics_port, "enabled with both set"),
    Setting("general", "prometheus_addr", "metrics.host", _metrics_addr, "empty: 0.0.0.0"),
    Setting("general", "sentry_dsn", "sentry_dsn", copy("sentry_dsn"), ""),
    Setting(
        "db",
        "db.file",
        None,
        None,
        "the database the import reads; ours is `database.url` (SQLite or PostgreSQL, --database-url)",
    ),
    Setting("http", "clientapi.http.bind_address", "listen.host", copy("listen.host"), ""),
    Setting("http", "clientapi.http.port", "listen.port", copy("listen.port", _int), ""),
    Setting("http", "internalapi.http.bind_address", "internal_api.host", copy("internal_api.host"), ""),
    Setting(
        "http",
        "internalapi.http.port",
        "internal_api.port, internal_api.enabled",
        _internal_port,
        "empty: off, as Sydent",
    ),
    Setting("http", "replication.https.certfile", None, None, _REPLICATION),
    Setting("http", "replication.https.cacert", None, None, _REPLICATION),
    Setting("http", "replication.https.bind_address", None, None, _REPLICATION),
    Setting("http", "replication.https.port", None, None, _REPLICATION),
    Setting(
        "http",
        "obey_x_forwarded_for",
        "listen.trusted_proxies",
        _obey_xff,
        "true: loopback (Sydent believed anyone); add a proxy elsewhere by address",
    ),
    Setting(
        "http", "federation.verifycerts", "federation.verify_tls", copy("federation.verify_tls", _configparser_bool), ""
    ),
    Setting("http", "client_http_base", "public_baseurl", _public_baseurl, ""),
    Setting("http", "verify_response_template", None, None, _DEPRECATED_TEMPLATE),
    Setting("peer.<name>", "base_replication_url", None, None, _REPLICATION),
    Setting("email", "email.template", None, None, _DEPRECATED_TEMPLATE),
    Setting("email", "email.invite_template", None, None, _DEPRECATED_TEMPLATE),
    Setting(
        "email", "email.from", "email.from", _email_from, "`{hostname}` (Sydent's default, sent literally) filled in"
    ),
    Setting("email", "email.subject", "email.validation_subject", copy("email.validation_subject"), ""),
    Setting("email", "email.invite.subject", "email.invite_subject", copy("email.invite_subject"), ""),
    Setting(
        "email", "email.invite.subject_space", "email.invite_subject_space", copy("email.invite_subject_space"), ""
    ),
    Setting("email", "email.smtphost", "email.smtp.host, email.transport", _smtp_host, "transport smtp"),
    Setting("email", "email.smtpport", "email.smtp.port", copy("email.smtp.port", _int), ""),
    Setting("email", "email.smtpusername", "email.smtp.username", copy("email.smtp.username"), ""),
    Setting("email", "email.smtppassword", "email.smtp.password", copy("email.smtp.password"), ""),
    Setting("email", "email.hostname", "email.hostname", non_empty("email.hostname"), "empty: the machine's FQDN"),
    Setting(
        "email", "email.tlsmode", "email.smtp.security", _tls_mode, "SSL/TLS -> tls, STARTTLS -> starttls, else none"
    ),
    Setting(
        "email",
        "email.default_web_client_location",
        "email.web_client_location",
        copy("email.web_client_location"),
        "",
    ),
    Setting(
        "email",
        "email.third_party_invite_username_obfuscate_characters",
        "invites.display_name_reveal_local_part",
        copy("invites.display_name_reveal_local_part", _int),
        "",
    ),
    Setting(
        "email",
        "email.third_party_invite_domain_obfuscate_characters",
        "invites.display_name_reveal_domain",
        copy("invites.display_name_reveal_domain", _int),
        "",
    ),
    Setting(
        "email",
        "email.third_party_invite_homeserver_blocklist",
        "invites.blocked_homeservers",
        copy("invites.blocked_homeservers", _lines),
        "one a line",
    ),
    Setting(
        "email",
        "email.third_party_invite_room_blocklist",
        "invites.blocked_room_ids",
        copy("invites.blocked_room_ids", _lines),
        "one a line",
    ),
    Setting(
        "email",
        "email.third_party_invite_keyword_blocklist",
        "invites.blocked_keywords",
        _blocked_keywords,
        "one a line, case-folded",
    ),
    Setting(
        "email",
        "email.ratelimit_sender.burst",
        "rate_limits.store_invite_per_sender_burst",
        copy("rate_limits.store_invite_per_sender_burst", _int),
        "",
    ),
    Setting(
        "email",
        "email.ratelimit_sender.rate_hz",
        "rate_limits.store_invite_per_sender_per_hour",
        _per_hour("rate_limits.store_invite_per_sender_per_hour"),
        "per second -> per hour",
    ),
    Setting("sms", "bodytemplate", "sms.template", copy("sms.template"), ""),
    Setting("sms", "username", "sms.openmarket.username, sms.provider", _sms_username, "set: provider openmarket"),
    Setting("sms", "password", "sms.openmarket.password", non_empty("sms.openmarket.password"), ""),
    Setting("sms", "originators.<cc>", "sms.originators.<cc>", None, "a string, or a list of several"),
    Setting(
        "sms",
        "smsrule.<cc>",
        "sms.allowed_countries / sms.refused_countries",
        None,
        "calling code -> its ISO 3166 regions",
    ),
    Setting(
        "sms",
        "msisdn.ratelimit.burst",
        "rate_limits.request_token_per_address_burst",
        copy("rate_limits.request_token_per_address_burst", _int),
        "our limit per address covers email addresses too",
    ),
    Setting(
        "sms",
        "msisdn.ratelimit.rate_hz",
        "rate_limits.request_token_per_address_per_hour",
        _per_hour("rate_limits.request_token_per_address_per_hour"),
        "per second -> per hour; covers email addresses too",
    ),
    Setting(
        "sms",
        "country.ratelimit.burst",
        "rate_limits.sms_per_country_per_hour",
        _country_burst,
        "our burst per country is the hourly number",
    ),
    Setting(
        "sms",
        "country.ratelimit.rate_hz",
        "rate_limits.sms_per_country_per_hour",
        _country_rate,
        "per second -> per hour, as `default` (each country its own bucket; Sydent: each calling code)",
    ),
    Setting(
        "crypto",
        "ed25519.signingkey",
        "signing_key_path",
        None,
        "the import writes the key to the key file at signing_key_path",
    ),
)

_PATTERNED: dict[tuple[str, str], Callable[[str, Conversion, str], dict[str, Any]]] = {
    ("sms", "originators."): _originators,
    ("sms", "smsrule."): _sms_rule,
}


def setting_for(section: str, option: str) -> Setting | None:
    """The row of one option of the file (None: not an option Sydent 2.6.1 reads)."""
    if section.startswith("peer."):
        section = "peer.<name>"
    for s in SETTINGS:
        if s.section == section and (
            s.option == option or (s.option.endswith(".<cc>") and option.startswith(s.option[:-4]))
        ):
            return s
    return None


def convert_option(section: str, option: str, value: str, c: Conversion) -> dict[str, Any]:
    """Our keys for one option (NoEquivalent: none; {} : our default)."""
    for (sec, prefix), convert in _PATTERNED.items():
        if section == sec and option.startswith(prefix):
            return convert(value, c, option[len(prefix) :])
    row = setting_for(section, option)
    if row is None:
        raise NoEquivalent("not an option Sydent 2.6.1 reads (Sydent ignores it too)")
    if row.convert is None:
        raise NoEquivalent(row.why)
    return row.convert(value, c)


def markdown_table() -> str:
    """The table of docs/deployment.md, "Every Sydent 2.6.1 option"."""
    lines = ["| Sydent section | option | sydent_lite | notes |", "| --- | --- | --- | --- |"]
    for s in SETTINGS:
        ours = f"`{s.ours}`" if s.ours else "none"
        if s.ours and ", " in s.ours:
            ours = ", ".join(f"`{k}`" for k in s.ours.split(", "))
        if s.ours and " / " in s.ours:
            ours = " / ".join(f"`{k}`" for k in s.ours.split(" / "))
        lines.append(f"| `[{s.section}]` | `{s.option}` | {ours} | {s.why} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # pragma: no cover
    print(markdown_table(), end="")
