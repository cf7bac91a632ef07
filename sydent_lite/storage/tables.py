"""The database schema (SQLAlchemy Core). Alembic migrations in migrations/ create it."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)

metadata = MetaData()

# Identity-server access tokens (from /account/register), stored as SHA-256 hashes.
accounts = Table(
    "accounts",
    metadata,
    Column("token_hash", String(64), primary_key=True),
    Column("user_id", String(255), nullable=False, index=True),
    Column("created_ts", BigInteger, nullable=False),
)

accepted_terms = Table(
    "accepted_terms",
    metadata,
    Column("user_id", String(255), primary_key=True),
    Column("url", String(1024), primary_key=True),
)

# Validation sessions. The client secret and the token (email token or SMS code) are stored as
# SHA-256 hashes only. failed_attempts counts wrong tokens (with the right client secret): at
# sessions.max_token_attempts an unvalidated session is dead.
validation_sessions = Table(
    "validation_sessions",
    metadata,
    Column("sid", String(64), primary_key=True),
    Column("medium", String(16), nullable=False),
    Column("address", String(512), nullable=False),
    Column("client_secret_hash", String(64), nullable=False),
    Column("token_hash", String(64), nullable=False),
    Column("send_attempt", BigInteger, nullable=False),
    Column("next_link", Text, nullable=True),
    Column("brand", String(64), nullable=True),
    Column("created_ts", BigInteger, nullable=False),
    Column("mtime", BigInteger, nullable=False),
    Column("validated", Boolean, nullable=False, default=False),
    Column("validated_at", BigInteger, nullable=True),
    Column("failed_attempts", Integer, nullable=False, default=0, server_default="0"),
    Index("ix_validation_sessions_key", "medium", "address", "client_secret_hash"),
)

# One row per 3PID: binding a bound address replaces the row. `signed_json` is the signed
# association exactly as /bind returned it, so v1 /lookup can return the very same object.
associations = Table(
    "associations",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("medium", String(16), nullable=False),
    Column("address", String(512), nullable=False),
    # The hashes under the two live peppers (lookup_peppers.slot 0 and 1, migration 0009);
    # "" (or NULL, in rows older than 0009) in a slot no live pepper owns.
    Column("lookup_hash", String(64), nullable=False),
    Column("lookup_hash_b", String(64), nullable=True),
    Column("mxid", String(255), nullable=False),
    Column("ts", BigInteger, nullable=False),
    Column("not_before", BigInteger, nullable=False),
    Column("not_after", BigInteger, nullable=False),
    Column("signed_json", Text, nullable=False),
    UniqueConstraint("medium", "address", name="uq_associations_threepid"),
    Index("ix_associations_lookup_hash", "lookup_hash"),
    Index("ix_associations_lookup_hash_b", "lookup_hash_b"),
    Index("ix_associations_mxid", "mxid"),
)

# Appended by database triggers on every change to `associations` (migration 0004): what each
# process's in-memory lookup index applies to stay current. present: the row (association_id)
# now has this lookup hash; not present: it no longer has it.
association_changes = Table(
    "association_changes",
    metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("lookup_hash", String(64), nullable=False),
    Column("lookup_hash_b", String(64), nullable=False, server_default=""),
    Column("association_id", BigInteger, nullable=False),
    Column("present", Boolean, nullable=False),
    Column("created_ms", BigInteger, nullable=False),
    sqlite_autoincrement=True,
)

# Every lookup pepper there has been (migration 0009): which hash slot of `associations` it
# owns, when it became (or becomes) current, when its grace window ends, and the rehash that
# prepares it (progress and claim).
lookup_peppers = Table(
    "lookup_peppers",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("pepper", String(255), nullable=False),
    Column("slot", Integer, nullable=False),
    Column("created_ms", BigInteger, nullable=False),
    Column("activates_ms", BigInteger, nullable=True),
    Column("retires_ms", BigInteger, nullable=True),
    Column("rehashed_through", Integer, nullable=False, server_default="0"),
    Column("claimed_by", String(64), nullable=False, server_default=""),
    Column("claimed_until_ms", BigInteger, nullable=False, server_default="0"),
)

# Small named values shared by every worker (the lookup pepper, ...).
server_state = Table(
    "server_state",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("value", Text, nullable=False),
)

# Invitations to 3PIDs not yet bound (store-invite), with their ephemeral public keys. The
# private halves are never stored (migration 0007 dropped them): the invite mail holds the
# only copy, and sign-ed25519 needs it.
invites = Table(
    "invites",
    metadata,
    Column("token", String(255), primary_key=True),
    Column("medium", String(16), nullable=False),
    Column("address", String(512), nullable=False),
    Column("room_id", String(255), nullable=False),
    Column("sender", String(255), nullable=False),
    Column("ephemeral_public_key", String(64), nullable=False),
    Column("created_ts", BigInteger, nullable=False),
    # Set when the invite is queued in an onbind callback, and when that callback succeeded.
    Column("callback_id", Integer, nullable=True),
    Column("delivered_ts", BigInteger, nullable=True),
    Index("ix_invites_threepid", "medium", "address"),
    Index("ix_invites_ephemeral_public_key", "ephemeral_public_key"),
    Index("ix_invites_callback_id", "callback_id"),
)

# onbind callbacks waiting for the invitee's homeserver to answer 2xx. A worker claims one by
# moving claimed_until into the future with a conditional UPDATE, so two never send the same.
onbind_callbacks = Table(
    "onbind_callbacks",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("destination", String(255), nullable=False),
    Column("body", Text, nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("next_attempt_ts", BigInteger, nullable=False),
    Column("claimed_until", BigInteger, nullable=False),
    Column("created_ts", BigInteger, nullable=False),
    Index("ix_onbind_callbacks_next_attempt_ts", "next_attempt_ts"),
)

# Ephemeral public keys without an invite of ours (imported from Sydent): still valid for
# /pubkey/ephemeral/isvalid until they expire like invites do.
ephemeral_public_keys = Table(
    "ephemeral_public_keys",
    metadata,
    Column("public_key", String(64), primary_key=True),
    Column("created_ts", BigInteger, nullable=False),
)

# Token buckets shared by every worker (when no Redis is configured).
rate_limit_buckets = Table(
    "rate_limit_buckets",
    metadata,
    Column("key", String(255), primary_key=True),
    Column("tokens", Float, nullable=False),
    Column("updated_ms", BigInteger, nullable=False),
)

# What an operator erased (`associations delete`): a SHA-256 of "<kind>\0<value>" (kind: a
# medium, or "mxid"), never the address or user ID itself. An import from Sydent skips what
# Sydent still holds of an erased person, so an erasure survives re-running the import.
erasures = Table(
    "erasures",
    metadata,
    Column("subject_hash", String(64), primary_key=True),
    Column("erased_ts", BigInteger, nullable=False),
)
