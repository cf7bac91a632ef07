"""`import_sydent`: read Sydent's database, choose the key, plan, write; all or nothing.

The import holds the serving lock (storage.serving_lock) exclusively from start to end: it
refuses to run while a server is up on the database, and no server starts meanwhile. The
database is written in one transaction; the key file (if one is installed) is written just
before it, so a failure leaves the database as it was and a rerun finds the key in place.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing
import os
from collections.abc import AsyncGenerator, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import aclosing
from pathlib import Path

import signedjson.key
from signedjson.types import SigningKey
from sqlalchemy import bindparam, select, text, update
from sqlalchemy.ext.asyncio import AsyncConnection

from sydent_lite.admin.sydent_import import read
from sydent_lite.admin.sydent_import.bulk_pg import PgAssociationWriter
from sydent_lite.admin.sydent_import.counts import ImportCounts
from sydent_lite.admin.sydent_import.erased import any_erased, drop_erased, drop_erased_associations
from sydent_lite.admin.sydent_import.errors import SydentImportError
from sydent_lite.admin.sydent_import.keys import ServingKey, choose_serving_key, install, read_signing_key_file
from sydent_lite.admin.sydent_import.plan import (
    AssociationPlanner,
    ChosenAssociation,
    check_sydent_signed,
    own_names,
    plan_in_worker,
    start_worker,
)
from sydent_lite.admin.sydent_import.read import SydentAssociation, SydentSource
from sydent_lite.admin.sydent_import.write import write_associations, write_other_tables
from sydent_lite.config import Config
from sydent_lite.context import operator_context
from sydent_lite.secrets_util import now_ms
from sydent_lite.services.hashing import HASHED_WITH_KEY, PEPPER_KEY, hash_for_live_peppers, load_pepper, lookup_hash
from sydent_lite.signing import ServerSigner
from sydent_lite.storage.associations import AssociationStore
from sydent_lite.storage.batching import chunks
from sydent_lite.storage.dialect import insert_for
from sydent_lite.storage.serving_lock import ServingLockBusy, take_serving_lock
from sydent_lite.storage.state import ServerStateStore
from sydent_lite.storage.tables import associations, server_state

logger = logging.getLogger(__name__)

DEFAULT_BATCH_ROWS = 10_000
BATCH_ROWS_ENV = "SYDENT_LITE_IMPORT_BATCH_ROWS"


async def import_sydent(
    config: Config,
    sydent_db: Path,
    signing_key_file: Path | None = None,
    *,
    signing_key: SigningKey | None = None,
    new_signing_key: bool = False,
    new_pepper: bool = False,
) -> ImportCounts:
    """Import a Sydent SQLite database into ours; returns what it did, counted.

    Sydent's key comes as a file (`signing_key_file`: a key file or sydent.conf) or as a key
    (`signing_key`, read from sydent.conf). Without either, the key we already have must be
    the one that signed Sydent's associations, unless `new_signing_key`. Sydent's lookup
    pepper becomes ours unless `new_pepper`.

    Raises FileNotFoundError (no such database or key file), SydentImportError (not a Sydent
    database, no or an unreadable key, a key that did not sign Sydent's associations, a server
    running) and SigningKeyMismatch (our key file holds another key) before writing anything.
    """
    counts = ImportCounts()
    with SydentSource(Path(sydent_db)) as source:
        data = source.other_tables()
        given_as = "the key in sydent.conf"
        if signing_key is None and signing_key_file is not None:
            signing_key, given_as = read_signing_key_file(Path(signing_key_file)), str(signing_key_file)
        async with operator_context(config) as ctx:
            try:
                lock = await take_serving_lock(ctx.database, config.database.url, exclusive=True)
            except ServingLockBusy as e:
                raise SydentImportError(f"refusing to import: {e} (import before the first start)") from None
            try:
                planner, serving = _planner(config, source, signing_key, given_as, new_signing_key)
                counts.signing_key_already_present = int(serving.already_present)
                counts.signing_key_imported = int(install(serving))
                state = ServerStateStore(ctx.database)
                pepper = data.pepper if data.pepper is not None and not new_pepper else None
                if pepper is None:
                    pepper = await load_pepper(state, AssociationStore(ctx.database))
                async with ctx.database.begin() as conn:  # all or nothing
                    if data.pepper is not None and pepper == data.pepper:
                        await _adopt_pepper(conn, pepper)
                        counts.lookup_pepper_from_sydent = 1
                    bulk = await PgAssociationWriter.open(conn) if conn.dialect.name == "postgresql" else None
                    check_erased = await any_erased(conn)
                    # One batch of 3PIDs at a time: the import holds a batch, never the table.
                    batches = read.association_batches(source.association_groups(), _batch_rows())
                    async with aclosing(_planned(planner, batches)) as planned:  # the worker ends with it
                        async for chosen in planned:
                            if check_erased:
                                chosen, erased = await drop_erased_associations(conn, chosen)
                                counts.erased_associations_skipped += erased
                            await write_associations(conn, chosen, pepper, counts, bulk)
                    if bulk is not None:
                        await bulk.finish()
                    data, erased_rest = await drop_erased(conn, data)
                    await write_other_tables(conn, data, now_ms(), counts)
                # A no-op (every hash is under the pepper we serve); it also holds for a database
                # an older version left half-hashed.
                await load_pepper(state, AssociationStore(ctx.database))
                # The rows went into `lookup_hash` under the current pepper: after a rotation that
                # is not (or not the only) hash slot lookups read (services.peppers).
                await hash_for_live_peppers(AssociationStore(ctx.database))
                # Fresh statistics for the planner: a big import changes the tables' shape at once,
                # and autovacuum (if it runs at all) gets to it later.
                async with ctx.database.begin() as conn:
                    await conn.execute(text("ANALYZE"))
            finally:
                await lock.release()
        counts.sydent_rows_unreadable_skipped = data.skipped_rows + source.skipped_association_rows

    planner.warn_of_names()
    signer = planner.signer
    counts.associations_unbound_in_sydent = planner.unbound
    counts.associations_unusable_skipped = planner.unusable
    counts.erased_sessions_skipped = erased_rest.sessions
    counts.erased_invites_skipped = erased_rest.invites
    counts.erased_account_tokens_skipped = erased_rest.account_tokens
    counts.erased_terms_acceptances_skipped = erased_rest.terms_acceptances
    if serving.sydents is None and counts.associations_resigned:
        logger.warning(
            "--new-signing-key: %d association(s) Sydent signed were re-signed with our key %s; "
            "signatures clients saved from Sydent will not verify against it",
            counts.associations_resigned,
            signer.key_id,
        )
    logger.info("import from %s: %s", sydent_db, ", ".join(f"{k}={v}" for k, v in counts.as_dict().items() if v))
    return counts


def _planner(
    config: Config, source: SydentSource, signing_key: SigningKey | None, given_as: str, new_signing_key: bool
) -> tuple[AssociationPlanner, ServingKey]:
    """The key we serve from now on (Sydent's, installed if we have none, or ours) and the
    planner that signs with it; SydentImportError if the key did not sign Sydent's associations."""
    our_key_path = Path(config.signing_key_path)
    serving = choose_serving_key(our_key_path, signing_key, given_as, new_signing_key)
    signer = ServerSigner(config.effective_server_name, serving.key)
    # Without Sydent's key, the one we have must be it (a rerun), unless a new key was asked for.
    checked_key = serving.sydents
    if checked_key is None and serving.install_at is None and not new_signing_key:
        checked_key = serving.key
    own = own_names(source, signer)
    try:
        if checked_key is not None:
            check_sydent_signed(source, own, checked_key)
    except SydentImportError:
        if serving.sydents is not None:
            raise
        raise SydentImportError(
            f"{our_key_path} (signing_key_path) holds a key ({signer.key_id}) that did not sign Sydent's "
            "associations, and no Sydent key was given: give --signing-key (Sydent's sydent.conf), or "
            "--new-signing-key to re-sign them with this key (signatures clients kept stop verifying)"
        ) from None
    return AssociationPlanner(signer, own), serving


async def _planned(
    planner: AssociationPlanner, batches: Iterator[list[list[SydentAssociation]]]
) -> AsyncGenerator[list[ChosenAssociation]]:
    """Each batch planned (signed: the largest cost), in order. With more than one batch, a
    worker process plans one while this one reads the next and the caller writes the last;
    two batches at most are in flight, so memory stays bounded."""
    head = list(itertools.islice(batches, 2))
    if len(head) < 2 or (os.cpu_count() or 1) < 2:
        for batch in itertools.chain(head, batches):
            yield planner.plan(batch)
        return
    signer = planner.signer
    # spawn, not fork: this process has threads (aiosqlite's) and open connections.
    with ProcessPoolExecutor(
        max_workers=1,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=start_worker,
        initargs=(
            signer.server_name,
            signer.key.alg,
            signer.key.version,
            signedjson.key.encode_signing_key_base64(signer.key),
            planner.own_names,
        ),
    ) as pool:
        loop = asyncio.get_running_loop()
        pending = loop.run_in_executor(pool, plan_in_worker, head[0])
        for batch in itertools.chain(head[1:], batches):
            following = loop.run_in_executor(pool, plan_in_worker, batch)
            yield planner.absorb(await pending)
            pending = following
        yield planner.absorb(await pending)


def _batch_rows() -> int:
    """Sydent rows per batch; the environment variable is for tests (batches smaller than a fixture)."""
    value = os.environ.get(BATCH_ROWS_ENV, "")
    return int(value) if value.isdigit() and int(value) > 0 else DEFAULT_BATCH_ROWS


async def _adopt_pepper(conn: AsyncConnection, pepper: str) -> None:
    """Sydent's pepper becomes ours, in the import's transaction: the hashes of associations we
    had (none, when importing before the first start) are recomputed under it first."""
    hashed_with = (
        await conn.execute(select(server_state.c.value).where(server_state.c.name == HASHED_WITH_KEY))
    ).scalar_one_or_none()
    if hashed_with != pepper:
        rehash = update(associations).where(associations.c.id == bindparam("row_id"))
        last_id = None
        while True:  # by id, a page at a time: ours may be big too
            page = select(associations.c.id, associations.c.medium, associations.c.address).order_by(associations.c.id)
            if last_id is not None:
                page = page.where(associations.c.id > last_id)
            ours = (await conn.execute(page.limit(DEFAULT_BATCH_ROWS))).all()
            if not ours:
                break
            last_id = ours[-1].id
            for chunk in chunks(ours, 1000):
                await conn.execute(
                    rehash.values(lookup_hash=bindparam("new_hash")),
                    [{"row_id": i, "new_hash": lookup_hash(a, m, pepper)} for i, m, a in chunk],
                )
        await _set_state(conn, HASHED_WITH_KEY, pepper)
    await _set_state(conn, PEPPER_KEY, pepper)


async def _set_state(conn: AsyncConnection, name: str, value: str) -> None:
    stmt = insert_for(conn, server_state).values(name=name, value=value)
    await conn.execute(stmt.on_conflict_do_update(index_elements=["name"], set_={"value": value}))
