"""The `sydent-lite` command line."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from sydent_lite.config import Config, ConfigError, load_config
from sydent_lite.signing import SigningKeyError


def _setup_logging(config: Config) -> None:
    logging.basicConfig(
        level=config.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # httpx logs every request URL at INFO, query strings (OpenID tokens) included.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)


def _cmd_serve(config: Config, workers: int = 1) -> int:
    from sydent_lite.server import serve

    return serve(config, workers=workers)


def _cmd_migrate(config: Config) -> int:
    from sydent_lite.storage.database import create_engine, migrate

    async def run() -> None:
        engine = create_engine(config.database.url)
        try:
            await migrate(engine)
        finally:
            await engine.dispose()

    asyncio.run(run())
    print("database schema is up to date")
    return 0


def _cmd_create_token(config: Config, user_id: str) -> int:
    """An identity-server token for a user without the OpenID exchange (operator tool, local use)."""
    from sydent_lite.secrets_util import hash_secret, now_ms, random_string
    from sydent_lite.services.accounts import TOKEN_LENGTH
    from sydent_lite.storage.accounts import AccountStore
    from sydent_lite.storage.database import create_engine, migrate
    from sydent_lite.threepids import is_valid_user_id

    if not is_valid_user_id(user_id):
        print(f"sydent-lite: {user_id!r} is not a Matrix user ID (@localpart:server)", file=sys.stderr)
        return 2
    token = random_string(TOKEN_LENGTH)

    async def run() -> None:
        engine = create_engine(config.database.url)
        try:
            await migrate(engine)
            await AccountStore(engine).add_token(hash_secret(token), user_id, now_ms())
        finally:
            await engine.dispose()

    asyncio.run(run())
    print(token)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sydent-lite", description="A Matrix identity server.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (
        ("serve", "run the server (applies migrations, creates the signing key if missing)"),
        ("migrate", "apply database migrations and exit"),
    ):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--config", "-c", metavar="PATH", help="YAML config file (default: embedded defaults)")
        if name == "serve":
            p.add_argument("--workers", type=int, default=1, metavar="N", help="worker processes (share one database)")
    p = sub.add_parser("create-token", help="print a new identity-server access token for a user (no homeserver needed)")
    p.add_argument("--config", "-c", metavar="PATH", help="YAML config file (default: embedded defaults)")
    p.add_argument("--user-id", required=True, help="the Matrix user ID the token belongs to")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigError as e:
        print(f"sydent-lite: {e}", file=sys.stderr)
        return 2
    _setup_logging(config)
    try:
        if args.command == "create-token":
            return _cmd_create_token(config, args.user_id)
        if args.command == "serve":
            if args.workers < 1:
                print("sydent-lite: --workers must be at least 1", file=sys.stderr)
                return 2
            return _cmd_serve(config, args.workers)
        return _cmd_migrate(config)
    except (ConfigError, SigningKeyError) as e:
        print(f"sydent-lite: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
