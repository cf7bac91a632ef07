"""Imported ephemeral public keys, and shared rate-limit buckets.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-22
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "ephemeral_public_keys",
        sa.Column("public_key", sa.String(64), primary_key=True),
        sa.Column("created_ts", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "rate_limit_buckets",
        sa.Column("key", sa.String(255), primary_key=True),
        sa.Column("tokens", sa.Float, nullable=False),
        sa.Column("updated_ms", sa.BigInteger, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("rate_limit_buckets")
    op.drop_table("ephemeral_public_keys")
