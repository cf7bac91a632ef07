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

from sqlalchemy import Row, Table, select, tuple_, update
from sqlalchemy.ext.asyncio import AsyncConnection

from sydent_lite.admin.sydent_import.counts import CopiedKind, ImportCounts
from sydent_lite.admin.sydent_import.plan import AssociationPlan, ChosenAssociation
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


async def write_import(
    conn: AsyncConnection, plan: AssociationPlan, data: SydentData, pepper: str, now: int, counts: ImportCounts
) -> None:
    """The planned associations, then every other table (`now`: for rows Sydent kept no time of)."""
    await _write_associations(conn, plan.chosen, pepper, counts)
    counts.sessions_without_token_skipped += sum(1 for s in data.sessions if s.token is None)
    for copy in _copies(data, now):
        imported, present = await _insert_new_rows(conn, copy)
        counts.add_copied(copy.counted_as, imported, present)


# --- associations ---------------------------------------------------------------------------------


async def _write_associations(
    conn: AsyncConnection, chosen: list[ChosenAssociation], pepper: str, counts: ImportCounts
) -> None:
    key = ("medium", "address")
    compared = ("mxid", "ts", "not_before", "not_after", "signed_json")
    ours = await _rows_by_key(conn, associations, key, [(c.medium, c.address) for c in chosen], compared)
    new_rows = []
    for c in chosen:
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
        existing = ours.get((c.medium, c.address))
        if existing is not None:
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
        else:
            new_rows.append(values)
        counts.associations_imported += 1
        counts.associations_resigned += int(c.resigned)
    await _insert(conn, associations, new_rows)


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
    """{key: row (the key columns, then `extra`)} for the keys already in the table."""
    columns = [table.c[name] for name in key]
    match = columns[0] if len(columns) == 1 else tuple_(*columns)
    out: dict[Any, Row[Any]] = {}
    for chunk in chunks(list(dict.fromkeys(keys)), _CHUNK):
        rows = await conn.execute(select(*columns, *(table.c[name] for name in extra)).where(match.in_(chunk)))
        for row in rows:
            out[row[0] if len(columns) == 1 else tuple(row[: len(columns)])] = row
    return out


async def _insert(conn: AsyncConnection, table: Table, rows: list[dict[str, Any]]) -> None:
    for chunk in chunks(rows, _CHUNK):
        await conn.execute(insert_for(conn, table).on_conflict_do_nothing(), list(chunk))
