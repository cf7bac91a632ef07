"""Configuration: strict keys and types, defaults, and the CLI refusing a bad file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel, ValidationError

from sydent_lite.config import ConfigError, Originator, config_from_dict, load_config

REPO = Path(__file__).resolve().parent.parent


def test_embedded_defaults() -> None:
    config = load_config(None)
    assert config.listen.host == "127.0.0.1" and config.listen.port == 8090
    assert config.database.url == "sqlite:///data/sydent_lite.db"
    assert config.signing_key_path == "data/signing.key"
    assert config.email.transport == "maildir" and config.email.maildir == "data/outbox"
    # The keys keep what the file says (nothing: derive); the derived values are computed once.
    assert config.server_name is None and config.public_baseurl is None
    assert config.effective_server_name == "127.0.0.1:8090"
    assert config.base_url == "http://127.0.0.1:8090"
    assert config.email_from == "Identity Server <noreply@localhost>"
    assert "10.0.0.0/8" in config.federation.ip_blocklist and "127.0.0.0/8" in config.federation.ip_blocklist
    assert {"::/96", "2002::/16", "fec0::/10", "64:ff9b:1::/48", "3fff::/20", "5f00::/16"} <= set(
        config.federation.ip_blocklist
    )


def test_example_config_loads_and_documents_every_key() -> None:
    config = load_config(REPO / "config.example.yaml")
    assert config.server_name == "id.example.org"
    assert config.public_baseurl == "https://id.example.org"
    text = (REPO / "config.example.yaml").read_text()

    # Every settable key of every section appears in the example.
    def keys(model: BaseModel) -> list[str]:
        out = []
        for name, field in type(model).model_fields.items():
            value = getattr(model, name)
            out.append(field.alias or name)
            if isinstance(value, BaseModel):
                out.extend(keys(value))
        return out

    for key in keys(config):
        assert f"{key}:" in text, f"config.example.yaml does not document '{key}'"


@pytest.mark.parametrize(
    "data, message",
    [
        ({"listen": {"prot": 1}}, "unknown config key 'listen.prot'"),
        ({"nonsense": 1}, "unknown config key 'nonsense'"),
        ({"email": {"smtp": {"hots": "x"}}}, "unknown config key 'email.smtp.hots'"),
        ({"email": {"from_": "x"}}, "unknown config key 'email.from_'"),
        ({"listen": {"port": "8090"}}, "'listen.port' must be an integer"),
        ({"listen": {"port": True}}, "'listen.port' must be an integer"),
        ({"listen": {"port": 70000}}, "'listen.port' must be between"),
        ({"federation": {"verify_tls": "flase"}}, "'federation.verify_tls' must be true or false"),
        ({"federation": {"ip_allowlist": "127.0.0.1"}}, "'federation.ip_allowlist' must be a list"),
        ({"federation": {"ip_blocklist": ["not-a-net"]}}, "'federation.ip_blocklist[0]' is not an IP network"),
        ({"email": {"transport": "carrier-pigeon"}}, "'email.transport' must be one of smtp, maildir"),
        ({"email": {"smtp": {"security": "ssl"}}}, "'email.smtp.security' must be one of none, starttls, tls"),
        ({"database": {"url": "mysql://x"}}, "'database.url'"),
        ({"database": 5}, "'database' must be a mapping"),
        ({"server_name": 5}, "'server_name' must be a string"),
        ({"listen": {"tls_certificate": "/x.pem"}}, "go together"),
        ({"rate_limits": {"enabled": None}}, "'rate_limits.enabled' must be true or false, not empty"),
        ({"sessions": {"max_token_attempts": 0}}, "'sessions.max_token_attempts' must be between 1 and 100"),
        ({"sessions": {"max_token_attempts": 101}}, "'sessions.max_token_attempts' must be between 1 and 100"),
        ({"sessions": {"max_token_attempts": "5"}}, "'sessions.max_token_attempts' must be an integer"),
        (
            {"rate_limits": {"submit_token_per_address_burst": 2.5}},
            "'rate_limits.submit_token_per_address_burst' must be an integer",
        ),
        (
            {"rate_limits": {"submit_token_per_ip_per_minute": "60"}},
            "'rate_limits.submit_token_per_ip_per_minute' must be a number",
        ),
        (
            {"invites": {"display_name_reveal_local_part": -1}},
            "'invites.display_name_reveal_local_part' must be between 0 and 255",
        ),
        ({"invites": {"display_name_reveal_domain": "3"}}, "'invites.display_name_reveal_domain' must be an integer"),
        (
            {"email": {"allowed_web_client_locations": "https://app.element.io"}},
            "'email.allowed_web_client_locations' must be a list",
        ),
        ({"listen": {"header_timeout_seconds": 0}}, "'listen.header_timeout_seconds' must be positive"),
        ({"listen": {"body_timeout_seconds": -1}}, "'listen.body_timeout_seconds' must be positive"),
        ({"listen": {"max_headers": 5}}, "'listen.max_headers' must be at least 16"),
        ({"listen": {"max_connections_per_ip": 0}}, "'listen.max_connections_per_ip' must be at least 1"),
        ({"listen": {"max_url_bytes": 65536}}, "'listen.max_url_bytes' must not exceed 'listen.max_header_bytes'"),
        ({"listen": {"max_connections": "many"}}, "'listen.max_connections' must be an integer"),
    ],
)
def test_bad_config_names_the_key(data: dict[Any, Any], message: str) -> None:
    with pytest.raises(ConfigError) as e:
        config_from_dict(data)
    assert message in str(e.value)


@pytest.mark.parametrize(
    "data, message",
    [
        # The whole message, word for word: operators (and scripts) read these.
        ({"email": {"transport": "smpt"}}, "config key 'email.transport' must be one of smtp, maildir (got 'smpt')"),
        ({"email": {"transport": 5}}, "config key 'email.transport' must be a string"),
        (
            {"sms": {"provider": "sns"}},
            "config key 'sms.provider' must be one of file, twilio, openmarket, webhook (got 'sns')",
        ),
        ({"log_level": "verbose"}, "config key 'log_level' must be one of DEBUG, INFO, WARNING, ERROR (got 'VERBOSE')"),
        ({"log_format": "XML"}, "config key 'log_format' must be one of text, json (got 'xml')"),
        ({1: "x"}, "config key '1' is not a string"),
        ({"listen": {2: "x"}}, "config key 'listen.2' is not a string"),
        ({"listen": {"port": None}}, "config key 'listen.port' must be an integer, not empty"),
        (
            {"listen": {"trusted_proxies": ["127.0.0.1", "x"]}},
            "config key 'listen.trusted_proxies[1]' is not an IP network: 'x'",
        ),
        (
            {"listen": {"tls_private_key": "/k.pem"}},
            "config keys 'listen.tls_certificate' and 'listen.tls_private_key' go together",
        ),
        ({"listen": {"max_header_bytes": 1000}}, "config key 'listen.max_header_bytes' must be at least 1024"),
        (
            {"metrics": {"enabled": True, "port": 8090}},
            "config key 'metrics.port' must differ from 'listen.port' (metrics are not public)",
        ),
        ({"metrics": {"enabled": True, "port": 0}}, "config key 'metrics.port' must be between 1 and 65535"),
        ({"metrics": {"enabled": True, "path": "metrics"}}, "config key 'metrics.path' must start with /"),
        (
            {"rate_limits": {"redis_url": "http://127.0.0.1:6379"}},
            "config key 'rate_limits.redis_url' must be a redis://, rediss:// or unix:// URL",
        ),
        ({"database": {"url": "mysql://x"}}, "config key 'database.url' must be a sqlite:/// or postgresql:// URL"),
        ({"sms": {"code_length": 3}}, "config key 'sms.code_length' must be between 4 and 12"),
        ({"sms": {"template": "Your code"}}, "config key 'sms.template' must contain {token}"),
        (
            {"sms": {"originators": {44: "beta:x"}}},
            "config key 'sms.originators.44' must look like alpha:NAME, long:NUMBER or short:CODE",
        ),
        (
            {"sms": {"originators": {"default": 5}}},
            "config key 'sms.originators.default' must be a string or a list of strings",
        ),
        ({"sms": {"webhook": {"headers": {"X-Key": 5}}}}, "config key 'sms.webhook.headers.X-Key' must be a string"),
        (
            {"sms": {"provider": "twilio", "twilio": {"account_sid": "AC1"}}},
            "sms.provider twilio needs 'sms.twilio.account_sid' and 'sms.twilio.auth_token'",
        ),
        (
            {"sms": {"provider": "openmarket"}},
            "sms.provider openmarket needs 'sms.openmarket.username' and 'sms.openmarket.password'",
        ),
        ({"sms": {"provider": "webhook"}}, "sms.provider webhook needs 'sms.webhook.url'"),
        ({"invites": {"onbind_retry_max_seconds": 0}}, "config keys 'invites.onbind_retry_*_seconds' must be positive"),
        ({"invites": {"expiry_seconds": 0}}, "config key 'invites.expiry_seconds' must be positive"),
        (
            {"invites": {"onbind_max_destinations": 0}},
            "config key 'invites.onbind_max_destinations' must be at least 1",
        ),
        ({"sessions": {"email_token_length": 7}}, "config key 'sessions.email_token_length' must be between 8 and 255"),
        # Newly worded with the move to pydantic (they named a Python type, or left out "not empty").
        ({"sms": {"originators": None}}, "config key 'sms.originators' must be a mapping, not empty"),
        (
            {"federation": {"ip_allowlist": [None]}},
            "config key 'federation.ip_allowlist[0]' must be a string, not empty",
        ),
    ],
)
def test_messages_word_for_word(data: dict[Any, Any], message: str) -> None:
    with pytest.raises(ConfigError) as e:
        config_from_dict(data)
    assert str(e.value) == message


def test_every_bad_key_is_named_at_once() -> None:
    with pytest.raises(ConfigError) as e:
        config_from_dict({"listen": {"port": "8090", "hostt": "::"}, "sms": {"code_length": 20}})
    assert str(e.value).splitlines() == [
        "config key 'listen.port' must be an integer",
        "unknown config key 'listen.hostt'",
        "config key 'sms.code_length' must be between 4 and 12",
    ]


def test_loose_spellings_that_are_accepted() -> None:
    config = config_from_dict(
        {
            "log_level": "debug",
            "log_format": "JSON",  # any case, as before
            "listen": {"header_timeout_seconds": 3},  # an integer where a number goes
            "sms": {"originators": {44: "alpha:Matrix"}, "refused_countries": ["gb", "Fr"]},  # YAML's integer key
        }
    )
    assert (config.log_level, config.log_format) == ("DEBUG", "json")
    assert config.listen.header_timeout_seconds == 3.0 and isinstance(config.listen.header_timeout_seconds, float)
    assert config.sms.originators == {"44": (Originator("alpha", "Matrix"),)}
    assert config.sms.refused_countries == ["GB", "FR"]


@pytest.mark.parametrize(
    "data, server_name, base_url, email_from",
    [
        ({}, "127.0.0.1:8090", "http://127.0.0.1:8090", "Identity Server <noreply@localhost>"),
        (
            {"listen": {"host": "::1", "port": 8443, "tls_certificate": "c.pem", "tls_private_key": "k.pem"}},
            "[::1]:8443",
            "https://[::1]:8443",
            "Identity Server <noreply@localhost>",
        ),
        (
            {"server_name": "id.test:8443", "public_baseurl": "https://id.test/"},
            "id.test:8443",
            "https://id.test",
            "Identity Server <noreply@id.test>",
        ),
        (
            {"server_name": "id.test", "email": {"from": "Me <me@id.test>"}},
            "id.test",
            "http://127.0.0.1:8090",
            "Me <me@id.test>",
        ),
    ],
)
def test_derived_values(data: dict[str, Any], server_name: str, base_url: str, email_from: str) -> None:
    config = config_from_dict(data)
    assert (config.effective_server_name, config.base_url, config.email_from) == (server_name, base_url, email_from)


def test_loaded_config_is_read_only() -> None:
    config = load_config(None)
    with pytest.raises(ValidationError):
        config.listen.port = 1
    with pytest.raises(ValidationError):
        config.server_name = "elsewhere"


def test_workers_get_the_config_back_as_it_was() -> None:
    # What `serve --workers N` hands each worker (server.CONFIG_ENV): the model's JSON, read back
    # as a config file would be; no hand-written inverse to forget a key or a renamed one.
    config = config_from_dict(
        {
            **yaml.safe_load((REPO / "config.example.yaml").read_text()),
            "email": {"from": "Me <me@id.test>", "transport": "smtp", "smtp": {"password": "pw", "timeout_seconds": 5}},
            "sms": {
                "originators": {44: "alpha:Matrix", "default": "long:+447700900000"},
                "refused_countries": ["gb"],
                "provider": "webhook",
                "webhook": {"url": "https://hook.test/", "headers": {"X-Key": "k"}},
            },
            "log_level": "debug",
        }
    )
    dumped = json.loads(config.model_dump_json(by_alias=True))
    assert dumped["email"]["from"] == "Me <me@id.test>" and "from_" not in dumped["email"]
    assert dumped["sms"]["originators"] == {"44": ["alpha:Matrix"], "default": ["long:+447700900000"]}
    again = config_from_dict(dumped)
    assert again == config
    assert (again.effective_server_name, again.base_url, again.email_from) == (
        config.effective_server_name,
        config.base_url,
        config.email_from,
    )
    assert load_config(None) == config_from_dict(json.loads(load_config(None).model_dump_json(by_alias=True)))


def test_lookup_max_addresses_and_the_address_burst() -> None:
    config = load_config(None)
    assert config.lookup.max_addresses == 10_000  # as Sydent's address_lookup_limit
    assert config.rate_limits.lookup_addresses_burst >= config.lookup.max_addresses
    # A burst below the largest lookup could never pay for one: start-up stops, naming both keys.
    with pytest.raises(ConfigError) as e:
        config_from_dict({"rate_limits": {"lookup_addresses_burst": 5000}})
    assert "'rate_limits.lookup_addresses_burst' (5000)" in str(e.value)
    assert "'lookup.max_addresses' (10000)" in str(e.value)
    with pytest.raises(ConfigError):
        config_from_dict({"lookup": {"max_addresses": 30_000}})  # above the default burst
    # Lowered together, raised together, or with rate limits off: fine.
    assert (
        config_from_dict(
            {"rate_limits": {"lookup_addresses_burst": 5000}, "lookup": {"max_addresses": 5000}}
        ).lookup.max_addresses
        == 5000
    )
    assert (
        config_from_dict(
            {"rate_limits": {"lookup_addresses_burst": 50_000}, "lookup": {"max_addresses": 50_000}}
        ).lookup.max_addresses
        == 50_000
    )
    assert (
        config_from_dict(
            {"rate_limits": {"enabled": False, "lookup_addresses_burst": 10}, "lookup": {"max_addresses": 20_000}}
        ).lookup.max_addresses
        == 20_000
    )
    for bad in (0, -1, 100_001):
        with pytest.raises(ConfigError) as e:
            config_from_dict({"rate_limits": {"enabled": False}, "lookup": {"max_addresses": bad}})
        assert "'lookup.max_addresses' must be between 1 and 100,000" in str(e.value)
    with pytest.raises(ConfigError) as e:
        config_from_dict({"lookup": {"max_addresses": "10000"}})
    assert "'lookup.max_addresses' must be an integer" in str(e.value)
    with pytest.raises(ConfigError) as e:
        config_from_dict({"lookup": {"max_adresses": 10}})
    assert "unknown config key 'lookup.max_adresses'" in str(e.value)


def test_guessing_defaults() -> None:
    # docs/api-behaviour.md states the odds of guessing a code with exactly these.
    config = load_config(None)
    assert config.sessions.max_token_attempts == 5
    rl = config.rate_limits
    assert (rl.submit_token_per_address_per_day, rl.submit_token_per_address_burst) == (20.0, 20)
    assert (rl.submit_token_per_ip_per_minute, rl.submit_token_per_ip_burst) == (20.0, 20)
    assert (config.sms.code_length, config.sessions.email_token_length) == (6, 32)
    for edge in (1, 100):
        assert config_from_dict({"sessions": {"max_token_attempts": edge}}).sessions.max_token_attempts == edge


def test_from_key_and_empty_sections() -> None:
    config = config_from_dict({"email": {"from": "Me <me@id.test>"}, "federation": None, "server_name": "id.test"})
    assert config.email_from == "Me <me@id.test>"
    assert config.federation.verify_tls is True
    assert config.server_name == "id.test"


def test_cli_refuses_bad_config_before_starting(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("listen:\n  port: 8090\n  hostt: 0.0.0.0\n")
    proc = subprocess.run(
        [sys.executable, "-m", "sydent_lite", "serve", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert "unknown config key 'listen.hostt'" in proc.stderr
    assert "listening on" not in proc.stdout + proc.stderr


def test_cli_refuses_unreadable_and_non_mapping_files(tmp_path: Path) -> None:
    for content, message in (("- a\n- b\n", "must contain a mapping"), ("a: [\n", "not valid YAML")):
        path = tmp_path / "c.yaml"
        path.write_text(content)
        with pytest.raises(ConfigError) as e:
            load_config(path)
        assert message in str(e.value)
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.yaml")


def test_unusable_tls_files_stop_start_up_naming_the_keys(tmp_path: Path) -> None:
    path = tmp_path / "tls.yaml"
    path.write_text(f"listen:\n  tls_certificate: {tmp_path}/missing.pem\n  tls_private_key: {tmp_path}/missing.key\n")
    proc = subprocess.run(
        [sys.executable, "-m", "sydent_lite", "serve", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert "cannot use listen.tls_certificate and listen.tls_private_key" in proc.stderr
    assert "Traceback" not in proc.stderr
