"""CLI commands and storage behaviour that the HTTP tests cannot see directly."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import signedjson.key
import signedjson.sign
from support.db import DatabaseFactory, run_sql_at

from sydent_lite.config import config_from_dict
from sydent_lite.services.hashing import (
    HASHED_WITH_KEY,
    PEPPER_KEY,
    load_pepper,
    lookup_hash,
)
from sydent_lite.signing import ServerSigner, load_or_create_signing_key
from sydent_lite.storage.associations import AssociationStore, StoredAssociation
from sydent_lite.storage.database import migrate, open_database
from sydent_lite.storage.state import ServerStateStore
from sydent_lite.storage.tables import associations


@pytest.fixture
def database_url(db_factory: DatabaseFactory) -> str:
    """A fresh database of the current backend (SQLite file or scratch PostgreSQL database)."""
    return db_factory.create().url


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sydent_lite", *args], capture_output=True, text=True, timeout=120, cwd=cwd
    )


def test_spec_sha256_test_vectors() -> None:
    # identity-service-api.md, "sha256": pepper "matrixrocks".
    assert lookup_hash("alice@example.com", "email", "matrixrocks") == "4kenr7N9drpCJ4AfalmlGQVsOn3o2RHjkADUpXJWZUc"
    assert lookup_hash("bob@example.com", "email", "matrixrocks") == "LJwSazmv46n0hlMlsb_iYxI0_HXEqy_yj6Jm636cdT8"
    assert lookup_hash("18005552067", "msisdn", "matrixrocks") == "nlo35_T5fzSGZzJApqu8lgIudJvmOQtDaHtr-I4rU7I"


def test_signing_key_is_created_once_and_read_in_sydent_format(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "signing.key"
    key = load_or_create_signing_key(path)
    assert path.stat().st_mode & 0o777 == 0o600
    line = path.read_text().strip()
    assert line.startswith("ed25519 0 ")
    again = load_or_create_signing_key(path)
    assert again.encode() == key.encode()

    # A key written by Sydent/Synapse (same one-line format, other version) is used as is.
    other = signedjson.key.generate_signing_key("a_Xyz")
    sydent_file = tmp_path / "sydent.key"
    with sydent_file.open("w") as f:
        signedjson.key.write_signing_keys(f, [other])
    signer = ServerSigner("id.test", load_or_create_signing_key(sydent_file))
    assert signer.key_id == "ed25519:a_Xyz"
    signed = signer.sign({"mxid": "@a:hs.test", "ts": 1})
    signedjson.sign.verify_signed_json(signed, "id.test", signedjson.key.get_verify_key(other))


def test_signing_refuses_floats() -> None:
    signer = ServerSigner("id.test", signedjson.key.generate_signing_key("0"))
    try:
        signer.sign({"ts": 1.5})
    except ValueError as e:
        assert "floats" in str(e)
    else:
        raise AssertionError("a float was signed")


def test_migrate_and_create_token(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(f'database: {{url: "sqlite:///{tmp_path}/db.sqlite"}}\n')
    proc = run_cli("migrate", "--config", str(config), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "up to date" in proc.stdout
    proc = run_cli("create-token", "--config", str(config), "--user-id", "@alice:hs.test", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    token = proc.stdout.strip()
    assert len(token) == 64 and token.isalnum()
    assert token not in proc.stderr  # the secret only goes to stdout
    proc = run_cli("create-token", "--config", str(config), "--user-id", "alice", cwd=tmp_path)
    assert proc.returncode == 2 and "not a Matrix user ID" in proc.stderr


@pytest.mark.parametrize("url", ["sqlite:///:memory:", "sqlite://"])
def test_in_memory_sqlite_is_refused_naming_the_key(tmp_path: Path, url: str) -> None:
    """Each connection (and the hot reader) would see a database of its own: refused at start,
    as a config error, not a traceback; and by the storage layer itself."""
    from sydent_lite.storage.database import open_database

    config = tmp_path / "c.yaml"
    config.write_text(f'database: {{url: "{url}"}}\nsigning_key_path: "{tmp_path}/k"\n')
    for command in ("migrate", "serve"):
        proc = run_cli(command, "--config", str(config), cwd=tmp_path)
        assert proc.returncode == 2, (command, proc.stderr)
        assert "config key 'database.url'" in proc.stderr and "in-memory" in proc.stderr
        assert "Traceback" not in proc.stderr
    with pytest.raises(ValueError, match="in-memory"):
        open_database(url)


def _association(medium: str, address: str, pepper: str, mxid: str = "@a:hs.test") -> StoredAssociation:
    return StoredAssociation(
        medium=medium,
        address=address,
        lookup_hash=lookup_hash(address, medium, pepper),
        mxid=mxid,
        ts=1,
        not_before=1,
        not_after=2,
        signed_json="{}",
    )


def test_pepper_is_kept_and_hashes_recomputed_when_it_changes(database_url: str) -> None:
    async def scenario() -> None:
        database = open_database(database_url)
        try:
            await migrate(database)
            await migrate(database)  # idempotent
            state, store = ServerStateStore(database), AssociationStore(database)
            pepper = await load_pepper(state, store)
            assert pepper == await load_pepper(state, store)  # kept
            addresses = [f"user{i}@example.test" for i in range(1205)]  # more than one batch
            for a in addresses:
                await store.upsert(_association("email", a, pepper))
            # Rebinding replaces the row: still one association per 3PID.
            await store.upsert(_association("email", addresses[0], pepper, mxid="@b:hs.test"))
            rebound = await store.get("email", addresses[0])
            assert rebound is not None and rebound.mxid == "@b:hs.test"

            await state.set(PEPPER_KEY, "a-new-pepper")
            assert await load_pepper(state, store) == "a-new-pepper"
            assert await state.get(HASHED_WITH_KEY) == "a-new-pepper"
            new_hashes = [lookup_hash(a, "email", "a-new-pepper") for a in addresses]
            found = await store.mxids_by_hash(new_hashes)
            assert len(found) == len(addresses)
            assert found[new_hashes[0]] == "@b:hs.test"
            assert await store.mxids_by_hash([lookup_hash(addresses[1], "email", pepper)]) == {}
        finally:
            await database.dispose()

    asyncio.run(scenario())


def test_expired_sessions_are_cleaned_up_after_a_grace_period(database_url: str, tmp_path: Path) -> None:
    from sydent_lite.context import build_context
    from sydent_lite.secrets_util import now_ms
    from sydent_lite.storage.sessions import ValidationSession

    config = config_from_dict(
        {
            "database": {"url": database_url},
            "signing_key_path": str(tmp_path / "k"),
            "sessions": {"lifetime_seconds": 100},
        }
    )

    def session(sid: str, age_ms: int) -> ValidationSession:
        t = now_ms() - age_ms
        return ValidationSession(
            sid=sid,
            medium="email",
            address=f"{sid}@x.test",
            client_secret_hash="h",
            token_hash="t",
            send_attempt=1,
            next_link=None,
            brand=None,
            created_ts=t,
            mtime=t,
            validated=False,
            validated_at=None,
        )

    async def scenario() -> None:
        ctx = await build_context(config)
        try:
            store = ctx.sessions._store
            await store.create(session("fresh", 0))
            await store.create(session("expired", 150_000))  # expired, still within the grace period
            await store.create(session("ancient", 250_000))  # expired for more than a lifetime
            assert await ctx.sessions.delete_expired() == 1
            assert await store.get("ancient") is None
            assert await store.get("expired") is not None and await store.get("fresh") is not None
        finally:
            await ctx.aclose()

    asyncio.run(scenario())


def test_head_revision_is_alembics_head() -> None:
    # `migrate` skips Alembic when the database is at head_revision(): it must be Alembic's head.
    from alembic.config import Config as AlembicConfig
    from alembic.script import ScriptDirectory

    from sydent_lite.resources import migrations_dir
    from sydent_lite.storage.database import head_revision

    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(migrations_dir()))
    assert head_revision() == ScriptDirectory.from_config(cfg).get_current_head()


@pytest.mark.parametrize(
    "hold_mxids", [False, True, "mapped"], ids=["confirm-in-database", "mxids-in-memory", "mapped-from-snapshots"]
)
def test_lookup_index_follows_every_kind_of_write(database_url: str, hold_mxids: bool | str, tmp_path: Path) -> None:
    """Binds through the store, hand-written SQL updates and deletes: the index sees them all,
    whether it confirms candidates in the database (SQLite's way) or in its own table of
    mxids (PostgreSQL's), or in one mapped from a snapshot file that the first index wrote and
    each later one maps, with the changes since held beside it (PostgreSQL with snapshots)."""
    from sqlalchemy import delete, text

    from sydent_lite.services.lookup_confirmers import DatabaseConfirmer, MemoryConfirmer
    from sydent_lite.services.lookup_index import LookupIndex
    from sydent_lite.storage.association_changes import AssociationChangeStore

    def stored(address: str, mxid: str) -> StoredAssociation:
        return StoredAssociation(
            medium="email",
            address=address,
            lookup_hash=lookup_hash(address, "email", "p"),
            mxid=mxid,
            ts=1,
            not_before=1,
            not_after=2,
            signed_json="{}",
        )

    from sydent_lite.services.index_snapshot import IndexSnapshots

    def new_index(database: Any, store: AssociationStore, snapshot_dir: Path = tmp_path / "snapshots") -> LookupIndex:
        snapshots = IndexSnapshots(snapshot_dir, "p", 0) if hold_mxids == "mapped" else None
        confirmer = MemoryConfirmer(store, "p", snapshots=snapshots) if hold_mxids else DatabaseConfirmer(store)
        return LookupIndex(AssociationChangeStore(database), store, confirmer)

    async def run() -> None:
        database = open_database(database_url)
        try:
            await migrate(database)
            store = AssociationStore(database)
            await store.upsert(stored("before@example.test", "@a:hs.test"))
            index = new_index(database, store)
            await index.load()
            # Mapped from the snapshot it wrote (the other modes hold their own).
            assert (index._held.snapshot is not None) == (hold_mxids == "mapped")
            h_before, h_after = (
                lookup_hash("before@example.test", "email", "p"),
                lookup_hash("after@example.test", "email", "p"),
            )
            assert await index.mxids([h_before, h_after]) == {h_before: "@a:hs.test"}
            both = ["before@example.test", "after@example.test"]
            assert await index.mxids_by_address("email", both) == {both[0]: "@a:hs.test"}
            assert await index.mxids_by_address("msisdn", both) == {}

            await store.upsert(stored("after@example.test", "@b:hs.test"))  # a bind
            await store.upsert(stored("before@example.test", "@c:hs.test"))  # rebound to someone else
            await index.catch_up()
            assert await index.mxids([h_before, h_after]) == {h_before: "@c:hs.test", h_after: "@b:hs.test"}
            assert await index.mxids_by_address("email", both) == {both[0]: "@c:hs.test", both[1]: "@b:hs.test"}

            async with database.begin() as conn:  # an operator's hand-written SQL
                await conn.execute(delete(associations).where(associations.c.address == "after@example.test"))
                await conn.execute(
                    text("UPDATE associations SET mxid = '@d:hs.test' WHERE address = 'before@example.test'")
                )
            await index.catch_up()
            assert await index.mxids([h_before, h_after]) == {h_before: "@d:hs.test"}
            assert await index.mxids_by_address("email", both) == {both[0]: "@d:hs.test"}
            assert index._stale >= 1  # the deleted row's keys stay, counted, until a rebuild

            # Pruned log: a fresh index still loads the table and follows new changes.
            async with database.begin() as conn:
                await conn.execute(text("UPDATE association_changes SET created_ms = 0"))
            assert await index.prune() > 0
            fresh = new_index(database, store)
            await fresh.load()  # the first snapshot is older than the log: a new one is written
            assert (fresh._held.snapshot is not None) == (hold_mxids == "mapped")
            assert await fresh.mxids([h_before]) == {h_before: "@d:hs.test"}
            await store.upsert(stored("after@example.test", "@e:hs.test"))
            await fresh.catch_up()
            assert await fresh.mxids([h_after]) == {h_after: "@e:hs.test"}
            assert await fresh.mxids_by_address("email", both) == {both[0]: "@d:hs.test", both[1]: "@e:hs.test"}

            # A rebuild that lets lookups go on meanwhile, with binds, a rebind and a removal
            # racing it: the rebuilt index ends where the table is.
            during = ["during1@example.test", "during2@example.test"]
            h_during = [lookup_hash(a, "email", "p") for a in during]
            rebuild = asyncio.create_task(fresh.load(block_lookups=False))
            await store.upsert(stored(during[0], "@f:hs.test"))
            await fresh.catch_up()
            await store.upsert(stored(during[1], "@g:hs.test"))
            await store.upsert(stored(during[0], "@h:hs.test"))
            await store.delete("email", "after@example.test", "@e:hs.test")
            await rebuild
            await fresh.catch_up()
            assert await fresh.mxids([h_before, h_after, *h_during]) == {
                h_before: "@d:hs.test",
                h_during[0]: "@h:hs.test",
                h_during[1]: "@g:hs.test",
            }
            await store.upsert(stored("after@example.test", "@e:hs.test"))  # as it was, for what follows
            await fresh.catch_up()

            if database_url.startswith("postgresql"):
                # TRUNCATE fires no row trigger: its marker row (migration 0005) empties the index.
                async with database.begin() as conn:
                    await conn.execute(text("TRUNCATE associations"))
                await fresh.catch_up()
                assert await fresh.mxids([h_before, h_after]) == {}
                assert await fresh.mxids_by_address("email", both) == {}
                await store.upsert(stored("before@example.test", "@d:hs.test"))
                await store.upsert(stored("after@example.test", "@e:hs.test"))
                await fresh.catch_up()
                assert await fresh.mxids([h_before, h_after]) == {h_before: "@d:hs.test", h_after: "@e:hs.test"}

            # Every hash and address under one key: the full hashes and addresses still decide.
            from sydent_lite.services import filter_keys, lookup_index

            monkeypatch = pytest.MonkeyPatch()
            monkeypatch.setattr(filter_keys.HashKeys, "__call__", lambda self, values: np.ones(len(values), np.uint32))
            for name in ("_threepid_keys", "_local_keys"):
                monkeypatch.setattr(lookup_index, name, lambda medium, values: np.ones(len(values), np.uint32))
            try:
                colliding = new_index(database, store, tmp_path / "colliding")  # not the others' snapshots
                await colliding.load()
                unknown = lookup_hash("nobody@example.test", "email", "p")
                assert await colliding.mxids([h_before, h_after, unknown]) == {
                    h_before: "@d:hs.test",
                    h_after: "@e:hs.test",
                }
                assert await colliding.mxids_by_address("email", [*both, "nobody@example.test"]) == {
                    both[0]: "@d:hs.test",
                    both[1]: "@e:hs.test",
                }
                async with database.begin() as conn:
                    await conn.execute(delete(associations).where(associations.c.address == "after@example.test"))
                await colliding.catch_up()
                assert await colliding.mxids([h_before, h_after, unknown]) == {h_before: "@d:hs.test"}
                assert await colliding.mxids_by_address("email", both) == {both[0]: "@d:hs.test"}
            finally:
                monkeypatch.undo()
        finally:
            await database.dispose()

    asyncio.run(run())


@pytest.mark.parametrize("hold_mxids", [False, True], ids=["confirm-in-database", "mxids-in-memory"])
def test_a_background_load_pauses_between_its_steps_and_lookups_are_answered_meanwhile(
    database_url: str, hold_mxids: bool
) -> None:
    """A load beside the answering index (a rebuild; an upcoming pepper's) is paced: after each
    batch it sleeps on the clock three times as long as the batch took (share 0.25), and in
    those pauses lookups are answered, binds included. Flat out at start, once its deadline
    has come, or when hurried (lookups wait for it)."""
    import dataclasses
    from collections.abc import AsyncIterator

    from support.clock import FakeClock

    from sydent_lite.services.lookup_confirmers import (
        CandidateConfirmer,
        DatabaseConfirmer,
        FilterKeys,
        MemoryConfirmer,
    )
    from sydent_lite.services.lookup_index import LookupIndex
    from sydent_lite.services.pacing import Pace
    from sydent_lite.storage.association_changes import AssociationChangeStore

    clock = FakeClock()

    class SlowConfirmer(CandidateConfirmer):
        """Each batch of the table takes a second (of the fake clock)."""

        def __init__(self, inner: CandidateConfirmer) -> None:
            self.inner, self.slot = inner, inner.slot

        async def confirm_hashes(self, hashes: Any) -> dict[str, str]:
            return await self.inner.confirm_hashes(hashes)

        async def confirm_addresses(self, medium: str, addresses: Any) -> dict[str, str]:
            return await self.inner.confirm_addresses(medium, addresses)

        def empty(self) -> CandidateConfirmer:
            return SlowConfirmer(self.inner.empty())

        async def load(self, expected: int) -> AsyncIterator[FilterKeys]:
            async for batch in self.inner.load(expected):
                clock.advance(1.0)
                yield batch

        def apply(self, changes: Any, current: Any) -> None:
            self.inner.apply(changes, current)

    def stored(address: str, mxid: str) -> StoredAssociation:
        h = lookup_hash(address, "email", "p")
        return StoredAssociation("email", address, h, mxid, 1, 1, 2, "{}")

    async def wait_for_pause(load: asyncio.Task[None]) -> None:
        for _ in range(1000):
            if clock.sleepers or load.done():
                break
            await asyncio.sleep(0.005)
        assert clock.sleepers == 1 and not load.done()

    async def run() -> None:
        database = open_database(database_url)
        try:
            await migrate(database)
            store = AssociationStore(database)
            async with database.begin() as conn:  # several batches of the load (2,000 rows each)
                rows = [stored(f"fill{i}@example.test", "@fill:hs.test") for i in range(4_500)]
                await conn.execute(associations.insert(), [dataclasses.asdict(r) for r in rows])
            confirmer = SlowConfirmer(MemoryConfirmer(store, "p") if hold_mxids else DatabaseConfirmer(store))
            index = LookupIndex(AssociationChangeStore(database), store, confirmer, clock)
            await asyncio.wait_for(index.load(), 60)  # at start: no pause (nothing advances the clock)
            assert clock.sleepers == 0
            fill = lookup_hash("fill7@example.test", "email", "p")
            assert await index.mxids([fill]) == {fill: "@fill:hs.test"}

            pace = Pace(clock, 0.25)
            rebuild = asyncio.create_task(index.load(block_lookups=False, pace=pace))
            await wait_for_pause(rebuild)
            # Paused after a batch that took 1 s: for 3 s.
            clock.advance(2.9)
            assert clock.sleepers == 1
            # Meanwhile a bind, and lookups by hash and by address: answered.
            await store.upsert(stored("during@example.test", "@during:hs.test"))
            await index.catch_up()
            during = lookup_hash("during@example.test", "email", "p")
            assert await index.mxids([fill, during]) == {fill: "@fill:hs.test", during: "@during:hs.test"}
            assert await index.mxids_by_address("email", ["during@example.test"]) == {
                "during@example.test": "@during:hs.test"
            }
            assert not rebuild.done()
            clock.advance(0.1)
            assert clock.sleepers == 0
            await wait_for_pause(rebuild)  # the next batch, and its pause
            pace.hurry()  # someone waits for it: no more pauses
            clock.advance(3.0)
            await asyncio.wait_for(rebuild, 60)
            assert clock.sleepers == 0 and pace.slept == 6.0
            await index.catch_up()
            assert await index.mxids([fill, during]) == {fill: "@fill:hs.test", during: "@during:hs.test"}

            # With its deadline come, a paced load does not pause either.
            late = Pace(clock, 0.25, deadline=clock.monotonic())
            await asyncio.wait_for(index.load(block_lookups=False, pace=late), 60)
            assert late.slept == 0.0 and clock.sleepers == 0
            assert await index.mxids([during]) == {during: "@during:hs.test"}
        finally:
            await database.dispose()

    asyncio.run(run())


def test_a_failed_change_poll_does_not_count_for_the_lookups_waiting_on_it() -> None:
    """Lookups waiting for a poll that failed poll again themselves (and fail too, if the
    database is still away) rather than answer from an index that may be half updated."""
    from sydent_lite.services.lookup_confirmers import DatabaseConfirmer
    from sydent_lite.services.lookup_index import LookupIndex

    class FlakyLog:
        def __init__(self) -> None:
            self.calls = 0

        async def since(self, last_id: int) -> list[Any]:
            self.calls += 1
            await asyncio.sleep(0.01)
            if self.calls == 2:
                raise ConnectionError("the database went away")
            return []

    async def run() -> None:
        log = FlakyLog()
        index = LookupIndex(log, None, DatabaseConfirmer(None))  # type: ignore[arg-type]
        # The first poll runs while two more lookups arrive; the one that polls next fails;
        # the last one needs a poll that started after it arrived and succeeded: its own.
        results = await asyncio.gather(index.catch_up(), index.catch_up(), index.catch_up(), return_exceptions=True)
        assert results[0] is None and isinstance(results[1], ConnectionError) and results[2] is None
        assert log.calls == 3

    asyncio.run(run())


@pytest.mark.parametrize(
    ("expected", "size"),
    [(0, 1 << 16), (100_000, 1 << 22), (1_000_000, 1 << 25), (3_000_000, 1 << 27), (10_000_000, 1 << 28)],
)
def test_slot_filter_size_is_the_power_of_two_nearest_32_slots_a_key(expected: int, size: int) -> None:
    # 10,000,000 keys: 2**28 slots (26.8 a key, 32 MiB packed), not 2**29 (64 MiB).
    from sydent_lite.services.lookup_index import SlotFilter

    assert SlotFilter((), expected).size == size


@pytest.mark.parametrize("packed", [False, True], ids=["byte-slots", "bit-slots"])
def test_slot_filter_never_says_no_to_a_key_it_holds(packed: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    import random

    from sydent_lite.services import lookup_index
    from sydent_lite.services.lookup_index import SLOTS_PER_KEY, SlotFilter

    if packed:
        monkeypatch.setattr(lookup_index, "MAX_BYTE_SLOTS", 1)
    rng = random.Random(3)
    keys = [rng.getrandbits(32) for _ in range(6000)]
    slot_filter = SlotFilter(keys[:3000], 3000)
    assert slot_filter.packed is packed
    assert len(slot_filter.slots) == slot_filter.size // (8 if packed else 1)
    slot_filter.add(keys[3000:])
    assert all(slot_filter.maybe(keys))
    others = [rng.getrandbits(32) for _ in range(20000)]

    def false_share(f: SlotFilter) -> float:
        return sum(1 for m in f.maybe(others) if m) / len(others)

    assert false_share(slot_filter) < 2 * 6000 / slot_filter.size + 0.01  # misses mostly say no
    assert slot_filter.size * 2**0.5 >= 3000 * SLOTS_PER_KEY
    # Mapped read-only (a snapshot's section), with keys added beside it: the same answers.
    mapped = SlotFilter.mapped(memoryview(bytes(slot_filter.slots)), slot_filter.count, packed)
    later = [rng.getrandbits(32) for _ in range(500)]
    mapped.add(later)
    slot_filter.add(later)
    assert all(mapped.maybe(keys + later))
    # It says "maybe" wherever the filter itself does (a packed one's additions are held by
    # byte, so their bytes' other slots say "maybe" too), and still mostly "no".
    assert all(m or not o for m, o in zip(mapped.maybe(others), slot_filter.maybe(others), strict=True))
    assert false_share(mapped) < 2 * 6500 / slot_filter.size + 0.01
    if not packed:
        assert list(map(bool, mapped.maybe(others))) == list(map(bool, slot_filter.maybe(others)))
    assert not slot_filter.crowded
    slot_filter.add(rng.getrandbits(32) for _ in range(3000))
    assert slot_filter.crowded  # three times what it was sized for: rebuild


def test_pooled_connection_lost_while_idle_is_replaced(database_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """PostgreSQL: connections are pinged only after sitting idle, and one whose server
    session died meanwhile (a database restart, a terminated backend) is replaced, not
    handed to a request."""
    if not database_url.startswith("postgresql"):
        pytest.skip("SQLite connections are files, not server sessions")
    from sqlalchemy import text

    from sydent_lite.storage import database

    async def run() -> None:
        pool_owner = open_database(database_url)
        killer = open_database(database_url)
        try:
            async with pool_owner.connect() as conn:
                pid = (await conn.execute(text("SELECT pg_backend_pid()"))).scalar()
            async with killer.connect() as conn:
                assert (await conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})).scalar()
            monkeypatch.setattr(database, "PING_AFTER_IDLE_SECONDS", 0.0)  # as if it sat idle
            async with pool_owner.connect() as conn:
                assert (await conn.execute(text("SELECT pg_backend_pid()"))).scalar() != pid
        finally:
            await pool_owner.dispose()
            await killer.dispose()

    asyncio.run(run())


def test_hot_reader_survives_its_connection_being_terminated(database_url: str) -> None:
    """PostgreSQL's hot-path reader (its own asyncpg pool): a read after the server ended the
    reader's session (a restart, a terminated backend) still answers, on a new connection."""
    if not database_url.startswith("postgresql"):
        pytest.skip("SQLite connections are files, not server sessions")
    from sydent_lite.storage.readers import PgReader

    async def run() -> None:
        database = open_database(database_url)
        try:
            await migrate(database)
            reader = database.reader
            assert isinstance(reader, PgReader)
            row = await reader.first("SELECT pg_backend_pid()")
            assert row is not None
            # Killed, and this loop runs meanwhile: the pool sees the session end.
            assert run_sql_at(database_url, "SELECT pg_terminate_backend($1)", row[0])[0][0]
            await asyncio.sleep(0.2)
            again = await reader.first("SELECT pg_backend_pid()")
            assert again is not None and again[0] != row[0]
            # Killed while this loop does not run: the pool cannot have noticed, hands out the
            # dead connection, and the read is retried on a new one.
            assert run_sql_at(database_url, "SELECT pg_terminate_backend($1)", again[0])[0][0]
            time.sleep(0.2)  # the server closes the session's socket
            third = await reader.first("SELECT pg_backend_pid()")
            assert third is not None and third[0] not in (row[0], again[0])
            # Lists go as one array parameter, for any length (numbered after the ones before).
            [(among, args)] = reader.in_list("x", [3, 1], 2)
            sql = f"SELECT x FROM unnest({reader.param(1)}::int[]) AS x WHERE {among} ORDER BY x"
            assert await reader.all(sql, ([1, 2, 3], *args)) == [(1,), (3,)]
        finally:
            await database.dispose()  # closes the reader's pool too
        assert reader._pool is None

    asyncio.run(run())


def test_racing_upserts_of_one_address_all_succeed(database_url: str) -> None:
    """Binds of one new address racing in several connections: one row, no error (on
    PostgreSQL the losers can trip over the unique lookup_hash index before ON CONFLICT
    sees the winner's row; the store retries them)."""
    from sqlalchemy import func, select

    async def run() -> None:
        database = open_database(database_url)
        try:
            await migrate(database)
            store = AssociationStore(database)
            for round_ in range(30):
                address = f"race{round_}@example.test"
                await asyncio.gather(
                    *(
                        store.upsert(
                            StoredAssociation(
                                medium="email",
                                address=address,
                                lookup_hash=lookup_hash(address, "email", "p"),
                                mxid=f"@u{i}:hs.test",
                                ts=i,
                                not_before=i,
                                not_after=i + 1,
                                signed_json="{}",
                            )
                        )
                        for i in range(8)
                    )
                )
                async with database.connect() as conn:
                    count = (
                        await conn.execute(
                            select(func.count()).select_from(associations).where(associations.c.address == address)
                        )
                    ).scalar()
                assert count == 1
        finally:
            await database.dispose()

    asyncio.run(run())


def test_associations_without_planner_statistics_are_analyzed_at_start(database_url: str) -> None:
    if not database_url.startswith("postgresql"):
        pytest.skip("PostgreSQL's planner statistics")
    from sqlalchemy import text

    from sydent_lite.storage.database import analyze_if_never_analyzed

    stats_sql = text(
        "SELECT count(*) FROM pg_stats WHERE schemaname = current_schema()"
        " AND tablename = 'associations' AND attname = 'lookup_hash'"
    )

    async def run() -> None:
        database = open_database(database_url)
        try:
            await migrate(database)
            address = "stats@example.test"
            await AssociationStore(database).upsert(
                StoredAssociation(
                    medium="email",
                    address=address,
                    lookup_hash=lookup_hash(address, "email", "p"),
                    mxid="@s:hs.test",
                    ts=1,
                    not_before=1,
                    not_after=2,
                    signed_json="{}",
                )
            )
            async with database.connect() as conn:
                assert (await conn.execute(stats_sql)).scalar() == 0
            await analyze_if_never_analyzed(database)
            async with database.connect() as conn:
                assert (await conn.execute(stats_sql)).scalar() == 1
        finally:
            await database.dispose()

    asyncio.run(run())
