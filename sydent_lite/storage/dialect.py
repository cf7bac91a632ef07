"""The one place that knows SQLite and PostgreSQL spell upserts and list matches differently."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import Table, any_, bindparam
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection


def insert_for(conn: AsyncConnection, table: Table) -> Any:
    """An INSERT that supports .on_conflict_do_nothing()/.on_conflict_do_update() on this backend."""
    if conn.dialect.name == "postgresql":
        return postgresql.insert(table)
    return sqlite.insert(table)


def among(column: Any, values: Sequence[Any], dialect_name: str) -> Any:
    """`column IN (values)`, as PostgreSQL best takes it: `= ANY($1)` with one array parameter.

    An expanded IN list is a different statement for every length, so asyncpg prepared (and
    PostgreSQL planned) a new one for almost every lookup; the array form is one statement,
    and has no limit on its length. Elsewhere an ordinary IN (keep lists under SQLite's
    parameter limit).
    """
    if dialect_name == "postgresql":
        return column == any_(bindparam(None, list(values), type_=postgresql.ARRAY(column.type)))
    return column.in_(list(values))
