"""`import_sydent`: read Sydent's database, choose the key, plan, write; all or nothing."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from sqlalchemy import text

from sydent_lite.admin.sydent_import.counts import ImportCounts
from sydent_lite.admin.sydent_import.keys import choose_serving_key, install
from sydent_lite.admin.sydent_import.plan import plan_associations
from sydent_lite.admin.sydent_import.read import read_sydent_database
from sydent_lite.admin.sydent_import.write import write_import
from sydent_lite.config import Config
from sydent_lite.context import operator_context
from sydent_lite.secrets_util import now_ms
from sydent_lite.services.hashing import hash_for_live_peppers, load_pepper
from sydent_lite.signing import ServerSigner
from sydent_lite.storage.associations import AssociationStore
from sydent_lite.storage.state import ServerStateStore

logger = logging.getLogger(__name__)


async def import_sydent(config: Config, sydent_db: Path, signing_key_file: Path | None = None) -> ImportCounts:
    """Import a Sydent SQLite database into ours; returns what it did, counted.

    Raises FileNotFoundError (no such database or key file), SydentImportError (not a Sydent
    database, unreadable key, a key that did not sign Sydent's associations) and
    SigningKeyMismatch (our key file holds another key) before writing anything.
    """
    counts = ImportCounts()
    data = await asyncio.to_thread(read_sydent_database, Path(sydent_db))
    counts.sydent_rows_unreadable_skipped = data.skipped_rows

    # The key we serve from now on: Sydent's (installed if we have none), or ours.
    serving = choose_serving_key(Path(config.signing_key_path), signing_key_file)
    counts.signing_key_already_present = int(serving.already_present)
    signer = ServerSigner(config.effective_server_name, serving.key)
    plan = plan_associations(data, signer, serving.sydents)
    counts.signing_key_imported = int(install(serving))

    async with operator_context(config) as ctx:
        pepper = await load_pepper(ServerStateStore(ctx.database), AssociationStore(ctx.database))
        async with ctx.database.begin() as conn:  # all or nothing
            await write_import(conn, plan, data, pepper, now_ms(), counts)
        # The rows went into `lookup_hash` under the current pepper: after a rotation that is
        # not (or not the only) slot lookups read.
        await hash_for_live_peppers(AssociationStore(ctx.database))
        # Fresh statistics for the planner: a big import changes the tables' shape at once,
        # and autovacuum (if it runs at all) gets to it later.
        async with ctx.database.begin() as conn:
            await conn.execute(text("ANALYZE"))

    counts.associations_unbound_in_sydent = plan.unbound
    counts.associations_unusable_skipped = plan.unusable
    if signing_key_file is None and counts.associations_resigned:
        logger.warning(
            "no --signing-key: %d association(s) Sydent signed were re-signed with our key %s; "
            "signatures clients saved from Sydent will not verify against it",
            counts.associations_resigned,
            signer.key_id,
        )
    logger.info("import from %s: %s", sydent_db, ", ".join(f"{k}={v}" for k, v in counts.as_dict().items() if v))
    return counts
