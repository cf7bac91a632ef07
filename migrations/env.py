"""Alembic environment: sydent_lite runs migrations itself and hands us a connection.

Run by `sydent-lite migrate` and at `sydent-lite serve` start-up, never by the alembic CLI
alone (the URL lives in sydent_lite's config, not in an alembic.ini).
"""

from alembic import context

from sydent_lite.storage.tables import metadata

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations with `sydent-lite migrate --config PATH`")

context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
