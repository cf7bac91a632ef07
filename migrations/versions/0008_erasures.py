"""A record of erasures (`associations delete`), so that a re-run import does not undo them.

Only a SHA-256 of what was erased is kept ("<medium>\\0<address>" or "mxid\\0<user id>"),
never the address: the record says "this was erased" to whoever already knows the address.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "erasures",
        sa.Column("subject_hash", sa.String(64), primary_key=True),
        sa.Column("erased_ts", sa.BigInteger, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("erasures")
