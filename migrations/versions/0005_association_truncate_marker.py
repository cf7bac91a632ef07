"""PostgreSQL: a TRUNCATE of `associations` is logged too, as one marker row.

Row triggers (0004) do not fire on TRUNCATE. That was harmless while every lookup candidate
was confirmed in the database; since each PostgreSQL process also holds every lookup hash
with its mxid in memory, a TRUNCATE that nobody logged would leave every process answering
lookups with associations that no longer exist. The marker (association id 0, which no row
has) tells each process that everything before it is gone. SQLite has no TRUNCATE: its
`DELETE FROM associations` fires the row triggers.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01
"""

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

_PG_FUNCTION = """
CREATE FUNCTION log_associations_truncated() RETURNS trigger AS $$
BEGIN
    -- As for row changes: held until commit, so ids are handed out in commit order.
    LOCK TABLE association_changes IN EXCLUSIVE MODE;
    INSERT INTO association_changes (lookup_hash, association_id, present, created_ms)
    VALUES ('', 0, FALSE, (extract(epoch from clock_timestamp()) * 1000)::bigint);
    RETURN NULL;
END
$$ LANGUAGE plpgsql
"""

_PG_TRIGGER = """
CREATE TRIGGER associations_truncated AFTER TRUNCATE ON associations
FOR EACH STATEMENT EXECUTE FUNCTION log_associations_truncated()
"""


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(_PG_FUNCTION)
        op.execute(_PG_TRIGGER)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER associations_truncated ON associations")
        op.execute("DROP FUNCTION log_associations_truncated()")
