"""The `sydent-lite` command line."""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import TYPE_CHECKING

from sydent_lite.config import Config, ConfigError, load_config
from sydent_lite.observability.logs import setup_from_config
from sydent_lite.signing import SigningKeyError
from sydent_lite.storage.inline_sqlite import AiosqliteChanged
from sydent_lite.version import package_version

if TYPE_CHECKING:
    from signedjson.types import SigningKey


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
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
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
    pepper = sub.add_parser("pepper", help="the lookup pepper: rotate it now, or show the schedule")
    pepper_sub = pepper.add_subparsers(dest="pepper_command", required=True)
    p = with_config(pepper_sub.add_parser("rotate", help="prepare a new lookup pepper now and schedule it"))
    p.add_argument(
        "--activate-in",
        type=int,
        metavar="SECONDS",
        help="seconds from prepared to current (default: lookup.pepper_activation_delay_seconds)",
    )
    with_config(pepper_sub.add_parser("show", help="the current, previous and next pepper's times (not the peppers)"))
    p = sub.add_parser(
        "import-sydent",
        help="move a Sydent server here: its settings (--sydent-config) and data (its SQLite database)",
    )
    p.add_argument(
        "--config",
        "-c",
        metavar="PATH",
        help="our YAML config; with --sydent-config, the file to write (default sydent-lite.yaml; "
        "an existing one is used as it is)",
    )
    p.add_argument("sydent_db", nargs="?", metavar="PATH_TO_SYDENT_SQLITE_DB", help="default: sydent.conf's db.file")
    p.add_argument("--sydent-config", metavar="SYDENT_CONF", help="Sydent's sydent.conf: settings, key and database")
    p.add_argument(
        "--sydent-dir",
        metavar="DIR",
        help="Sydent's working directory, for the relative paths in sydent.conf (default: sydent.conf's folder)",
    )
    p.add_argument(
        "--database-url", metavar="URL", help="with --sydent-config: our database (default: SQLite beside the config)"
    )
    p.add_argument(
        "--signing-key",
        metavar="FILE",
        help="Sydent's signing key (a key file, or sydent.conf), so its signatures stay valid",
    )
    p.add_argument(
        "--new-signing-key",
        action="store_true",
        help="import without Sydent's key: re-sign with a new key (signatures clients kept stop verifying)",
    )
    p.add_argument(
        "--new-pepper",
        action="store_true",
        help="do not carry Sydent's lookup pepper over (clients' cached lookup hashes stop matching)",
    )
    return parser


def _cmd_admin(args: argparse.Namespace, config: Config) -> int:
    """The operator commands (lazy imports: `serve` should not pay for them)."""

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
        if args.command == "pepper":
            from sydent_lite.admin import peppers

            if args.pepper_command == "show":
                print("\n".join(asyncio.run(peppers.show(config))))
                return 0
            if args.activate_in is not None and args.activate_in < 0:
                print("sydent-lite: --activate-in must not be negative", file=sys.stderr)
                return 2
            status, lines = asyncio.run(peppers.rotate(config, args.activate_in))
            print("\n".join(lines), file=sys.stdout if status == 0 else sys.stderr)
            return status
        if args.command == "import-sydent":
            return _cmd_import(args, config)
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


def _cmd_import(args: argparse.Namespace, config: Config, signing_key: SigningKey | None = None) -> int:
    """The plain import: Sydent's database into ours, with `config` (ours)."""
    from pathlib import Path

    from sydent_lite.admin.sydent_import import SydentImportError, import_sydent
    from sydent_lite.admin.sydent_import.ownership import give_database_to_folder_owner

    if args.sydent_db is None:
        print("sydent-lite: give Sydent's database (PATH_TO_SYDENT_SQLITE_DB) or --sydent-config", file=sys.stderr)
        return 2
    if args.signing_key and args.new_signing_key:
        print("sydent-lite: --signing-key and --new-signing-key exclude each other", file=sys.stderr)
        return 2
    key_file = Path(args.signing_key) if args.signing_key else None
    try:
        counts = asyncio.run(
            import_sydent(
                config,
                Path(args.sydent_db),
                key_file,
                signing_key=None if key_file is not None else signing_key,
                new_signing_key=args.new_signing_key,
                new_pepper=args.new_pepper,
            )
        )
    except SydentImportError as e:
        print(f"sydent-lite: {e}", file=sys.stderr)
        return 2
    give_database_to_folder_owner(config.database.url)
    print("\n".join(counts.lines()))
    return 0


def _cmd_import_sydent_conf(args: argparse.Namespace) -> int:
    """`import-sydent --sydent-config`: our config from sydent.conf (written unless it exists), then the data."""
    from pathlib import Path

    from sydent_lite.admin.sydent_import import SydentImportError
    from sydent_lite.admin.sydent_import.config_out import settings_from_sydent, write_config
    from sydent_lite.admin.sydent_import.sydent_conf import read_sydent_conf

    out = Path(args.config or "sydent-lite.yaml")
    try:
        conf = read_sydent_conf(Path(args.sydent_config), Path(args.sydent_dir) if args.sydent_dir else None)
        existing = load_config(out) if out.exists() else None
        if existing is not None:
            database_url, key_path = existing.database.url, Path(existing.signing_key_path)
        else:
            here = out.resolve().parent
            database_url = args.database_url or f"sqlite:///{here / 'sydent_lite.db'}"
            key_path = here / "signing.key"
        settings = settings_from_sydent(conf, database_url=database_url, signing_key_path=key_path)
    except (SydentImportError, ConfigError, FileNotFoundError) as e:
        print(f"sydent-lite: {e}", file=sys.stderr)
        return 2
    for line in settings.report():
        print(line)
    if existing is None:
        write_config(settings, out, conf.path)
        print(f"wrote {out} from {conf.path}")
        config = load_config(out)
    else:
        print(f"using the existing {out} as it is (remove it to write it again from {conf.path})")
        config = existing
    setup_from_config(config)
    if args.sydent_db is None:
        args.sydent_db = str(settings.sydent_db)
    if settings.signing_key is None and not args.signing_key and not args.new_signing_key:
        print(f"note: {conf.path} has no [crypto] ed25519.signingkey (Sydent makes one at its first start)")
    return _cmd_import(args, config, settings.signing_key)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "generate-config":
        from sydent_lite.admin.operator import generate_config

        print(generate_config(args.server_name), end="")
        return 0
    if args.command == "import-sydent" and args.sydent_config:
        try:
            return _cmd_import_sydent_conf(args)
        except SigningKeyError as e:
            print(f"sydent-lite: {e}", file=sys.stderr)
            return 2
    try:
        config = load_config(args.config)
    except ConfigError as e:
        print(f"sydent-lite: {e}", file=sys.stderr)
        return 2
    setup_from_config(config)
    try:
        if args.command == "create-token":
            return _cmd_create_token(config, args.user_id)
        if args.command in ("keys", "associations", "bind", "import-sydent", "pepper"):
            return _cmd_admin(args, config)
        if args.command == "serve":
            return _cmd_serve(config, args.workers)
        return _cmd_migrate(config)
    except (ConfigError, SigningKeyError, AiosqliteChanged) as e:
        print(f"sydent-lite: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
