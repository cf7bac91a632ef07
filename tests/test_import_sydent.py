"""`import-sydent`: a Sydent database built here from Sydent's own schema, imported, then served.

The CREATE TABLE statements below are Sydent 2.6.1's schema as its SQLite database ends up
after `sydent/db/sqlitedb.py` has run every migration (user_version 5): the `.sql` files of
`sydent/db/` for the tables the migrations leave alone, the migrations' statements for the
others. The rows are written the way Sydent's stores write them (`sydent/db/*.py`): invite
and ephemeral-key times in seconds, the signed association JSON as `json.dumps` of
`signedjson.sign.sign_json(...)`, casefolded email addresses, ...
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import signedjson.key
import signedjson.sign
import yaml
from sqlalchemy import inspect, select, text
from support.db import DatabaseFactory
from support.server import DEFAULT_TERMS, SydentServer, sha256_address, write_terms
from support.smtp import SmtpSink

from sydent_lite.admin.sydent_import import (
    SigningKeyMismatch,
    SydentImportError,
    import_sydent,
    read_signing_key_file,
)
from sydent_lite.config import config_from_dict
from sydent_lite.secrets_util import hash_secret
from sydent_lite.services.hashing import PEPPER_KEY, load_pepper, lookup_hash
from sydent_lite.signing import load_or_create_signing_key
from sydent_lite.storage.associations import AssociationStore, StoredAssociation
from sydent_lite.storage.database import migrate, open_database
from sydent_lite.storage.state import ServerStateStore
from sydent_lite.storage.tables import (
    accepted_terms,
    accounts,
    associations,
    ephemeral_public_keys,
    invites,
    server_state,
    validation_sessions,
)

V1 = "/_matrix/identity/api/v1"
V2 = "/_matrix/identity/v2"

# --- Sydent's schema (2.6.1, after all of sqlitedb.py's migrations) -------------------------------

SYDENT_SCHEMA = """
-- threepid_associations.sql, as migration v0 -> v1 recreates the tables (+ v3 lookup_hash)
CREATE TABLE local_threepid_associations (id integer primary key autoincrement, medium varchar(16) not null, address varchar(256) not null, mxid varchar(256), ts integer, notBefore bigint, notAfter bigint, lookup_hash VARCHAR(256));
CREATE UNIQUE INDEX local_threepid_medium_address on local_threepid_associations(medium, address);
CREATE TABLE global_threepid_associations (id integer primary key autoincrement, medium varchar(16) not null, address varchar(256) not null, mxid varchar(256) not null, ts integer not null, notBefore bigint not null, notAfter integer not null, originServer varchar(255) not null, originId integer not null, sgAssoc text not null, lookup_hash VARCHAR(256));
CREATE INDEX global_threepid_medium_address on global_threepid_associations (medium, address);
CREATE INDEX global_threepid_medium_lower_address on global_threepid_associations (medium, lower(address));
CREATE UNIQUE INDEX global_threepid_originServer_originId on global_threepid_associations (originServer, originId);
CREATE INDEX global_threepid_lookup_hash ON global_threepid_associations(lookup_hash);

-- threepid_validation.sql (+ v2 index)
CREATE TABLE IF NOT EXISTS threepid_validation_sessions (id integer primary key, medium varchar(16) not null, address varchar(256) not null, clientSecret varchar(32) not null, validated int default 0, mtime bigint not null);
CREATE TABLE IF NOT EXISTS threepid_token_auths (id integer primary key, validationSession integer not null, token varchar(32) not null, sendAttemptNumber integer not null, foreign key (validationSession) references threepid_validations(id));
CREATE INDEX threepid_validation_sessions_mtime ON threepid_validation_sessions(mtime);

-- invite_tokens.sql
CREATE TABLE IF NOT EXISTS invite_tokens (
    id integer primary key,
    medium varchar(16) not null,
    address varchar(256) not null,
    room_id varchar(256) not null,
    sender varchar(256) not null,
    token varchar(256) not null,
    received_ts bigint, -- When the invite was received by us from the homeserver
    sent_ts bigint -- When the token was sent by us to the user
);
CREATE INDEX IF NOT EXISTS invite_token_medium_address on invite_tokens(medium, address);
CREATE INDEX IF NOT EXISTS invite_token_token on invite_tokens(token);
CREATE TABLE IF NOT EXISTS ephemeral_public_keys(
    id integer primary key,
    public_key varchar(256) not null,
    verify_count bigint default 0,
    persistence_ts bigint
);
CREATE UNIQUE INDEX IF NOT EXISTS ephemeral_public_keys_index on ephemeral_public_keys(public_key);

-- peers.sql
CREATE TABLE IF NOT EXISTS peers (id integer primary key, name varchar(255) not null, port integer default null, lastSentVersion integer, lastPokeSucceededAt integer, active integer not null default 0);
CREATE UNIQUE INDEX IF NOT EXISTS name on peers(name);
CREATE TABLE IF NOT EXISTS peer_pubkeys (id integer primary key, peername varchar(255) not null, alg varchar(16) not null, key text not null, foreign key (peername) references peers (name));
CREATE UNIQUE INDEX IF NOT EXISTS peername_alg on peer_pubkeys(peername, alg);

-- v3: hashing_metadata; v4: accounts, tokens, accepted_terms_urls
CREATE TABLE IF NOT EXISTS hashing_metadata (id integer primary key, lookup_pepper varchar(256));
CREATE TABLE accounts(user_id TEXT NOT NULL PRIMARY KEY, created_ts BIGINT NOT NULL, consent_version TEXT);
CREATE TABLE tokens(token TEXT NOT NULL PRIMARY KEY, user_id TEXT NOT NULL);
CREATE TABLE accepted_terms_urls(user_id TEXT NOT NULL, url TEXT NOT NULL);
CREATE UNIQUE INDEX accepted_terms_urls_idx ON accepted_terms_urls (user_id, url);
PRAGMA user_version = 5;
"""  # noqa: E501 - Sydent's schema, verbatim

DAY = 24 * 3600 * 1000
LIFETIME = 100 * 365 * DAY  # Sydent's THREEPID_ASSOCIATION_LIFETIME_MS
TERMS_EN = [DEFAULT_TERMS["docs"][d]["langs"]["en"]["url"] for d in ("terms_of_service", "privacy_policy")]

ALICE, BOB, CAROL = "@alice:hs.test", "@bob:hs.test", "@carol:hs.test"
ALICE_TOKEN_1 = "A" * 32 + "lice1" + "x" * 27
ALICE_TOKEN_2 = "A" * 32 + "lice2" + "y" * 27
CAROL_TOKEN = "C" * 32 + "arol0" + "z" * 27


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass
class SydentFixture:
    """What went into the Sydent database, for the checks."""

    path: Path
    server_name: str
    key: Any
    peer_key: Any
    now: int
    sg_assoc: dict[tuple[str, str], str] = field(default_factory=dict)  # newest sgAssoc per 3PID
    expected: dict[tuple[str, str], tuple[str, int]] = field(default_factory=dict)  # 3PID -> (mxid, ts)
    ephemeral_keys: list[str] = field(default_factory=list)


class SydentBuilder:
    """Writes rows as Sydent's stores do (sydent/db/threepid_associations.py & co)."""

    def __init__(self, path: Path, server_name: str, key: Any) -> None:
        self.db = sqlite3.connect(path)
        self.db.executescript(SYDENT_SCHEMA)
        self.server_name = server_name
        self.key = key
        self.db.execute("INSERT INTO hashing_metadata (id, lookup_pepper) VALUES (0, 'sydentspepper')")

    @staticmethod
    def assoc(medium: str, address: str, mxid: str, ts: int) -> dict[str, Any]:
        return {
            "medium": medium,
            "address": address,
            "mxid": mxid,
            "ts": ts,
            "not_before": ts,
            "not_after": ts + LIFETIME,
        }

    def bind_local(self, a: dict[str, Any]) -> int:
        # LocalAssociationStore.addOrUpdateAssociation: insert or replace (one row per 3PID).
        cur = self.db.execute(
            "insert or replace into local_threepid_associations ('medium', 'address', 'lookup_hash', 'mxid', 'ts',"
            " 'notBefore', 'notAfter') values (?, ?, ?, ?, ?, ?, ?)",
            (a["medium"], a["address"], "h", a["mxid"], a["ts"], a["not_before"], a["not_after"]),
        )
        return int(cur.lastrowid)  # type: ignore[arg-type]

    def push_global(self, a: dict[str, Any], origin_id: int, origin: str | None = None, key: Any = None) -> str:
        # The pusher signs (Signer.signedThreePidAssociation) and GlobalAssociationStore.addAssociation
        # stores json.dumps of it; peers' associations arrive signed by the peer.
        origin = origin or self.server_name
        sg = json.dumps(signedjson.sign.sign_json(dict(a), origin, key or self.key))
        self.db.execute(
            "insert or ignore into global_threepid_associations (medium, address, lookup_hash, mxid, ts, notBefore,"
            " notAfter, originServer, originId, sgAssoc) values (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                a["medium"],
                a["address"].casefold() if a["medium"] == "email" else a["address"],
                "h",
                a["mxid"],
                a["ts"],
                a["not_before"],
                a["not_after"],
                origin,
                origin_id,
                sg,
            ),
        )
        return sg

    def unbind(self, medium: str, address: str, ts: int) -> None:
        # LocalAssociationStore.removeAssociation + GlobalAssociationStore.removeAssociation.
        self.db.execute(
            "REPLACE INTO local_threepid_associations ('medium', 'address', 'mxid', 'ts', 'notBefore', 'notAfter')"
            " values (?, ?, NULL, ?, null, null)",
            (medium, address, ts),
        )
        self.db.execute("DELETE FROM global_threepid_associations WHERE medium = ? AND address = ?", (medium, address))

    def close(self) -> None:
        self.db.commit()
        self.db.close()


def build_sydent_db(path: Path, server_name: str, key: Any) -> SydentFixture:
    now = now_ms()
    now_s = now // 1000
    peer_key = signedjson.key.generate_signing_key("p1")
    fx = SydentFixture(path, server_name, key, peer_key, now)
    b = SydentBuilder(path, server_name, key)

    # Bound and pushed: in both tables.
    a = b.assoc("email", "both@example.test", ALICE, now - 5 * DAY)
    fx.sg_assoc[("email", "both@example.test")] = b.push_global(a, b.bind_local(a))
    # Only in the global table, signed by Sydent (its local row is long gone).
    a = b.assoc("email", "globalonly@example.test", ALICE, now - 4 * DAY)
    fx.sg_assoc[("email", "globalonly@example.test")] = b.push_global(a, 900)
    # Bound but not pushed yet: local only, no signed JSON anywhere.
    a = b.assoc("email", "localonly@example.test", BOB, now - 3 * DAY)
    b.bind_local(a)
    # Bound to one user, later rebound to another: two global rows, the local row replaced.
    old = b.assoc("email", "rebound@example.test", "@old:hs.test", now - 10 * DAY)
    b.push_global(old, b.bind_local(old))
    new = b.assoc("email", "rebound@example.test", "@new:hs.test", now - DAY)
    fx.sg_assoc[("email", "rebound@example.test")] = b.push_global(new, b.bind_local(new))
    # A phone number.
    a = b.assoc("msisdn", "447700900001", CAROL, now - 2 * DAY)
    fx.sg_assoc[("msisdn", "447700900001")] = b.push_global(a, b.bind_local(a))
    # From a replication peer, signed by the peer (address as the peer sent it).
    a = b.assoc("email", "Peer.User@Example.test", "@peer:other.test", now - 6 * DAY)
    fx.sg_assoc[("email", "peer.user@example.test")] = b.push_global(a, 1, origin="peer.test", key=peer_key)
    # Bound, then unbound: nothing to import.
    a = b.assoc("email", "unbound@example.test", ALICE, now - 7 * DAY)
    b.push_global(a, b.bind_local(a))
    b.unbind("email", "unbound@example.test", now - 6 * DAY)
    # Also bound on our side: newer there (kept), older there (replaced).
    a = b.assoc("email", "newerhere@example.test", ALICE, now - 3 * DAY)
    fx.sg_assoc[("email", "newerhere@example.test")] = b.push_global(a, b.bind_local(a))
    a = b.assoc("email", "olderhere@example.test", BOB, now - 2 * DAY)
    fx.sg_assoc[("email", "olderhere@example.test")] = b.push_global(a, b.bind_local(a))
    for medium, address, mxid, ts in [
        ("email", "both@example.test", ALICE, now - 5 * DAY),
        ("email", "globalonly@example.test", ALICE, now - 4 * DAY),
        ("email", "localonly@example.test", BOB, now - 3 * DAY),
        ("email", "rebound@example.test", "@new:hs.test", now - DAY),
        ("msisdn", "447700900001", CAROL, now - 2 * DAY),
        ("email", "peer.user@example.test", "@peer:other.test", now - 6 * DAY),
        ("email", "olderhere@example.test", BOB, now - 2 * DAY),
    ]:
        fx.expected[(medium, address)] = (mxid, ts)

    # Invites (JoinTokenStore: times in seconds), one still pending, one delivered.
    b.db.execute(
        "INSERT INTO invite_tokens ('medium', 'address', 'room_id', 'sender', 'token', 'received_ts', 'sent_ts')"
        " VALUES (?, ?, ?, ?, ?, ?, ?)",
        ("email", "invitee@example.test", "!room:hs.test", ALICE, "invitetokenpending", now_s - 3600, None),
    )
    b.db.execute(
        "INSERT INTO invite_tokens ('medium', 'address', 'room_id', 'sender', 'token', 'received_ts', 'sent_ts')"
        " VALUES (?, ?, ?, ?, ?, ?, ?)",
        ("email", "both@example.test", "!room2:hs.test", BOB, "invitetokensent", now_s - 7200, now_s - 3600),
    )
    for i in range(2):
        public = signedjson.key.encode_verify_key_base64(
            signedjson.key.get_verify_key(signedjson.key.generate_signing_key("0"))
        )
        fx.ephemeral_keys.append(public)
        b.db.execute(
            "INSERT INTO ephemeral_public_keys (public_key, verify_count, persistence_ts) VALUES (?, ?, ?)",
            (public, i, now_s - 3600 * (i + 1)),
        )

    # Validation sessions (ThreePidValSessionStore): random integer ids, token auths.
    b.db.execute(
        "insert into threepid_validation_sessions ('id', 'medium', 'address', 'clientSecret', 'mtime', 'validated')"
        " values (?, ?, ?, ?, ?, ?)",
        (1234567, "email", "validated@example.test", "sydentsecret1", now - 60_000, 1),
    )
    b.db.execute(
        "insert into threepid_token_auths (id, validationSession, token, sendAttemptNumber)"
        " values (10, 1234567, 'firsttoken', 1)"
    )
    b.db.execute(
        "insert into threepid_token_auths (id, validationSession, token, sendAttemptNumber)"
        " values (11, 1234567, 'latesttoken', 2)"
    )
    b.db.execute(
        "insert into threepid_validation_sessions ('id', 'medium', 'address', 'clientSecret', 'mtime')"
        " values (?, ?, ?, ?, ?)",
        (2345678, "msisdn", "447700900123", "sydentsecret2", now - 60_000),
    )
    b.db.execute(
        "insert into threepid_token_auths (validationSession, token, sendAttemptNumber) values (2345678, '123456', 1)"
    )
    b.db.execute(
        "insert into threepid_validation_sessions ('id', 'medium', 'address', 'clientSecret', 'mtime')"
        " values (?, ?, ?, ?, ?)",
        (3456789, "email", "notoken@example.test", "sydentsecret3", now - 60_000),
    )
    # An email session whose link Sydent mailed and nobody clicked yet.
    b.db.execute(
        "insert into threepid_validation_sessions ('id', 'medium', 'address', 'clientSecret', 'mtime')"
        " values (?, ?, ?, ?, ?)",
        (4567890, "email", "pending@example.test", "sydentsecret4", now - 60_000),
    )
    b.db.execute(
        "insert into threepid_token_auths (validationSession, token, sendAttemptNumber)"
        " values (4567890, 'SydentMailedToken4567890abcdefgh', 1)"
    )

    # Accounts (AccountStore), tokens, accepted terms (TermsStore).
    for user, created in ((ALICE, now - 100 * DAY), (BOB, now - 50 * DAY), (CAROL, now - 10 * DAY)):
        b.db.execute(
            "insert or ignore into accounts (user_id, created_ts, consent_version) values (?, ?, ?)",
            (user, created, None),
        )
    for user, token in ((ALICE, ALICE_TOKEN_1), (ALICE, ALICE_TOKEN_2), (CAROL, CAROL_TOKEN)):
        b.db.execute("insert into tokens (user_id, token) values (?, ?)", (user, token))
    b.db.executemany(
        "insert or ignore into accepted_terms_urls (user_id, url) values (?, ?)",
        [(ALICE, u) for u in TERMS_EN] + [(BOB, TERMS_EN[0])],
    )
    b.close()
    return fx


FIRST_RUN = {
    "associations_imported": 7,
    "associations_already_present": 0,
    "associations_newer_here_kept": 1,
    "associations_resigned": 1,
    "associations_signature_repaired": 0,
    "associations_unbound_in_sydent": 1,
    "associations_unusable_skipped": 0,
    "invites_imported": 2,
    "invites_already_present": 0,
    "ephemeral_keys_imported": 2,
    "ephemeral_keys_already_present": 0,
    "sessions_imported": 3,
    "sessions_already_present": 0,
    "sessions_without_token_skipped": 1,
    "account_tokens_imported": 3,
    "account_tokens_already_present": 0,
    "terms_acceptances_imported": 3,
    "terms_acceptances_already_present": 0,
    "signing_key_imported": 1,
    "signing_key_already_present": 0,
    "lookup_pepper_from_sydent": 1,
    "sydent_rows_unreadable_skipped": 0,
    "erased_associations_skipped": 0,
    "erased_sessions_skipped": 0,
    "erased_invites_skipped": 0,
    "erased_account_tokens_skipped": 0,
    "erased_terms_acceptances_skipped": 0,
}


# --- helpers --------------------------------------------------------------------------------------


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def make_config(url: str, server_name: str, key_path: Path) -> Any:
    return config_from_dict({"server_name": server_name, "database": {"url": url}, "signing_key_path": str(key_path)})


async def _dump(url: str) -> dict[str, list[tuple[Any, ...]]]:
    engine = open_database(url)
    try:
        async with engine.connect() as conn:
            names = await conn.run_sync(lambda c: inspect(c).get_table_names())
            out: dict[str, list[tuple[Any, ...]]] = {}
            for name in sorted(names):
                rows = (await conn.execute(text(f'SELECT * FROM "{name}"'))).all()
                out[name] = sorted((tuple(r) for r in rows), key=repr)
            return out
    finally:
        await engine.dispose()


def dump(url: str) -> dict[str, list[tuple[Any, ...]]]:
    tables: dict[str, list[tuple[Any, ...]]] = run(_dump(url))
    return tables


async def _prepare_ours(url: str, now: int) -> None:
    """Our database before the import: migrated, and two of the addresses already bound here."""
    engine = open_database(url)
    try:
        await migrate(engine)
        store = AssociationStore(engine)
        pepper = await load_pepper(ServerStateStore(engine), store)
        for address, mxid, ts in (
            ("newerhere@example.test", "@mine:hs.test", now - 3600_000),
            ("olderhere@example.test", "@stale:hs.test", now - 30 * DAY),
        ):
            await store.upsert(
                StoredAssociation(
                    "email",
                    address,
                    lookup_hash(address, "email", pepper),
                    mxid,
                    ts,
                    ts,
                    ts + LIFETIME,
                    json.dumps({"mxid": mxid, "ts": ts}),
                )
            )
    finally:
        await engine.dispose()


async def _select(url: str, query: Any) -> list[dict[str, Any]]:
    engine = open_database(url)
    try:
        async with engine.connect() as conn:
            return [dict(r) for r in (await conn.execute(query)).mappings()]
    finally:
        await engine.dispose()


def select_all(url: str, query: Any) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = run(_select(url, query))
    return rows


def write_key(path: Path, key: Any) -> Path:
    with path.open("w") as f:
        signedjson.key.write_signing_keys(f, [key])
    return path


def verify(signed_json: str, server_name: str, key: Any) -> dict[str, Any]:
    obj: dict[str, Any] = json.loads(signed_json)
    signedjson.sign.verify_signed_json(obj, server_name, signedjson.key.get_verify_key(key))
    return obj


# --- the tests ------------------------------------------------------------------------------------


def test_import_then_serve(db_factory: DatabaseFactory, smtp_sink: SmtpSink, tmp_path: Path) -> None:
    db = db_factory.create()
    # The server that will serve the imported data: its name is Sydent's server.name.
    server = SydentServer(
        tmp_path / "server",
        database_url=db.url,
        smtp_port=smtp_sink.port,
        ca_file=None,
        terms_path=write_terms(tmp_path / "terms.yaml"),
        name="sydent_lite (imported)",
    )
    sydent_key = signedjson.key.generate_signing_key("1")
    fx = build_sydent_db(tmp_path / "sydent.db", server.server_name, sydent_key)
    key_file = write_key(tmp_path / "sydent.signing.key", sydent_key)
    run(_prepare_ours(db.url, fx.now))
    config = make_config(db.url, server.server_name, server.signing_key_path)
    sydent_db_before = (tmp_path / "sydent.db").read_bytes()

    counts = run(import_sydent(config, fx.path, key_file))
    assert counts.as_dict() == FIRST_RUN
    assert (tmp_path / "sydent.db").read_bytes() == sydent_db_before  # opened read-only

    # The signing key: installed as is (version "1"), 0600.
    installed = load_or_create_signing_key(server.signing_key_path)
    assert installed.version == "1" and installed.encode() == sydent_key.encode()
    assert server.signing_key_path.stat().st_mode & 0o777 == 0o600

    # Associations: one per 3PID, the newest, times kept, Sydent's signed JSON verbatim.
    rows = {(r["medium"], r["address"]): r for r in select_all(db.url, select(associations))}
    pepper = select_all(db.url, select(server_state.c.value).where(server_state.c.name == PEPPER_KEY))[0]["value"]
    assert set(rows) == set(fx.expected) | {("email", "newerhere@example.test")}
    for threepid, (mxid, ts) in fx.expected.items():
        row = rows[threepid]
        assert (row["mxid"], row["ts"], row["not_before"], row["not_after"]) == (mxid, ts, ts, ts + LIFETIME), threepid
        assert row["lookup_hash"] == lookup_hash(threepid[1], threepid[0], pepper)
        if threepid == ("email", "peer.user@example.test"):
            assert row["signed_json"] == fx.sg_assoc[threepid]
            verify(row["signed_json"], "peer.test", fx.peer_key)  # the peer's signature, untouched
            continue
        obj = verify(row["signed_json"], server.server_name, sydent_key)
        assert set(obj["signatures"]) == {server.server_name}
        assert set(obj["signatures"][server.server_name]) == {"ed25519:1"}
        if threepid in fx.sg_assoc:
            assert row["signed_json"] == fx.sg_assoc[threepid]
    # The one Sydent had not pushed yet: signed now, with Sydent's key, as Sydent would have.
    resigned = json.loads(rows[("email", "localonly@example.test")]["signed_json"])
    assert resigned == signedjson.sign.sign_json(
        SydentBuilder.assoc("email", "localonly@example.test", BOB, fx.now - 3 * DAY), server.server_name, sydent_key
    )
    # Bound here after Sydent's binding: ours stays.
    assert rows[("email", "newerhere@example.test")]["mxid"] == "@mine:hs.test"
    assert ("email", "unbound@example.test") not in rows

    # Invites and ephemeral keys (seconds -> milliseconds).
    now_s = fx.now // 1000
    inv = {r["token"]: r for r in select_all(db.url, select(invites))}
    assert inv["invitetokenpending"] == {
        "token": "invitetokenpending",
        "medium": "email",
        "address": "invitee@example.test",
        "room_id": "!room:hs.test",
        "sender": ALICE,
        "ephemeral_public_key": "",
        "created_ts": (now_s - 3600) * 1000,
        "callback_id": None,
        "delivered_ts": None,
    }
    assert (inv["invitetokensent"]["created_ts"], inv["invitetokensent"]["delivered_ts"]) == (
        (now_s - 7200) * 1000,
        (now_s - 3600) * 1000,
    )
    keys = {r["public_key"]: r["created_ts"] for r in select_all(db.url, select(ephemeral_public_keys))}
    assert keys == {fx.ephemeral_keys[0]: (now_s - 3600) * 1000, fx.ephemeral_keys[1]: (now_s - 7200) * 1000}

    # Sessions: Sydent's integer sid, latest token and send attempt; client secret and token hashed.
    sessions = {r["sid"]: r for r in select_all(db.url, select(validation_sessions))}
    assert set(sessions) == {"1234567", "2345678", "4567890"}
    s = sessions["1234567"]
    assert (s["medium"], s["address"], s["token_hash"], s["send_attempt"], s["validated"]) == (
        "email",
        "validated@example.test",
        hash_secret("latesttoken"),
        2,
        True,
    )
    assert s["client_secret_hash"] == hash_secret("sydentsecret1") and "sydentsecret1" not in repr(s)
    assert s["mtime"] == s["validated_at"] == s["created_ts"] == fx.now - 60_000
    s = sessions["2345678"]
    assert (
        s["medium"],
        s["token_hash"],
        s["send_attempt"],
        s["validated"],
        s["validated_at"],
        s["failed_attempts"],
    ) == ("msisdn", hash_secret("123456"), 1, False, None, 0)
    for clear in ("latesttoken", "SydentMailedToken4567890abcdefgh"):
        assert all(clear not in repr(table) for table in dump(db.url).values()), clear

    # Tokens hashed (the token itself nowhere), terms copied.
    tokens = {r["token_hash"]: r for r in select_all(db.url, select(accounts))}
    assert tokens[hash_secret(ALICE_TOKEN_1)]["user_id"] == ALICE
    assert tokens[hash_secret(ALICE_TOKEN_2)]["created_ts"] == fx.now - 100 * DAY
    assert tokens[hash_secret(CAROL_TOKEN)]["user_id"] == CAROL
    assert all(ALICE_TOKEN_1 not in repr(table) for table in dump(db.url).values())
    terms = {(r["user_id"], r["url"]) for r in select_all(db.url, select(accepted_terms))}
    assert terms == {(ALICE, u) for u in TERMS_EN} | {(BOB, TERMS_EN[0])}

    # Idempotent: the second run imports nothing and changes nothing.
    before, key_bytes = dump(db.url), server.signing_key_path.read_bytes()
    again = run(import_sydent(config, fx.path, key_file))
    assert dump(db.url) == before and server.signing_key_path.read_bytes() == key_bytes
    assert {k: v for k, v in again.as_dict().items() if v} == {
        "associations_already_present": 7,
        "associations_newer_here_kept": 1,
        "associations_unbound_in_sydent": 1,
        "invites_already_present": 2,
        "ephemeral_keys_already_present": 2,
        "sessions_already_present": 3,
        "sessions_without_token_skipped": 1,
        "account_tokens_already_present": 3,
        "terms_acceptances_already_present": 3,
        "signing_key_already_present": 1,
        "lookup_pepper_from_sydent": 1,
    }

    # And the real server serves it all.
    server.start()
    try:
        c = server.client
        for threepid in fx.sg_assoc:
            if threepid == ("email", "newerhere@example.test"):
                continue
            resp = c.get(f"{V1}/lookup", params={"medium": threepid[0], "address": threepid[1]})
            assert resp.status_code == 200 and resp.json() == json.loads(fx.sg_assoc[threepid]), resp.text
        resp = c.get(f"{V1}/lookup", params={"medium": "email", "address": "LocalOnly@Example.test"})
        assert resp.json() == resigned
        assert c.get(f"{V1}/lookup", params={"medium": "email", "address": "unbound@example.test"}).json() == {}

        public = signedjson.key.encode_verify_key_base64(signedjson.key.get_verify_key(sydent_key))
        for prefix in (V1, V2):
            resp = c.get(f"{prefix}/pubkey/ed25519:1")
            assert resp.status_code == 200 and resp.json() == {"public_key": public}, resp.text
            assert c.get(f"{prefix}/pubkey/isvalid", params={"public_key": public}).json() == {"valid": True}
            for key in fx.ephemeral_keys:
                resp = c.get(f"{prefix}/pubkey/ephemeral/isvalid", params={"public_key": key})
                assert resp.json() == {"valid": True}, resp.text
        assert c.get(f"{V2}/pubkey/ed25519:0").status_code == 404

        # Sydent's tokens work, with the terms its users accepted there.
        alice = {"Authorization": f"Bearer {ALICE_TOKEN_1}"}
        assert c.get(f"{V2}/account", headers=alice).json() == {"user_id": ALICE}
        details = c.get(f"{V2}/hash_details", headers=alice)
        assert details.status_code == 200, details.text
        h = sha256_address("both@example.test", "email", details.json()["lookup_pepper"])
        resp = c.post(
            f"{V2}/lookup",
            headers=alice,
            json={"algorithm": "sha256", "pepper": details.json()["lookup_pepper"], "addresses": [h]},
        )
        assert resp.json() == {"mappings": {h: ALICE}}, resp.text
        resp = c.get(f"{V2}/hash_details", headers={"Authorization": f"Bearer {CAROL_TOKEN}"})
        assert resp.status_code == 403 and resp.json()["errcode"] == "M_TERMS_NOT_SIGNED"

        # Sessions in flight keep working: the validated one, and the one waiting for its code.
        resp = c.get(
            f"{V2}/3pid/getValidated3pid", params={"sid": "1234567", "client_secret": "sydentsecret1"}, headers=alice
        )
        assert resp.json() == {
            "medium": "email",
            "address": "validated@example.test",
            "validated_at": fx.now - 60_000,
        }, resp.text
        resp = c.post(
            f"{V2}/validate/msisdn/submitToken",
            json={"sid": "2345678", "client_secret": "sydentsecret2", "token": "123456"},
            headers=alice,
        )
        assert resp.json() == {"success": True}, resp.text
        # The link Sydent mailed (its v1 path) still validates, though only the token's hash was imported.
        resp = c.get(
            f"{V1}/validate/email/submitToken",
            params={"token": "SydentMailedToken4567890abcdefgh", "client_secret": "sydentsecret4", "sid": "4567890"},
        )
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/html"), resp.text
        resp = c.get(f"{V1}/3pid/getValidated3pid", params={"sid": "4567890", "client_secret": "sydentsecret4"})
        assert resp.status_code == 200 and resp.json()["address"] == "pending@example.test", resp.text

        # Sydent's invites carry no ephemeral key of their own: the key from Sydent's mail signs.
        mailed_key = signedjson.key.generate_signing_key("0")
        resp = c.post(
            f"{V1}/sign-ed25519",
            json={
                "mxid": "@invitee:hs.test",
                "token": "invitetokenpending",
                "private_key": signedjson.key.encode_signing_key_base64(mailed_key),
            },
        )
        assert resp.status_code == 200, resp.text
        signedjson.sign.verify_signed_json(resp.json(), server.server_name, signedjson.key.get_verify_key(mailed_key))
    finally:
        server.stop()


def test_a_different_key_of_ours_is_never_replaced(db_factory: DatabaseFactory, tmp_path: Path) -> None:
    db = db_factory.create()
    sydent_key = signedjson.key.generate_signing_key("0")
    fx = build_sydent_db(tmp_path / "sydent.db", "id.test", sydent_key)
    ours_path = tmp_path / "ours" / "signing.key"
    ours = load_or_create_signing_key(ours_path)
    run(_prepare_ours(db.url, fx.now))
    before, ours_bytes = dump(db.url), ours_path.read_bytes()
    key_file = write_key(tmp_path / "sydent.key", sydent_key)

    with pytest.raises(SigningKeyMismatch) as e:
        run(import_sydent(make_config(db.url, "id.test", ours_path), fx.path, key_file))
    assert str(ours_path) in str(e.value) and str(key_file) in str(e.value)
    assert dump(db.url) == before and ours_path.read_bytes() == ours_bytes
    assert ours.encode() == load_or_create_signing_key(ours_path).encode()

    # Through the command line: a message, exit status 2, nothing changed.
    config_path = tmp_path / "config.yaml"
    config_path.write_text(
        yaml.safe_dump({"server_name": "id.test", "database": {"url": db.url}, "signing_key_path": str(ours_path)})
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "sydent_lite",
            "import-sydent",
            str(fx.path),
            "--signing-key",
            str(key_file),
            "--config",
            str(config_path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 2 and str(ours_path) in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert dump(db.url) == before and ours_path.read_bytes() == ours_bytes


def test_a_key_that_did_not_sign_sydents_associations_is_refused(db_factory: DatabaseFactory, tmp_path: Path) -> None:
    db = db_factory.create()
    fx = build_sydent_db(tmp_path / "sydent.db", "id.test", signedjson.key.generate_signing_key("0"))
    ours_path = tmp_path / "signing.key"
    wrong = write_key(tmp_path / "wrong.key", signedjson.key.generate_signing_key("0"))
    with pytest.raises(SydentImportError, match="did not sign"):
        run(import_sydent(make_config(db.url, "id.test", ours_path), fx.path, wrong))
    assert not ours_path.exists()


def test_without_sydents_key_ours_signs(db_factory: DatabaseFactory, tmp_path: Path) -> None:
    """--new-signing-key: a new key of ours and Sydent's own associations re-signed with it;
    the peer's keep the peer's signature. Via the command line."""
    db = db_factory.create()
    fx = build_sydent_db(tmp_path / "sydent.db", "id.test", signedjson.key.generate_signing_key("0"))
    ours_path = tmp_path / "signing.key"
    config_path = tmp_path / "config.yaml"
    config_path.write_text(
        yaml.safe_dump({"server_name": "id.test", "database": {"url": db.url}, "signing_key_path": str(ours_path)})
    )

    def cli() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "sydent_lite",
                "import-sydent",
                str(fx.path),
                "--config",
                str(config_path),
                "--new-signing-key",
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    proc = cli()
    assert proc.returncode == 0, proc.stderr
    printed = dict(line.split(": ") for line in proc.stdout.splitlines())
    # Nothing of ours beforehand: all eight live associations come in, Sydent's seven re-signed.
    assert printed["associations_imported"] == "8" and printed["associations_resigned"] == "7"
    assert printed["signing_key_imported"] == "0"
    ours = load_or_create_signing_key(ours_path)
    rows = {r["address"]: r for r in select_all(db.url, select(associations))}
    for address, row in rows.items():
        if address == "peer.user@example.test":
            assert row["signed_json"] == fx.sg_assoc[("email", address)]
            verify(row["signed_json"], "peer.test", fx.peer_key)
        else:
            obj = verify(row["signed_json"], "id.test", ours)
            assert set(obj["signatures"]["id.test"]) == {"ed25519:0"} and "ts" in obj

    before = dump(db.url)
    proc = cli()
    assert proc.returncode == 0 and "associations_imported: 0" in proc.stdout, proc.stderr
    assert dump(db.url) == before


def test_not_a_sydent_database(db_factory: DatabaseFactory, tmp_path: Path) -> None:
    config = make_config(db_factory.create().url, "id.test", tmp_path / "signing.key")
    with pytest.raises(FileNotFoundError):
        run(import_sydent(config, tmp_path / "missing.db"))
    other = tmp_path / "other.db"
    sqlite3.connect(other).executescript("CREATE TABLE t (x int);")
    with pytest.raises(SydentImportError, match="not a Sydent database"):
        run(import_sydent(config, other))
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(SydentImportError):
        run(import_sydent(config, garbage))


def test_key_file_formats(tmp_path: Path) -> None:
    key = signedjson.key.generate_signing_key("0")
    seed = signedjson.key.encode_signing_key_base64(key)
    one_line = tmp_path / "a.key"
    one_line.write_text(f"ed25519 0 {seed}\n")
    conf = tmp_path / "sydent.conf"
    conf.write_text(f"[general]\nserver.name = id.test\n\n[crypto]\ned25519.signingkey = ed25519 0 {seed}\n")
    legacy = tmp_path / "legacy.conf"
    legacy.write_text(f"[crypto]\ned25519.signingkey = {bytes(key.encode()).hex()}\n")
    for path in (one_line, conf, legacy):
        read = read_signing_key_file(path)
        assert (read.alg, read.version, read.encode()) == ("ed25519", "0", key.encode()), path
    bad = tmp_path / "bad.key"
    bad.write_text("not a key\n")
    with pytest.raises(SydentImportError):
        read_signing_key_file(bad)
