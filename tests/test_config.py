"""Configuration: strict keys and types, defaults, and the CLI refusing a bad file."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from sydent_lite.config import ConfigError, config_from_dict, load_config

REPO = Path(__file__).resolve().parent.parent


def test_embedded_defaults() -> None:
    config = load_config(None)
    assert config.listen.host == "127.0.0.1" and config.listen.port == 8090
    assert config.database.url == "sqlite:///data/sydent_lite.db"
    assert config.signing_key_path == "data/signing.key"
    assert config.email.transport == "maildir" and config.email.maildir == "data/outbox"
    assert config.server_name == "127.0.0.1:8090"
    assert config.public_baseurl == "http://127.0.0.1:8090"
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
    import dataclasses

    def keys(obj: object, prefix: str = "") -> list[str]:
        out = []
        for f in dataclasses.fields(obj):  # type: ignore[arg-type]
            name = "from" if f.name == "from_" else f.name
            value = getattr(obj, f.name)
            out.append(name)
            if dataclasses.is_dataclass(value):
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
        ({"rate_limits": {"submit_token_per_address_burst": 2.5}},
         "'rate_limits.submit_token_per_address_burst' must be an integer"),
        ({"rate_limits": {"submit_token_per_ip_per_minute": "60"}},
         "'rate_limits.submit_token_per_ip_per_minute' must be a number"),
        ({"invites": {"display_name_reveal_local_part": -1}},
         "'invites.display_name_reveal_local_part' must be between 0 and 255"),
        ({"invites": {"display_name_reveal_domain": "3"}}, "'invites.display_name_reveal_domain' must be an integer"),
        ({"email": {"allowed_web_client_locations": "https://app.element.io"}},
         "'email.allowed_web_client_locations' must be a list"),
        ({"listen": {"header_timeout_seconds": 0}}, "'listen.header_timeout_seconds' must be positive"),
        ({"listen": {"body_timeout_seconds": -1}}, "'listen.body_timeout_seconds' must be positive"),
        ({"listen": {"max_headers": 5}}, "'listen.max_headers' must be at least 16"),
        ({"listen": {"max_connections_per_ip": 0}}, "'listen.max_connections_per_ip' must be at least 1"),
        ({"listen": {"max_url_bytes": 65536}}, "'listen.max_url_bytes' must not exceed 'listen.max_header_bytes'"),
        ({"listen": {"max_connections": "many"}}, "'listen.max_connections' must be an integer"),
    ],
)
def test_bad_config_names_the_key(data: dict, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        config_from_dict(data)
    assert message in str(e.value)


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
    assert config_from_dict({"rate_limits": {"lookup_addresses_burst": 5000},
                             "lookup": {"max_addresses": 5000}}).lookup.max_addresses == 5000
    assert config_from_dict({"rate_limits": {"lookup_addresses_burst": 50_000},
                             "lookup": {"max_addresses": 50_000}}).lookup.max_addresses == 50_000
    assert config_from_dict({"rate_limits": {"enabled": False, "lookup_addresses_burst": 10},
                             "lookup": {"max_addresses": 20_000}}).lookup.max_addresses == 20_000
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
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
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
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert "cannot use listen.tls_certificate and listen.tls_private_key" in proc.stderr
    assert "Traceback" not in proc.stderr
