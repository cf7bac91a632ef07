"""Reading Sydent's SQLite database (Sydent 2.x schema: `sydent/db/*.sql` and `sqlitedb.py`).

The database is opened read-only. Each table has its own reader, which keeps what we can
store and counts the rest as unreadable (`SydentData.skipped_rows`). Addresses come out in
our stored form (email case-folded). A table Sydent's older versions lack is read as empty,
except the two association tables, which make it a Sydent database.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from sydent_lite.admin.sydent_import.errors import SydentImportError
from sydent_lite.threepids import stored_address

# Sydent writes invite and ephemeral-key times with int(time.time()): seconds. A value this
# large is already in milliseconds (as seconds it would be the year 5138).
_MS_THRESHOLD = 100_000_000_000
_REQUIRED_TABLES = ("local_threepid_associations", "global_threepid_associations")


@dataclass
class SydentAssociation:
    """A row of `local_threepid_associations` (origin None) or `global_threepid_associations`."""

    medium: str
    address: str  # our stored form (email case-folded)
    mxid: str | None  # None: an unbinding (local table only)
    ts: int
    not_before: int | None  # None only for an unbinding
    not_after: int | None
    origin: str | None = None  # originServer; None for the local table
    sg_assoc: str | None = None  # the signed JSON, verbatim

    @property
    def key(self) -> tuple[str, str]:
        return (self.medium, self.address)


@dataclass
class SydentInvite:
    token: str
    medium: str
    address: str
    room_id: str
    sender: str
    created_ts: int | None  # milliseconds
    delivered_ts: int | None


@dataclass
class SydentEphemeralKey:
    public_key: str
    created_ts: int | None  # milliseconds


@dataclass
class SydentSession:
    sid: str  # str(Sydent's integer id)
    medium: str
    address: str
    client_secret: str
    validated: bool
    mtime: int
    token: str | None  # the latest token; None if it has none we could store
    send_attempt: int | None


@dataclass
class SydentToken:
    token: str
    user_id: str
    created_ts: int | None  # the account's


@dataclass
class SydentData:
    local: list[SydentAssociation] = field(default_factory=list)
    global_: list[SydentAssociation] = field(default_factory=list)
    invites: list[SydentInvite] = field(default_factory=list)
    ephemeral_keys: list[SydentEphemeralKey] = field(default_factory=list)
    sessions: list[SydentSession] = field(default_factory=list)
    tokens: list[SydentToken] = field(default_factory=list)
    terms: list[tuple[str, str]] = field(default_factory=list)  # user_id, url
    pepper: str | None = None  # hashing_metadata.lookup_pepper: what clients hashed with
    skipped_rows: int = 0


def read_sydent_database(path: Path) -> SydentData:
    """Everything we import from a Sydent SQLite database (opened read-only)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no Sydent database at {path}")
    try:
        db = sqlite3.connect(path.resolve().as_uri() + "?mode=ro", uri=True)
    except sqlite3.Error as e:
        raise SydentImportError(f"cannot open the Sydent database {path}: {e}") from None
    db.row_factory = sqlite3.Row
    try:
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        missing = [t for t in _REQUIRED_TABLES if t not in tables]
        if missing:
            raise SydentImportError(f"{path} is not a Sydent database (no table {', '.join(missing)})")
        data = SydentData()
        for reader in _READERS:
            reader(db, tables, data)
        return data
    except sqlite3.DatabaseError as e:
        raise SydentImportError(f"cannot read the Sydent database {path}: {e}") from None
    finally:
        db.close()


# --- values as Sydent's SQLite (dynamically typed) holds them ---------------------------------------


def _text(value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("utf-8")
    return str(value)


def _int(value: object) -> int | None:
    if value is None or value == "":
        return None
    if not isinstance(value, int | float | str | bytes):  # all a SQLite value can be
        raise ValueError(f"not a number: {value!r}")
    return int(value)


def _seconds_to_ms(value: object) -> int | None:
    v = _int(value)
    if v is None:
        return None
    return v if v >= _MS_THRESHOLD else v * 1000


def _storable(*values: str) -> bool:
    # PostgreSQL text cannot hold NUL; such a value was never a usable 3PID or token.
    return all("\x00" not in v for v in values)


# --- one reader per table --------------------------------------------------------------------------


def _read_local_associations(db: sqlite3.Connection, tables: set[str], data: SydentData) -> None:
    for row in db.execute(
        "SELECT medium, address, mxid, ts, notBefore, notAfter FROM local_threepid_associations ORDER BY id"
    ):
        medium, address, mxid = _text(row["medium"]), _text(row["address"]), _text(row["mxid"])
        ts, not_before, not_after = _int(row["ts"]), _int(row["notBefore"]), _int(row["notAfter"])
        if not medium or not address or not _storable(medium, address) or ts is None:
            data.skipped_rows += 1
            continue
        if mxid is not None and (not_before is None or not_after is None or not _storable(mxid)):
            data.skipped_rows += 1
            continue
        data.local.append(SydentAssociation(medium, stored_address(medium, address), mxid, ts, not_before, not_after))


def _read_global_associations(db: sqlite3.Connection, tables: set[str], data: SydentData) -> None:
    for row in db.execute(
        "SELECT medium, address, mxid, ts, notBefore, notAfter, originServer, sgAssoc"
        " FROM global_threepid_associations ORDER BY id"
    ):
        medium, address, mxid = _text(row["medium"]), _text(row["address"]), _text(row["mxid"])
        ts, not_before, not_after = _int(row["ts"]), _int(row["notBefore"]), _int(row["notAfter"])
        if (
            not (medium and address and mxid)
            or ts is None
            or not_before is None
            or not_after is None
            or not _storable(medium, address, mxid)
        ):
            data.skipped_rows += 1
            continue
        origin = _text(row["originServer"]) or ""
        data.global_.append(
            SydentAssociation(
                medium, stored_address(medium, address), mxid, ts, not_before, not_after, origin, _text(row["sgAssoc"])
            )
        )


def _read_invites(db: sqlite3.Connection, tables: set[str], data: SydentData) -> None:
    if "invite_tokens" not in tables:
        return
    for row in db.execute(
        "SELECT medium, address, room_id, sender, token, received_ts, sent_ts FROM invite_tokens ORDER BY id"
    ):
        medium, address, token = _text(row["medium"]), _text(row["address"]), _text(row["token"])
        room_id, sender = _text(row["room_id"]), _text(row["sender"])
        if (
            not (medium and address and token)
            or room_id is None
            or sender is None
            or not _storable(medium, address, room_id, sender, token)
        ):
            data.skipped_rows += 1
            continue
        data.invites.append(
            SydentInvite(
                token=token,
                medium=medium,
                address=stored_address(medium, address),
                room_id=room_id,
                sender=sender,
                created_ts=_seconds_to_ms(row["received_ts"]),
                delivered_ts=_seconds_to_ms(row["sent_ts"]),
            )
        )


def _read_ephemeral_keys(db: sqlite3.Connection, tables: set[str], data: SydentData) -> None:
    if "ephemeral_public_keys" not in tables:
        return
    for row in db.execute("SELECT public_key, persistence_ts FROM ephemeral_public_keys ORDER BY id"):
        key = _text(row["public_key"])
        if not key or not _storable(key):
            data.skipped_rows += 1
            continue
        data.ephemeral_keys.append(SydentEphemeralKey(key, _seconds_to_ms(row["persistence_ts"])))


# A session and its latest token (Sydent keeps one row per token sent).
_SESSIONS_WITH_TOKENS = (
    "SELECT s.id AS id, s.medium AS medium, s.address AS address, s.clientSecret AS client_secret,"
    " s.validated AS validated, s.mtime AS mtime, t.token AS token, t.sendAttemptNumber AS send_attempt"
    " FROM threepid_validation_sessions s LEFT JOIN threepid_token_auths t ON t.id ="
    " (SELECT max(a.id) FROM threepid_token_auths a WHERE a.validationSession = s.id)"
    " ORDER BY s.id"
)
_SESSIONS_WITHOUT_TOKENS = (
    "SELECT id, medium, address, clientSecret AS client_secret, validated, mtime, NULL AS token,"
    " NULL AS send_attempt FROM threepid_validation_sessions ORDER BY id"
)


def _read_sessions(db: sqlite3.Connection, tables: set[str], data: SydentData) -> None:
    if "threepid_validation_sessions" not in tables:
        return
    query = _SESSIONS_WITH_TOKENS if "threepid_token_auths" in tables else _SESSIONS_WITHOUT_TOKENS
    for row in db.execute(query):
        sid, mtime = _int(row["id"]), _int(row["mtime"])
        medium, address, secret = _text(row["medium"]), _text(row["address"]), _text(row["client_secret"])
        if (
            sid is None
            or not (medium and address and secret)
            or mtime is None
            or not _storable(medium, address, secret)
        ):
            data.skipped_rows += 1
            continue
        token = _text(row["token"])
        data.sessions.append(
            SydentSession(
                sid=str(sid),
                medium=medium,
                address=stored_address(medium, address),
                client_secret=secret,
                validated=bool(_int(row["validated"]) or 0),
                mtime=mtime,
                token=token if token is not None and _storable(token) else None,
                send_attempt=_int(row["send_attempt"]),
            )
        )


def _read_tokens(db: sqlite3.Connection, tables: set[str], data: SydentData) -> None:
    if "tokens" not in tables:
        return
    created: dict[str | None, int | None] = {}
    if "accounts" in tables:
        created = {
            _text(r["user_id"]): _int(r["created_ts"]) for r in db.execute("SELECT user_id, created_ts FROM accounts")
        }
    for row in db.execute("SELECT token, user_id FROM tokens"):
        token, user_id = _text(row["token"]), _text(row["user_id"])
        if not token or not user_id or not _storable(token, user_id):
            data.skipped_rows += 1
            continue
        data.tokens.append(SydentToken(token, user_id, created.get(user_id)))


def _read_terms(db: sqlite3.Connection, tables: set[str], data: SydentData) -> None:
    if "accepted_terms_urls" not in tables:
        return
    for row in db.execute("SELECT user_id, url FROM accepted_terms_urls"):
        user_id, url = _text(row["user_id"]), _text(row["url"])
        if not user_id or not url or not _storable(user_id, url):
            data.skipped_rows += 1
            continue
        data.terms.append((user_id, url))


def _read_pepper(db: sqlite3.Connection, tables: set[str], data: SydentData) -> None:
    # Sydent keeps one row (id 0), written at its first start (sydent/db/hashing_metadata.py).
    if "hashing_metadata" not in tables:
        return
    row = db.execute("SELECT lookup_pepper FROM hashing_metadata ORDER BY id LIMIT 1").fetchone()
    pepper = _text(row["lookup_pepper"]) if row is not None else None
    data.pepper = pepper if pepper and _storable(pepper) else None


_READERS: tuple[Callable[[sqlite3.Connection, set[str], SydentData], None], ...] = (
    _read_local_associations,
    _read_global_associations,
    _read_invites,
    _read_ephemeral_keys,
    _read_sessions,
    _read_tokens,
    _read_terms,
    _read_pepper,
)
