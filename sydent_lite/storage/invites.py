"""Stored invitations and the onbind callbacks that deliver them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

from sqlalchemy import ColumnElement, case, delete, exists, func, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from sydent_lite.storage.database import Database
from sydent_lite.storage.tables import associations, ephemeral_public_keys, invites, onbind_callbacks


@dataclass
class StoredInvite:
    token: str
    medium: str
    address: str
    room_id: str
    sender: str
    ephemeral_public_key: str  # "" for invites imported from Sydent; the private key is never stored
    created_ts: int
    callback_id: int | None = None
    delivered_ts: int | None = None


@dataclass
class PendingCallback:
    id: int
    destination: str
    body: str
    attempts: int


@dataclass(frozen=True)
class CallbackRequest:
    """How to queue the onbind callback of one 3PID's pending invites (the service builds it)."""

    medium: str
    address: str
    destination: str  # the bound Matrix ID's server
    build_body: Callable[[list[StoredInvite]], str]  # the pending invites -> the signed JSON body
    now: int
    not_before_ts: int  # invites created before this have expired


@dataclass(frozen=True)
class BoundAddress:
    """A bound 3PID, with the signed association as stored."""

    medium: str
    address: str
    mxid: str
    signed_json: str


def _unqueued(medium: Any, address: Any, not_before_ts: int) -> tuple[ColumnElement[bool], ...]:
    """The invites of this 3PID that no callback carries yet (medium/address: values or columns)."""
    return (
        invites.c.medium == medium,
        invites.c.address == address,
        invites.c.callback_id.is_(None),
        invites.c.delivered_ts.is_(None),  # e.g. imported from Sydent, already sent
        invites.c.created_ts >= not_before_ts,  # expired, not yet cleaned up
    )


def _due(now: int) -> tuple[ColumnElement[bool], ...]:
    return onbind_callbacks.c.next_attempt_ts <= now, onbind_callbacks.c.claimed_until < now


async def queue_callback_on(conn: AsyncConnection, request: CallbackRequest) -> int | None:
    """Put the 3PID's unqueued invites into one new callback, in the caller's transaction.

    Returns the callback id, or None when there was nothing to send (most binds: one read).
    """
    unqueued = _unqueued(request.medium, request.address, request.not_before_ts)
    if (await conn.execute(select(invites.c.token).where(*unqueued).limit(1))).first() is None:
        return None
    return await _claim_into(conn, await _insert_callback(conn, request.destination, request.now), request)


async def _insert_callback(conn: AsyncConnection, destination: str, now: int) -> int:
    result = await conn.execute(
        onbind_callbacks.insert().values(
            destination=destination, body="", attempts=0, next_attempt_ts=now, claimed_until=0, created_ts=now
        )
    )
    key = result.inserted_primary_key
    assert key is not None
    return int(key[0])


async def _claim_into(conn: AsyncConnection, callback_id: int, request: CallbackRequest) -> int | None:
    """Stamp the unqueued invites with `callback_id` and write its body; None (and the callback
    deleted again) if none were left to claim.

    Claim first, read second: concurrent binds of one address (in any process) each try to
    stamp the unqueued invites with their own callback id; the row locks (PostgreSQL) or the
    single writer (SQLite, whose transaction starts with a write) let exactly one succeed,
    and the others find nothing left to send.
    """
    unqueued = _unqueued(request.medium, request.address, request.not_before_ts)
    await conn.execute(update(invites).where(*unqueued).values(callback_id=callback_id))
    rows = (
        (
            await conn.execute(
                select(invites)
                # SQLite reuses the id of a delivered (deleted) callback: its invites are
                # told apart by their delivered_ts.
                .where(invites.c.callback_id == callback_id, invites.c.delivered_ts.is_(None))
                .order_by(invites.c.created_ts)
            )
        )
        .mappings()
        .all()
    )
    if not rows:
        await conn.execute(delete(onbind_callbacks).where(onbind_callbacks.c.id == callback_id))
        return None
    body = request.build_body([StoredInvite(**r) for r in rows])
    await conn.execute(update(onbind_callbacks).where(onbind_callbacks.c.id == callback_id).values(body=body))
    return callback_id


class InviteStore:
    def __init__(self, database: Database) -> None:
        self._db = database
        # One statement that commits on its own: below SQLAlchemy (storage.readers: `write`).
        self._insert = database.insert_sql(invites, [f.name for f in fields(StoredInvite)])

    async def add(self, invite: StoredInvite) -> None:
        await self._db.write(self._insert, list(invite.__dict__.values()))

    async def get(self, token: str) -> StoredInvite | None:
        async with self._db.connect() as conn:
            row = (await conn.execute(select(invites).where(invites.c.token == token))).mappings().first()
        return StoredInvite(**row) if row else None

    async def ephemeral_key_exists(self, public_key: str, not_before_ts: int) -> bool:
        if not public_key:
            return False  # invites imported from Sydent carry no ephemeral key of their own ("")
        ours = select(invites.c.token).where(
            invites.c.ephemeral_public_key == public_key, invites.c.created_ts >= not_before_ts
        )
        imported = select(ephemeral_public_keys.c.public_key).where(
            ephemeral_public_keys.c.public_key == public_key, ephemeral_public_keys.c.created_ts >= not_before_ts
        )
        async with self._db.connect() as conn:
            if (await conn.execute(ours.limit(1))).first() is not None:
                return True
            return (await conn.execute(imported.limit(1))).first() is not None

    async def bound_without_callback(self, not_before_ts: int, limit: int) -> list[BoundAddress]:
        """Bound 3PIDs with unqueued, undelivered, unexpired invites: what a crash between the
        two transactions of older versions (association, then callback) left behind."""
        query = (
            select(associations.c.medium, associations.c.address, associations.c.mxid, associations.c.signed_json)
            .where(exists().where(*_unqueued(associations.c.medium, associations.c.address, not_before_ts)))
            .order_by(associations.c.medium, associations.c.address)
            .limit(limit)
        )
        async with self._db.connect() as conn:
            return [BoundAddress(*row) for row in await conn.execute(query)]

    async def queue_missed_callback(self, bound: BoundAddress, request: CallbackRequest) -> int | None:
        """Queue the callback `bound` is missing, if it is still bound so and still missing it.

        Safe when several workers do it at once: as for binds, one of them claims the invites.
        """
        async with self._db.begin() as conn:
            # The INSERT first: on SQLite the transaction takes the write lock with it, so
            # what it reads next cannot change under it.
            callback_id = await _insert_callback(conn, request.destination, request.now)
            still_bound = await conn.execute(
                select(associations.c.id).where(
                    associations.c.medium == bound.medium,
                    associations.c.address == bound.address,
                    associations.c.signed_json == bound.signed_json,
                )
            )
            if still_bound.first() is None:  # unbound or bound anew meanwhile: not ours to send
                await conn.execute(delete(onbind_callbacks).where(onbind_callbacks.c.id == callback_id))
                return None
            return await _claim_into(conn, callback_id, request)

    async def due_destinations(self, now: int, limit: int) -> list[str]:
        """Destinations with callbacks due and unclaimed, the longest-waiting first; one row
        each, however long its backlog (a destination's backlog cannot hide another's)."""
        query = (
            select(onbind_callbacks.c.destination)
            .where(*_due(now))
            .group_by(onbind_callbacks.c.destination)
            .order_by(func.min(onbind_callbacks.c.next_attempt_ts), onbind_callbacks.c.destination)
            .limit(limit)
        )
        async with self._db.connect() as conn:
            return [row[0] for row in await conn.execute(query)]

    async def due_callbacks_to(self, destination: str, now: int, limit: int) -> list[PendingCallback]:
        """The callbacks to `destination` that are due and unclaimed, the longest-waiting first."""
        cb = onbind_callbacks.c
        query = (
            select(cb.id, cb.destination, cb.body, cb.attempts)
            .where(cb.destination == destination, *_due(now))
            .order_by(cb.next_attempt_ts, cb.id)
            .limit(limit)
        )
        async with self._db.connect() as conn:
            return [PendingCallback(*row) for row in await conn.execute(query)]

    async def next_due_ts(self, now: int) -> int | None:
        """The first time after `now` at which a callback falls due or another worker's claim
        on one lapses (None: nothing will)."""
        cb = onbind_callbacks.c
        becomes_due = case((cb.claimed_until > cb.next_attempt_ts, cb.claimed_until), else_=cb.next_attempt_ts)
        async with self._db.connect() as conn:
            first: int | None = (await conn.execute(select(func.min(becomes_due)).where(becomes_due > now))).scalar()
        return first

    async def claim(self, callback_id: int, now: int, lease_until: int) -> bool:
        """Take the callback for this worker until lease_until; False if another worker has it."""
        async with self._db.begin() as conn:
            result = await conn.execute(
                update(onbind_callbacks)
                .where(onbind_callbacks.c.id == callback_id, onbind_callbacks.c.claimed_until < now)
                .values(claimed_until=lease_until)
            )
        return result.rowcount == 1

    async def mark_delivered(self, callback_id: int, now: int, *, delete_invites: bool = False) -> None:
        """The callback reached the homeserver: drop it, and mark its invites delivered or, with
        `delete_invites`, delete them (Sydent's delete_tokens_on_bind). Their ephemeral public
        keys stay valid until the invites would have expired (pubkey/ephemeral/isvalid): a join
        signed with one must keep verifying for servers that see it later."""
        carried = (invites.c.callback_id == callback_id, invites.c.delivered_ts.is_(None))
        async with self._db.begin() as conn:
            if delete_invites:
                keys = select(invites.c.ephemeral_public_key, invites.c.created_ts).where(
                    *carried,
                    invites.c.ephemeral_public_key != "",
                    ~exists().where(ephemeral_public_keys.c.public_key == invites.c.ephemeral_public_key),
                )
                await conn.execute(ephemeral_public_keys.insert().from_select(["public_key", "created_ts"], keys))
                await conn.execute(delete(invites).where(*carried))
            else:
                await conn.execute(update(invites).where(*carried).values(delivered_ts=now))
            await conn.execute(delete(onbind_callbacks).where(onbind_callbacks.c.id == callback_id))

    async def reschedule(self, callback_id: int, attempts: int, next_attempt_ts: int) -> None:
        async with self._db.begin() as conn:
            await conn.execute(
                update(onbind_callbacks)
                .where(onbind_callbacks.c.id == callback_id)
                .values(attempts=attempts, next_attempt_ts=next_attempt_ts, claimed_until=0)
            )

    async def delete_older_than(self, ts: int) -> tuple[int, int]:
        """Expire invites (and never-delivered callbacks, imported keys) created before ts."""
        async with self._db.begin() as conn:
            await conn.execute(delete(ephemeral_public_keys).where(ephemeral_public_keys.c.created_ts < ts))
            inv = await conn.execute(delete(invites).where(invites.c.created_ts < ts))
            cbs = await conn.execute(delete(onbind_callbacks).where(onbind_callbacks.c.created_ts < ts))
        return inv.rowcount, cbs.rowcount
