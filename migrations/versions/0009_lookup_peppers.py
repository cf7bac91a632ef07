"""Lookup pepper rotation: a schedule of peppers, and a second lookup-hash column.

`lookup_peppers`: every pepper there has been, newest last. Each owns one of two hash slots of
`associations` (slot 0: `lookup_hash`, slot 1: `lookup_hash_b`), so that a new pepper's hashes
are written beside the current ones, never over them. A row's life: inserted with no
activation time (being prepared: its slot is being rehashed), then `activates_ms` is set once
every hash is written (the moment it becomes current, a little ahead, so every worker has
loaded it by then), and the pepper it replaces gets `retires_ms` (the end of its grace window).
The first row is made at the first start from `server_state`'s `lookup_pepper`.

The change log carries both slots' hashes. Its update trigger now fires only when a column
other than the two hashes is written: a rehash (hundreds of thousands of single-column
UPDATEs) is not logged; every bind writes every column (ts at least) and is.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

_SQLITE_NOW_MS = "CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER)"
_LOGGED_COLUMNS = "medium, address, mxid, ts, not_before, not_after, signed_json"


def _sqlite_log(row: str, present: str) -> str:
    return (
        "INSERT INTO association_changes (lookup_hash, lookup_hash_b, association_id, present, created_ms) "
        f"VALUES ({row}.lookup_hash, COALESCE({row}.lookup_hash_b, ''), {row}.id, {present}, {_SQLITE_NOW_MS});"
    )


_SQLITE_TRIGGERS = [
    f"CREATE TRIGGER associations_log_insert AFTER INSERT ON associations BEGIN {_sqlite_log('NEW', 'TRUE')} END",
    f"CREATE TRIGGER associations_log_update AFTER UPDATE OF {_LOGGED_COLUMNS} ON associations BEGIN "
    f"{_sqlite_log('OLD', 'FALSE')} {_sqlite_log('NEW', 'TRUE')} END",
    f"CREATE TRIGGER associations_log_delete AFTER DELETE ON associations BEGIN {_sqlite_log('OLD', 'FALSE')} END",
]

_PG_FUNCTION = """
CREATE OR REPLACE FUNCTION log_association_change() RETURNS trigger AS $$
DECLARE
    now_ms bigint := (extract(epoch from clock_timestamp()) * 1000)::bigint;
BEGIN
    -- Held until commit: ids are handed out in commit order.
    LOCK TABLE association_changes IN EXCLUSIVE MODE;
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        INSERT INTO association_changes (lookup_hash, lookup_hash_b, association_id, present, created_ms)
        VALUES (OLD.lookup_hash, COALESCE(OLD.lookup_hash_b, ''), OLD.id, FALSE, now_ms);
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        INSERT INTO association_changes (lookup_hash, lookup_hash_b, association_id, present, created_ms)
        VALUES (NEW.lookup_hash, COALESCE(NEW.lookup_hash_b, ''), NEW.id, TRUE, now_ms);
    END IF;
    RETURN NULL;
END
$$ LANGUAGE plpgsql
"""

_PG_TRIGGER = f"""
CREATE TRIGGER associations_change_log AFTER INSERT OR DELETE OR UPDATE OF {_LOGGED_COLUMNS} ON associations
FOR EACH ROW EXECUTE FUNCTION log_association_change()
"""

_OLD_INSERT = "INSERT INTO association_changes (lookup_hash, association_id, present, created_ms) VALUES"
_PG_OLD_FUNCTION = f"""
CREATE OR REPLACE FUNCTION log_association_change() RETURNS trigger AS $$
DECLARE
    now_ms bigint := (extract(epoch from clock_timestamp()) * 1000)::bigint;
BEGIN
    LOCK TABLE association_changes IN EXCLUSIVE MODE;
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        {_OLD_INSERT} (OLD.lookup_hash, OLD.id, FALSE, now_ms);
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        {_OLD_INSERT} (NEW.lookup_hash, NEW.id, TRUE, now_ms);
    END IF;
    RETURN NULL;
END
$$ LANGUAGE plpgsql
"""
_PG_OLD_TRIGGER = """
CREATE TRIGGER associations_change_log AFTER INSERT OR UPDATE OR DELETE ON associations
FOR EACH ROW EXECUTE FUNCTION log_association_change()
"""


def upgrade() -> None:
    op.create_table(
        "lookup_peppers",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("pepper", sa.String(255), nullable=False),
        sa.Column("slot", sa.Integer, nullable=False),
        sa.Column("created_ms", sa.BigInteger, nullable=False),
        # NULL while its hashes are being written.
        sa.Column("activates_ms", sa.BigInteger, nullable=True),
        # The end of its grace window once a newer pepper is scheduled; NULL before.
        sa.Column("retires_ms", sa.BigInteger, nullable=True),
        # The rehash: every association up to this id has its hash in the slot; who writes
        # them, and until when its claim holds (another process takes over after that).
        sa.Column("rehashed_through", sa.Integer, nullable=False, server_default="0"),
        sa.Column("claimed_by", sa.String(64), nullable=False, server_default=""),
        sa.Column("claimed_until_ms", sa.BigInteger, nullable=False, server_default="0"),
    )
    op.add_column("associations", sa.Column("lookup_hash_b", sa.String(64), nullable=True))
    op.create_index("ix_associations_lookup_hash_b", "associations", ["lookup_hash_b"])
    op.add_column("association_changes", sa.Column("lookup_hash_b", sa.String(64), nullable=False, server_default=""))
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER associations_change_log ON associations")
        op.execute(_PG_FUNCTION)
        op.execute(_PG_TRIGGER)
    else:
        for name in ("insert", "update", "delete"):
            op.execute(f"DROP TRIGGER associations_log_{name}")
        for statement in _SQLITE_TRIGGERS:
            op.execute(statement)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER associations_change_log ON associations")
        op.execute(_PG_OLD_FUNCTION)
        op.execute(_PG_OLD_TRIGGER)
    else:
        for name in ("insert", "update", "delete"):
            op.execute(f"DROP TRIGGER associations_log_{name}")
        old_new = f"{_OLD_INSERT} (NEW.lookup_hash, NEW.id, TRUE, {_SQLITE_NOW_MS});"
        old_old = f"{_OLD_INSERT} (OLD.lookup_hash, OLD.id, FALSE, {_SQLITE_NOW_MS});"
        old = [
            f"CREATE TRIGGER associations_log_insert AFTER INSERT ON associations BEGIN {old_new} END",
            f"CREATE TRIGGER associations_log_update AFTER UPDATE ON associations BEGIN {old_old} {old_new} END",
            f"CREATE TRIGGER associations_log_delete AFTER DELETE ON associations BEGIN {old_old} END",
        ]
        for statement in old:
            op.execute(statement)
    # Plain ALTER TABLE ... DROP COLUMN (SQLite >= 3.35): a batch rebuild would drop the triggers.
    op.drop_column("association_changes", "lookup_hash_b")
    op.drop_index("ix_associations_lookup_hash_b", "associations")
    op.drop_column("associations", "lookup_hash_b")
    op.drop_table("lookup_peppers")
