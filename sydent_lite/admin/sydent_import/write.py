"""Writing an import into our database, in the caller's transaction.

Nothing of ours is overwritten by older data, and writing the same import twice changes
nothing: an association replaces ours only if it is newer (or is the same binding, whose
signature made with another key is replaced by the one we serve now: a rerun with Sydent's
key repairs an import made without it); every other row goes in only if its key is not in
the table yet.

What becomes of Sydent's rows:
- invites: Sydent keeps no per-invite ephemeral key ("" for the public one); its seconds
  become milliseconds (read.py);
- validation sessions: sid = str(Sydent's integer id), the latest token; client secret and
  token hashed, as for our own sessions (Sydent's mailed links still validate);
- access tokens: one row per token, hashed;
- terms acceptances: as they are.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Row, Table, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from sydent_lite.admin.sydent_import.bulk_pg import COLUMNS, PgAssociationWriter
from sydent_lite.admin.sydent_import.counts import CopiedKind, ImportCounts
from sydent_lite.admin.sydent_import.plan import ChosenAssociation
from sydent_lite.admin.sydent_import.read import (
    SydentData,
    SydentEphemeralKey,
    SydentInvite,
    SydentSession,
    SydentToken,
)
from sydent_lite.secrets_util import hash_secret
from sydent_lite.services.hashing import lookup_hash
from sydent_lite.storage.batching import chunks
from sydent_lite.storage.dialect import insert_for
from sydent_lite.storage.tables import (
    accepted_terms,
    accounts,
    associations,
    ephemeral_public_keys,
    invites,
    validation_sessions,
)

_CHUNK = 500
_MAX_EPHEMERAL_KEY = 64  # ephemeral_public_keys.public_key: longer ones were never ours to check


async def write_other_tables(conn: AsyncConnection, data: SydentData, now: int, counts: ImportCounts) -> None:
    """Every table but the associations (`now`: for rows Sydent kept no time of)."""
    counts.sessions_without_token_skipped += sum(1 for s in data.sessions if s.token is None)
    for copy in _copies(data, now):
        imported, present = await _insert_new_rows(conn, copy)
        counts.add_copied(copy.counted_as, imported, present)


# --- associations ---------------------------------------------------------------------------------


async def write_associations(
    conn: AsyncConnection,
    chosen: list[ChosenAssociation],
    pepper: str,
    counts: ImportCounts,
    bulk: PgAssociationWriter | None = None,
) -> None:
    """One batch of planned associations (each 3PID once in a batch, and in one batch only).

    New 3PIDs go in first (ON CONFLICT DO NOTHING RETURNING says which did); only the others
    are read back to compare. Reading every key first would ask PostgreSQL about a table this
    transaction keeps growing, whose statistics still say it is empty: a sequential scan per
    batch, quadratic in the import. On PostgreSQL the rows go in by COPY (`bulk`)."""
    if bulk is not None:
        inserted = await bulk.insert_new([_record(c, pepper) for c in chosen])
    else:
        inserted = set()
        for chunk in chunks([_values(c, pepper) for c in chosen], _CHUNK):
            stmt = insert_for(conn, associations).on_conflict_do_nothing()
            result = await conn.execute(stmt.returning(associations.c.medium, associations.c.address), list(chunk))
            inserted.update((m, a) for m, a in result.all())
    existing = []
    for c in chosen:
        if (c.medium, c.address) in inserted:
            counts.associations_imported += 1
            counts.associations_resigned += int(c.resigned)
        else:
            existing.append(c)
    if existing:
        await _merge_existing(conn, existing, {(c.medium, c.address): _values(c, pepper) for c in existing}, counts)


def _record(c: ChosenAssociation, pepper: str) -> tuple[Any, ...]:
    # In bulk_pg.COLUMNS order.
    return (
        c.medium,
        c.address,
        lookup_hash(c.address, c.medium, pepper),
        c.mxid,
        c.ts,
        c.not_before,
        c.not_after,
        c.signed_json,
    )


def _values(c: ChosenAssociation, pepper: str) -> dict[str, Any]:
    return dict(zip(COLUMNS, _record(c, pepper), strict=True))


async def _merge_existing(
    conn: AsyncConnection,
    chosen: list[ChosenAssociation],
    rows: dict[tuple[str, str], dict[str, Any]],
    counts: ImportCounts,
) -> None:
    """The planned associations whose 3PID we have: ours is kept unless it is older (or the
    same binding under another key's signature)."""
    key = ("medium", "address")
    compared = ("mxid", "ts", "not_before", "not_after", "signed_json")
    ours = await _rows_by_key(conn, associations, key, [(c.medium, c.address) for c in chosen], compared)
    for c in chosen:
        values = rows[(c.medium, c.address)]
        existing = ours.get((c.medium, c.address))
        if existing is None:  # gone since the insert said it was there: nothing else writes meanwhile
            raise RuntimeError(f"association of a {c.medium} vanished during the import")
        if tuple(existing)[len(key) :] == (c.mxid, c.ts, c.not_before, c.not_after, c.signed_json):
            counts.associations_already_present += 1
            continue
        if tuple(existing)[len(key) : len(key) + 4] == (c.mxid, c.ts, c.not_before, c.not_after):
            # The same binding signed with another key (an earlier import without Sydent's
            # key): the signature we serve now (Sydent's, or made with the key we serve) goes in.
            result = await conn.execute(
                update(associations)
                .where(
                    associations.c.medium == c.medium,
                    associations.c.address == c.address,
                    associations.c.ts == c.ts,
                    associations.c.signed_json == existing.signed_json,
                )
                .values(signed_json=c.signed_json)
            )
            counts.associations_signature_repaired += result.rowcount
            continue
        if existing.ts >= c.ts:
            counts.associations_newer_here_kept += 1
            continue
        # Ours is older: replace it, unless it changed meanwhile (never overwrite newer).
        result = await conn.execute(
            update(associations)
            .where(associations.c.medium == c.medium, associations.c.address == c.address, associations.c.ts < c.ts)
            .values(**values)
        )
        if result.rowcount == 0:
            counts.associations_newer_here_kept += 1
            continue
        counts.associations_imported += 1
        counts.associations_resigned += int(c.resigned)


# --- every other table: rows copied when their key is new ----------------------------------------


@dataclass(frozen=True)
class _TableCopy:
    table: Table
    key: tuple[str, ...]  # the columns that identify a row
    rows: list[dict[str, Any]]  # of rows with one key, the last wins (Sydent's newest)
    counted_as: CopiedKind


def _copies(data: SydentData, now: int) -> list[_TableCopy]:
    sessions = [_session_row(s, s.token) for s in data.sessions if s.token is not None]  # others: skipped, counted
    keys = [_ephemeral_key_row(k, now) for k in data.ephemeral_keys if len(k.public_key) <= _MAX_EPHEMERAL_KEY]
    return [
        _TableCopy(invites, ("token",), [_invite_row(i, now) for i in data.invites], "invites"),
        _TableCopy(ephemeral_public_keys, ("public_key",), keys, "ephemeral_keys"),
        _TableCopy(validation_sessions, ("sid",), sessions, "sessions"),
        _TableCopy(accounts, ("token_hash",), [_token_row(t, now) for t in data.tokens], "account_tokens"),
        _TableCopy(
            accepted_terms,
            ("user_id", "url"),
            [{"user_id": u, "url": url} for u, url in data.terms],
            "terms_acceptances",
        ),
    ]


def _invite_row(invite: SydentInvite, now: int) -> dict[str, Any]:
    return {
        "token": invite.token,
        "medium": invite.medium,
        "address": invite.address,
        "room_id": invite.room_id,
        "sender": invite.sender,
        "ephemeral_public_key": "",
        "created_ts": invite.created_ts if invite.created_ts is not None else now,
        "callback_id": None,
        "delivered_ts": invite.delivered_ts,
    }


def _ephemeral_key_row(key: SydentEphemeralKey, now: int) -> dict[str, Any]:
    return {"public_key": key.public_key, "created_ts": key.created_ts if key.created_ts is not None else now}


def _session_row(session: SydentSession, token: str) -> dict[str, Any]:
    return {
        "sid": session.sid,
        "medium": session.medium,
        "address": session.address,
        "client_secret_hash": hash_secret(session.client_secret),
        "token_hash": hash_secret(token),
        "send_attempt": session.send_attempt if session.send_attempt is not None else -1,
        "next_link": None,
        "brand": None,
        "created_ts": session.mtime,
        "mtime": session.mtime,
        "validated": session.validated,
        "validated_at": session.mtime if session.validated else None,
        "failed_attempts": 0,
    }


def _token_row(token: SydentToken, now: int) -> dict[str, Any]:
    return {
        "token_hash": hash_secret(token.token),
        "user_id": token.user_id,
        "created_ts": token.created_ts if token.created_ts is not None else now,
    }


async def _insert_new_rows(conn: AsyncConnection, copy: _TableCopy) -> tuple[int, int]:
    """Insert the rows whose key is not in the table yet; (rows inserted, keys already there)."""
    by_key = {_key_of(row, copy.key): row for row in copy.rows}
    present = await _rows_by_key(conn, copy.table, copy.key, list(by_key))
    new_rows = [row for k, row in by_key.items() if k not in present]
    await _insert(conn, copy.table, new_rows)
    return len(new_rows), len(by_key) - len(new_rows)


# --- helpers --------------------------------------------------------------------------------------


def _key_of(row: dict[str, Any], key: tuple[str, ...]) -> Any:
    """One column's value, or a tuple of several (as `_rows_by_key` keys them)."""
    return row[key[0]] if len(key) == 1 else tuple(row[c] for c in key)


async def _rows_by_key(
    conn: AsyncConnection, table: Table, key: tuple[str, ...], keys: Sequence[Any], extra: Sequence[str] = ()
) -> dict[Any, Row[Any]]:
    """{key: row (the key columns, then `extra`)} for the keys already in the table.

    A two-column key is asked as `first = x AND second IN (...)`: PostgreSQL plans a list of
    row values `(a, b) IN ((..), ..)` as a sequential scan on a big table (a rerun of a
    1,000,000-row import spent minutes there), but the equality and IN use the index."""
    columns = [table.c[name] for name in key]
    selected = select(*columns, *(table.c[name] for name in extra))
    out: dict[Any, Row[Any]] = {}
    if len(columns) == 1:
        for chunk in chunks(list(dict.fromkeys(keys)), _CHUNK):
            out.update((row[0], row) for row in await conn.execute(selected.where(columns[0].in_(chunk))))
        return out
    first, second = columns
    by_first: dict[Any, list[Any]] = {}
    for a, b in dict.fromkeys(keys):
        by_first.setdefault(a, []).append(b)
    for a, seconds in by_first.items():
        for chunk in chunks(seconds, _CHUNK):
            out.update(
                ((row[0], row[1]), row) for row in await conn.execute(selected.where(first == a, second.in_(chunk)))
            )
    return out


async def _insert(conn: AsyncConnection, table: Table, rows: list[dict[str, Any]]) -> None:
    for chunk in chunks(rows, _CHUNK):
        await conn.execute(insert_for(conn, table).on_conflict_do_nothing(), list(chunk))
