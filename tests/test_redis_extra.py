"""redis is an optional extra (`pip install 'sydent-lite[redis]'`): a config that sets
`rate_limits.redis_url` without it installed is refused at start-up, naming the key and the fix."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from sydent_lite import cli
from sydent_lite.config import ConfigError, config_from_dict

REDIS_CONFIG = {"rate_limits": {"redis_url": "redis://127.0.0.1:6379"}}


def test_redis_url_without_redis_installed_is_a_config_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "redis", None)  # what `import redis` sees when it is not installed
    with pytest.raises(ConfigError) as info:
        config_from_dict(REDIS_CONFIG)
    assert str(info.value) == (
        "config key 'rate_limits.redis_url' needs the redis package: pip install 'sydent-lite[redis]'"
    )
    # The command line says so and stops before touching the database.
    path = tmp_path / "config.yaml"
    path.write_text(
        f"database: {{url: 'sqlite:///{tmp_path}/db.sqlite'}}\n"
        f"signing_key_path: {tmp_path}/signing.key\n"
        "rate_limits: {redis_url: 'redis://127.0.0.1:6379'}\n"
    )
    assert cli.main(["migrate", "--config", str(path)]) == 2
    assert not (tmp_path / "db.sqlite").exists()
    assert "pip install 'sydent-lite[redis]'" in capsys.readouterr().err


def test_without_redis_url_redis_is_not_needed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "redis", None)
    assert config_from_dict({}).rate_limits.redis_url is None
    assert config_from_dict({"rate_limits": {"redis_url": ""}}).rate_limits.redis_url == ""


def test_redis_url_with_redis_installed_is_accepted() -> None:
    assert config_from_dict(REDIS_CONFIG).rate_limits.redis_url == "redis://127.0.0.1:6379"
