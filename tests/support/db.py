"""Databases for the servers under test: a SQLite file, or a fresh PostgreSQL database.

PostgreSQL: the admin connection comes from `SYDENT_LITE_TEST_POSTGRES` (default
`postgresql://postgres@127.0.0.1:5432/test`); each server gets its own database
`sydent_lite_t_<random>`, dropped afterwards. `SYDENT_LITE_TEST_POSTGRES=off` skips the
PostgreSQL tests. If PostgreSQL cannot be reached they are skipped, except when `CI` is set:
then they fail, because CI must run them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import shutil
import sqlite3
import urllib.parse
import uuid
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest

DEFAULT_POSTGRES = "postgresql://postgres@127.0.0.1:5432/test"
POSTGRES_ENV = "SYDENT_LITE_TEST_POSTGRES"

BACKENDS = ("sqlite", "postgres")


def postgres_admin_url() -> str | None:
    """The admin URL, or None when the PostgreSQL tests are switched off."""
    value = os.environ.get(POSTGRES_ENV, DEFAULT_POSTGRES).strip()
    if value.lower() == "off":
        return None
    return value


def postgres_disabled() -> bool:
    return postgres_admin_url() is None


def _run(coro: Coroutine[Any, Any, Any]) -> Any:
    # Always on a thread of our own: safe whether or not the caller has a running event loop.
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()


def _asyncpg_url(url: str) -> str:
    # asyncpg wants postgresql:// or postgres://
    for prefix in ("postgresql+asyncpg://", "postgres+asyncpg://"):
        if url.startswith(prefix):
            return "postgresql://" + url[len(prefix) :]
    return url


def run_sql(db: ScratchDatabase, sql: str, *args: Any) -> list[Any]:
    """Rows of one statement on a scratch PostgreSQL database ($1-style parameters)."""
    return run_sql_at(db.url, sql, *args)


def run_sql_at(url: str, sql: str, *args: Any) -> list[Any]:
    """Rows of one statement on the PostgreSQL database at `url`, on a connection of its own,
    on a thread of its own: the caller's event loop (if any) does not run meanwhile."""

    async def go() -> list[Any]:
        import asyncpg

        conn = await asyncpg.connect(_asyncpg_url(url), timeout=10)
        try:
            return list(await conn.fetch(sql, *args))
        finally:
            await conn.close()

    return cast("list[Any]", _run(go()))


def sql(url: str, statement: str, *args: Any) -> list[dict[str, Any]]:
    """Rows (as dicts) of one statement, with `?` parameters, on the database at `url` (a
    server's `database.url`, SQLite or PostgreSQL), on a connection of its own, committed."""
    if url.startswith("sqlite"):
        path = url.split(":///", 1)[1]
        conn = sqlite3.connect(path, timeout=10)
        conn.row_factory = sqlite3.Row
        try:
            rows = [dict(r) for r in conn.execute(statement, args)]
            conn.commit()
            return rows
        finally:
            conn.close()
    parts = statement.split("?")
    numbered = parts[0] + "".join(f"${i}{part}" for i, part in enumerate(parts[1:], start=1))
    return [dict(r) for r in run_sql_at(url, numbered, *args)]


def refuse_inserts(url: str, table: str) -> None:
    """Make every INSERT into `table` fail (a trigger), as a full disk or a lost connection
    would at that point; `allow_inserts` takes it away again."""
    if url.startswith("sqlite"):
        sql(
            url,
            f"CREATE TRIGGER refuse_{table} BEFORE INSERT ON {table} BEGIN"
            " SELECT RAISE(ABORT, 'refused by the test'); END",
        )
    else:
        sql(
            url,
            f"CREATE FUNCTION refuse_{table}() RETURNS trigger AS $$ BEGIN"
            " RAISE EXCEPTION 'refused by the test'; END $$ LANGUAGE plpgsql",
        )
        sql(
            url,
            f"CREATE TRIGGER refuse_{table} BEFORE INSERT ON {table} FOR EACH ROW EXECUTE FUNCTION refuse_{table}()",
        )


def allow_inserts(url: str, table: str) -> None:
    if url.startswith("sqlite"):
        sql(url, f"DROP TRIGGER refuse_{table}")
    else:
        sql(url, f"DROP TRIGGER refuse_{table} ON {table}")
        sql(url, f"DROP FUNCTION refuse_{table}()")


def _with_database(url: str, dbname: str, scheme: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit((scheme, parts.netloc, "/" + dbname, parts.query, parts.fragment))


_reachability: dict[str, str | None] = {}


def postgres_problem(admin_url: str) -> str | None:
    """None when PostgreSQL answers at `admin_url`, else why not (cached)."""
    if admin_url not in _reachability:

        async def probe() -> None:
            import asyncpg

            conn = await asyncpg.connect(_asyncpg_url(admin_url), timeout=5)
            try:
                await conn.fetchval("SELECT 1")
            finally:
                await conn.close()

        try:
            _run(probe())
            _reachability[admin_url] = None
        except Exception as e:
            _reachability[admin_url] = f"{type(e).__name__}: {e}"
    return _reachability[admin_url]


def require_postgres() -> str:
    """The admin URL; skips (or, under CI, fails) the calling test when PostgreSQL is unusable."""
    admin = postgres_admin_url()
    if admin is None:
        pytest.skip(f"PostgreSQL tests switched off ({POSTGRES_ENV}=off)")
    problem = postgres_problem(admin)
    if problem is not None:
        message = f"PostgreSQL at {admin} is not reachable: {problem}"
        if os.environ.get("CI"):
            pytest.fail(message + " (CI is set: the PostgreSQL tests must run)", pytrace=False)
        pytest.skip(message)
    return admin


async def _create_postgres(admin_url: str, name: str, template: str | None = None) -> None:
    import asyncpg

    conn = await asyncpg.connect(_asyncpg_url(admin_url), timeout=10)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else ""))
    finally:
        await conn.close()


async def _drop_postgres(admin_url: str, name: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(_asyncpg_url(admin_url), timeout=10)
    try:
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        except asyncpg.PostgresSyntaxError:  # PostgreSQL < 13
            await conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", name)
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
    finally:
        await conn.close()


# Databases dropped at once: a DROP DATABASE waits for a checkpoint, and concurrent ones share it
# (12 took 4 s together, 1.5 s each one after another).
DROP_CONCURRENCY = 16


@dataclass
class ScratchDatabase:
    backend: str
    url: str  # what goes into the server's `database.url`
    name: str  # file path (sqlite) or database name (postgres)
    admin_url: str | None = None

    def drop(self) -> None:
        drop_all([self])


def drop_all(databases: list[ScratchDatabase]) -> list[str]:
    """Drop `databases` (PostgreSQL ones concurrently); the errors, one line each."""
    errors: list[str] = []
    postgres = []
    for db in databases:
        if db.backend == "sqlite":
            for suffix in ("", "-wal", "-shm", "-journal"):
                Path(db.name + suffix).unlink(missing_ok=True)
        else:
            postgres.append(db)

    async def drop_them() -> list[BaseException | None]:
        limit = asyncio.Semaphore(DROP_CONCURRENCY)

        async def one(db: ScratchDatabase) -> None:
            assert db.admin_url is not None
            async with limit:
                await _drop_postgres(db.admin_url, db.name)

        return await asyncio.gather(*(one(db) for db in postgres), return_exceptions=True)

    if postgres:
        for db, outcome in zip(postgres, _run(drop_them()), strict=True):
            if outcome is not None:
                errors.append(f"{db.name}: {outcome}")
    return errors


class DatabaseFactory:
    """Creates databases of one backend and drops them all in `cleanup()`.

    `create(migrated=True)`: a copy of a database migrated once per factory (SQLite: the file
    copied; PostgreSQL: `CREATE DATABASE ... TEMPLATE`), instead of a server applying every
    migration again at its start (2 s on PostgreSQL). The migrations themselves are still run
    by every server on an empty database (`create()`), and by tests/test_migrations.py.
    """

    def __init__(self, backend: str, tmpdir: Path) -> None:
        assert backend in BACKENDS, backend
        self.backend = backend
        self.tmpdir = tmpdir
        self.created: list[ScratchDatabase] = []
        self.admin_url = require_postgres() if backend == "postgres" else None
        self._template: ScratchDatabase | None = None

    def create(self, migrated: bool = False) -> ScratchDatabase:
        template = self._migrated_template() if migrated else None
        db = self._new(template)
        self.created.append(db)
        return db

    def _new(self, template: ScratchDatabase | None = None) -> ScratchDatabase:
        suffix = uuid.uuid4().hex[:12]
        if self.backend == "sqlite":
            path = (self.tmpdir / f"sydent_lite_{suffix}.sqlite").resolve()
            if template is not None:
                shutil.copyfile(template.name, path)
            return ScratchDatabase("sqlite", f"sqlite:///{path}", str(path))
        assert self.admin_url is not None
        name = f"sydent_lite_t_{suffix}"
        _run(_create_postgres(self.admin_url, name, template.name if template else None))
        url = _with_database(self.admin_url, name, "postgresql+asyncpg")
        return ScratchDatabase("postgres", url, name, self.admin_url)

    def _migrated_template(self) -> ScratchDatabase:
        if self._template is None:
            from sydent_lite.storage.database import migrate_database

            template = self._new()
            self.created.append(template)
            _run(migrate_database(template.url))  # closes its connections: a template must have none
            if self.backend == "sqlite":
                assert not Path(template.name + "-wal").exists(), "the migrated template is not one file"
            self._template = template
        return self._template

    def cleanup(self) -> None:
        databases, self.created = self.created, []
        errors = drop_all(databases)
        if errors:
            raise RuntimeError("could not drop test databases: " + "; ".join(errors))
