"""`import-sydent --sydent-config`: the move from a real Sydent 2.6.1 in one command, and its traps.

Everything starts from what the real Sydent wrote (tests/fixtures/sydent-2.6.1: its
sydent.conf with the signing key inside, its SQLite database, its templates and terms), copied
into a folder laid out as Sydent's working directory. Each trap of issue 16 is a test that
does what went wrong, and shows it no longer does: a re-import resurrecting an erased person,
an import without Sydent's key, a failure half-way, an import under a running server, the lookup
pepper, a key file the service user cannot read.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path
from typing import Any

import pytest
import signedjson.key
import signedjson.sign
import yaml
from signedjson.types import SigningKey
from sqlalchemy import select
from support.db import allow_inserts, refuse_inserts
from support.server import SydentServer

from sydent_lite.admin import operator
from sydent_lite.admin.operator import generate_config
from sydent_lite.admin.sydent_import import SydentImportError, import_sydent
from sydent_lite.admin.sydent_import.config_out import settings_from_sydent
from sydent_lite.admin.sydent_import.keys import parse_signing_key_value
from sydent_lite.admin.sydent_import.settings_map import (
    SETTINGS,
    Conversion,
    convert_option,
    markdown_table,
    setting_for,
)
from sydent_lite.admin.sydent_import.sydent_conf import read_sydent_conf
from sydent_lite.config import config_from_dict, load_config
from sydent_lite.context import load_static_parts
from sydent_lite.services.hashing import PEPPER_KEY
from sydent_lite.signing import SigningKeyError, load_or_create_signing_key
from sydent_lite.storage.database import migrate_database, open_database
from sydent_lite.storage.erasures import MXID, subject_hash
from sydent_lite.storage.people import MatrixUser, ThreePid
from sydent_lite.storage.serving_lock import take_serving_lock
from sydent_lite.storage.tables import (
    accepted_terms,
    accounts,
    associations,
    erasures,
    invites,
    server_state,
    validation_sessions,
)

FIXTURES = Path(__file__).parent / "fixtures" / "sydent-2.6.1"
FACTS: dict[str, Any] = json.loads((FIXTURES / "facts.json").read_text(encoding="utf-8"))
REPO = Path(__file__).resolve().parent.parent
V1 = "/_matrix/identity/api/v1"
V2 = "/_matrix/identity/v2"
_key = parse_signing_key_value(FACTS["signing_key_in_conf"])
assert _key is not None
SYDENT_KEY: SigningKey = _key
SERVER_NAME = FACTS["server_name"]
# The stored (case-folded) address of each association Sydent held, and its facts.
STORED = {f["address_casefolded"]: f for f in FACTS["associations"].values() if f["expected_mxid"]}
BOUND = {address: f["expected_mxid"] for address, f in STORED.items()}


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def sydent_folder(tmp_path: Path) -> Path:
    """Sydent's working directory: sydent.conf, sydent.db, res/, terms.yaml (a copy)."""
    folder = tmp_path / "sydent"
    shutil.copytree(FIXTURES, folder)
    return folder


def fixture_age_seconds(folder: Path) -> int:
    """How long ago the real Sydent wrote the fixture's newest validation session."""
    with contextlib.closing(sqlite3.connect(folder / "sydent.db")) as conn:
        (newest_ms,) = conn.execute("SELECT MAX(mtime) FROM threepid_validation_sessions").fetchone()
    return max(0, int(time.time() - newest_ms / 1000))


def cli(*args: str, cwd: Path | None = None, user: str | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, "-m", "sydent_lite", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=str(cwd or REPO),
        env=env,
        user=user,
    )


def one_command(folder: Path, out: Path, database_url: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return cli(
        "import-sydent",
        "--sydent-config",
        str(folder / "sydent.conf"),
        "--config",
        str(out),
        "--database-url",
        database_url,
        *extra,
    )


def our_config(url: str, key_path: Path) -> Any:
    return config_from_dict({"server_name": SERVER_NAME, "database": {"url": url}, "signing_key_path": str(key_path)})


async def _select(url: str, query: Any) -> list[dict[str, Any]]:
    database = open_database(url)
    try:
        async with database.connect() as conn:
            return [dict(r) for r in (await conn.execute(query)).mappings()]
    finally:
        await database.dispose()


def select_all(url: str, query: Any) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = run(_select(url, query))
    return rows


def dump(url: str) -> dict[str, list[tuple[Any, ...]]]:
    tables = (associations, invites, validation_sessions, accounts, accepted_terms, erasures, server_state)
    return {t.name: sorted(tuple(r.values()) for r in select_all(url, select(t))) for t in tables}


def printed_counts(stdout: str) -> dict[str, int]:
    out = {}
    for line in stdout.splitlines():
        name, sep, value = line.partition(": ")
        if sep and value.isdigit():
            out[name] = int(value)
    return out


# --- one command, served as Sydent served it -----------------------------------------------------


def test_one_command_then_serve_as_sydent(db_factory, smtp_sink, homeserver, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    db = db_factory.create()
    folder = sydent_folder(tmp_path)
    out = tmp_path / "sydent-lite" / "config.yaml"
    proc = one_command(folder, out, db.url)
    assert proc.returncode == 0, proc.stderr
    # What could not be mapped is said, with why; secrets are not printed.
    assert "not mapped: [http] replication.https.port: sydent_lite does not replicate" in proc.stdout
    assert "not mapped: [peer.id2.sydent.test] base_replication_url" in proc.stdout
    assert "sms-fixture-password" not in proc.stdout + proc.stderr
    counts = printed_counts(proc.stdout)
    assert counts["associations_imported"] == len(BOUND) and counts["signing_key_imported"] == 1
    assert counts["lookup_pepper_from_sydent"] == 1 and counts["invites_imported"] > 0

    # The config says what sydent.conf said.
    assert out.stat().st_mode & 0o777 == 0o600
    written = yaml.safe_load(out.read_text())
    config = load_config(out)
    assert config.effective_server_name == SERVER_NAME and config.base_url == FACTS["public_base_url"]
    assert (config.listen.host, config.listen.port, config.lookup.max_addresses) == ("127.0.0.1", 18090, 5000)
    assert config.email.from_ == "Sydent Test Identity <noreply@id.sydent.test>"
    assert (config.email.smtp.host, config.email.smtp.port, config.email.transport) == ("127.0.0.1", 18025, "smtp")
    assert config.email.default_brand == "vector-im" and Path(config.email.templates_dir or "") == folder / "res"
    assert Path(config.terms_path or "") == folder / "terms.yaml"
    assert "fe80::/10" in config.federation.ip_blocklist and config.federation.ip_allowlist == ["127.0.0.1"]
    assert (config.invites.display_name_reveal_local_part, config.invites.display_name_reveal_domain) == (4, 5)
    assert config.sms.template == "Your Sydent Test code is {token}" and config.sms.provider == "openmarket"
    assert "US" in config.sms.refused_countries and written["sms"]["originators"]["1"] == "short:12345"
    assert config.metrics.enabled and config.metrics.port == 18092
    assert load_or_create_signing_key(config.signing_key_path).encode() == SYDENT_KEY.encode()

    # The same command again: our config is kept as it is, nothing changes.
    before = dump(db.url)
    again = one_command(folder, out, db.url)
    assert again.returncode == 0 and f"using the existing {out} as it is" in again.stdout, again.stderr
    assert printed_counts(again.stdout)["associations_already_present"] == len(BOUND)
    assert dump(db.url) == before and yaml.safe_load(out.read_text()) == written

    # Served from that config (the test's own ports, mail sink and homeserver stand-in).
    overrides: dict[str, dict[str, Any]] = {
        "listen": {"trusted_proxies": []},
        "metrics": {"enabled": False},
        "rate_limits": {"enabled": False},
        # The fixture's sessions are as old as the fixture: a lifetime that still covers them.
        "sessions": {"lifetime_seconds": fixture_age_seconds(folder) + 86_400},
        "email": {"smtp": {"host": "127.0.0.1", "port": smtp_sink.port}},
        "federation": {"ip_blocklist": written["federation"]["ip_blocklist"], "ip_allowlist": ["127.0.0.0/8"]},
        "sms": {"provider": "file", "outbox": str(tmp_path / "sms")},
    }
    extra = {k: v for k, v in written.items() if k not in ("listen", "database")}
    if "internal_api" in written:  # Sydent's fixture listens on 18091: not in a test
        overrides["internal_api"] = {"enabled": False}
    for section, values in overrides.items():
        extra[section] = {**extra.get(section, {}), **values}
    server = SydentServer(
        tmp_path / "server",
        database_url=db.url,
        smtp_port=smtp_sink.port,
        ca_file=homeserver.ca_path,
        terms_path=config.terms_path,
        templates_dir=config.email.templates_dir,
        extra_config=extra,
        name="sydent_lite (from sydent.conf)",
    )
    server.start()
    try:
        c = server.client
        assert c.get(f"{V1}/pubkey/ed25519:0").json() == FACTS["pubkey_ed25519_0"]
        # v1 lookups: Sydent's signed associations, byte for byte.
        for address, facts in STORED.items():
            resp = c.get(f"{V1}/lookup", params={"medium": "email", "address": address})
            assert resp.json() == facts["v1_lookup_casefolded"], address
        bulk = c.post(f"{V1}/bulk_lookup", json=FACTS["v1_bulk_lookup"]["request"])
        # Every answer Sydent gave; Sydent's bulk_lookup also misses an address typed in mixed
        # case that its single lookup finds (we find it in both).
        answered = set(map(tuple, bulk.json()["threepids"]))
        assert set(map(tuple, FACTS["v1_bulk_lookup"]["response"]["threepids"])) <= answered
        assert answered - set(map(tuple, FACTS["v1_bulk_lookup"]["response"]["threepids"])) == {
            ("email", "Mixed.Case@Example.TEST", "@mixed.case:127.0.0.1:18448")
        }
        # v2 with Sydent's token, pepper and the hashes a client computed against Sydent.
        alice = {"Authorization": f"Bearer {FACTS['accounts']['alice']['access_token']}"}
        details = c.get(f"{V2}/hash_details", headers=alice).json()
        assert details["lookup_pepper"] == FACTS["hash_details"]["lookup_pepper"]
        assert sorted(details["algorithms"]) == sorted(FACTS["hash_details"]["algorithms"])
        resp = c.post(f"{V2}/lookup", headers=alice, json=FACTS["v2_lookup"]["request"])
        assert resp.status_code == 200 and resp.json() == FACTS["v2_lookup"]["response"], resp.text

        # The pending session's mailed link (Sydent's) validates here. (Sydent keeps no next_link
        # in its database, so the page says "done" where Sydent redirected to the link's nextLink.)
        pending = FACTS["sessions"]["pending"]
        link = urllib.parse.urlsplit(pending["link"])
        resp = c.get(f"{link.path}?{link.query}")
        assert resp.status_code == 200 and "Verification successful" in resp.text, resp.text
        resp = c.get(
            f"{V1}/3pid/getValidated3pid", params={"sid": pending["sid"], "client_secret": pending["client_secret"]}
        )
        assert resp.status_code == 200 and resp.json()["address"] == "pending.user@example.test", resp.text

        # An invite Sydent stored is delivered when its address is bound here.
        invite = FACTS["invites"]["room"]
        mxid = homeserver.user_id("invitee1")
        run(operator.bind_by_hand(config, medium="email", address=invite["request"]["address"], mxid=mxid))
        server.restart()  # a running server sends it at its next look at the queue; a start looks at once
        onbind = homeserver.wait_for_onbind(mxid).json
        assert [i["token"] for i in onbind["invites"]] == [invite["token"]]
        signed = onbind["invites"][0]["signed"]
        signedjson.sign.verify_signed_json(signed, SERVER_NAME, signedjson.key.get_verify_key(SYDENT_KEY))

        # Sydent's templates and brand: a validation mail as Sydent's vector-im brand writes it.
        resp = server.client.post(
            f"{V1}/validate/email/requestToken",
            json={"email": "newcomer@example.test", "client_secret": "newcomer-secret", "send_attempt": 1},
        )
        assert resp.status_code == 200, resp.text
        mail = smtp_sink.wait_for("newcomer@example.test")
        head = mail.raw.decode("utf-8", "replace").split("\r\n\r\n", 1)[0]
        assert "Subject: Confirm your email address for Element" in head
        assert "From: Sydent Test Identity <noreply@id.sydent.test>" in head
        assert "register this email address with element.io" in mail.text
    finally:
        server.stop()


# --- erasures stick ------------------------------------------------------------------------------


def test_an_erased_person_stays_erased_when_the_import_runs_again(db_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    db = db_factory.create()
    folder = sydent_folder(tmp_path)
    config = our_config(db.url, tmp_path / "signing.key")
    run(import_sydent(config, folder / "sydent.db", folder / "sydent.conf"))
    plain, alice = "plain@example.test", FACTS["accounts"]["alice"]["user_id"]
    assert any(r["address"] == plain for r in select_all(db.url, select(validation_sessions)))

    removed = run(operator.delete_person(config, ThreePid("email", plain)))
    assert [b.address for b in removed.associations] == [plain] and removed.sessions >= 1
    removed = run(operator.delete_person(config, MatrixUser(alice)))
    assert removed.tokens == 1 and removed.terms == 2
    # The record: hashes only, never the address or the user ID.
    record = dump(db.url)["erasures"]
    assert {r[0] for r in record} >= {subject_hash("email", plain), subject_hash(MXID, alice)}
    assert plain not in repr(record) and alice not in repr(record)

    # The import again, through the command line: nothing of theirs comes back, and it says so.
    ours = tmp_path / "config.yaml"
    ours.write_text(
        yaml.safe_dump(
            {"server_name": SERVER_NAME, "database": {"url": db.url}, "signing_key_path": str(tmp_path / "signing.key")}
        )
    )
    proc = cli(
        "import-sydent", str(folder / "sydent.db"), "--config", str(ours), "--signing-key", str(folder / "sydent.conf")
    )
    assert proc.returncode == 0, proc.stderr
    counts = printed_counts(proc.stdout)
    assert counts["erased_associations_skipped"] == 1 + sum(1 for m in BOUND.values() if m == alice)
    assert counts["erased_sessions_skipped"] >= 1 and counts["erased_account_tokens_skipped"] == 1
    assert counts["erased_terms_acceptances_skipped"] == 2 and counts["associations_imported"] == 0
    assert "of people erased here with `associations delete`" in proc.stdout
    rows = select_all(db.url, select(associations))
    assert all(r["address"] != plain and r["mxid"] != alice for r in rows)
    assert all(r["address"] != plain for r in select_all(db.url, select(validation_sessions)))
    assert all(r["user_id"] != alice for r in select_all(db.url, select(accounts)))
    assert all(r["user_id"] != alice for r in select_all(db.url, select(accepted_terms)))
    # Everyone else is still there.
    assert {r["address"] for r in rows} == {a for a, m in BOUND.items() if a != plain and m != alice}


# --- the signing key -----------------------------------------------------------------------------


def test_without_sydents_key_refused_then_a_wrong_key_repaired_by_a_rerun(db_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    db = db_factory.create()
    folder = sydent_folder(tmp_path)
    key_path = tmp_path / "data" / "signing.key"
    config = our_config(db.url, key_path)
    run(migrate_database(db.url))
    before = dump(db.url)

    # No key, no say-so: refused, nothing written (the old behaviour re-signed and exited 0).
    with pytest.raises(SydentImportError, match="--new-signing-key"):
        run(import_sydent(config, folder / "sydent.db"))
    assert dump(db.url) == before and not key_path.exists()
    # A key that is not Sydent's: refused.
    wrong = tmp_path / "wrong.key"
    wrong.write_text("ed25519 0 " + signedjson.key.encode_signing_key_base64(signedjson.key.generate_signing_key("0")))
    with pytest.raises(SydentImportError, match="did not sign"):
        run(import_sydent(config, folder / "sydent.db", wrong))
    assert dump(db.url) == before and not key_path.exists()

    # Asked for in so many words: everything re-signed with a new key.
    counts = run(import_sydent(config, folder / "sydent.db", new_signing_key=True))
    assert counts.associations_resigned == len(BOUND)
    new_key = load_or_create_signing_key(key_path)
    assert new_key.encode() != SYDENT_KEY.encode()
    # A rerun without a key now stops: the key we have did not sign Sydent's associations.
    with pytest.raises(SydentImportError, match="did not sign Sydent's"):
        run(import_sydent(config, folder / "sydent.db"))

    # The repair the message describes: move our key away, run again with Sydent's.
    key_path.rename(tmp_path / "new.key.moved")
    counts = run(import_sydent(config, folder / "sydent.db", folder / "sydent.conf"))
    assert counts.associations_signature_repaired == len(BOUND) and counts.signing_key_imported == 1
    for row in select_all(db.url, select(associations)):
        facts = STORED[row["address"]]
        assert json.loads(row["signed_json"]) == facts["v1_lookup_casefolded"]
    again = run(import_sydent(config, folder / "sydent.db"))  # our key is Sydent's now: no flag needed
    assert again.associations_already_present == len(BOUND)


def test_an_import_that_fails_half_way_leaves_the_database_as_it_was(db_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    db = db_factory.create()
    folder = sydent_folder(tmp_path)
    config = our_config(db.url, tmp_path / "signing.key")
    run(migrate_database(db.url))
    run(operator.delete_person(config, MatrixUser("@nobody:hs.test")))  # something of ours: an erasure
    before = dump(db.url)

    refuse_inserts(db.url, "accepted_terms")  # the last table written: everything else went in first
    with pytest.raises(Exception, match="refused by the test"):
        run(import_sydent(config, folder / "sydent.db", folder / "sydent.conf"))
    assert dump(db.url) == before
    allow_inserts(db.url, "accepted_terms")
    counts = run(import_sydent(config, folder / "sydent.db", folder / "sydent.conf"))
    assert counts.associations_imported == len(BOUND) and counts.terms_acceptances_imported > 0


# --- a running server ----------------------------------------------------------------------------


def test_import_refused_while_a_server_runs_and_no_server_starts_during_one(  # type: ignore[no-untyped-def]
    db_factory, smtp_sink, tmp_path: Path
) -> None:
    db = db_factory.create()
    folder = sydent_folder(tmp_path)
    server = SydentServer(tmp_path / "server", database_url=db.url, smtp_port=smtp_sink.port, ca_file=None)
    config = our_config(db.url, server.signing_key_path)
    server.start()  # its first start: migrated, a key and a pepper of its own
    try:
        before = dump(db.url)
        with pytest.raises(SydentImportError, match="server is running on this database"):
            run(import_sydent(config, folder / "sydent.db", folder / "sydent.conf"))
        assert dump(db.url) == before
    finally:
        server.stop()
    server.signing_key_path.unlink()  # the key its start made signed nothing yet
    counts = run(import_sydent(config, folder / "sydent.db", folder / "sydent.conf"))
    assert counts.associations_imported == len(BOUND)

    # While an import holds the lock, a server does not start.
    async def hold_and_start() -> str:
        database = open_database(db.url)
        lock = await take_serving_lock(database, db.url, exclusive=True)
        try:
            try:
                await asyncio.to_thread(server.start)
            except Exception as e:  # ServerStartError, with the server's output
                return str(e)
            server.stop()
            return "started"
        finally:
            await lock.release()
            await database.dispose()

    assert "an import-sydent is running on this database" in run(hold_and_start())
    server.start()  # and once it is over, it does
    server.stop()


# --- the lookup pepper ---------------------------------------------------------------------------


def test_sydents_pepper_is_carried_over_unless_told_otherwise(db_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    folder = sydent_folder(tmp_path)
    pepper = FACTS["hash_details"]["lookup_pepper"]
    kept, fresh = db_factory.create(), db_factory.create()
    run(import_sydent(our_config(kept.url, tmp_path / "a.key"), folder / "sydent.db", folder / "sydent.conf"))
    run(
        import_sydent(
            our_config(fresh.url, tmp_path / "b.key"), folder / "sydent.db", folder / "sydent.conf", new_pepper=True
        )
    )
    state = {r["name"]: r["value"] for r in select_all(kept.url, select(server_state))}
    assert state[PEPPER_KEY] == pepper
    # The hashes a client computed with Sydent's pepper are the ones stored (the v2 lookup is in
    # the serving test above).
    hashes = {r["lookup_hash"] for r in select_all(kept.url, select(associations))}
    assert set(FACTS["v2_lookup"]["response"]["mappings"]) <= hashes
    other = {r["name"]: r["value"] for r in select_all(fresh.url, select(server_state))}
    assert other[PEPPER_KEY] != pepper


# --- key files the service user can read ---------------------------------------------------------


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root, as the trap does")
def test_a_key_file_root_left_unreadable_says_so_and_the_import_gives_files_to_the_folder_owner(  # type: ignore[no-untyped-def]
    db_factory, tmp_path: Path
) -> None:
    # As root, an import into the service user's folder: the files it writes are the user's.
    data = tmp_path / "data"
    data.mkdir()
    os.chown(data, 65534, 65534)  # nobody
    db = db_factory.create()
    folder = sydent_folder(tmp_path)
    run(import_sydent(our_config(db.url, data / "signing.key"), folder / "sydent.db", folder / "sydent.conf"))
    assert (data / "signing.key").stat().st_uid == 65534

    # A key file root owns (0600), read by the service user: the error says what is wrong
    # (it said "not in 'ed25519 ...' format"). The reader runs as nobody, in a child process.
    root_key = Path(tempfile.mkdtemp(prefix="root-owned-")) / "signing.key"
    root_key.parent.chmod(0o755)  # the folder may be entered, the file (0600) not read
    load_or_create_signing_key(root_key)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child)
        try:
            os.setgid(65534)
            os.setuid(65534)
            try:
                load_or_create_signing_key(root_key)
                message = "read it"
            except SigningKeyError as e:
                message = str(e)
            os.write(write, message.encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as f:
        message = f.read().decode()
    os.waitpid(pid, 0)
    shutil.rmtree(root_key.parent)
    assert "permission denied (owner root, mode 600; this process runs as nobody)" in message, message
    assert "format" not in message and f"chown nobody: {root_key}" in message


# --- the config side -----------------------------------------------------------------------------


def test_generate_config_takes_the_mail_domain_from_the_server_name() -> None:
    text = generate_config("id.example.net:8443")
    config = config_from_dict(yaml.safe_load(text))
    assert config.email_from.endswith("<noreply@id.example.net>") and "id.example.org" not in config.email_from


def test_empty_terms_path_means_no_terms(tmp_path: Path) -> None:
    # Ours: an empty terms_path stopped start-up with "Is a directory: '.'".
    config = config_from_dict({"terms_path": "", "signing_key_path": str(tmp_path / "k")})
    assert config.terms_path is None
    load_static_parts(config)
    # Sydent's: sydent-minimal.conf has `terms.path =`, and becomes no terms.
    conf = read_sydent_conf(FIXTURES / "sydent-minimal.conf")
    settings = settings_from_sydent(conf, database_url="sqlite:////tmp/x.db", signing_key_path=tmp_path / "k")
    assert settings.data["terms_path"] is None
    # Its `email.from = Sydent Validation <noreply@{hostname}>` is sent literally by Sydent: filled in.
    assert "{hostname}" not in settings.data["email"]["from"]


def test_sydent_conf_is_read_as_sydent_reads_it(tmp_path: Path) -> None:
    conf = read_sydent_conf(FIXTURES / "sydent.conf")
    c = Conversion(conf)
    # Multi-line values (continued with a tab, as Sydent rewrote the file).
    blocklist = convert_option("general", "ip.blacklist", conf.get("general", "ip.blacklist") or "", c)
    assert {"10.0.0.0/8", "::1/128", "fc00::/7", "0.0.0.0/32"} <= set(blocklist["federation.ip_blocklist"])
    hs = convert_option(
        "email",
        "email.third_party_invite_homeserver_blocklist",
        conf.get("email", "email.third_party_invite_homeserver_blocklist") or "",
        c,
    )
    assert hs == {"invites.blocked_homeservers": ["spam.example", "evil.example"]}
    words = convert_option(
        "email",
        "email.third_party_invite_keyword_blocklist",
        conf.get("email", "email.third_party_invite_keyword_blocklist") or "",
        c,
    )
    assert words == {"invites.blocked_keywords": ["free bitcoin", "casino"]}
    # %(name)s of the invite subjects survives (Sydent reads them raw).
    subject = convert_option("email", "email.invite.subject", conf.get("email", "email.invite.subject") or "", c)
    assert subject == {"email.invite_subject": "%(sender_display_name)s has invited you to chat on Sydent Test"}
    assert convert_option("sms", "originators.44", conf.get("sms", "originators.44") or "", c) == {
        "sms.originators.44": ["long:447700900123", "alpha:SydentTest"]
    }
    assert convert_option("sms", "smsrule.44", "allow", c) == {"sms.allowed_countries": ["GB", "GG", "IM", "JE"]}
    assert convert_option("email", "email.ratelimit_sender.rate_hz", "0.05", c) == {
        "rate_limits.store_invite_per_sender_per_hour": 180.0
    }
    assert convert_option("general", "enable_v1_access", "false", c) == {"access.v1_enabled": False}
    settings = settings_from_sydent(conf, database_url="sqlite:////tmp/x.db", signing_key_path=tmp_path / "k")
    assert settings.signing_key is not None and settings.signing_key.encode() == SYDENT_KEY.encode()
    assert settings.sydent_db == FIXTURES / "sydent.db"

    # Old files kept settings in [DEFAULT]; Sydent 2.6.1 puts its defaults into each section
    # before reading the file, so those win (checked with the real Sydent): said, not used.
    old = tmp_path / "old.conf"
    old.write_text(
        f"[DEFAULT]\nserver.name = old.example\nemail.smtphost = mail.old.example\n"
        f"[crypto]\ned25519.signingkey = {FACTS['signing_key_in_conf']}\n"
    )
    settings = settings_from_sydent(
        read_sydent_conf(old), database_url="sqlite:////tmp/x.db", signing_key_path=tmp_path / "k"
    )
    assert settings.data["server_name"] == os.uname()[1] and settings.data["email"]["smtp"]["host"] == "localhost"
    assert "not mapped: [DEFAULT] server.name: Sydent 2.6.1 did not use it" in "\n".join(settings.report())


# Every option Sydent 2.6.1 reads (sydent/config/*.py: cfg.get/getint/getfloat/getboolean/has_option;
# originators.<cc> and smsrule.<cc> by prefix, [peer.<name>] by section).
SYDENT_OPTIONS = [
    tuple(line.split())
    for line in """
general server.name
general log.level
general log.path
general templates.path
general brand.default
general pidfile.path
general terms.path
general address_lookup_limit
general prometheus_port
general prometheus_addr
general sentry_dsn
general delete_tokens_on_bind
general ip.blacklist
general ip.whitelist
general enable_v1_access
general homeserver_allow_list
general enable_v1_associations
db db.file
crypto ed25519.signingkey
peer.example base_replication_url
http verify_response_template
http clientapi.http.bind_address
http clientapi.http.port
http internalapi.http.port
http internalapi.http.bind_address
http replication.https.certfile
http replication.https.cacert
http replication.https.bind_address
http replication.https.port
http obey_x_forwarded_for
http federation.verifycerts
http client_http_base
email email.template
email email.invite_template
email email.subject
email email.invite.subject
email email.invite.subject_space
email email.smtphost
email email.smtpport
email email.smtpusername
email email.smtppassword
email email.tlsmode
email email.hostname
email email.from
email email.default_web_client_location
email email.third_party_invite_username_obfuscate_characters
email email.third_party_invite_domain_obfuscate_characters
email email.third_party_invite_homeserver_blocklist
email email.third_party_invite_room_blocklist
email email.third_party_invite_keyword_blocklist
email email.ratelimit_sender.burst
email email.ratelimit_sender.rate_hz
sms bodytemplate
sms username
sms password
sms originators.44
sms smsrule.44
sms msisdn.ratelimit.burst
sms msisdn.ratelimit.rate_hz
sms country.ratelimit.burst
sms country.ratelimit.rate_hz
""".strip().splitlines()
]


def test_every_sydent_option_has_an_answer_in_the_table_and_the_docs() -> None:
    for section, option in SYDENT_OPTIONS:
        row = setting_for(section, option)
        assert row is not None, (section, option)
        assert row.ours or row.why, (section, option)
    assert len(SETTINGS) == len({(s.section, s.option) for s in SETTINGS})
    docs = (REPO / "docs" / "deployment.md").read_text(encoding="utf-8")
    assert markdown_table() in docs, "regenerate: python -m sydent_lite.admin.sydent_import.settings_map"
