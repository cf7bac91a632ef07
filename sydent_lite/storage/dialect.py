"""The one place that knows SQLite and PostgreSQL spell upserts differently (list matches:
storage.readers)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Table
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection


def insert_for(conn: AsyncConnection, table: Table) -> Any:
    """An INSERT that supports .on_conflict_do_nothing()/.on_conflict_do_update() on this backend."""
    return INSERT_FOR_DIALECT[conn.dialect.name](table)


# By dialect name: for statements built once, beside the table (hot paths: a statement built
# per call costs more CPU than SQLite takes to run it).
INSERT_FOR_DIALECT: dict[str, Any] = {"postgresql": postgresql.insert, "sqlite": sqlite.insert}
