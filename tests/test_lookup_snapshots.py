"""Lookup index snapshots (services.index_snapshot): one process writes, every worker maps.

In process, on both databases (the mxid table the snapshots hold is PostgreSQL's confirmer,
but it works on either): a damaged, truncated, foreign or out-of-history file is never used,
and the index is rebuilt from the table and answers exactly; a second index maps the first
one's snapshot and follows changes on top of it; a new snapshot written when the changes pile
up is taken up by the other index. Over real sockets, on PostgreSQL: `serve --workers 2` with
clients binding, unbinding and looking up, each answer checked, while a new snapshot is
written and a killed worker restarts from it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import random
import re
import signal
import threading
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from support.db import DatabaseFactory
from support.homeserver import HomeserverStandIn
from support.server import IdentityApi, wait_until
from support.smtp import SmtpSink
from test_pepper_rotation import Client, assert_every_answer_right, insert_filler, run_clients
from test_workers import WorkersServer, child_pids

from sydent_lite.clock import SYSTEM_CLOCK
from sydent_lite.config import config_from_dict
from sydent_lite.services import lookup_index
from sydent_lite.services.filter_keys import HashKeys
from sydent_lite.services.hashing import lookup_hash
from sydent_lite.services.index_builder import ProcessBuilder
from sydent_lite.services.index_snapshot import IndexSnapshots
from sydent_lite.services.lookup_confirmers import MemoryConfirmer
from sydent_lite.services.lookup_index import LookupIndex
from sydent_lite.services.pacing import Pace
from sydent_lite.storage.association_changes import AssociationChangeStore
from sydent_lite.storage.associations import AssociationStore, StoredAssociation
from sydent_lite.storage.database import Database, migrate, open_database
from sydent_lite.storage.tables import associations

PEPPER = "p"


@pytest.fixture
def database_url(db_factory: DatabaseFactory) -> str:
    return db_factory.create().url


def stored(address: str, mxid: str) -> StoredAssociation:
    return StoredAssociation("email", address, lookup_hash(address, "email", PEPPER), mxid, 1, 1, 2, "{}")


def new_index(database: Database, store: AssociationStore, directory: Path, pepper: str = PEPPER) -> LookupIndex:
    confirmer = MemoryConfirmer(store, pepper, snapshots=IndexSnapshots(directory, pepper, 0))
    return LookupIndex(AssociationChangeStore(database), store, confirmer)


async def migrated_with_bindings(database: Database, count: int) -> tuple[AssociationStore, dict[str, str]]:
    """The schema, and `count` addresses bound (address -> mxid), through the project's store."""
    await migrate(database)
    store = AssociationStore(database)
    bound = {f"u{i}@example.test": f"@u{i}:hs.test" for i in range(count)}
    for address, mxid in bound.items():
        await store.upsert(stored(address, mxid))
    return store, bound


def snapshot_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("index-*.snap"))


async def assert_exact(index: LookupIndex, bound: dict[str, str], unbound: list[str]) -> None:
    hashes = {lookup_hash(a, "email", PEPPER): a for a in [*bound, *unbound]}
    want = {h: bound[a] for h, a in hashes.items() if a in bound}
    assert await index.mxids(list(hashes)) == want
    assert await index.mxids_by_address("email", [*bound, *unbound]) == bound


def test_a_damaged_or_foreign_snapshot_is_never_used_and_is_rebuilt(
    database_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    directory = tmp_path / "snapshots"

    async def run() -> None:
        database = open_database(database_url)
        try:
            store, bound = await migrated_with_bindings(database, 50)
            unbound = [f"nobody{i}@example.test" for i in range(50)]
            first = new_index(database, store, directory)
            await first.load()
            [good] = snapshot_files(directory)
            original = good.read_bytes()

            async def reloaded(why: str) -> LookupIndex:
                caplog.clear()
                index = new_index(database, store, directory)
                await index.load()
                assert f"rejected ({why}" in caplog.text
                assert index._held.snapshot is not None  # rebuilt, written again, mapped
                assert snapshot_files(directory)[0].read_bytes() != b""
                await assert_exact(index, bound, unbound)
                return index

            # One byte of the body flipped (a mxid's: the lookups would answer it).
            damaged = bytearray(original)
            damaged[-200] ^= 0x01
            good.write_bytes(bytes(damaged))
            await reloaded("checksum mismatch")

            # Cut short (a disk that filled up; a copy interrupted).
            [good] = snapshot_files(directory)
            good.write_bytes(original[: len(original) // 2])
            await reloaded("truncated")

            # Another pepper's snapshot under this one's name (another database's, say).
            other = tmp_path / "other"
            foreign = new_index(database, store, other, pepper="another pepper")
            await foreign.load()
            [theirs] = snapshot_files(other)
            [good] = snapshot_files(directory)
            good.write_bytes(theirs.read_bytes())
            await reloaded("of another pepper")

            # Not a snapshot at all.
            [good] = snapshot_files(directory)
            good.write_bytes(b"\0" * 4096)
            await reloaded("not a snapshot of this format")

            # A snapshot from a future this database never had (restored from a backup):
            # its change-log id is ahead of the log's.
            [good] = snapshot_files(directory)
            ahead = re.sub(r"-(\d{20})\.snap$", f"-{10**12:020d}.snap", good.name)
            good.rename(directory / ahead)
            caplog.clear()
            index = new_index(database, store, directory)
            await index.load()
            assert "ahead of the change log" in caplog.text
            await assert_exact(index, bound, unbound)
            assert oct(directory.stat().st_mode & 0o777) == "0o700"
            assert all(oct(p.stat().st_mode & 0o777) == "0o600" for p in snapshot_files(directory))
        finally:
            await database.dispose()

    asyncio.run(run())


@pytest.mark.parametrize("packed", [False, True], ids=["byte-slots", "bit-slots"])
def test_a_new_snapshot_is_written_when_changes_pile_up_and_every_index_switches_to_it(
    database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, packed: bool
) -> None:
    """bit-slots: the filters of a large index (a bit a slot), written, mapped and followed."""
    directory = tmp_path / "snapshots"
    monkeypatch.setattr(lookup_index, "MAX_CHANGED", 5)
    if packed:
        monkeypatch.setattr(lookup_index, "MAX_BYTE_SLOTS", 1)

    async def run() -> None:
        database = open_database(database_url)
        try:
            store, bound = await migrated_with_bindings(database, 20)
            a, b = new_index(database, store, directory), new_index(database, store, directory)
            await a.load()
            await b.load()
            first_id = b._held.base_id
            assert a._held.hashes.packed is b._held.hashes.packed is b._held.threepids.packed is packed
            assert b._held.snapshot is not None and b._held.snapshot.path == a._held.snapshot.path  # type: ignore[union-attr]

            # Changes on top of the mapped snapshot: new binds, a rebind, a removal.
            for i in range(20, 30):
                bound[f"u{i}@example.test"] = f"@u{i}:hs.test"
                await store.upsert(stored(f"u{i}@example.test", f"@u{i}:hs.test"))
            bound["u0@example.test"] = "@someone-else:hs.test"
            await store.upsert(stored("u0@example.test", "@someone-else:hs.test"))
            await store.delete("email", "u1@example.test", "@u1:hs.test")
            del bound["u1@example.test"]
            unbound = ["u1@example.test", "nobody@example.test"]
            for index in (a, b):
                await index.catch_up()
                await assert_exact(index, bound, unbound)

            await a.maintain()  # more than MAX_CHANGED held beside the snapshot: a new one
            assert a._held.base_id > first_id and a._held.changed == 0
            [newest] = snapshot_files(directory)  # the older one is gone
            assert a._held.snapshot is not None and a._held.snapshot.path == newest
            await b.maintain()  # sees it, switches
            assert b._held.base_id == a._held.base_id and b._held.snapshot is not None
            assert b._held.snapshot.path == newest
            for index in (a, b):
                await assert_exact(index, bound, unbound)
            # Still following the log after the switch.
            await store.delete("email", "u2@example.test", "@u2:hs.test")
            del bound["u2@example.test"]
            for index in (a, b):
                await index.catch_up()
                await assert_exact(index, bound, [*unbound, "u2@example.test"])
        finally:
            await database.dispose()

    asyncio.run(run())


def test_a_directory_open_to_others_is_not_used(
    database_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The files hold every lookup hash with its Matrix ID: never in a folder others can read
    (or plant files in). The index is then the process's own, and answers all the same."""
    directory = tmp_path / "shared"
    directory.mkdir(mode=0o755)
    directory.chmod(0o755)

    async def run() -> None:
        database = open_database(database_url)
        try:
            await migrate(database)
            store = AssociationStore(database)
            await store.upsert(stored("a@example.test", "@a:hs.test"))
            index = new_index(database, store, directory)
            await index.load()
            assert "snapshots off" in caplog.text and "closed to others" in caplog.text
            assert index._held.snapshot is None and snapshot_files(directory) == []
            await assert_exact(index, {"a@example.test": "@a:hs.test"}, ["b@example.test"])
        finally:
            await database.dispose()

    asyncio.run(run())


# --- over real sockets: serve --workers 2 on PostgreSQL ---------------------------------------------


@pytest.mark.postgres
@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs /proc to find the worker processes")
def test_workers_answer_exactly_while_a_snapshot_is_rewritten_and_a_worker_restarts(
    tmp_path: Path, smtp_sink: SmtpSink, homeserver: HomeserverStandIn, request: pytest.FixtureRequest
) -> None:
    factory = DatabaseFactory("postgres", tmp_path / "pg")
    db = factory.create()
    server = WorkersServer(
        tmp_path / "workers",
        database_url=db.url,
        smtp_port=smtp_sink.port,
        ca_file=homeserver.ca_path,
        name="sydent_lite --workers 2",
    )
    request.node.extra_sydent_servers = [server]
    clients_http: list[Any] = []
    try:
        server.start()
        assert server.proc is not None

        def count(text: str) -> int:
            return server.output().count(text)

        # Every worker started from the one snapshot the first of them wrote.
        wait_until(lambda: count("lookup index mapped from") >= 2, 60, "both workers mapping the snapshot")
        assert count("lookup index snapshot written") == 1, server.output()

        def api() -> IdentityApi:  # a connection of its own: the clients' requests spread over the workers
            clients_http.append(server.new_client())
            return IdentityApi(server, smtp_sink, homeserver, clients_http[-1])

        admin = api().register()
        pepper = api().hash_details(admin)["lookup_pepper"]
        fillers = insert_filler(db.url, pepper, 300)
        clients = [Client([api(), api()], fillers, seed) for seed in range(4)]

        def start_clients() -> tuple[threading.Event, threading.Thread]:
            stop = threading.Event()
            runner = threading.Thread(target=run_clients, args=(clients, stop, 600, 180.0))
            runner.start()
            return stop, runner

        stop, runner = start_clients()
        try:
            wait_until(lambda: all(sum(c.tally.lookups.values()) >= 3 for c in clients), 60, "lookups")
            # Enough changes beside the snapshot (lookup_index.MAX_CHANGED) that a worker writes
            # a new one, and both switch to it, while the clients go on.
            insert_filler(db.url, pepper, 8_000)
            wait_until(lambda: count("lookup index snapshot written") >= 2, 90, "a new snapshot written")
            wait_until(lambda: count("lookup index mapped from") >= 4, 60, "both workers switching to it")
        finally:
            stop.set()
            runner.join()
        # A worker dies; the supervisor starts another, which maps the newest snapshot and
        # replays the log while the clients bind and unbind again. (They pause for the kill
        # itself: a bind cut off mid-way leaves the client not knowing whether it was made.)
        workers = [p for p in child_pids(server.proc.pid) if b"spawn_main" in Path(f"/proc/{p}/cmdline").read_bytes()]
        assert len(workers) == 2, server.output()
        mapped = count("lookup index mapped from")
        os.kill(workers[0], signal.SIGKILL)
        for client in clients:  # their kept-alive connections to the dead worker are gone with it
            for each in client.apis:
                each.client.close()
                each.client = server.new_client()
                clients_http.append(each.client)
        before = {id(c): sum(c.tally.lookups.values()) for c in clients}
        stop, runner = start_clients()
        try:
            wait_until(lambda: count("lookup index mapped from") > mapped, 60, "the new worker mapping the snapshot")
            wait_until(
                lambda: all(sum(c.tally.lookups.values()) >= before[id(c)] + 5 for c in clients),
                90,
                "lookups after the restart",
            )
        finally:
            stop.set()
            runner.join()
        assert_every_answer_right(clients)
    finally:
        for c in clients_http:
            c.close()
        server.stop()
        factory.cleanup()


def builder_for(database_url: str, directory: Path, pepper: str = PEPPER, database_id: str = "") -> ProcessBuilder:
    config = config_from_dict({"database": {"url": database_url}})
    return ProcessBuilder(config.model_dump_json(by_alias=True), pepper, 0, str(directory), database_id)


def test_a_builder_process_writes_the_snapshot_and_the_index_maps_it(
    database_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The snapshot is built and written by a child process (services.index_builder), not by
    the process that answers: it maps the file and answers exactly, and so do later changes.
    A child that fails (here: a database it cannot open) leaves the build to the process."""
    directory = tmp_path / "snapshots"
    monkeypatch.setattr(lookup_index, "MAX_CHANGED", 5)
    caplog.set_level("INFO")

    async def run() -> None:
        database = open_database(database_url)
        try:
            store, bound = await migrated_with_bindings(database, 30)
            builds: list[int] = []

            def build_here(held: Any) -> Any:
                builds.append(1)
                return real_build(held)

            confirmer = MemoryConfirmer(
                store, PEPPER, snapshots=IndexSnapshots(directory, PEPPER, 0, "", builder_for(database_url, directory))
            )
            index = LookupIndex(AssociationChangeStore(database), store, confirmer)
            real_build = index._build
            monkeypatch.setattr(index, "_build", build_here)
            await index.load()
            assert not builds  # nothing built here
            assert "the builder process" in caplog.text and "wrote the snapshot" in caplog.text
            assert index._held.snapshot is not None and snapshot_files(directory) == [index._held.snapshot.path]
            await assert_exact(index, bound, ["nobody@example.test"])

            # Changes pile up beside it: the next snapshot comes from a builder process too.
            for i in range(30, 40):
                bound[f"u{i}@example.test"] = f"@u{i}:hs.test"
                await store.upsert(stored(f"u{i}@example.test", f"@u{i}:hs.test"))
            await store.delete("email", "u1@example.test", "@u1:hs.test")
            del bound["u1@example.test"]
            first = index._held.base_id
            await index.catch_up()
            await index.maintain()
            assert not builds and index._held.base_id > first and index._held.changed == 0
            await assert_exact(index, bound, ["u1@example.test"])

            # A builder that fails: the process builds and writes the snapshot itself.
            broken = IndexSnapshots(
                tmp_path / "other", PEPPER, 0, "", builder_for("postgresql://nobody@127.0.0.1:1/none", tmp_path)
            )
            confirmer = MemoryConfirmer(store, PEPPER, snapshots=broken)
            fallback = LookupIndex(AssociationChangeStore(database), store, confirmer)
            await fallback.load()
            assert "the snapshot builder" in caplog.text and "failed" in caplog.text
            assert fallback._held.snapshot is not None
            await assert_exact(fallback, bound, ["u1@example.test"])
        finally:
            await database.dispose()

    asyncio.run(run())


def test_a_paced_builder_process_goes_flat_out_once_hurried(database_url: str, tmp_path: Path) -> None:
    """A child paced so slowly that it would never finish (a millionth of the time at work)
    finishes once the worker's pace is hurried (lookups now wait for the index): told on its
    stdin, at once, even before it has started listening."""
    directory = tmp_path / "snapshots"

    async def run() -> None:
        database = open_database(database_url)
        try:
            await migrate(database)
            async with database.begin() as conn:  # several batches of the build (2,000 rows each)
                rows = [stored(f"fill{i}@example.test", "@fill:hs.test") for i in range(4_500)]
                await conn.execute(associations.insert(), [dataclasses.asdict(r) for r in rows])
            IndexSnapshots(directory, PEPPER, 0).prepare_directory()
            pace = Pace(SYSTEM_CLOCK, 1e-6)
            job = asyncio.create_task(builder_for(database_url, directory).run(pace))
            await asyncio.sleep(0.2)  # started, perhaps not yet reading its stdin
            assert not job.done() and not snapshot_files(directory)
            pace.hurry()
            assert await asyncio.wait_for(job, 120)
            assert len(snapshot_files(directory)) == 1
        finally:
            await database.dispose()

    asyncio.run(run())


_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def forge_crc32(target: str, rng: random.Random) -> str:
    """Another 43-character ASCII string with `target`'s CRC-32, as anyone can make one (CRC-32
    is affine over GF(2)): 33 characters at random, then the low four bits of ten '@'s set to
    solve the 32 linear equations."""
    free = [(33 + i, bit) for i in range(10) for bit in range(4)]
    base = bytearray("".join(rng.choice(_B64) for _ in range(33)).encode() + b"@" * 10)
    c0 = zlib.crc32(bytes(43))
    basis: dict[int, tuple[int, int]] = {}  # leading bit -> (vector, which free bits make it)
    for j, (pos, bit) in enumerate(free):
        unit = bytearray(43)
        unit[pos] = 1 << bit
        vector, made_of = zlib.crc32(unit) ^ c0, 1 << j
        while vector:
            top = vector.bit_length() - 1
            if top not in basis:
                basis[top] = (vector, made_of)
                break
            vector, made_of = vector ^ basis[top][0], made_of ^ basis[top][1]
    want, made_of = zlib.crc32(target.encode()) ^ zlib.crc32(bytes(base)), 0
    while want:
        vector, bits = basis[want.bit_length() - 1]
        want, made_of = want ^ vector, made_of ^ bits
    for j, (pos, bit) in enumerate(free):
        if made_of >> j & 1:
            base[pos] ^= 1 << bit
    return base.decode("ascii")


def test_made_up_hashes_do_not_all_pass_a_shared_filter(
    database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The attack: hashes made to share a bound hash's CRC-32 (the pepper is public, so anyone
    knows a bound person's hash). Under CRC-32 keys, which a shared index's hash filter had,
    every one of them passed and cost a confirmation. Keyed (services.filter_keys), as many
    pass as of any other misses: a few."""
    rng = random.Random(18)

    async def run() -> None:
        database = open_database(database_url)
        try:
            store, bound = await migrated_with_bindings(database, 50)
            index = new_index(database, store, tmp_path / "snapshots")
            await index.load()
            assert index._held.snapshot is not None  # the shared kind: mapped from a snapshot
            targets = [lookup_hash(a, "email", PEPPER) for a in bound]
            made_up = [forge_crc32(targets[i % len(targets)], rng) for i in range(1000)]
            assert all(
                zlib.crc32(m.encode()) == zlib.crc32(t.encode()) for m, t in zip(made_up, targets * 20, strict=True)
            )
            assert not set(made_up) & set(targets)
            # Against a filter keyed by CRC-32 the attack works: every one says "maybe".
            crc_filter = lookup_index.SlotFilter(lookup_index._crc_keys(targets), len(targets))
            assert all(crc_filter.maybe(lookup_index._crc_keys(made_up)))
            confirmed: list[str] = []
            confirm = index._held.confirmer.confirm_hashes

            async def counting(candidates: Sequence[str]) -> dict[str, str]:
                confirmed.extend(candidates)
                return await confirm(candidates)

            monkeypatch.setattr(index._held.confirmer, "confirm_hashes", counting)
            assert await index.mxids(made_up) == {}
            assert len(confirmed) < 50, len(confirmed)
            assert await index.mxids(targets[:5]) == {t: bound[a] for t, a in zip(targets[:5], bound, strict=False)}
        finally:
            await database.dispose()

    asyncio.run(run())


def test_hash_keys_are_the_same_however_a_hash_arrives() -> None:
    """One secret, one key per string: in a list of regular hashes, beside odd strings (keyed
    one by one), in a snapshot's process or another; another secret keys differently."""
    keys = HashKeys.random()
    regular = [lookup_hash(f"u{i}@example.test", "email", PEPPER) for i in range(100)]
    odd = ["short", "x" * 44, "é" * 43, "\ud800" * 43, ""]
    alone = keys(regular).tolist()
    mixed = keys([*odd[:2], *regular[:50], *odd[2:], *regular[50:]]).tolist()
    assert mixed[2:52] + mixed[55:] == alone
    assert mixed[:2] + mixed[52:55] == [keys([o]).tolist()[0] for o in odd]
    assert HashKeys(keys.secret)(regular).tolist() == alone
    assert sum(a == b for a, b in zip(HashKeys.random()(regular).tolist(), alone, strict=True)) < 3
    assert keys([]).tolist() == []
