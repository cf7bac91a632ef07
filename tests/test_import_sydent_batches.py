"""`import-sydent` streams the associations in batches: batches far smaller than the fixture
give the same database as one batch, each 3PID arrives once (its rows in one batch even when
they sort apart in Sydent's tables), erasures hold in every batch, and a rerun changes nothing.

The batch size comes from SYDENT_LITE_IMPORT_BATCH_ROWS (for tests); the batches the import
actually made are recorded, so a size that was ignored fails the test.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import signedjson.key
from sqlalchemy import func, select, text
from test_import_sydent import SydentBuilder, dump, make_config, run, select_all

from sydent_lite.admin import operator
from sydent_lite.admin.sydent_import import bulk_pg, import_sydent, read
from sydent_lite.admin.sydent_import.importer import BATCH_ROWS_ENV
from sydent_lite.admin.sydent_import.read import SydentAssociation
from sydent_lite.storage.associations import AssociationStore, StoredAssociation
from sydent_lite.storage.database import migrate_database, open_database
from sydent_lite.storage.people import MatrixUser, ThreePid
from sydent_lite.storage.tables import association_changes, associations

SERVER_NAME = "id.batches.test"
BATCH = 7  # rows; the fixture has ~130 association rows
ERASED_USER = "@erased:hs.test"
T0 = 1_700_000_000_000


def build(path: Path, key: Any) -> dict[tuple[str, str], tuple[str, int]]:
    """A Sydent database; returns what must be imported: 3PID -> (mxid, ts)."""
    b = SydentBuilder(path, SERVER_NAME, key)
    expected: dict[tuple[str, str], tuple[str, int]] = {}
    for i in range(40):  # bound and pushed: a local and a global row each
        mxid = ERASED_USER if i % 8 == 0 else f"@u{i}:hs.test"
        a = b.assoc("email", f"u{i}@example.test", mxid, T0 + i)
        b.push_global(a, b.bind_local(a))
        expected[("email", f"u{i}@example.test")] = (mxid, T0 + i)
    for i in range(15):  # only the global table, several rows each: the newest wins
        for n in range(3):
            a = b.assoc("msisdn", f"4477009{i:05d}", f"@m{i}v{n}:hs.test", T0 + 100 * i + n)
            b.push_global(a, 10_000 + 3 * i + n)
        expected[("msisdn", f"4477009{i:05d}")] = (f"@m{i}v2:hs.test", T0 + 100 * i + 2)
    for i in range(10):  # bound, then unbound later: nothing to import
        a = b.assoc("email", f"gone{i}@example.test", f"@g{i}:hs.test", T0 + i)
        b.push_global(a, b.bind_local(a))
        b.unbind("email", f"gone{i}@example.test", T0 + 1000 + i)
    for i in range(10):
        # An old local row in mixed case (an older Sydent did not fold emails) and a newer global
        # row folded: they sort far apart in Sydent's tables, yet are one 3PID.
        old = b.assoc("email", f"ZZ{i}@Example.TEST", f"@old{i}:hs.test", T0 + i)
        b.bind_local(old)
        new = b.assoc("email", f"zz{i}@example.test", f"@new{i}:hs.test", T0 + 500 + i)
        b.push_global(new, 20_000 + i)
        expected[("email", f"zz{i}@example.test")] = (f"@new{i}:hs.test", T0 + 500 + i)
    b.close()
    return expected


@pytest.fixture
def batches(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The row count of every batch the import makes (BATCH rows each, asked for)."""
    monkeypatch.setenv(BATCH_ROWS_ENV, str(BATCH))
    made: list[int] = []
    real = read.association_batches

    def recorded(groups: Iterator[list[SydentAssociation]], rows: int) -> Iterator[list[list[SydentAssociation]]]:
        for batch in real(groups, rows):
            made.append(sum(len(g) for g in batch))
            yield batch

    monkeypatch.setattr(read, "association_batches", recorded)
    return made


def imported(url: str) -> dict[tuple[str, str], tuple[str, int]]:
    rows = select_all(url, select(associations))
    assert len(rows) == len({(r["medium"], r["address"]) for r in rows})  # each 3PID once
    return {(r["medium"], r["address"]): (r["mxid"], r["ts"]) for r in rows}


def test_small_batches_import_every_row_once_and_a_rerun_changes_nothing(
    db_factory: Any, batches: list[int], tmp_path: Path
) -> None:
    key = signedjson.key.generate_signing_key("0")
    sydent_db = tmp_path / "sydent.db"
    expected = build(sydent_db, key)
    key_file = tmp_path / "sydent.key"
    key_file.write_text(f"ed25519 0 {signedjson.key.encode_signing_key_base64(key)}\n")

    small, whole = db_factory.create(), db_factory.create()
    small_config = make_config(small.url, SERVER_NAME, tmp_path / "small.key")
    counts = run(import_sydent(small_config, sydent_db, key_file))
    assert len(batches) > 10 and max(batches) < 2 * BATCH  # many batches, each about BATCH rows
    assert sum(batches) == 40 * 2 + 15 * 3 + 10 * 1 + 10 * 2  # every readable row, in one batch only
    assert imported(small.url) == expected
    assert counts.associations_imported == len(expected) and counts.associations_unbound_in_sydent == 10

    # One batch makes the same database.
    batches.clear()
    whole_config = make_config(whole.url, SERVER_NAME, tmp_path / "whole.key")
    with pytest.MonkeyPatch.context() as m:
        m.setenv(BATCH_ROWS_ENV, "1000000")
        run(import_sydent(whole_config, sydent_db, key_file))
    assert len(batches) == 1
    assert [r[1:] for r in dump(small.url)["associations"]] == [r[1:] for r in dump(whole.url)["associations"]]

    # A rerun in small batches changes nothing.
    before = dump(small.url)
    counts = run(import_sydent(small_config, sydent_db, key_file))
    assert counts.associations_imported == 0 and counts.associations_already_present == len(expected)
    assert dump(small.url) == before


def test_erasures_hold_in_every_batch(db_factory: Any, batches: list[int], tmp_path: Path) -> None:
    key = signedjson.key.generate_signing_key("0")
    sydent_db = tmp_path / "sydent.db"
    expected = build(sydent_db, key)
    key_file = tmp_path / "sydent.key"
    key_file.write_text(f"ed25519 0 {signedjson.key.encode_signing_key_base64(key)}\n")
    db = db_factory.create()
    config = make_config(db.url, SERVER_NAME, tmp_path / "ours.key")
    run(import_sydent(config, sydent_db, key_file))

    # A user with 3PIDs in several batches, and a 3PID of a batch of its own.
    erased_user = [k for k, (mxid, _) in expected.items() if mxid == ERASED_USER]
    assert len(erased_user) == 5
    run(operator.delete_person(config, MatrixUser(ERASED_USER)))
    run(operator.delete_person(config, ThreePid("msisdn", "447700900007")))
    left = {k: v for k, v in expected.items() if k not in erased_user and k != ("msisdn", "447700900007")}
    assert imported(db.url) == left

    batches.clear()
    before = dump(db.url)
    counts = run(import_sydent(config, sydent_db, key_file))
    assert len(batches) > 10
    assert counts.erased_associations_skipped == 6 and counts.associations_imported == 0
    assert counts.associations_already_present == len(left)
    assert imported(db.url) == left and dump(db.url) == before


async def _schema(url: str) -> list[tuple[Any, ...]]:
    """The indexes, constraints and triggers of `associations`, with whether each trigger is on."""
    engine = open_database(url)
    try:
        async with engine.connect() as conn:
            if conn.dialect.name == "postgresql":
                queries = [
                    "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'associations'",
                    "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint"
                    " WHERE conrelid = 'associations'::regclass",
                    "SELECT tgname, tgenabled FROM pg_trigger WHERE tgrelid = 'associations'::regclass"
                    " AND NOT tgisinternal",
                ]
            else:
                queries = ["SELECT type, name, sql FROM sqlite_master WHERE tbl_name = 'associations'"]
            found = []
            for q in queries:
                found += [tuple(r) for r in (await conn.execute(text(q))).all()]
            return sorted(found)
    finally:
        await engine.dispose()


async def _bind_and_count_changes(url: str) -> tuple[int, int]:
    """(change-log rows before, after) a bind made as a server makes it."""
    engine = open_database(url)
    try:
        count = select(func.count()).select_from(association_changes)
        async with engine.connect() as conn:
            before = (await conn.execute(count)).scalar_one()
        await AssociationStore(engine).upsert(
            StoredAssociation("email", "after@import.test", "h" * 43, "@after:hs.test", T0, T0, T0 + 1, "{}")
        )
        async with engine.connect() as conn:
            return before, (await conn.execute(count)).scalar_one()
    finally:
        await engine.dispose()


def test_the_import_leaves_the_tables_indexes_and_change_log_as_a_migration_made_them(
    db_factory: Any, batches: list[int], tmp_path: Path
) -> None:
    """On PostgreSQL the import drops the indexes and disables the change-log trigger for its
    transaction: both are back afterwards, into an empty table and into one that has rows."""
    key = signedjson.key.generate_signing_key("0")
    sydent_db = tmp_path / "sydent.db"
    expected = build(sydent_db, key)
    key_file = tmp_path / "sydent.key"
    key_file.write_text(f"ed25519 0 {signedjson.key.encode_signing_key_base64(key)}\n")
    db = db_factory.create()
    run(migrate_database(db.url))
    migrated = run(_schema(db.url))
    config = make_config(db.url, SERVER_NAME, tmp_path / "ours.key")

    run(import_sydent(config, sydent_db, key_file))  # into the empty table
    assert imported(db.url) == expected and run(_schema(db.url)) == migrated
    run(import_sydent(config, sydent_db, key_file))  # into one that has rows
    assert run(_schema(db.url)) == migrated
    before, after = run(_bind_and_count_changes(db.url))
    assert after == before + 1  # the next bind is logged for the servers' lookup index


def test_without_the_tables_owner_the_import_writes_the_same(
    db_factory: Any, batches: list[int], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PostgreSQL: when the trigger cannot be disabled (not the table's owner: here, a query
    that fails in its place), the rows go in with the trigger and indexes as they are."""
    if db_factory.backend != "postgres":
        pytest.skip("PostgreSQL only")
    key = signedjson.key.generate_signing_key("0")
    sydent_db = tmp_path / "sydent.db"
    expected = build(sydent_db, key)
    key_file = tmp_path / "sydent.key"
    key_file.write_text(f"ed25519 0 {signedjson.key.encode_signing_key_base64(key)}\n")
    monkeypatch.setattr(bulk_pg, "_TRIGGERS", "SELECT 1 / 0")
    db = db_factory.create()
    config = make_config(db.url, SERVER_NAME, tmp_path / "ours.key")
    counts = run(import_sydent(config, sydent_db, key_file))
    assert imported(db.url) == expected and counts.associations_imported == len(expected)
    # Every imported row was logged by the trigger, which stayed on.
    logged = select_all(db.url, select(association_changes.c.lookup_hash))
    assert len(logged) >= len(expected)
    counts = run(import_sydent(config, sydent_db, key_file))
    assert counts.associations_already_present == len(expected) and imported(db.url) == expected
