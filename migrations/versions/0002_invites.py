"""Invitations with ephemeral keys, and durable onbind callbacks.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "invites",
        sa.Column("token", sa.String(255), primary_key=True),
        sa.Column("medium", sa.String(16), nullable=False),
        sa.Column("address", sa.String(512), nullable=False),
        sa.Column("room_id", sa.String(255), nullable=False),
        sa.Column("sender", sa.String(255), nullable=False),
        sa.Column("ephemeral_public_key", sa.String(64), nullable=False),
        sa.Column("ephemeral_private_key", sa.String(64), nullable=False),
        sa.Column("created_ts", sa.BigInteger, nullable=False),
        sa.Column("callback_id", sa.Integer, nullable=True),
        sa.Column("delivered_ts", sa.BigInteger, nullable=True),
    )
    op.create_index("ix_invites_threepid", "invites", ["medium", "address"])
    op.create_index("ix_invites_ephemeral_public_key", "invites", ["ephemeral_public_key"])
    op.create_index("ix_invites_callback_id", "invites", ["callback_id"])
    op.create_table(
        "onbind_callbacks",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("destination", sa.String(255), nullable=False),
        sa.Column("body", sa.Text, nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("next_attempt_ts", sa.BigInteger, nullable=False),
        sa.Column("claimed_until", sa.BigInteger, nullable=False),
        sa.Column("created_ts", sa.BigInteger, nullable=False),
    )
    op.create_index("ix_onbind_callbacks_next_attempt_ts", "onbind_callbacks", ["next_attempt_ts"])


def downgrade() -> None:
    op.drop_table("onbind_callbacks")
    op.drop_table("invites")
