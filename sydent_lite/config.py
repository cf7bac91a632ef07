"""Configuration: a YAML file validated into frozen pydantic models.

The key names are a public contract (operators keep their files across upgrades). Loading is
strict: an unknown key or a value of the wrong type stops start-up with a message that names
the key, because a silently ignored typo in an identity server's config is a security bug
waiting to happen (think `verify_tls: flase`). pydantic does the checking (types, choices,
ranges, the rules that span keys); `_describe` words its errors as operators have always read
them ("config key 'listen.port' must be an integer"). Values derived from others
(`effective_server_name`, `base_url`, `email_from`) are computed once, while validating.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Self, TypeVar, cast, get_args

import phonenumbers
import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    PrivateAttr,
    ValidationError,
    model_validator,
)
from pydantic_core import ErrorDetails


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


# --- rules on one value: the message reads "config key '<key>' <wording>" ----------------------


class _NamesItsKeys(ValueError):
    """A rule's message that names its keys itself (a rule spanning several keys)."""


_V = TypeVar("_V")


def _rule(ok: Callable[[Any], bool], wording: str, error: type[ValueError] = ValueError) -> AfterValidator:
    def check(value: _V) -> _V:
        if not ok(value):
            raise error(wording)
        return value

    return AfterValidator(check)


def _between(low: int, high: int) -> AfterValidator:
    return _rule(lambda v: low <= v <= high, f"must be between {low} and {high}")


def _at_least(minimum: int) -> AfterValidator:
    return _rule(lambda v: v >= minimum, f"must be at least {minimum}")


_POSITIVE = _rule(lambda v: v > 0, "must be positive")


def _ip_network(value: str) -> str:
    try:
        ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise ValueError(f"is not an IP network: {value!r}") from None
    return value


def _keys_as_strings(value: Any) -> Any:
    # YAML reads `44:` as an integer; these mappings are keyed by strings.
    if isinstance(value, dict):
        return {str(k) if isinstance(k, int) else k: v for k, v in value.items()}
    return value


def _empty_is_none(value: Any) -> Any:
    return None if isinstance(value, str) and not value.strip() else value


def _upper(value: Any) -> Any:
    return value.upper() if isinstance(value, str) else value


def _lower(value: Any) -> Any:
    return value.lower() if isinstance(value, str) else value


_HOSTNAME = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?$"
)


def _is_ehlo_name(value: str) -> bool:
    """RFC 5321 4.1.1.1: a domain, or an address literal ([192.0.2.1], [IPv6:2001:db8::1])."""
    if value.startswith("[") and value.endswith("]"):
        literal = value[1:-1]
        if literal[:5].lower() == "ipv6:":
            literal = literal[5:]
        try:
            ipaddress.ip_address(literal)
        except ValueError:
            return False
        return True
    return bool(_HOSTNAME.match(value))


def _is_country(code: str) -> bool:
    # phonenumbers' regions: a typo in an allow list would otherwise refuse a whole country.
    return code in phonenumbers.SUPPORTED_REGIONS


def _country_keys(value: Any) -> Any:
    # ISO codes in any case ("gb"); "default" as it is.
    if isinstance(value, dict):
        return {k.upper() if isinstance(k, str) and k.lower() != "default" else k: v for k, v in value.items()}
    return value


Port = Annotated[int, _between(1, 65535)]
Country = Annotated[
    str, BeforeValidator(_upper), _rule(_is_country, "must be an ISO 3166-1 alpha-2 country code (e.g. GB)")
]
CountryKey = Annotated[
    str,
    _rule(lambda k: k == "default" or _is_country(k), 'must be an ISO 3166-1 alpha-2 country code or "default"'),
]
PositiveSeconds = Annotated[float, _POSITIVE]
IpNetwork = Annotated[str, AfterValidator(_ip_network)]
StringMapping = Annotated[dict[str, str], BeforeValidator(_keys_as_strings)]

EmailTransport = Literal["smtp", "maildir"]
SmtpSecurity = Literal["none", "starttls", "tls"]
SmsProviderName = Literal["file", "twilio", "openmarket", "webhook"]
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]
LogFormat = Literal["text", "json"]
OriginatorType = Literal["alpha", "long", "short"]


@dataclass(frozen=True)
class Originator:
    """Who an SMS comes from: a sender name, a (long) phone number or a short code."""

    type: OriginatorType
    text: str

    def __str__(self) -> str:
        """Sydent's form, as in the config file: "alpha:Matrix"."""
        return f"{self.type}:{self.text}"


def parse_originator(value: object) -> Originator:
    """Sydent's originator form: "alpha:Matrix", "long:+447700900000" or "short:12345"."""
    if isinstance(value, Originator):
        return value
    if not isinstance(value, str):
        raise ValueError("must be a string")
    kind, sep, text = value.partition(":")
    if not sep or kind not in get_args(OriginatorType) or not text:
        raise ValueError("must look like alpha:NAME, long:NUMBER or short:CODE")
    return Originator(cast(OriginatorType, kind), text)


def parse_originators(value: object) -> tuple[Originator, ...]:
    """One originator or several: a list, or a string of them separated by commas (Sydent's
    `originators.<cc> = long:+44..., long:+44...`)."""
    if isinstance(value, str):
        items: list[object] = [part.strip() for part in value.split(",")]
    elif isinstance(value, Originator):
        items = [value]
    elif isinstance(value, list | tuple):
        items = list(value)
    else:
        raise ValueError("must be a string or a list of strings")
    if not items:
        raise ValueError("must name at least one originator")
    return tuple(parse_originator(item) for item in items)


def _originators_spec(originators: tuple[Originator, ...]) -> list[str]:
    return [str(o) for o in originators]


# Parsed while loading (delivery gets Originator values), written back in the file's form.
OriginatorSpecs = Annotated[
    tuple[Originator, ...], PlainValidator(parse_originators), PlainSerializer(_originators_spec)
]


# --- the sections -------------------------------------------------------------------------------


class _Section(BaseModel):
    """A mapping of the config file: unknown keys and loose types refused, read-only once loaded."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _empty_means_defaults(cls, data: Any) -> Any:
        # An empty YAML value for a section (`federation:` and nothing under it): all defaults.
        return {} if data is None else data


class ListenConfig(_Section):
    host: str = "127.0.0.1"
    port: Port = 8090
    # Homeservers only ever call https://<id_server>/...; serve TLS directly when both are set.
    tls_certificate: str | None = None
    tls_private_key: str | None = None
    # Reverse proxies whose X-Forwarded-For we believe (IPs or networks); nobody else's.
    # They are also exempt from max_connections_per_ip (every client comes through them).
    trusted_proxies: list[IpNetwork] = Field(default_factory=list)
    # Slow requests (see sydent_lite/http/protocol.py): the request line and headers must
    # arrive within header_timeout_seconds of the accept (TLS handshake included), of the
    # request's first byte or of the previous response; a body may pause at most
    # body_idle_timeout_seconds and take body_timeout_seconds in all. Then 408 and close.
    header_timeout_seconds: PositiveSeconds = 10.0
    body_idle_timeout_seconds: PositiveSeconds = 15.0
    body_timeout_seconds: PositiveSeconds = 60.0
    # The head of a request: request line and headers in bytes, header fields, target (URL).
    max_header_bytes: Annotated[int, _at_least(1024)] = 32 * 1024
    max_headers: Annotated[int, _at_least(16)] = 100
    max_url_bytes: Annotated[int, _at_least(256)] = 8 * 1024
    # Open connections per process, and per client address (IPv6: per /64); beyond, 503.
    max_connections: Annotated[int, _at_least(1)] = 4096
    max_connections_per_ip: Annotated[int, _at_least(1)] = 100

    @model_validator(mode="after")
    def _rules(self) -> Self:
        if self.max_url_bytes > self.max_header_bytes:
            raise _NamesItsKeys("config key 'listen.max_url_bytes' must not exceed 'listen.max_header_bytes'")
        if bool(self.tls_certificate) != bool(self.tls_private_key):
            raise _NamesItsKeys("config keys 'listen.tls_certificate' and 'listen.tls_private_key' go together")
        return self


_IN_MEMORY_SQLITE = ("sqlite://", "sqlite:///", "sqlite:///:memory:")


class DatabaseConfig(_Section):
    # sqlite:///relative/path, sqlite:////absolute/path or postgresql+asyncpg://user@host/db
    url: Annotated[
        str,
        _rule(lambda url: url.startswith(("sqlite", "postgresql")), "must be a sqlite:/// or postgresql:// URL"),
        # Every connection (the hot reader's too) would see a database of its own.
        _rule(
            lambda url: url.split("?", 1)[0] not in _IN_MEMORY_SQLITE,
            "must name a SQLite file: an in-memory database is not supported",
        ),
    ] = "sqlite:///data/sydent_lite.db"


class SmtpConfig(_Section):
    host: str = "localhost"
    port: int = 25
    security: SmtpSecurity = "none"
    username: str = ""
    password: str = ""
    timeout_seconds: float = 30.0


class EmailConfig(_Section):
    transport: EmailTransport = "maildir"
    maildir: str = "data/outbox"
    smtp: SmtpConfig = Field(default_factory=SmtpConfig)
    # Our name in SMTP EHLO/HELO and in Message-IDs (Sydent's email.hostname). None: the host
    # of server_name (an IP literal as [address]).
    hostname: Annotated[str, _rule(_is_ehlo_name, "must be a host name or an [address] literal")] | None = None
    # None: "Identity Server <noreply@{server host}>" (Config.email_from). The key is `from`.
    from_: str | None = Field(default=None, alias="from")
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
    allowed_web_client_locations: list[str] = Field(default_factory=list)


class FederationConfig(_Section):
    verify_tls: bool = True
    # Extra CA certificates (PEM) to trust besides the system store, e.g. a private CA.
    ca_file: str | None = None
    ip_allowlist: list[IpNetwork] = Field(default_factory=list)
    ip_blocklist: list[IpNetwork] = Field(default_factory=lambda: list(DEFAULT_IP_BLOCKLIST))
    timeout_seconds: float = 10.0
    max_response_bytes: int = 1024 * 1024


def _redis_installed(url: str) -> bool:
    # redis is an optional dependency (the `redis` extra): say so at start-up, not at the first
    # rate-limited request.
    return not url or importlib.util.find_spec("redis") is not None


RedisUrl = Annotated[
    str,
    _rule(
        lambda url: not url or url.startswith(("redis://", "rediss://", "unix://")),
        "must be a redis://, rediss:// or unix:// URL",
    ),
    _rule(_redis_installed, "needs the redis package: pip install 'sydent-lite[redis]'"),
]


class RateLimitConfig(_Section):
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
    # ... and per inviter (the `sender` Matrix ID), as Sydent's email.ratelimit_sender.*
    # (5 at once, then one per 5 minutes).
    store_invite_per_sender_per_hour: float = 12.0
    store_invite_per_sender_burst: int = 5
    # SMS sent per destination country (ISO 3166-1 alpha-2, or "default" for every country
    # not listed), per hour; the burst is the same number. Empty: no limit per country.
    sms_per_country_per_hour: Annotated[
        dict[CountryKey, Annotated[int, _at_least(1)]], BeforeValidator(_country_keys)
    ] = Field(default_factory=dict)
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
    redis_url: RedisUrl | None = None


class LookupConfig(_Section):
    # Addresses (v2 lookup) or pairs (v1 bulk_lookup) one request may ask about (Sydent's
    # address_lookup_limit). The lookup endpoints' body cap is derived from it; every other
    # endpoint keeps its small one.
    max_addresses: Annotated[
        int,
        _rule(lambda n: 1 <= n <= MAX_LOOKUP_ADDRESSES_LIMIT, f"must be between 1 and {MAX_LOOKUP_ADDRESSES_LIMIT:,}"),
    ] = 10_000
    # Lookup pepper rotation (services.peppers). A new pepper every this many seconds (0: only
    # by hand, `sydent-lite pepper rotate`); the default, a day, bounds what a leaked batch of
    # hashes is good for to a day, at the cost of one rehash of every association a day.
    pepper_rotation_seconds: Annotated[int, _rule(lambda n: n >= 0, "must not be negative")] = 86_400
    # After a rotation, lookups made with the previous pepper are still answered for this long.
    previous_pepper_grace_seconds: Annotated[int, _rule(lambda n: n >= 0, "must not be negative")] = 3_600
    # A prepared pepper becomes current this long after its hashes are written: every worker
    # loads it before then, each at a moment drawn in the first half (not all at once).
    pepper_activation_delay_seconds: Annotated[int, _rule(lambda n: n >= 0, "must not be negative")] = 300
    # Every association's lookup hash and mxid held in each process's memory (~85 bytes each),
    # where lookups confirm their candidates; false: by an indexed read of the database instead
    # (no memory, but ~0.4 ms a 1,000-hash lookup on SQLite, ~1 ms of PostgreSQL's CPU).
    mxids_in_memory: bool = True

    @model_validator(mode="after")
    def _rotation_rules(self) -> Self:
        window = self.previous_pepper_grace_seconds + self.pepper_activation_delay_seconds
        if self.pepper_rotation_seconds and self.pepper_rotation_seconds <= window:
            # At most two peppers are live at once: a rotation waits for the previous one to retire.
            raise _NamesItsKeys(
                "config key 'lookup.pepper_rotation_seconds' must be 0 or more than "
                "'lookup.previous_pepper_grace_seconds' + 'lookup.pepper_activation_delay_seconds'"
            )
        return self


class MetricsConfig(_Section):
    # Prometheus metrics on a listener of their own, never on the public port.
    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = 9092
    path: str = "/metrics"

    @model_validator(mode="after")
    def _rules(self) -> Self:
        # Only a listener that will be opened needs a usable address.
        if self.enabled:
            if not 0 < self.port < 65536:
                raise _NamesItsKeys("config key 'metrics.port' must be between 1 and 65535")
            if not self.path.startswith("/"):
                raise _NamesItsKeys("config key 'metrics.path' must start with /")
        return self


class SessionConfig(_Section):
    # A validation session expires this long after its last modification (spec: 24 hours).
    lifetime_seconds: int = 24 * 60 * 60
    # Length of the emailed validation token.
    email_token_length: Annotated[int, _between(8, 255)] = 32
    # Wrong tokens (with the right client secret) a session survives; then it is dead.
    max_token_attempts: Annotated[int, _between(1, 100)] = 5


class TwilioConfig(_Section):
    account_sid: str = ""
    auth_token: str = ""
    # Messages resource: POST {api_base_url}/2010-04-01/Accounts/{account_sid}/Messages.json
    api_base_url: str = "https://api.twilio.com"


class OpenMarketConfig(_Section):
    username: str = ""
    password: str = ""
    # Sydent's endpoint: POST {api_base_url}/sms/v4/mt
    api_base_url: str = "https://smsc.openmarket.com"


class WebhookConfig(_Section):
    # POST url with JSON {"to": msisdn, "text": ..., "originator": {"type", "text"} | null}
    url: str = ""
    headers: StringMapping = Field(default_factory=dict)


class SmsConfig(_Section):
    # file: write each SMS into `outbox` (trying things out); twilio | openmarket | webhook.
    provider: SmsProviderName = "file"
    outbox: str = "data/sms_outbox"
    # The code people type in: this many digits.
    code_length: Annotated[int, _between(4, 12)] = 6
    # The SMS text; {token} is the code (as Sydent's bodyTemplate).
    template: Annotated[str, _rule(lambda t: "{token}" in t, "must contain {token}")] = "Your code is {token}"
    # Sender per country calling code ("44") or "default", as Sydent: "alpha:Matrix",
    # "long:+447700900000" or "short:12345", or a list of them (a number always gets the same
    # one of the list, picked from its digits as Sydent does).
    originators: Annotated[dict[str, OriginatorSpecs], BeforeValidator(_keys_as_strings)] = Field(default_factory=dict)
    # ISO 3166-1 alpha-2 codes we never send to (400 M_DESTINATION_REJECTED); any case.
    refused_countries: list[Annotated[str, AfterValidator(str.upper)]] = Field(default_factory=list)
    # Not empty: we send only to these countries (ISO 3166-1 alpha-2), others as refused.
    allowed_countries: list[Country] = Field(default_factory=list)
    timeout_seconds: float = 15.0
    twilio: TwilioConfig = Field(default_factory=TwilioConfig)
    openmarket: OpenMarketConfig = Field(default_factory=OpenMarketConfig)
    webhook: WebhookConfig = Field(default_factory=WebhookConfig)

    @model_validator(mode="after")
    def _provider_settings(self) -> Self:
        if self.provider == "twilio" and not (self.twilio.account_sid and self.twilio.auth_token):
            raise _NamesItsKeys("sms.provider twilio needs 'sms.twilio.account_sid' and 'sms.twilio.auth_token'")
        if self.provider == "openmarket" and not (self.openmarket.username and self.openmarket.password):
            raise _NamesItsKeys("sms.provider openmarket needs 'sms.openmarket.username' and 'sms.openmarket.password'")
        if self.provider == "webhook" and not self.webhook.url:
            raise _NamesItsKeys("sms.provider webhook needs 'sms.webhook.url'")
        return self


RetrySeconds = Annotated[
    float, _rule(lambda s: s > 0, "config keys 'invites.onbind_retry_*_seconds' must be positive", _NamesItsKeys)
]


class InviteConfig(_Section):
    # Stored invitations (and their ephemeral keys) older than this are deleted.
    expiry_seconds: Annotated[int, _POSITIVE] = 90 * 24 * 60 * 60
    # onbind callbacks: first retry after this, doubling up to the maximum, until delivered.
    onbind_retry_initial_seconds: RetrySeconds = 5.0
    onbind_retry_max_seconds: RetrySeconds = 3600.0
    # Each destination (homeserver) is delivered to on its own: at most this many callbacks
    # in flight to one, and at most this many destinations served at once (per process).
    onbind_max_in_flight_per_destination: Annotated[int, _at_least(1)] = 2
    onbind_max_destinations: Annotated[int, _at_least(1)] = 50
    # store-invite's `display_name` (the invitee's address, masked as Sydent does): how many
    # characters of the local part and of the domain it shows (`dav...@exa...`).
    display_name_reveal_local_part: Annotated[int, _between(0, 255)] = 3
    display_name_reveal_domain: Annotated[int, _between(0, 255)] = 3
    # Invite abuse (Sydent's email.third_party_invite_*_blocklist): store-invite is refused
    # (403 M_UNAUTHORIZED) from users of these homeservers (the `sender`'s server name, exactly,
    # any case), for these rooms (exact room IDs), or when a keyword (any case) appears in a
    # field the inviter wrote (room name, sender display name, ...; see docs/api-behaviour.md).
    blocked_homeservers: list[str] = Field(default_factory=list)
    blocked_room_ids: list[str] = Field(default_factory=list)
    blocked_keywords: list[Annotated[str, _rule(bool, "must not be empty (it would match every invite)")]] = Field(
        default_factory=list
    )
    # Once an onbind callback has delivered an address's invites, delete them (as Sydent's
    # delete_tokens_on_bind); false keeps them, marked delivered, until expiry_seconds.
    delete_tokens_on_bind: bool = True


class AccessConfig(_Section):
    # Not empty: only users of these homeservers (server names, any case) may register
    # (/account/register), bind and store invites (Sydent's homeserver_allow_list). v1 has no
    # user to check, so as in Sydent it requires v1_enabled: false.
    homeserver_allow_list: list[Annotated[str, AfterValidator(str.lower)]] = Field(default_factory=list)
    # false: no /_matrix/identity/api/v1 endpoint at all (Sydent's enable_v1_access).
    v1_enabled: bool = True
    # false: no v1 /3pid/bind (Sydent's enable_v1_associations); off whenever v1 is.
    v1_associations_enabled: bool = True

    @property
    def v1_bind_enabled(self) -> bool:
        return self.v1_enabled and self.v1_associations_enabled

    @model_validator(mode="after")
    def _rules(self) -> Self:
        if self.homeserver_allow_list and self.v1_enabled:
            raise _NamesItsKeys(
                "config key 'access.homeserver_allow_list' needs 'access.v1_enabled: false': v1 requests carry no "
                "user whose homeserver could be checked"
            )
        return self


def is_loopback_host(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class InternalApiConfig(_Section):
    # Sydent's internal API (/_matrix/identity/internal/bind and /unbind): binds any address to
    # any Matrix ID without authentication, so it listens on a loopback address only.
    enabled: bool = False
    host: Annotated[
        str,
        _rule(
            is_loopback_host, "must be a loopback address (127.0.0.1, ::1 or localhost): the API has no authentication"
        ),
    ] = "127.0.0.1"
    port: Port = 8091


class Config(_Section):
    # None: derived from listen.* (effective_server_name, base_url).
    server_name: str | None = None
    public_baseurl: str | None = None
    listen: ListenConfig = Field(default_factory=ListenConfig)
    database: DatabaseConfig = Field(default_factory=DatabaseConfig)
    signing_key_path: str = "data/signing.key"
    email: EmailConfig = Field(default_factory=EmailConfig)
    # None or empty: no terms (an empty value means no terms to Sydent too).
    terms_path: Annotated[str | None, BeforeValidator(_empty_is_none)] = None
    federation: FederationConfig = Field(default_factory=FederationConfig)
    rate_limits: RateLimitConfig = Field(default_factory=RateLimitConfig)
    lookup: LookupConfig = Field(default_factory=LookupConfig)
    sessions: SessionConfig = Field(default_factory=SessionConfig)
    invites: InviteConfig = Field(default_factory=InviteConfig)
    sms: SmsConfig = Field(default_factory=SmsConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    access: AccessConfig = Field(default_factory=AccessConfig)
    internal_api: InternalApiConfig = Field(default_factory=InternalApiConfig)
    # Unhandled errors reported to Sentry (needs the `sentry` extra: pip install sydent-lite[sentry]).
    sentry_dsn: str | None = None
    # Any case in the file ("debug"); kept in the case shown here.
    log_level: Annotated[LogLevel, BeforeValidator(_upper)] = "INFO"
    log_format: Annotated[LogFormat, BeforeValidator(_lower)] = "text"
    # The access line starts with the client's address (listen.trusted_proxies honoured).
    log_client_address: bool = True

    # Derived values: computed once, while validating; not settable from YAML.
    _server_name: str = PrivateAttr()
    _base_url: str = PrivateAttr()
    _email_from: str = PrivateAttr()

    @property
    def effective_server_name(self) -> str:
        return self._server_name

    @property
    def base_url(self) -> str:
        """public_baseurl without a trailing slash."""
        return self._base_url

    @property
    def email_from(self) -> str:
        return self._email_from

    @model_validator(mode="after")
    def _rules_across_sections(self) -> Self:
        if self.metrics.enabled and self.metrics.port == self.listen.port:
            raise _NamesItsKeys("config key 'metrics.port' must differ from 'listen.port' (metrics are not public)")
        if self.internal_api.enabled and self.internal_api.port in (
            self.listen.port,
            self.metrics.port if self.metrics.enabled else None,
        ):
            raise _NamesItsKeys("config key 'internal_api.port' must differ from 'listen.port' and 'metrics.port'")
        max_addresses = self.lookup.max_addresses
        burst = self.rate_limits.lookup_addresses_burst
        if self.rate_limits.enabled and burst < max_addresses:
            # A lookup of N addresses costs N at once: a smaller bucket could never pay for one.
            raise _NamesItsKeys(
                f"config key 'rate_limits.lookup_addresses_burst' ({burst}) must be at least 'lookup.max_addresses' "
                f"({max_addresses}): a lookup of that many addresses could never pass; raise the burst or lower "
                "lookup.max_addresses"
            )
        return self

    @model_validator(mode="after")
    def _derive(self) -> Self:
        scheme = "https" if self.listen.tls_certificate else "http"
        host = self.listen.host
        display_host = f"[{host}]" if ":" in host else host
        # Homeservers sign unbind requests for the identity server's host[:port].
        self._server_name = self.server_name if self.server_name is not None else f"{display_host}:{self.listen.port}"
        public_baseurl = self.public_baseurl
        if public_baseurl is None:
            public_baseurl = f"{scheme}://{display_host}:{self.listen.port}"
        self._base_url = public_baseurl.rstrip("/")
        self._email_from = self.email.from_ if self.email.from_ is not None else _default_from(self._server_name)
        return self


def _default_from(server_name: str) -> str:
    domain = server_name.rsplit(":", 1)[0] if not server_name.endswith("]") else server_name
    try:
        ipaddress.ip_address(domain.strip("[]"))
        domain = "localhost"  # an IP literal makes a poor mail domain
    except ValueError:
        pass
    return f"Identity Server <noreply@{domain}>"


# --- pydantic's errors in our words -------------------------------------------------------------

_MUST_BE = {
    "bool_type": "true or false",
    "int_type": "an integer",
    "float_type": "a number",
    "string_type": "a string",
    "list_type": "a list",
    "dict_type": "a mapping",
    "model_type": "a mapping",
}


def _key(loc: tuple[int | str, ...]) -> str:
    """('listen', 'trusted_proxies', 0) -> listen.trusted_proxies[0]"""
    key = ""
    for part in loc:
        key += f"[{part}]" if isinstance(part, int) else f".{part}" if key else part
    return key


def _describe(error: ErrorDetails) -> str:
    """One validation error as start-up reports it, naming the key as the file spells it."""
    kind, value, loc = error["type"], error["input"], error["loc"]
    if loc and loc[-1] == "[key]":  # a mapping's key, not its value, is wrong: name the key
        loc = loc[:-1]
    key = _key(loc)
    if kind == "extra_forbidden":
        return f"unknown config key '{key}'"
    if kind == "invalid_key":  # a key that is not a string (loc ends with it)
        return f"config key '{_key(loc[:-1])}{'.' if len(loc) > 1 else ''}{loc[-1]}' is not a string"
    if kind == "literal_error" and isinstance(value, str):
        choices = re.findall(r"'([^']*)'", error.get("ctx", {}).get("expected", ""))
        return f"config key '{key}' must be one of {', '.join(choices)} (got {value!r})"
    if kind == "literal_error":
        kind = "string_type"  # every choice is a string
    if kind in _MUST_BE:
        return f"config key '{key}' must be {_MUST_BE[kind]}" + (", not empty" if value is None else "")
    reason = error.get("ctx", {}).get("error")
    if kind == "value_error" and isinstance(reason, _NamesItsKeys):
        return str(reason)
    if kind == "value_error" and isinstance(reason, ValueError):
        return f"config key '{key}' {reason}"
    return f"config key '{key}' is not valid: {error['msg']}"  # pragma: no cover (a type not used here)


# --- loading ------------------------------------------------------------------------------------


def config_from_dict(data: Mapping[str, Any]) -> Config:
    """The configuration from YAML-shaped data (the file's key names); ConfigError names each bad key."""
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError("\n".join(_describe(error) for error in e.errors(include_url=False))) from None


def load_config(path: str | Path | None) -> Config:
    """Load a YAML config file, or the embedded defaults when path is None."""
    if path is None:
        return config_from_dict({})
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
    return config_from_dict(data)
