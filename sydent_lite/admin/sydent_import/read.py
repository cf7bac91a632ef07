"""Reading Sydent's SQLite database (Sydent 2.x schema: `sydent/db/*.sql` and `sqlitedb.py`).

The database is opened read-only. Each table has its own reader, which keeps what we can
store and counts the rest as unreadable (`SydentData.skipped_rows`,
`SydentSource.skipped_association_rows`). The associations, the bulk of a big server, are
never held at once: `association_groups` streams them one 3PID at a time. Addresses come out in
our stored form (email case-folded). A table Sydent's older versions lack is read as empty,
except the two association tables, which make it a Sydent database.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from sydent_lite.admin.sydent_import.errors import SydentImportError
from sydent_lite.threepids import stored_address

# Sydent writes invite and ephemeral-key times with int(time.time()): seconds. A value this
# large is already in milliseconds (as seconds it would be the year 5138).
_MS_THRESHOLD = 100_000_000_000
_REQUIRED_TABLES = ("local_threepid_associations", "global_threepid_associations")


class SydentAssociation(NamedTuple):
    """A row of `local_threepid_associations` (origin None) or `global_threepid_associations`.
    A tuple: millions are made, and each batch is pickled to the planning worker."""

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
    """Every table but the associations, which are streamed (`SydentSource.association_groups`):
    a Sydent server holds millions of those and few of these."""

    invites: list[SydentInvite] = field(default_factory=list)
    ephemeral_keys: list[SydentEphemeralKey] = field(default_factory=list)
    sessions: list[SydentSession] = field(default_factory=list)
    tokens: list[SydentToken] = field(default_factory=list)
    terms: list[tuple[str, str]] = field(default_factory=list)  # user_id, url
    pepper: str | None = None  # hashing_metadata.lookup_pepper: what clients hashed with
    skipped_rows: int = 0


# Every association row, local then global, in the order of its 3PID's stored form: the rows
# of one 3PID come together. Within a 3PID, local first, then by id (the order the planner
# breaks ties in). SQLite sorts on disk past its cache, so memory stays flat in the table size.
_ASSOCIATIONS_BY_THREEPID = (
    "SELECT * FROM ("
    " SELECT 0 AS src, id, medium, address, mxid, ts, notBefore, notAfter, NULL AS originServer,"
    " NULL AS sgAssoc, sort_text(medium) AS k_medium, sort_address(medium, address) AS k_address"
    " FROM local_threepid_associations"
    " UNION ALL"
    " SELECT 1 AS src, id, medium, address, mxid, ts, notBefore, notAfter, originServer, {sg} AS sgAssoc,"
    " sort_text(medium) AS k_medium, sort_address(medium, address) AS k_address"
    " FROM global_threepid_associations"
    ") ORDER BY k_medium, k_address, src, id"
)


class SydentSource:
    """A Sydent SQLite database, opened read-only; the associations read one 3PID at a time."""

    def __init__(self, path: Path) -> None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no Sydent database at {path}")
        self.path = path
        try:
            self._db = sqlite3.connect(path.resolve().as_uri() + "?mode=ro", uri=True)
        except sqlite3.Error as e:
            raise SydentImportError(f"cannot open the Sydent database {path}: {e}") from None
        self._db.row_factory = sqlite3.Row
        self._db.create_function("sort_text", 1, _sort_text, deterministic=True)
        self._db.create_function("sort_address", 2, _sort_address, deterministic=True)
        self.skipped_association_rows = 0
        with self._reading():
            # The sort's runs go to temporary files past this much memory (KiB).
            self._db.execute("PRAGMA cache_size = -65536")
            self.tables = {r[0] for r in self._db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        missing = [t for t in _REQUIRED_TABLES if t not in self.tables]
        if missing:
            self.close()
            raise SydentImportError(f"{path} is not a Sydent database (no table {', '.join(missing)})")

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> SydentSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _reading(self) -> Iterator[None]:
        try:
            yield
        except sqlite3.DatabaseError as e:
            raise SydentImportError(f"cannot read the Sydent database {self.path}: {e}") from None

    def other_tables(self) -> SydentData:
        """Everything but the associations."""
        data = SydentData()
        with self._reading():
            for reader in _READERS:
                reader(self._db, self.tables, data)
        return data

    def origins(self) -> set[str]:
        """The originServer of every association in Sydent's global table."""
        with self._reading():
            return {
                _text(r[0]) or ""
                for r in self._db.execute("SELECT DISTINCT originServer FROM global_threepid_associations")
            }

    def association_groups(self, *, signatures: bool = True) -> Iterator[list[SydentAssociation]]:
        """The readable rows of each 3PID, local first, one list per 3PID. Unreadable rows are
        counted in `skipped_association_rows` (when `signatures`: the pass that imports)."""
        group: list[SydentAssociation] = []
        query = _ASSOCIATIONS_BY_THREEPID.format(sg="sgAssoc" if signatures else "NULL")
        with self._reading():
            for row in self._db.execute(query):
                a = _local_association(row) if row["src"] == 0 else _global_association(row)
                if a is None:
                    self.skipped_association_rows += int(signatures)
                    continue
                if group and group[0].key != a.key:
                    yield group
                    group = []
                group.append(a)
        if group:
            yield group

    def global_associations(self) -> Iterator[SydentAssociation]:
        """The readable rows of Sydent's global table, in the order Sydent wrote them."""
        with self._reading():
            for row in self._db.execute(
                "SELECT medium, address, mxid, ts, notBefore, notAfter, originServer, sgAssoc"
                " FROM global_threepid_associations ORDER BY id"
            ):
                a = _global_association(row)
                if a is not None:
                    yield a


def association_batches(
    groups: Iterator[list[SydentAssociation]], rows: int
) -> Iterator[list[list[SydentAssociation]]]:
    """Whole 3PIDs' groups, about `rows` rows at a time (a 3PID is never split)."""
    batch: list[list[SydentAssociation]] = []
    held = 0
    for group in groups:
        batch.append(group)
        held += len(group)
        if held >= rows:
            yield batch
            batch, held = [], 0
    if batch:
        yield batch


_SqliteValue = str | bytes | int | float | None


def _sort_text(value: _SqliteValue) -> _SqliteValue:
    # As `_text` reads it, without failing inside SQLite: text and blob of the same value sort together.
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def _sort_address(medium: _SqliteValue, address: _SqliteValue) -> _SqliteValue:
    medium, address = _sort_text(medium), _sort_text(address)
    if isinstance(medium, str) and isinstance(address, str):
        return stored_address(medium, address)
    return address


# --- values as Sydent's SQLite (dynamically typed) holds them ---------------------------------------


def _text(value: object) -> str | None:
    if type(value) is str:  # nearly every value
        return value
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("utf-8")
    return str(value)


def _int(value: object) -> int | None:
    if type(value) is int:  # nearly every value: the checks below cost a third of reading a row
        return value
    if value is None or value == "":
        return None
    if not isinstance(value, (int, float, str, bytes)):  # all a SQLite value can be
        raise ValueError(f"not a number: {value!r}")
    return int(value)


def _seconds_to_ms(value: object) -> int | None:
    v = _int(value)
    if v is None:
        return None
    return v if v >= _MS_THRESHOLD else v * 1000


def _storable(*values: str) -> bool:
    # PostgreSQL text cannot hold NUL; such a value was never a usable 3PID or token.
    return "\x00" not in "".join(values)  # one C scan, not a generator per row


# --- one reader per table --------------------------------------------------------------------------


def _local_association(row: sqlite3.Row) -> SydentAssociation | None:
    medium, address, mxid = _text(row["medium"]), _text(row["address"]), _text(row["mxid"])
    ts, not_before, not_after = _int(row["ts"]), _int(row["notBefore"]), _int(row["notAfter"])
    if not medium or not address or not _storable(medium, address) or ts is None:
        return None
    if mxid is not None and (not_before is None or not_after is None or not _storable(mxid)):
        return None
    return SydentAssociation(medium, stored_address(medium, address), mxid, ts, not_before, not_after)


def _global_association(row: sqlite3.Row) -> SydentAssociation | None:
    medium, address, mxid = _text(row["medium"]), _text(row["address"]), _text(row["mxid"])
    ts, not_before, not_after = _int(row["ts"]), _int(row["notBefore"]), _int(row["notAfter"])
    if (
        not (medium and address and mxid)
        or ts is None
        or not_before is None
        or not_after is None
        or not _storable(medium, address, mxid)
    ):
        return None
    origin = _text(row["originServer"]) or ""
    return SydentAssociation(
        medium, stored_address(medium, address), mxid, ts, not_before, not_after, origin, _text(row["sgAssoc"])
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
    _read_invites,
    _read_ephemeral_keys,
    _read_sessions,
    _read_tokens,
    _read_terms,
    _read_pepper,
)
