"""`sydent-lite import-sydent`: move a Sydent server's data (its SQLite database) here.

What Sydent keeps, and where it goes (Sydent 2.x schema, `sydent/db/*.sql` + `sqlitedb.py`):

- `local_threepid_associations` (medium, address, mxid, ts, notBefore, notAfter; one row per
  3PID, mxid NULL = unbound) and `global_threepid_associations` (the same plus originServer,
  originId and `sgAssoc`, the signed JSON; several rows per 3PID are possible, newest `ts`
  wins) -> `associations`, one row per 3PID: the newest association, `ts`/`not_before`/
  `not_after` kept, `signed_json` = Sydent's `sgAssoc` when it has one that verifies with the
  key we serve, else the association re-signed (ed25519 is deterministic: with Sydent's key
  the signature is the one Sydent made). Associations Sydent got from its replication peers
  keep their peer's signature. An unbinding newer than every binding imports nothing.
- `invite_tokens` -> `invites` (Sydent keeps no per-invite ephemeral key: "" for the public one;
  `received_ts`/`sent_ts` are in seconds in Sydent, milliseconds here).
- `ephemeral_public_keys` -> `ephemeral_public_keys` (`persistence_ts`, seconds).
- `threepid_validation_sessions` + `threepid_token_auths` (the latest token of a session) ->
  `validation_sessions`, sid = str(Sydent's integer id), client secret and token hashed.
- `accounts` + `tokens` -> `accounts` (one row per token, token hashed) and
  `accepted_terms_urls` -> `accepted_terms`.
- The signing key (`ed25519.signingkey` in sydent.conf) from `--signing-key FILE`.

Nothing in our database is overwritten by older data, and running the import twice changes
nothing. The Sydent database is opened read-only.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nacl.encoding
import nacl.signing
import signedjson.key
import signedjson.sign
from sqlalchemy import select, text, tuple_, update
from sqlalchemy.ext.asyncio import AsyncConnection

from sydent_lite.config import Config
from sydent_lite.secrets_util import hash_secret, now_ms
from sydent_lite.services.hashing import load_pepper, lookup_hash
from sydent_lite.signing import (
    ServerSigner,
    SigningKeyError,
    load_or_create_signing_key,
)
from sydent_lite.storage.associations import AssociationStore
from sydent_lite.storage.batching import chunks
from sydent_lite.storage.database import migrate, open_database
from sydent_lite.storage.dialect import insert_for
from sydent_lite.storage.state import ServerStateStore
from sydent_lite.storage.tables import (
    accepted_terms,
    accounts,
    associations,
    ephemeral_public_keys,
    invites,
    validation_sessions,
)
from sydent_lite.threepids import stored_address

logger = logging.getLogger(__name__)

_CHUNK = 500
# Sydent writes invite and ephemeral-key times with int(time.time()): seconds. A value this
# large is already in milliseconds (as seconds it would be the year 5138).
_MS_THRESHOLD = 100_000_000_000
_REQUIRED_TABLES = ("local_threepid_associations", "global_threepid_associations")


class SydentImportError(Exception):
    """The import cannot go ahead; the message says why (nothing has been written)."""


class SigningKeyMismatch(SydentImportError, SigningKeyError):
    """Our signing key file holds a different key than the one given with --signing-key."""


# --- reading Sydent's database --------------------------------------------------------------------


@dataclass
class _Assoc:
    medium: str
    address: str  # our stored form (email case-folded)
    mxid: str | None  # None: an unbinding (local table only)
    ts: int
    not_before: int | None
    not_after: int | None
    origin: str | None = None  # originServer; None for the local table
    sg_assoc: str | None = None  # the signed JSON, verbatim

    @property
    def key(self) -> tuple[str, str]:
        return (self.medium, self.address)


@dataclass
class _Session:
    sid: str
    medium: str
    address: str
    client_secret: str
    validated: bool
    mtime: int
    token: str | None
    send_attempt: int | None


@dataclass
class SydentData:
    local: list[_Assoc] = field(default_factory=list)
    global_: list[_Assoc] = field(default_factory=list)
    invites: list[dict[str, Any]] = field(default_factory=list)
    ephemeral_keys: list[dict[str, Any]] = field(default_factory=list)
    sessions: list[_Session] = field(default_factory=list)
    tokens: list[tuple[str, str, int | None]] = field(default_factory=list)  # token, user_id, created_ts
    terms: list[tuple[str, str]] = field(default_factory=list)
    skipped_rows: int = 0


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("utf-8")
    return str(value)


def _int(value: Any) -> int | None:
    if value is None or value == "":
        return None
    return int(value)


def _seconds_to_ms(value: Any) -> int | None:
    v = _int(value)
    if v is None:
        return None
    return v if v >= _MS_THRESHOLD else v * 1000


def _storable(*values: str | None) -> bool:
    # PostgreSQL text cannot hold NUL; such a value was never a usable 3PID or token.
    return all(v is not None and "\x00" not in v for v in values)


def _ro_uri(path: Path) -> str:
    return path.resolve().as_uri() + "?mode=ro"


def read_sydent_database(path: Path) -> SydentData:
    """Everything we import from a Sydent SQLite database (opened read-only)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no Sydent database at {path}")
    try:
        db = sqlite3.connect(_ro_uri(path), uri=True)
    except sqlite3.Error as e:
        raise SydentImportError(f"cannot open the Sydent database {path}: {e}") from None
    try:
        return _read(db, path)
    except sqlite3.DatabaseError as e:
        raise SydentImportError(f"cannot read the Sydent database {path}: {e}") from None
    finally:
        db.close()


def _read(db: sqlite3.Connection, path: Path) -> SydentData:
    tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    missing = [t for t in _REQUIRED_TABLES if t not in tables]
    if missing:
        raise SydentImportError(f"{path} is not a Sydent database (no table {', '.join(missing)})")
    data = SydentData()

    for row in db.execute(
        "SELECT medium, address, mxid, ts, notBefore, notAfter FROM local_threepid_associations ORDER BY id"
    ):
        medium, address, mxid = _text(row[0]), _text(row[1]), _text(row[2])
        ts, nb, na = _int(row[3]), _int(row[4]), _int(row[5])
        if not medium or not address or not _storable(medium, address) or ts is None:
            data.skipped_rows += 1
            continue
        if mxid is not None and (nb is None or na is None or not _storable(mxid)):
            data.skipped_rows += 1
            continue
        data.local.append(_Assoc(medium, stored_address(medium, address), mxid, ts, nb, na))

    for row in db.execute(
        "SELECT medium, address, mxid, ts, notBefore, notAfter, originServer, sgAssoc"
        " FROM global_threepid_associations ORDER BY id"
    ):
        medium, address, mxid = _text(row[0]), _text(row[1]), _text(row[2])
        ts, nb, na = _int(row[3]), _int(row[4]), _int(row[5])
        if not (medium and address and mxid) or None in (ts, nb, na) or not _storable(medium, address, mxid):
            data.skipped_rows += 1
            continue
        data.global_.append(
            _Assoc(medium, stored_address(medium, address), mxid, ts, nb, na, _text(row[6]) or "", _text(row[7]))
        )

    if "invite_tokens" in tables:
        for row in db.execute(
            "SELECT medium, address, room_id, sender, token, received_ts, sent_ts FROM invite_tokens ORDER BY id"
        ):
            medium, address, room_id, sender, token = (_text(v) for v in row[:5])
            if not (medium and address and token) or not _storable(medium, address, room_id, sender, token):
                data.skipped_rows += 1
                continue
            data.invites.append(
                {
                    "token": token,
                    "medium": medium,
                    "address": stored_address(medium, address),
                    "room_id": room_id,
                    "sender": sender,
                    "created_ts": _seconds_to_ms(row[5]),
                    "delivered_ts": _seconds_to_ms(row[6]),
                }
            )

    if "ephemeral_public_keys" in tables:
        for row in db.execute("SELECT public_key, persistence_ts FROM ephemeral_public_keys ORDER BY id"):
            key = _text(row[0])
            if not key or not _storable(key):
                data.skipped_rows += 1
                continue
            data.ephemeral_keys.append({"public_key": key, "created_ts": _seconds_to_ms(row[1])})

    if "threepid_validation_sessions" in tables:
        has_auths = "threepid_token_auths" in tables
        query = (
            "SELECT s.id, s.medium, s.address, s.clientSecret, s.validated, s.mtime, t.token, t.sendAttemptNumber"
            " FROM threepid_validation_sessions s LEFT JOIN threepid_token_auths t ON t.id ="
            " (SELECT max(a.id) FROM threepid_token_auths a WHERE a.validationSession = s.id)"
            " ORDER BY s.id"
            if has_auths
            else "SELECT id, medium, address, clientSecret, validated, mtime, NULL, NULL"
            " FROM threepid_validation_sessions ORDER BY id"
        )
        for row in db.execute(query):
            sid, medium, address, secret = _int(row[0]), _text(row[1]), _text(row[2]), _text(row[3])
            mtime = _int(row[5])
            if sid is None or not (medium and address and secret) or mtime is None or not _storable(
                medium, address, secret
            ):
                data.skipped_rows += 1
                continue
            data.sessions.append(
                _Session(
                    sid=str(sid),
                    medium=medium,
                    address=stored_address(medium, address),
                    client_secret=secret,
                    validated=bool(_int(row[4]) or 0),
                    mtime=mtime,
                    token=_text(row[6]),
                    send_attempt=_int(row[7]),
                )
            )

    if "tokens" in tables:
        created = {}
        if "accounts" in tables:
            created = {_text(u): _int(ts) for u, ts in db.execute("SELECT user_id, created_ts FROM accounts")}
        for token, user_id in db.execute("SELECT token, user_id FROM tokens"):
            token, user_id = _text(token), _text(user_id)
            if not token or not user_id or not _storable(token, user_id):
                data.skipped_rows += 1
                continue
            data.tokens.append((token, user_id, created.get(user_id)))

    if "accepted_terms_urls" in tables:
        for user_id, url in db.execute("SELECT user_id, url FROM accepted_terms_urls"):
            user_id, url = _text(user_id), _text(url)
            if not user_id or not url or not _storable(user_id, url):
                data.skipped_rows += 1
                continue
            data.terms.append((user_id, url))
    return data


# --- signing keys ---------------------------------------------------------------------------------

_HEX_SEED = re.compile(r"^[0-9a-fA-F]{64}$")


def read_signing_key_file(path: Path) -> Any:
    """Sydent's key: a one-line key file ("ed25519 <version> <base64 seed>", as ours and
    Synapse's), or sydent.conf itself (`ed25519.signingkey = ed25519 0 <seed>`, or the old
    hex-only form, which Sydent reads as version 0)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"no signing key file at {path}") from None
    except OSError as e:
        raise SydentImportError(f"cannot read the signing key file {path}: {e.strerror}") from None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        if not line.startswith("ed25519 "):
            name, sep, value = line.partition("=")
            if not sep:
                break
            if name.strip() != "ed25519.signingkey":
                continue  # another sydent.conf setting
            line = value.strip()
        parts = line.split()
        try:
            if len(parts) == 3 and parts[0] == "ed25519":
                return signedjson.key.decode_signing_key_base64(parts[0], parts[1], parts[2])
            if len(parts) == 1 and _HEX_SEED.match(parts[0]):
                key = nacl.signing.SigningKey(parts[0].encode("ascii"), encoder=nacl.encoding.HexEncoder)
                key.version = "0"  # type: ignore[attr-defined]
                key.alg = signedjson.key.NACL_ED25519  # type: ignore[attr-defined]
                return key
        except ValueError:  # bad base64/hex or seed length (nacl's errors are ValueErrors)
            pass
        break
    raise SydentImportError(
        f"{path} holds no signing key in 'ed25519 <version> <base64 seed>' format"
        " (or sydent.conf's 'ed25519.signingkey = ...')"
    )


def _same_key(a: Any, b: Any) -> bool:
    return (a.alg, a.version, bytes(a.encode())) == (b.alg, b.version, bytes(b.encode()))


def _write_key_file(path: Path, key: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        signedjson.key.write_signing_keys(f, [key])


def _signed_by(sg: dict[str, Any], key: Any) -> str | None:
    """The server name under which `key` signed `sg`, or None."""
    key_id = f"{key.alg}:{key.version}"
    verify_key = signedjson.key.get_verify_key(key)
    for name, sigs in (sg.get("signatures") or {}).items():
        if isinstance(sigs, dict) and key_id in sigs:
            try:
                signedjson.sign.verify_signed_json(sg, name, verify_key)
            except (signedjson.sign.SignatureVerifyException, ValueError):
                continue
            return str(name)
    return None


# --- choosing the associations ----------------------------------------------------------------------


@dataclass
class _Chosen:
    medium: str
    address: str
    mxid: str
    ts: int
    not_before: int
    not_after: int
    signed_json: str
    resigned: bool


def _parse_sg(a: _Assoc) -> dict[str, Any] | None:
    """Sydent's signed JSON for this row if it parses and says what the row says."""
    if not a.sg_assoc:
        return None
    try:
        sg = json.loads(a.sg_assoc)
    except ValueError:
        return None
    if not isinstance(sg, dict) or not isinstance(sg.get("address"), str):
        return None
    same = (
        sg.get("medium") == a.medium
        and stored_address(a.medium, sg["address"]) == a.address
        and sg.get("mxid") == a.mxid
        and sg.get("ts") == a.ts
        and sg.get("not_before") == a.not_before
        and sg.get("not_after") == a.not_after
    )
    return sg if same else None


def _same_binding(a: _Assoc, b: _Assoc) -> bool:
    return (a.key, a.mxid, a.ts, a.not_before, a.not_after) == (b.key, b.mxid, b.ts, b.not_before, b.not_after)


def _rank(a: _Assoc) -> tuple[int, int]:
    # Newest first; at equal ts an unbinding beats a binding, and Sydent's signed copy
    # (global) beats the unsigned local row of the same binding.
    return (a.ts, 3 if a.mxid is None else (2 if a.origin is not None else 1))


@dataclass
class _Plan:
    chosen: list[_Chosen]
    unbound: int
    unusable: int


def _plan_associations(data: SydentData, signer: ServerSigner, imported_key: Any | None) -> _Plan:
    by_key: dict[tuple[str, str], list[_Assoc]] = {}
    for a in [*data.local, *data.global_]:
        by_key.setdefault(a.key, []).append(a)

    # The names Sydent pushed its own associations under (its server_name).
    own_names = {signer.server_name}
    for local in data.local:
        if local.mxid is not None:
            own_names.update(g.origin or "" for g in by_key[local.key] if g.origin is not None and _same_binding(g, local))

    # With Sydent's key, its signatures must verify: a wrong --signing-key stops here.
    if imported_key is not None:
        own_signed = [sg for g in data.global_ if g.origin in own_names and (sg := _parse_sg(g)) is not None]
        if own_signed and not any(_signed_by(sg, imported_key) for sg in own_signed):
            raise SydentImportError(
                f"the signing key given ({imported_key.alg}:{imported_key.version}) did not sign any of the "
                f"{len(own_signed)} associations Sydent signed: is it Sydent's key?"
            )

    plan = _Plan([], 0, 0)
    warned_names: set[str] = set()
    for key, rows in by_key.items():
        newest = max(rows, key=_rank)
        if newest.mxid is None:
            plan.unbound += 1
            continue
        assert newest.not_before is not None and newest.not_after is not None
        own = newest.origin is None or newest.origin in own_names
        sg = _parse_sg(newest)
        if sg is None and newest.origin is None:
            # A local binding: Sydent's signed copy of it, if its pusher got that far.
            for g in rows:
                if g.origin is not None and _same_binding(g, newest) and (sg := _parse_sg(g)) is not None:
                    newest = g
                    break

        signed_json: str | None = None
        resigned = False
        if sg is not None and own:
            name = _signed_by(sg, signer.key)
            if name is not None:
                signed_json = newest.sg_assoc
                if name != signer.server_name and name not in warned_names:
                    warned_names.add(name)
                    logger.warning(
                        "Sydent signed associations as %r but server_name is %r: clients check the signature "
                        "against the server they asked; set server_name to Sydent's server.name",
                        name, signer.server_name,
                    )
        elif sg is not None:
            signed_json = newest.sg_assoc  # from a replication peer: its signature, verbatim
        if signed_json is None:
            if not own:
                plan.unusable += 1
                continue
            signed_json = json.dumps(
                signer.sign(
                    {
                        "medium": newest.medium,
                        "address": newest.address,
                        "mxid": newest.mxid,
                        "ts": newest.ts,
                        "not_before": newest.not_before,
                        "not_after": newest.not_after,
                    }
                )
            )
            resigned = True
        assert newest.mxid is not None and signed_json is not None
        plan.chosen.append(
            _Chosen(key[0], key[1], newest.mxid, newest.ts, newest.not_before, newest.not_after, signed_json, resigned)
        )
    return plan


# --- writing --------------------------------------------------------------------------------------


async def _existing(conn: AsyncConnection, columns: Sequence[Any], keys: Sequence[Any], extra: Sequence[Any] = ()) -> dict:
    """{key: row} for the keys already in the table (key = one column value or a tuple)."""
    out: dict[Any, Any] = {}
    keys = list(dict.fromkeys(keys))
    match = columns[0] if len(columns) == 1 else tuple_(*columns)
    for chunk in chunks(keys, _CHUNK):
        rows = await conn.execute(select(*columns, *extra).where(match.in_(chunk)))
        for row in rows:
            k = row[0] if len(columns) == 1 else tuple(row[: len(columns)])
            out[k] = row
    return out


async def _insert_missing(conn: AsyncConnection, table: Any, rows: list[dict[str, Any]]) -> None:
    for chunk in chunks(rows, _CHUNK):
        await conn.execute(insert_for(conn, table).on_conflict_do_nothing(), list(chunk))


async def _import_associations(conn: AsyncConnection, plan: _Plan, pepper: str, counts: dict[str, int]) -> None:
    existing = await _existing(
        conn,
        [associations.c.medium, associations.c.address],
        [(c.medium, c.address) for c in plan.chosen],
        [associations.c.mxid, associations.c.ts, associations.c.not_before, associations.c.not_after,
         associations.c.signed_json],
    )
    new_rows = []
    for c in plan.chosen:
        values = {
            "medium": c.medium,
            "address": c.address,
            "lookup_hash": lookup_hash(c.address, c.medium, pepper),
            "mxid": c.mxid,
            "ts": c.ts,
            "not_before": c.not_before,
            "not_after": c.not_after,
            "signed_json": c.signed_json,
        }
        ours = existing.get((c.medium, c.address))
        if ours is not None:
            if tuple(ours[2:]) == (c.mxid, c.ts, c.not_before, c.not_after, c.signed_json):
                counts["associations_already_present"] += 1
                continue
            if ours[3] >= c.ts:
                counts["associations_newer_here_kept"] += 1
                continue
            # Ours is older: replace it, unless it changed meanwhile (never overwrite newer).
            result = await conn.execute(
                update(associations)
                .where(associations.c.medium == c.medium, associations.c.address == c.address,
                       associations.c.ts < c.ts)
                .values(**values)
            )
            if result.rowcount == 0:
                counts["associations_newer_here_kept"] += 1
                continue
        else:
            new_rows.append(values)
        counts["associations_imported"] += 1
        counts["associations_resigned"] += int(c.resigned)
    await _insert_missing(conn, associations, new_rows)


async def _import_rest(conn: AsyncConnection, data: SydentData, counts: dict[str, int]) -> None:
    now = now_ms()

    # Invites (Sydent's tokens are unique in practice; the newest row wins otherwise).
    by_token = {inv["token"]: inv for inv in data.invites}
    have = await _existing(conn, [invites.c.token], list(by_token))
    rows = []
    for token, inv in by_token.items():
        if token in have:
            counts["invites_already_present"] += 1
            continue
        rows.append(
            {
                **inv,
                "created_ts": inv["created_ts"] if inv["created_ts"] is not None else now,
                "ephemeral_public_key": "",
                "callback_id": None,
            }
        )
    await _insert_missing(conn, invites, rows)
    counts["invites_imported"] += len(rows)

    # Ephemeral public keys.
    by_key = {k["public_key"]: k for k in data.ephemeral_keys if len(k["public_key"]) <= 64}
    have = await _existing(conn, [ephemeral_public_keys.c.public_key], list(by_key))
    rows = []
    for public_key, k in by_key.items():
        if public_key in have:
            counts["ephemeral_keys_already_present"] += 1
            continue
        rows.append({"public_key": public_key, "created_ts": k["created_ts"] if k["created_ts"] is not None else now})
    await _insert_missing(conn, ephemeral_public_keys, rows)
    counts["ephemeral_keys_imported"] += len(rows)

    # Validation sessions: Sydent's integer sid, its latest token and send attempt.
    usable = [s for s in data.sessions if s.token is not None and _storable(s.token)]
    counts["sessions_without_token_skipped"] += len(data.sessions) - len(usable)
    have = await _existing(conn, [validation_sessions.c.sid], [s.sid for s in usable])
    rows = []
    for s in usable:
        if s.sid in have:
            counts["sessions_already_present"] += 1
            continue
        assert s.token is not None  # `usable` has a token
        rows.append(
            {
                "sid": s.sid,
                "medium": s.medium,
                "address": s.address,
                "client_secret_hash": hash_secret(s.client_secret),
                # Only the hash is kept, as for our own sessions: Sydent's mailed links still validate.
                "token_hash": hash_secret(s.token),
                "send_attempt": s.send_attempt if s.send_attempt is not None else -1,
                "next_link": None,
                "brand": None,
                "created_ts": s.mtime,
                "mtime": s.mtime,
                "validated": s.validated,
                "validated_at": s.mtime if s.validated else None,
                "failed_attempts": 0,
            }
        )
        have[s.sid] = True
    await _insert_missing(conn, validation_sessions, rows)
    counts["sessions_imported"] += len(rows)

    # Access tokens, stored hashed.
    by_hash = {hash_secret(token): (user_id, created) for token, user_id, created in data.tokens}
    have = await _existing(conn, [accounts.c.token_hash], list(by_hash))
    rows = []
    for token_hash, (user_id, created) in by_hash.items():
        if token_hash in have:
            counts["account_tokens_already_present"] += 1
            continue
        rows.append({"token_hash": token_hash, "user_id": user_id, "created_ts": created if created is not None else now})
    await _insert_missing(conn, accounts, rows)
    counts["account_tokens_imported"] += len(rows)

    # Terms acceptances.
    pairs = list(dict.fromkeys(data.terms))
    have = await _existing(conn, [accepted_terms.c.user_id, accepted_terms.c.url], pairs)
    rows = [{"user_id": u, "url": url} for u, url in pairs if (u, url) not in have]
    counts["terms_acceptances_already_present"] += len(pairs) - len(rows)
    await _insert_missing(conn, accepted_terms, rows)
    counts["terms_acceptances_imported"] += len(rows)


def _new_counts() -> dict[str, int]:
    names = [
        "associations_imported", "associations_already_present", "associations_newer_here_kept",
        "associations_resigned", "associations_unbound_in_sydent", "associations_unusable_skipped",
        "invites_imported", "invites_already_present",
        "ephemeral_keys_imported", "ephemeral_keys_already_present",
        "sessions_imported", "sessions_already_present", "sessions_without_token_skipped",
        "account_tokens_imported", "account_tokens_already_present",
        "terms_acceptances_imported", "terms_acceptances_already_present",
        "signing_key_imported", "signing_key_already_present",
        "sydent_rows_unreadable_skipped",
    ]
    return dict.fromkeys(names, 0)


async def import_sydent(config: Config, sydent_db: Path, signing_key_file: Path | None = None) -> dict[str, int]:
    """Import a Sydent SQLite database into ours; returns counts per kind (see `_new_counts`).

    Raises FileNotFoundError (no such database or key file), SydentImportError (not a Sydent
    database, unreadable key, a key that did not sign Sydent's associations) and
    SigningKeyMismatch (our key file holds another key) before writing anything.
    """
    counts = _new_counts()
    data = await asyncio.to_thread(read_sydent_database, Path(sydent_db))
    counts["sydent_rows_unreadable_skipped"] = data.skipped_rows

    # The key we serve from now on: Sydent's (installed if we have none), or ours.
    our_key_path = Path(config.signing_key_path)
    imported_key = None
    write_key = False
    if signing_key_file is not None:
        imported_key = read_signing_key_file(Path(signing_key_file))
        if our_key_path.exists():
            ours = load_or_create_signing_key(our_key_path)
            if not _same_key(ours, imported_key):
                raise SigningKeyMismatch(
                    f"{our_key_path} (signing_key_path) holds a different key ({ours.alg}:{ours.version}) than "
                    f"{signing_key_file} ({imported_key.alg}:{imported_key.version}); refusing to import: "
                    f"signatures made with either key would stop verifying. Move {our_key_path} away "
                    "(if nothing was signed with it yet) and run again."
                )
            counts["signing_key_already_present"] = 1
        else:
            write_key = True
        serving_key = imported_key
    else:
        serving_key = None  # ours, loaded (or created, as `serve` would) below
    if serving_key is None:
        serving_key = load_or_create_signing_key(our_key_path)
    signer = ServerSigner(config.effective_server_name, serving_key)
    plan = _plan_associations(data, signer, imported_key)

    if write_key:
        try:
            _write_key_file(our_key_path, imported_key)
        except FileExistsError:
            raise SigningKeyMismatch(f"{our_key_path} appeared while importing; run again") from None
        counts["signing_key_imported"] = 1
        logger.info("installed Sydent's signing key %s:%s at %s", signer.key.alg, signer.key.version, our_key_path)

    engine = open_database(config.database.url)
    try:
        await migrate(engine)
        pepper = await load_pepper(ServerStateStore(engine), AssociationStore(engine))
        async with engine.begin() as conn:  # all or nothing
            await _import_associations(conn, plan, pepper, counts)
            await _import_rest(conn, data, counts)
        # Fresh statistics for the planner: a big import changes the tables' shape at once,
        # and autovacuum (if it runs at all) gets to it later.
        async with engine.begin() as conn:
            await conn.execute(text("ANALYZE"))
    finally:
        await engine.dispose()

    counts["associations_unbound_in_sydent"] = plan.unbound
    counts["associations_unusable_skipped"] = plan.unusable
    if signing_key_file is None and counts["associations_resigned"]:
        logger.warning(
            "no --signing-key: %d association(s) Sydent signed were re-signed with our key %s; "
            "signatures clients saved from Sydent will not verify against it",
            counts["associations_resigned"], signer.key_id,
        )
    logger.info("import from %s: %s", sydent_db, ", ".join(f"{k}={v}" for k, v in counts.items() if v))
    return counts
