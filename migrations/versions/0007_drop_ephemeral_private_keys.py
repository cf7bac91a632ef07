"""Invitations no longer keep their ephemeral private keys.

With the key in the database, v2 sign-ed25519 could sign for anyone who knew the invite token,
and that token is public (the state key of the room's m.room.third_party_invite event). The
invite mail's join link is now the key's only copy, as with Sydent; sign-ed25519 requires it.

Downgrading brings the column back empty: the keys are gone for good.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # SQLite: batch mode rebuilds the table without the column (indexes included).
    with op.batch_alter_table("invites") as batch:
        batch.drop_column("ephemeral_private_key")


def downgrade() -> None:
    with op.batch_alter_table("invites") as batch:
        batch.add_column(sa.Column("ephemeral_private_key", sa.String(64), nullable=False, server_default=""))
