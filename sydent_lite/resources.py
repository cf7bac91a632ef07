"""Where the packaged data folders (templates, migrations) live.

An installed wheel carries the repository's top-level `templates/` and `migrations/` inside the
package as `_bundled/...` (see the force-include in pyproject.toml); a source checkout or an
editable install reads the top-level folders directly.
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent


def _data_dir(name: str) -> Path:
    bundled = _PACKAGE_DIR / "_bundled" / name
    if bundled.exists():
        return bundled
    return _PACKAGE_DIR.parent / name


def templates_dir() -> Path:
    """The folder holding the packaged template brands (`default/`, ...)."""
    return _data_dir("templates")


def migrations_dir() -> Path:
    """The Alembic migrations folder (env.py, versions/)."""
    return _data_dir("migrations")


def example_config() -> Path:
    """The documented example configuration (config.example.yaml)."""
    return _data_dir("config.example.yaml")
