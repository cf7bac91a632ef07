"""The `sydent-lite` command line."""

from __future__ import annotations

import argparse
import asyncio
import sys

from sydent_lite.config import Config, ConfigError, load_config
from sydent_lite.observability.logs import setup_from_config
from sydent_lite.signing import SigningKeyError
from sydent_lite.storage.inline_sqlite import AiosqliteChanged


def _cmd_serve(config: Config, workers: int) -> int:
    from sydent_lite.server import serve

    return serve(config, workers)


def _cmd_migrate(config: Config) -> int:
    from sydent_lite.storage.database import migrate_database

    asyncio.run(migrate_database(config.database.url))
    print("database schema is up to date")
    return 0


def _cmd_create_token(config: Config, user_id: str) -> int:
    """An identity-server token for a user without the OpenID exchange (operator tool, local use)."""
    from sydent_lite.secrets_util import hash_secret, now_ms, random_string
    from sydent_lite.services.accounts import TOKEN_LENGTH
    from sydent_lite.storage.accounts import AccountStore
    from sydent_lite.storage.database import migrate, open_database
    from sydent_lite.threepids import is_valid_user_id

    if not is_valid_user_id(user_id):
        print(f"sydent-lite: {user_id!r} is not a Matrix user ID (@localpart:server)", file=sys.stderr)
        return 2
    token = random_string(TOKEN_LENGTH)

    async def run() -> None:
        database = open_database(config.database.url)
        try:
            await migrate(database)
            await AccountStore(database).add_token(hash_secret(token), user_id, now_ms())
        finally:
            await database.dispose()

    asyncio.run(run())
    print(token)
    return 0


def _positive_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
    if not 1 <= n <= 256:
        raise argparse.ArgumentTypeError("must be between 1 and 256")
    return n


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
            p.add_argument(
                "--workers",
                "-w",
                type=_positive_int,
                default=1,
                metavar="N",
                help="worker processes sharing the port (state is in the database; use PostgreSQL for N > 1)",
            )

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--config", "-c", metavar="PATH", help="YAML config file (default: embedded defaults)")
        return p

    def with_target(p: argparse.ArgumentParser) -> None:
        with_config(p)
        p.add_argument("--medium", choices=["email", "msisdn"], help="medium of --address")
        p.add_argument("--address", help="the email address or phone number (digits or +international)")
        p.add_argument("--mxid", help="a Matrix user ID: everything about that person")

    p = with_config(
        sub.add_parser(
            "create-token", help="print a new identity-server access token for a user (no homeserver needed)"
        )
    )
    p.add_argument("--user-id", required=True, help="the Matrix user ID the token belongs to")
    p = sub.add_parser("generate-config", help="print a documented config file to start from")
    p.add_argument("--server-name", help="fill in server_name and public_baseurl")
    keys = sub.add_parser("keys", help="the signing key").add_subparsers(dest="keys_command", required=True)
    with_config(keys.add_parser("show", help="print the key id and public key"))
    with_config(keys.add_parser("generate", help="create the signing key file (refuses to replace one)"))
    assoc = sub.add_parser("associations", help="look at or delete what is stored about a person")
    assoc_sub = assoc.add_subparsers(dest="associations_command", required=True)
    with_target(assoc_sub.add_parser("show", help="print associations of an address or a Matrix ID"))
    with_target(assoc_sub.add_parser("delete", help="delete everything stored about an address or a Matrix ID"))
    p = with_config(sub.add_parser("bind", help="bind an address to a Matrix ID by hand (as Sydent's script)"))
    p.add_argument("--medium", choices=["email", "msisdn"], required=True)
    p.add_argument("--address", required=True)
    p.add_argument("--mxid", required=True)
    p = with_config(sub.add_parser("import-sydent", help="move a Sydent server's data (SQLite database) here"))
    p.add_argument("sydent_db", metavar="PATH_TO_SYDENT_SQLITE_DB")
    p.add_argument("--signing-key", metavar="FILE", help="Sydent's signing key file, so its signatures stay valid")
    return parser


def _cmd_admin(args: argparse.Namespace, config: Config) -> int:
    """The operator commands (lazy imports: `serve` should not pay for them)."""
    from pathlib import Path

    from sydent_lite.admin import operator
    from sydent_lite.errors import MatrixError

    try:
        if args.command == "keys":
            if args.keys_command == "show":
                print(operator.show_key(config))
            else:
                print(operator.generate_key(config.signing_key_path))
            return 0
        if args.command == "bind":
            print(
                operator.dumps(
                    asyncio.run(operator.bind_by_hand(config, medium=args.medium, address=args.address, mxid=args.mxid))
                )
            )
            return 0
        if args.command == "import-sydent":
            from sydent_lite.admin.sydent_import import SydentImportError, import_sydent

            key = Path(args.signing_key) if args.signing_key else None
            try:
                counts = asyncio.run(import_sydent(config, Path(args.sydent_db), key))
            except SydentImportError as e:
                print(f"sydent-lite: {e}", file=sys.stderr)
                return 2
            print("\n".join(counts.lines()))
            return 0
        # associations show|delete
        if (args.mxid is None) == (args.address is None) or (args.address is not None and args.medium is None):
            print("sydent-lite: give either --mxid, or --medium with --address", file=sys.stderr)
            return 2
        person = operator.person_as_typed(medium=args.medium, address=args.address, mxid=args.mxid)
        if args.associations_command == "show":
            print(operator.dumps(asyncio.run(operator.show_associations(config, person))))
        else:
            print(operator.removed_report(asyncio.run(operator.delete_person(config, person))))
        return 0
    except (MatrixError, FileExistsError, FileNotFoundError) as e:
        message = e.error if isinstance(e, MatrixError) else str(e)
        print(f"sydent-lite: {message}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "generate-config":
        from sydent_lite.admin.operator import generate_config

        print(generate_config(args.server_name), end="")
        return 0
    try:
        config = load_config(args.config)
    except ConfigError as e:
        print(f"sydent-lite: {e}", file=sys.stderr)
        return 2
    setup_from_config(config)
    try:
        if args.command == "create-token":
            return _cmd_create_token(config, args.user_id)
        if args.command in ("keys", "associations", "bind", "import-sydent"):
            return _cmd_admin(args, config)
        if args.command == "serve":
            return _cmd_serve(config, args.workers)
        return _cmd_migrate(config)
    except (ConfigError, SigningKeyError, AiosqliteChanged) as e:
        print(f"sydent-lite: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
