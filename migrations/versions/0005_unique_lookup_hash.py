"""The lookup_hash index becomes unique.

Lookups read their candidates by lookup hash (`lookup_hash IN (...)`). Without table
statistics (a fresh import, autovacuum off) PostgreSQL guessed that a list of 150 hashes
matched a quarter of a 1,000,000-row table and scanned all of it: 5 lookups a second. A
unique index tells the planner the truth (one row per hash) whatever the statistics say.
Lookup hashes are unique anyway: one per (medium, address), which is itself unique.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-23
"""
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.drop_index("ix_associations_lookup_hash", table_name="associations")
    op.create_index("ix_associations_lookup_hash", "associations", ["lookup_hash"], unique=True)


def downgrade() -> None:
    op.drop_index("ix_associations_lookup_hash", table_name="associations")
    op.create_index("ix_associations_lookup_hash", "associations", ["lookup_hash"])
