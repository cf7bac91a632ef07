"""A log of association changes, written by triggers, for each process's in-memory lookup index.

Every INSERT, UPDATE and DELETE on `associations` (from a bind, an unbind, an import, an
operator command or a hand-written SQL statement alike) appends "association N now has this
lookup hash" (present) or "... no longer has it" here. Each server process keeps the
hash -> mxid map in memory (which hashes exist, and the rows that hold them) and applies the
rows it has not seen yet before answering a lookup, so a bind made by any process is visible
to every process's next lookup.

Ids must be in commit order, or a reader could move past an id whose transaction commits
later: SQLite has one writer at a time; on PostgreSQL the trigger holds an EXCLUSIVE lock on
the log until commit (binds across the cluster take turns; reads are not blocked).

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-22
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

_SQLITE_NOW_MS = "CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER)"

_SQLITE_TRIGGERS = [
    f"""CREATE TRIGGER associations_log_insert AFTER INSERT ON associations BEGIN
        INSERT INTO association_changes (lookup_hash, association_id, present, created_ms)
            VALUES (NEW.lookup_hash, NEW.id, TRUE, {_SQLITE_NOW_MS});
    END""",
    f"""CREATE TRIGGER associations_log_update AFTER UPDATE ON associations BEGIN
        INSERT INTO association_changes (lookup_hash, association_id, present, created_ms)
            VALUES (OLD.lookup_hash, OLD.id, FALSE, {_SQLITE_NOW_MS});
        INSERT INTO association_changes (lookup_hash, association_id, present, created_ms)
            VALUES (NEW.lookup_hash, NEW.id, TRUE, {_SQLITE_NOW_MS});
    END""",
    f"""CREATE TRIGGER associations_log_delete AFTER DELETE ON associations BEGIN
        INSERT INTO association_changes (lookup_hash, association_id, present, created_ms)
            VALUES (OLD.lookup_hash, OLD.id, FALSE, {_SQLITE_NOW_MS});
    END""",
]

_PG_FUNCTION = """
CREATE FUNCTION log_association_change() RETURNS trigger AS $$
DECLARE
    now_ms bigint := (extract(epoch from clock_timestamp()) * 1000)::bigint;
BEGIN
    -- Held until commit: ids are handed out in commit order.
    LOCK TABLE association_changes IN EXCLUSIVE MODE;
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        INSERT INTO association_changes (lookup_hash, association_id, present, created_ms)
            VALUES (OLD.lookup_hash, OLD.id, FALSE, now_ms);
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        INSERT INTO association_changes (lookup_hash, association_id, present, created_ms)
            VALUES (NEW.lookup_hash, NEW.id, TRUE, now_ms);
    END IF;
    RETURN NULL;
END
$$ LANGUAGE plpgsql
"""

_PG_TRIGGER = """
CREATE TRIGGER associations_change_log AFTER INSERT OR UPDATE OR DELETE ON associations
FOR EACH ROW EXECUTE FUNCTION log_association_change()
"""


def upgrade() -> None:
    op.create_table(
        "association_changes",
        # AUTOINCREMENT on SQLite: an id is never handed out twice, even after pruning.
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
        sa.Column("lookup_hash", sa.String(64), nullable=False),
        sa.Column("association_id", sa.BigInteger, nullable=False),
        sa.Column("present", sa.Boolean, nullable=False),
        sa.Column("created_ms", sa.BigInteger, nullable=False),
        sqlite_autoincrement=True,
    )
    if op.get_bind().dialect.name == "postgresql":
        op.execute(_PG_FUNCTION)
        op.execute(_PG_TRIGGER)
    else:
        for statement in _SQLITE_TRIGGERS:
            op.execute(statement)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER associations_change_log ON associations")
        op.execute("DROP FUNCTION log_association_change()")
    else:
        for name in ("insert", "update", "delete"):
            op.execute(f"DROP TRIGGER associations_log_{name}")
    op.drop_table("association_changes")
