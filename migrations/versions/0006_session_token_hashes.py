"""Validation sessions keep only a hash of their token, and count wrong tokens.

`token` held the emailed token or SMS code in clear; it becomes `token_hash` (SHA-256 hex, as
client secrets and access tokens already are), existing tokens hashed in place, so sessions
pending during the upgrade still validate with the code or link they were sent.
`failed_attempts` counts wrong tokens presented with the right client secret: at
`sessions.max_token_attempts` an unvalidated session is dead.

Downgrading keeps the hashes (a clear token cannot be recovered from them): sessions pending
at that moment must be requested again.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02
"""

import hashlib

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

_CHUNK = 1000


def upgrade() -> None:
    conn = op.get_bind()
    sessions = sa.table("validation_sessions", sa.column("sid", sa.String), sa.column("token", sa.String))
    # Hashed before the column shrinks to 64 characters (email tokens may be up to 255).
    rows = conn.execute(sa.select(sessions.c.sid, sessions.c.token)).all()
    hash_by_sid = (
        sa.update(sessions).where(sessions.c.sid == sa.bindparam("b_sid")).values(token=sa.bindparam("b_hash"))
    )
    for start in range(0, len(rows), _CHUNK):
        conn.execute(
            hash_by_sid,
            [
                {"b_sid": sid, "b_hash": hashlib.sha256(token.encode("utf-8")).hexdigest()}
                for sid, token in rows[start : start + _CHUNK]
            ],
        )
    # SQLite cannot alter columns in place: batch mode rebuilds the table (indexes included).
    with op.batch_alter_table("validation_sessions") as batch:
        batch.alter_column(
            "token",
            new_column_name="token_hash",
            existing_type=sa.String(255),
            type_=sa.String(64),
            existing_nullable=False,
        )
        batch.add_column(sa.Column("failed_attempts", sa.Integer, nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("validation_sessions") as batch:
        batch.drop_column("failed_attempts")
        batch.alter_column(
            "token_hash",
            new_column_name="token",
            existing_type=sa.String(64),
            type_=sa.String(255),
            existing_nullable=False,
        )
