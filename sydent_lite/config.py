"""Configuration: a YAML file mapped onto typed dataclasses.

The key names are a public contract (operators keep their files across upgrades). Loading is
strict: an unknown key or a value of the wrong type stops start-up with a message that names
the key, because a silently ignored typo in an identity server's config is a security bug
waiting to happen (think `verify_tls: flase`).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(Exception):
    """The configuration cannot be used; the message names the offending key."""


# lookup.max_addresses at most: the lookup body cap grows with it (128 bytes an address), and
# 100,000 addresses already make a 13 MB request.
MAX_LOOKUP_ADDRESSES_LIMIT = 100_000


# Addresses an outbound request must never reach unless allow-listed: loopback, private,
# link-local, CGNAT, multicast, reserved and documentation ranges (IPv4 and IPv6), and the IPv6
# ranges that lead to an IPv4 address or to no public host (IANA's special-purpose registries).
DEFAULT_IP_BLOCKLIST = [
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.0.0.0/24",
    "192.0.2.0/24",
    "192.88.99.0/24",
    "192.168.0.0/16",
    "198.18.0.0/15",
    "198.51.100.0/24",
    "203.0.113.0/24",
    "224.0.0.0/4",
    "240.0.0.0/4",
    "255.255.255.255/32",
    "::/128",
    "::1/128",
    "::/96",  # IPv4-compatible (deprecated): ::a.b.c.d
    "::ffff:0:0/96",
    "::ffff:0:0:0/96",  # IPv4-translated (RFC 2765)
    "64:ff9b::/96",
    "64:ff9b:1::/48",  # local-use NAT64 (RFC 8215)
    "100::/64",
    "100:0:0:1::/64",  # dummy prefix (IANA special-purpose registry)
    "2001::/23",  # IETF protocol assignments: Teredo, ORCHIDv2 (2001:20::/28), benchmarking ...
    "2001:db8::/32",
    "2002::/16",  # 6to4: a relay carries it to the IPv4 address inside
    "3fff::/20",  # documentation (RFC 9637)
    "5f00::/16",  # SRv6 SIDs (RFC 9602)
    "fc00::/7",
    "fe80::/10",
    "fec0::/10",  # site-local (deprecated)
    "ff00::/8",
]


@dataclass
class ListenConfig:
    host: str = "127.0.0.1"
    port: int = 8090
    # Homeservers only ever call https://<id_server>/...; serve TLS directly when both are set.
    tls_certificate: str | None = None
    tls_private_key: str | None = None
    # Reverse proxies whose X-Forwarded-For we believe (IPs or networks); nobody else's.
    # They are also exempt from max_connections_per_ip (every client comes through them).
    trusted_proxies: list[str] = field(default_factory=list)
    # Slow requests (see sydent_lite/http/protocol.py): the request line and headers must
    # arrive within header_timeout_seconds of the accept (TLS handshake included), of the
    # request's first byte or of the previous response; a body may pause at most
    # body_idle_timeout_seconds and take body_timeout_seconds in all. Then 408 and close.
    header_timeout_seconds: float = 10.0
    body_idle_timeout_seconds: float = 15.0
    body_timeout_seconds: float = 60.0
    # The head of a request: request line and headers in bytes, header fields, target (URL).
    max_header_bytes: int = 32 * 1024
    max_headers: int = 100
    max_url_bytes: int = 8 * 1024
    # Open connections per process, and per client address (IPv6: per /64); beyond, 503.
    max_connections: int = 4096
    max_connections_per_ip: int = 100


@dataclass
class DatabaseConfig:
    # sqlite:///relative/path, sqlite:////absolute/path or postgresql+asyncpg://user@host/db
    url: str = "sqlite:///data/sydent_lite.db"


@dataclass
class SmtpConfig:
    host: str = "localhost"
    port: int = 25
    security: str = "none"  # none | starttls | tls
    username: str = ""
    password: str = ""
    timeout_seconds: float = 30.0


@dataclass
class EmailConfig:
    transport: str = "maildir"  # smtp | maildir
    maildir: str = "data/outbox"
    smtp: SmtpConfig = field(default_factory=SmtpConfig)
    # None: "Identity Server <noreply@{server host}>"
    from_: str | None = None
    templates_dir: str | None = None
    default_brand: str = "default"
    # Subject of the validation mail, available to templates as `subject`.
    validation_subject: str = "Confirm your email address for Matrix"
    # Subjects of invitation mails; %(name)s takes any store-invite field (as Sydent).
    invite_subject: str = "%(sender_display_name)s has invited you to chat"
    invite_subject_space: str = "%(sender_display_name)s has invited you to a space"
    # Where invite mails send people to join (templates: web_client_location), unless the
    # invitation names another web client (`org.matrix.web_client_location`, which Synapse
    # sets): honoured if it is an http(s) base URL and, when this list is not empty, in it.
    web_client_location: str = "https://app.element.io"
    allowed_web_client_locations: list[str] = field(default_factory=list)


@dataclass
class FederationConfig:
    verify_tls: bool = True
    # Extra CA certificates (PEM) to trust besides the system store, e.g. a private CA.
    ca_file: str | None = None
    ip_allowlist: list[str] = field(default_factory=list)
    ip_blocklist: list[str] = field(default_factory=lambda: list(DEFAULT_IP_BLOCKLIST))
    timeout_seconds: float = 10.0
    max_response_bytes: int = 1024 * 1024


@dataclass
class RateLimitConfig:
    enabled: bool = True
    # requestToken: sustained rate and burst, per client IP and per target address.
    request_token_per_ip_per_minute: float = 30.0
    request_token_per_ip_burst: int = 20
    request_token_per_address_per_hour: float = 10.0
    request_token_per_address_burst: int = 5
    # submitToken: per address, taken before the token is compared (bounds guessing across
    # every session of that address), and per client IP (every call).
    submit_token_per_address_per_day: float = 20.0
    submit_token_per_address_burst: int = 20
    submit_token_per_ip_per_minute: float = 20.0
    submit_token_per_ip_burst: int = 20
    # store-invite, per client IP and per invited address.
    store_invite_per_ip_per_minute: float = 30.0
    store_invite_per_ip_burst: int = 20
    store_invite_per_address_per_hour: float = 10.0
    store_invite_per_address_burst: int = 5
    # lookup / bulk_lookup requests, per user (v2; every token of the user) or client IP (v1).
    lookup_per_token_per_minute: float = 600.0
    lookup_per_token_burst: int = 100
    # Addresses looked up, on the same subjects: a lookup of N addresses costs N. The burst
    # takes a whole 10,000-address book twice over; the rate refills one in 10 minutes.
    lookup_addresses_per_minute: float = 1000.0
    lookup_addresses_burst: int = 20000
    # /account/register (each one a request to a homeserver), per client IP and per homeserver
    # host, checked before that request is made.
    register_per_ip_per_minute: float = 10.0
    register_per_ip_burst: int = 10
    register_per_server_per_minute: float = 60.0
    register_per_server_burst: int = 30
    # Where the buckets live, shared by every worker: Redis when set, else the database.
    redis_url: str | None = None


@dataclass
class LookupConfig:
    # Addresses (v2 lookup) or pairs (v1 bulk_lookup) one request may ask about (Sydent's
    # address_lookup_limit). The lookup endpoints' body cap is derived from it; every other
    # endpoint keeps its small one.
    max_addresses: int = 10_000


@dataclass
class MetricsConfig:
    # Prometheus metrics on a listener of their own, never on the public port.
    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = 9092
    path: str = "/metrics"


@dataclass
class SessionConfig:
    # A validation session expires this long after its last modification (spec: 24 hours).
    lifetime_seconds: int = 24 * 60 * 60
    # Length of the emailed validation token.
    email_token_length: int = 32
    # Wrong tokens (with the right client secret) a session survives; then it is dead.
    max_token_attempts: int = 5


@dataclass
class TwilioConfig:
    account_sid: str = ""
    auth_token: str = ""
    # Messages resource: POST {api_base_url}/2010-04-01/Accounts/{account_sid}/Messages.json
    api_base_url: str = "https://api.twilio.com"


@dataclass
class OpenMarketConfig:
    username: str = ""
    password: str = ""
    # Sydent's endpoint: POST {api_base_url}/sms/v4/mt
    api_base_url: str = "https://smsc.openmarket.com"


@dataclass
class WebhookConfig:
    # POST url with JSON {"to": msisdn, "text": ..., "originator": {"type", "text"} | null}
    url: str = ""
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class SmsConfig:
    # file: write each SMS into `outbox` (trying things out); twilio | openmarket | webhook.
    provider: str = "file"
    outbox: str = "data/sms_outbox"
    # The code people type in: this many digits.
    code_length: int = 6
    # The SMS text; {token} is the code (as Sydent's bodyTemplate).
    template: str = "Your code is {token}"
    # Sender per country calling code ("44") or "default", as Sydent: "alpha:Matrix",
    # "long:+447700900000" or "short:12345".
    originators: dict[str, str] = field(default_factory=dict)
    # ISO 3166-1 alpha-2 codes we never send to (400 M_DESTINATION_REJECTED).
    refused_countries: list[str] = field(default_factory=list)
    timeout_seconds: float = 15.0
    twilio: TwilioConfig = field(default_factory=TwilioConfig)
    openmarket: OpenMarketConfig = field(default_factory=OpenMarketConfig)
    webhook: WebhookConfig = field(default_factory=WebhookConfig)


@dataclass
class InviteConfig:
    # Stored invitations (and their ephemeral keys) older than this are deleted.
    expiry_seconds: int = 90 * 24 * 60 * 60
    # onbind callbacks: first retry after this, doubling up to the maximum, until delivered.
    onbind_retry_initial_seconds: float = 5.0
    onbind_retry_max_seconds: float = 3600.0
    # Each destination (homeserver) is delivered to on its own: at most this many callbacks
    # in flight to one, and at most this many destinations served at once (per process).
    onbind_max_in_flight_per_destination: int = 2
    onbind_max_destinations: int = 50
    # store-invite's `display_name` (the invitee's address, masked as Sydent does): how many
    # characters of the local part and of the domain it shows (`dav...@exa...`).
    display_name_reveal_local_part: int = 3
    display_name_reveal_domain: int = 3


@dataclass
class Config:
    server_name: str | None = None
    public_baseurl: str | None = None
    listen: ListenConfig = field(default_factory=ListenConfig)
    database: DatabaseConfig = field(default_factory=DatabaseConfig)
    signing_key_path: str = "data/signing.key"
    email: EmailConfig = field(default_factory=EmailConfig)
    terms_path: str | None = None
    federation: FederationConfig = field(default_factory=FederationConfig)
    rate_limits: RateLimitConfig = field(default_factory=RateLimitConfig)
    lookup: LookupConfig = field(default_factory=LookupConfig)
    sessions: SessionConfig = field(default_factory=SessionConfig)
    invites: InviteConfig = field(default_factory=InviteConfig)
    sms: SmsConfig = field(default_factory=SmsConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    log_level: str = "INFO"
    log_format: str = "text"

    # Derived values, filled in by finalise(); not settable from YAML.
    @property
    def effective_server_name(self) -> str:
        assert self.server_name is not None
        return self.server_name

    @property
    def base_url(self) -> str:
        assert self.public_baseurl is not None
        return self.public_baseurl.rstrip("/")

    @property
    def email_from(self) -> str:
        assert self.email.from_ is not None
        return self.email.from_


# YAML key -> dataclass attribute, where the YAML name is a Python keyword.
_RENAMED = {"from": "from_"}
_ATTR_TO_KEY = {v: k for k, v in _RENAMED.items()}


def _type_name(tp: Any) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}
    if tp in names:
        return names[tp]
    origin = typing.get_origin(tp)
    if origin is list:
        return "a list"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return str(tp)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], key)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping")
        return _build(tp, value, key + ".")
    if origin is dict:
        key_tp, value_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping")
        return {
            _coerce(str(k) if isinstance(k, int) else k, key_tp, f"{key}.{k}"): _coerce(v, value_tp, f"{key}.{k}")
            for k, v in value.items()
        }
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}' must be a list")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}' must be true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}' must be an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}' must be a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key '{key}' must be a string")
        return value
    raise ConfigError(f"config key '{key}' has an unsupported type")  # pragma: no cover


def _build(cls: type, data: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for raw_key, value in data.items():
        if not isinstance(raw_key, str):
            raise ConfigError(f"config key '{prefix}{raw_key}' is not a string")
        attr = _RENAMED.get(raw_key, raw_key)
        if attr not in fields or raw_key in _ATTR_TO_KEY:
            raise ConfigError(f"unknown config key '{prefix}{raw_key}'")
        tp = hints[attr]
        optional = typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in typing.get_args(tp)
        if value is None and not optional:
            # An empty YAML value for a section means "all defaults".
            if dataclasses.is_dataclass(tp):
                continue
            raise ConfigError(f"config key '{prefix}{raw_key}' must be {_type_name(tp)}, not empty")
        kwargs[attr] = _coerce(value, tp, prefix + raw_key)
    return cls(**kwargs)


def _choice(value: str, allowed: tuple[str, ...], key: str) -> None:
    if value not in allowed:
        raise ConfigError(f"config key '{key}' must be one of {', '.join(allowed)} (got {value!r})")


def _check_listen_limits(listen: ListenConfig) -> None:
    for key in ("header_timeout_seconds", "body_idle_timeout_seconds", "body_timeout_seconds"):
        if not getattr(listen, key) > 0:
            raise ConfigError(f"config key 'listen.{key}' must be positive")
    minimums = {"max_header_bytes": 1024, "max_headers": 16, "max_url_bytes": 256,
                "max_connections": 1, "max_connections_per_ip": 1}
    for key, minimum in minimums.items():
        if getattr(listen, key) < minimum:
            raise ConfigError(f"config key 'listen.{key}' must be at least {minimum}")
    if listen.max_url_bytes > listen.max_header_bytes:
        raise ConfigError("config key 'listen.max_url_bytes' must not exceed 'listen.max_header_bytes'")


def finalise(config: Config) -> Config:
    """Check cross-field rules and fill in values derived from others."""
    _choice(config.email.transport, ("smtp", "maildir"), "email.transport")
    _choice(config.email.smtp.security, ("none", "starttls", "tls"), "email.smtp.security")
    _choice(config.log_level.upper(), ("DEBUG", "INFO", "WARNING", "ERROR"), "log_level")
    _choice(config.log_format.lower(), ("text", "json"), "log_format")
    if config.metrics.enabled:
        if not (0 < config.metrics.port < 65536):
            raise ConfigError("config key 'metrics.port' must be between 1 and 65535")
        if config.metrics.port == config.listen.port:
            raise ConfigError("config key 'metrics.port' must differ from 'listen.port' (metrics are not public)")
        if not config.metrics.path.startswith("/"):
            raise ConfigError("config key 'metrics.path' must start with /")
    redis_url = config.rate_limits.redis_url
    if redis_url and not redis_url.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError("config key 'rate_limits.redis_url' must be a redis://, rediss:// or unix:// URL")
    max_addresses = config.lookup.max_addresses
    if not (1 <= max_addresses <= MAX_LOOKUP_ADDRESSES_LIMIT):
        raise ConfigError(f"config key 'lookup.max_addresses' must be between 1 and {MAX_LOOKUP_ADDRESSES_LIMIT:,}")
    burst = config.rate_limits.lookup_addresses_burst
    if config.rate_limits.enabled and burst < max_addresses:
        # A lookup of N addresses costs N at once: a smaller bucket could never pay for one.
        raise ConfigError(
            f"config key 'rate_limits.lookup_addresses_burst' ({burst}) must be at least 'lookup.max_addresses' "
            f"({max_addresses}): a lookup of that many addresses could never pass; raise the burst or lower "
            "lookup.max_addresses"
        )
    if not (0 < config.listen.port < 65536):
        raise ConfigError("config key 'listen.port' must be between 1 and 65535")
    _check_listen_limits(config.listen)
    if bool(config.listen.tls_certificate) != bool(config.listen.tls_private_key):
        raise ConfigError("config keys 'listen.tls_certificate' and 'listen.tls_private_key' go together")
    url = config.database.url
    if not (url.startswith("sqlite") or url.startswith("postgresql")):
        raise ConfigError("config key 'database.url' must be a sqlite:/// or postgresql:// URL")
    if url.startswith("sqlite") and url.split("?", 1)[0] in ("sqlite://", "sqlite:///", "sqlite:///:memory:"):
        raise ConfigError("config key 'database.url' must name a SQLite file: an in-memory database is not supported")
    for i, net in enumerate(config.listen.trusted_proxies):
        try:
            ipaddress.ip_network(net, strict=False)
        except ValueError:
            raise ConfigError(f"config key 'listen.trusted_proxies[{i}]' is not an IP network: {net!r}") from None
    for key in ("ip_allowlist", "ip_blocklist"):
        for i, net in enumerate(getattr(config.federation, key)):
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError:
                raise ConfigError(f"config key 'federation.{key}[{i}]' is not an IP network: {net!r}") from None
    _choice(config.sms.provider, ("file", "twilio", "openmarket", "webhook"), "sms.provider")
    if not (4 <= config.sms.code_length <= 12):
        raise ConfigError("config key 'sms.code_length' must be between 4 and 12")
    if "{token}" not in config.sms.template:
        raise ConfigError("config key 'sms.template' must contain {token}")
    for cc, spec in config.sms.originators.items():
        kind, sep, text = spec.partition(":")
        if not sep or kind not in ("alpha", "long", "short") or not text:
            raise ConfigError(f"config key 'sms.originators.{cc}' must look like alpha:NAME, long:NUMBER or short:CODE")
    config.sms.refused_countries = [c.upper() for c in config.sms.refused_countries]
    if config.sms.provider == "twilio" and not (config.sms.twilio.account_sid and config.sms.twilio.auth_token):
        raise ConfigError("sms.provider twilio needs 'sms.twilio.account_sid' and 'sms.twilio.auth_token'")
    if config.sms.provider == "openmarket" and not (config.sms.openmarket.username and config.sms.openmarket.password):
        raise ConfigError("sms.provider openmarket needs 'sms.openmarket.username' and 'sms.openmarket.password'")
    if config.sms.provider == "webhook" and not config.sms.webhook.url:
        raise ConfigError("sms.provider webhook needs 'sms.webhook.url'")
    if config.invites.onbind_retry_initial_seconds <= 0 or config.invites.onbind_retry_max_seconds <= 0:
        raise ConfigError("config keys 'invites.onbind_retry_*_seconds' must be positive")
    if config.invites.expiry_seconds <= 0:
        raise ConfigError("config key 'invites.expiry_seconds' must be positive")
    for key in ("onbind_max_in_flight_per_destination", "onbind_max_destinations"):
        if getattr(config.invites, key) < 1:
            raise ConfigError(f"config key 'invites.{key}' must be at least 1")
    for key in ("display_name_reveal_local_part", "display_name_reveal_domain"):
        if not (0 <= getattr(config.invites, key) <= 255):
            raise ConfigError(f"config key 'invites.{key}' must be between 0 and 255")
    if config.sessions.email_token_length < 8 or config.sessions.email_token_length > 255:
        raise ConfigError("config key 'sessions.email_token_length' must be between 8 and 255")
    if not (1 <= config.sessions.max_token_attempts <= 100):
        raise ConfigError("config key 'sessions.max_token_attempts' must be between 1 and 100")

    scheme = "https" if config.listen.tls_certificate else "http"
    host = config.listen.host
    display_host = f"[{host}]" if ":" in host else host
    if config.server_name is None:
        # Homeservers sign unbind requests for the identity server's host[:port].
        config.server_name = f"{display_host}:{config.listen.port}"
    if config.public_baseurl is None:
        config.public_baseurl = f"{scheme}://{display_host}:{config.listen.port}"
    if config.email.from_ is None:
        domain = config.server_name.rsplit(":", 1)[0] if not config.server_name.endswith("]") else config.server_name
        try:
            ipaddress.ip_address(domain.strip("[]"))
            domain = "localhost"  # an IP literal makes a poor mail domain
        except ValueError:
            pass
        config.email.from_ = f"Identity Server <noreply@{domain}>"
    return config


def load_config(path: str | Path | None) -> Config:
    """Load a YAML config file, or the embedded defaults when path is None."""
    if path is None:
        return finalise(Config())
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must contain a mapping at the top level")
    return finalise(_build(Config, data))


def config_from_dict(data: dict) -> Config:
    return finalise(_build(Config, data))
