"""PostgreSQL: the associations written by COPY, in the import's transaction.

An import runs with the serving lock held exclusively (no server is up, none starts), so for
its transaction:
- the change-log trigger is disabled: its rows say "association N has this hash" to servers
  that are running, and there are none; every server builds its lookup index from the table
  at start (from the log's position then), so rows the import committed without a log entry
  are in it. The trigger is enabled again before commit (ALTER TABLE is transactional).
- into an empty table, the rows are copied straight in, with the secondary indexes dropped
  and built again at the end (one sort each instead of a random B-tree insert per row: the
  hashes are random, and at millions of rows their index outgrows the buffer cache). Each
  3PID comes once (read.association_batches), and the unique index built again checks it.
- into a table that has rows (a rerun, or associations of ours), each batch is copied into
  a temporary table and inserted from it with ON CONFLICT DO NOTHING RETURNING, which says
  which 3PIDs were new (the rest are merged as before).
Both need the table's owner (ALTER TABLE); without that the rows go in by the same COPY and
INSERT ... SELECT with the trigger and indexes as they are.
"""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection

logger = logging.getLogger(__name__)

COLUMNS = ("medium", "address", "lookup_hash", "mxid", "ts", "not_before", "not_after", "signed_json")
_STAGING = "import_sydent_associations"

# The indexes of `associations` but its primary key, with how to make each again (a unique
# constraint is made as a constraint, so that it keeps its name and ON CONFLICT finds it).
_INDEXES = """
SELECT i.relname, pg_get_indexdef(x.indexrelid), c.conname, pg_get_constraintdef(c.oid)
FROM pg_index x
JOIN pg_class i ON i.oid = x.indexrelid
LEFT JOIN pg_constraint c ON c.conindid = x.indexrelid AND c.conrelid = x.indrelid
WHERE x.indrelid = 'associations'::regclass AND NOT x.indisprimary
ORDER BY i.relname
"""
_TRIGGERS = """
SELECT tgname FROM pg_trigger
WHERE tgrelid = 'associations'::regclass AND NOT tgisinternal AND tgenabled <> 'D'
ORDER BY tgname
"""


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


class PgAssociationWriter:
    """Writes batches of association rows (tuples in COLUMNS order); `finish` before commit."""

    def __init__(self, conn: AsyncConnection, driver: Any, empty: bool) -> None:
        self._conn = conn
        self._driver = driver  # the asyncpg connection under `conn`, in its transaction
        self.empty = empty
        self._triggers: list[str] = []
        self._indexes: list[str] = []  # statements that make the dropped indexes again
        self._staging = False

    @classmethod
    async def open(cls, conn: AsyncConnection) -> PgAssociationWriter:
        # Through SQLAlchemy first: this begins the transaction the driver's COPY then runs in.
        await conn.execute(text("LOCK TABLE associations IN SHARE ROW EXCLUSIVE MODE"))
        empty = (await conn.execute(text("SELECT NOT EXISTS (SELECT 1 FROM associations)"))).scalar_one()
        raw = await conn.get_raw_connection()
        driver = raw.driver_connection
        assert driver is not None and driver.is_in_transaction()
        writer = cls(conn, driver, bool(empty))
        try:
            async with conn.begin_nested():  # the owner may do this; anyone else goes the slow way
                triggers = [r[0] for r in await conn.execute(text(_TRIGGERS))]
                for name in triggers:
                    await conn.execute(text(f"ALTER TABLE associations DISABLE TRIGGER {_quote(name)}"))
                indexes = []
                if writer.empty:
                    for index, index_def, constraint, constraint_def in await conn.execute(text(_INDEXES)):
                        if constraint is not None:
                            await conn.execute(text(f"ALTER TABLE associations DROP CONSTRAINT {_quote(constraint)}"))
                            indexes.append(
                                f"ALTER TABLE associations ADD CONSTRAINT {_quote(constraint)} {constraint_def}"
                            )
                        else:
                            await conn.execute(text(f"DROP INDEX {_quote(index)}"))
                            indexes.append(index_def)
        except DBAPIError as e:
            logger.info("import-sydent: writing with the change log and indexes as they are (%s)", e.orig)
        else:
            writer._triggers, writer._indexes = triggers, indexes
        return writer

    async def insert_new(self, rows: list[tuple[Any, ...]]) -> set[tuple[str, str]]:
        """Insert the rows whose 3PID is not in the table; returns those 3PIDs."""
        if not rows:
            return set()
        if self.empty:
            await self._driver.copy_records_to_table("associations", records=rows, columns=COLUMNS)
            return {(r[0], r[1]) for r in rows}
        if not self._staging:
            await self._driver.execute(
                f"CREATE TEMPORARY TABLE {_STAGING} (medium text, address text, lookup_hash text, mxid text,"
                " ts bigint, not_before bigint, not_after bigint, signed_json text) ON COMMIT DROP"
            )
            self._staging = True
        else:
            await self._driver.execute(f"TRUNCATE {_STAGING}")
        await self._driver.copy_records_to_table(_STAGING, records=rows, columns=COLUMNS)
        columns = ", ".join(COLUMNS)
        inserted = await self._driver.fetch(
            f"INSERT INTO associations ({columns}) SELECT {columns} FROM {_STAGING}"
            " ON CONFLICT (medium, address) DO NOTHING RETURNING medium, address"
        )
        return {(r[0], r[1]) for r in inserted}

    async def finish(self) -> None:
        """The dropped indexes made again, the triggers enabled again (before the commit)."""
        if self._indexes:
            # Memory for the index builds' sorts (PostgreSQL's, for this transaction only).
            await self._driver.execute("SET LOCAL maintenance_work_mem = '256MB'")
        for statement in self._indexes:
            await self._driver.execute(statement)
        for name in self._triggers:
            await self._driver.execute(f"ALTER TABLE associations ENABLE TRIGGER {_quote(name)}")
        self._indexes, self._triggers = [], []
