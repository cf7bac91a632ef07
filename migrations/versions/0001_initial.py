"""Initial schema: accounts, terms acceptance, validation sessions, associations, server state.

Revision ID: 0001
Revises:
Create Date: 2026-11-22
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "accounts",
        sa.Column("token_hash", sa.String(64), primary_key=True),
        sa.Column("user_id", sa.String(255), nullable=False),
        sa.Column("created_ts", sa.BigInteger, nullable=False),
    )
    op.create_index("ix_accounts_user_id", "accounts", ["user_id"])
    op.create_table(
        "accepted_terms",
        sa.Column("user_id", sa.String(255), primary_key=True),
        sa.Column("url", sa.String(1024), primary_key=True),
    )
    op.create_table(
        "validation_sessions",
        sa.Column("sid", sa.String(64), primary_key=True),
        sa.Column("medium", sa.String(16), nullable=False),
        sa.Column("address", sa.String(512), nullable=False),
        sa.Column("client_secret_hash", sa.String(64), nullable=False),
        sa.Column("token", sa.String(255), nullable=False),
        sa.Column("send_attempt", sa.BigInteger, nullable=False),
        sa.Column("next_link", sa.Text, nullable=True),
        sa.Column("brand", sa.String(64), nullable=True),
        sa.Column("created_ts", sa.BigInteger, nullable=False),
        sa.Column("mtime", sa.BigInteger, nullable=False),
        sa.Column("validated", sa.Boolean, nullable=False),
        sa.Column("validated_at", sa.BigInteger, nullable=True),
    )
    op.create_index("ix_validation_sessions_key", "validation_sessions", ["medium", "address", "client_secret_hash"])
    op.create_table(
        "associations",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("medium", sa.String(16), nullable=False),
        sa.Column("address", sa.String(512), nullable=False),
        sa.Column("lookup_hash", sa.String(64), nullable=False),
        sa.Column("mxid", sa.String(255), nullable=False),
        sa.Column("ts", sa.BigInteger, nullable=False),
        sa.Column("not_before", sa.BigInteger, nullable=False),
        sa.Column("not_after", sa.BigInteger, nullable=False),
        sa.Column("signed_json", sa.Text, nullable=False),
        sa.UniqueConstraint("medium", "address", name="uq_associations_threepid"),
    )
    op.create_index("ix_associations_lookup_hash", "associations", ["lookup_hash"])
    op.create_index("ix_associations_mxid", "associations", ["mxid"])
    op.create_table(
        "server_state",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("value", sa.Text, nullable=False),
    )


def downgrade() -> None:
    for table in ("server_state", "associations", "validation_sessions", "accepted_terms", "accounts"):
        op.drop_table(table)
