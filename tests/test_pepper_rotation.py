"""Lookup pepper rotation (issue 17): scheduled or by hand, coherent across processes, no pause.

The main test rotates while several clients bind, unbind and look up, each checking every
answer against what it knows it bound: exact mappings for the current pepper and, within the
grace window, the previous one. On SQLite with one server; on PostgreSQL with two server
processes on one database, every client asking one for the pepper and the other for the
lookup. The race the rotation must survive (a bind whose row the rehash has already passed)
is also forced directly, in storage.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from support.db import DatabaseFactory, sql
from support.homeserver import HomeserverStandIn
from support.server import (
    V1,
    V2,
    EmailSession,
    IdentityApi,
    SydentServer,
    User,
    sha256_address,
    wait_until,
)
from support.smtp import SmtpSink

from sydent_lite.storage.tables import associations

FILLER = 3_000  # rows the rehash has to write besides the clients' (several batches)
FILLER_MXID = "@filler:hs.test"
ROTATION = {"pepper_rotation_seconds": 0, "previous_pepper_grace_seconds": 600, "pepper_activation_delay_seconds": 2}


def run_cli(server: SydentServer, *args: str) -> Any:
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, "-m", "sydent_lite", *args, "--config", str(server.config_path)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=str(Path(__file__).resolve().parents[1]),
    )


def rotate(server: SydentServer, activate_in: int = 2) -> str:
    proc = run_cli(server, "pepper", "rotate", "--activate-in", str(activate_in))
    assert proc.returncode == 0, proc.stderr + proc.stdout
    return str(proc.stdout)


def peppers_in_db(url: str) -> list[dict[str, Any]]:
    return sql(url, "SELECT id, pepper, slot, activates_ms, retires_ms FROM lookup_peppers ORDER BY id")


def insert_filler(url: str, pepper: str, count: int) -> list[str]:
    """`count` associations written straight into the table (as an import would), hashed with
    `pepper`; their addresses."""
    from sydent_lite.services.hashing import lookup_hash
    from sydent_lite.storage.database import open_database

    addresses = [f"filler{i}-{uuid.uuid4().hex[:6]}@fill.test" for i in range(count)]
    rows = [
        {
            "medium": "email",
            "address": a,
            "lookup_hash": lookup_hash(a, "email", pepper),
            "mxid": FILLER_MXID,
            "ts": 1,
            "not_before": 1,
            "not_after": 2,
            "signed_json": "{}",
        }
        for a in addresses
    ]

    async def go() -> None:
        database = open_database(url)
        try:
            async with database.begin() as conn:
                await conn.execute(associations.insert(), rows)
        finally:
            await database.dispose()

    asyncio.run(go())
    return addresses


def check_every_hash(url: str, pepper_row: dict[str, Any]) -> None:
    """Every association holds its hash under this pepper, in the pepper's slot: none missed."""
    from sydent_lite.services.hashing import lookup_hash

    column = ("lookup_hash", "lookup_hash_b")[pepper_row["slot"]]
    rows = sql(url, f"SELECT medium, address, {column} AS h FROM associations")
    wrong = [r["address"] for r in rows if r["h"] != lookup_hash(r["address"], r["medium"], pepper_row["pepper"])]
    assert rows and not wrong, f"{len(wrong)} of {len(rows)} rows lack the new pepper's hash: {wrong[:5]}"


# --- the concurrent clients ----------------------------------------------------------------------


@dataclass
class Tally:
    lookups: dict[str, int] = field(default_factory=dict)  # pepper -> answered lookups
    binds: int = 0
    unbinds: int = 0
    errors: list[str] = field(default_factory=list)


class Client:
    """One person with a few addresses of their own: binds, unbinds and looks them up (and a few
    filler addresses), checking each answer against what it has bound."""

    def __init__(self, apis: list[IdentityApi], fillers: list[str], seed: int) -> None:
        self.apis = apis
        self.rng = random.Random(seed)
        self.user: User = apis[0].register()
        self.addresses = [f"c{seed}-{i}-{uuid.uuid4().hex[:6]}@people.test" for i in range(4)]
        self.bound: dict[str, EmailSession] = {}
        self.fillers = fillers
        self.first_pepper: str | None = None
        self.tally = Tally()

    def api(self) -> IdentityApi:
        return self.rng.choice(self.apis)

    def step(self) -> None:
        roll = self.rng.random()
        if roll < 0.2:
            self.bind()
        elif roll < 0.3 and self.bound:
            self.unbind()
        else:
            self.lookup()

    def bind(self) -> None:
        free = [a for a in self.addresses if a not in self.bound]
        if not free:
            return
        address = self.rng.choice(free)
        api = self.api()
        session = api.validated_email_session(address, user=self.user)
        resp = api.bind(session, self.user.user_id, user=self.user)
        if resp.status_code != 200:
            self.tally.errors.append(f"bind: {resp.status_code} {resp.text}")
            return
        self.bound[address] = session
        self.tally.binds += 1

    def unbind(self) -> None:
        address = self.rng.choice(sorted(self.bound))
        session = self.bound[address]
        body = {
            "sid": session.sid,
            "client_secret": session.client_secret,
            "mxid": self.user.user_id,
            "threepid": {"medium": "email", "address": address},
        }
        resp = self.api().client.post(f"{V2}/3pid/unbind", headers=self.user.headers, json=body)
        if resp.status_code != 200:
            self.tally.errors.append(f"unbind: {resp.status_code} {resp.text}")
            return
        del self.bound[address]
        self.tally.unbinds += 1

    def lookup(self) -> None:
        # A pepper asked of one process (fresh), or the first one this client ever saw (a
        # client that cached it), used on another.
        fresh = self.api().hash_details(self.user)["lookup_pepper"]
        if self.first_pepper is None:
            self.first_pepper = fresh
        pepper = fresh if self.rng.random() < 0.6 else self.first_pepper
        fillers = self.rng.sample(self.fillers, 3)
        expected = dict.fromkeys(self.bound, self.user.user_id) | dict.fromkeys(fillers, FILLER_MXID)
        api = self.api()
        if self.rng.random() < 0.2:  # "none": the addresses in clear
            queries = {f"{a} email": a for a in [*self.addresses, *fillers]}
            resp = api.lookup(self.user, list(queries), "none", pepper)
            want = {q: expected[a] for q, a in queries.items() if a in expected}
        else:
            queries = {sha256_address(a, "email", pepper): a for a in [*self.addresses, *fillers]}
            resp = api.lookup(self.user, list(queries), "sha256", pepper)
            want = {h: expected[a] for h, a in queries.items() if a in expected}
        if resp.status_code != 200:
            self.tally.errors.append(f"lookup: {resp.status_code} {resp.text}")
            return
        got = resp.json()["mappings"]
        if got != want:
            self.tally.errors.append(f"lookup with {'fresh' if pepper == fresh else 'first'} pepper: {got} != {want}")
        self.tally.lookups[pepper] = self.tally.lookups.get(pepper, 0) + 1
        # v1 bulk_lookup (no pepper) answers the same.
        pairs = [["email", a] for a in self.addresses]
        bulk = api.client.post(f"{V1}/bulk_lookup", json={"threepids": pairs})
        found = {a: m for _, a, m in bulk.json().get("threepids", [])} if bulk.status_code == 200 else None
        if found != dict.fromkeys(self.bound, self.user.user_id):
            self.tally.errors.append(f"bulk_lookup: {bulk.status_code} {bulk.text}")


def assert_every_answer_right(clients: list[Client]) -> None:
    """Every answer the clients got matched the model, and they did bind and unbind."""
    errors = [e for c in clients for e in c.tally.errors]
    assert not errors, errors[:10]
    assert sum(c.tally.binds for c in clients) > 0 and sum(c.tally.unbinds for c in clients) > 0


def run_clients(clients: list[Client], stop: threading.Event, max_steps: int, max_seconds: float) -> None:
    deadline = time.monotonic() + max_seconds

    def loop(c: Client) -> None:
        for _ in range(max_steps):
            if stop.is_set() or time.monotonic() > deadline:
                return
            try:
                c.step()
            except Exception as e:  # an answer that is not what a client can read
                c.tally.errors.append(f"{type(e).__name__}: {e}")

    threads = [threading.Thread(target=loop, args=(c,), daemon=True) for c in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def rotate_under_load(apis: list[IdentityApi], server: SydentServer, url: str) -> None:
    """Clients run; a rotation is made; every answer before, during and after is checked."""
    admin = apis[0].register()
    old = apis[0].hash_details(admin)["lookup_pepper"]
    fillers = insert_filler(url, old, FILLER)
    clients = [Client(apis, fillers, seed) for seed in range(4)]
    stop = threading.Event()
    runner = threading.Thread(target=run_clients, args=(clients, stop, 400, 120.0))
    runner.start()
    try:
        wait_until(lambda: all(sum(c.tally.lookups.values()) >= 2 for c in clients), 60, "lookups before the rotation")
        out = rotate(server, activate_in=2)
        assert "prepared" in out and old not in out  # peppers stay out of the CLI's output
        # Every process switches: hash_details says the new pepper, and it is the database's.
        wait_until(lambda: all(a.hash_details(admin)["lookup_pepper"] != old for a in apis), 30, "the switch")
        new = apis[0].hash_details(admin)["lookup_pepper"]
        assert {a.hash_details(admin)["lookup_pepper"] for a in apis} == {new}
        rows = peppers_in_db(url)
        assert [r["pepper"] for r in rows][-2:] == [old, new]
        # More work after the switch, with both peppers (the first one from the clients' caches).
        wait_until(
            lambda: all(c.tally.lookups.get(new, 0) >= 3 and c.tally.lookups.get(old, 0) >= 3 for c in clients),
            90,
            "lookups with both peppers after the switch",
        )
    finally:
        stop.set()
        runner.join()
    assert_every_answer_right(clients)
    check_every_hash(url, peppers_in_db(url)[-1])


# Both places a lookup's candidates are confirmed (lookup.mxids_in_memory): memory, the
# default, and the database.
@pytest.mark.parametrize("in_memory", [True, False], ids=["mxids-in-memory", "mxids-in-database"])
def test_rotation_under_concurrent_lookups_binds_and_unbinds(make_server, api_for, in_memory: bool) -> None:  # type: ignore[no-untyped-def]
    server = make_server(extra_config={"lookup": {**ROTATION, "mxids_in_memory": in_memory}})
    rotate_under_load([api_for(server)], server, server.database_url)


@pytest.mark.postgres
def test_rotation_under_load_on_two_processes_of_one_postgresql(
    tmp_path: Path, smtp_sink: SmtpSink, homeserver: HomeserverStandIn
) -> None:
    from sydent_lite.signing import load_or_create_signing_key

    factory = DatabaseFactory("postgres", tmp_path / "pg")
    servers: list[SydentServer] = []
    clients: list[httpx.Client] = []
    try:
        db = factory.create()
        key = tmp_path / "signing.key"
        load_or_create_signing_key(str(key))
        for label in ("A", "B"):
            servers.append(
                SydentServer(
                    tmp_path / label,
                    database_url=db.url,
                    smtp_port=smtp_sink.port,
                    ca_file=homeserver.ca_path,
                    extra_config={"lookup": ROTATION, "signing_key_path": str(key)},
                    name=f"sydent_lite {label}",
                )
            )
        for s in servers:
            s.extra_config["server_name"] = servers[0].server_name
            s.start()
        apis = []
        for s in servers:
            clients.append(s.new_client())
            apis.append(IdentityApi(s, smtp_sink, homeserver, clients[-1]))
        rotate_under_load(apis, servers[0], db.url)
    finally:
        for c in clients:
            c.close()
        for s in servers:
            s.stop()
        factory.cleanup()


# --- grace, hash_details, the CLI, the schedule ----------------------------------------------------


def test_after_the_grace_window_the_previous_pepper_is_refused_naming_the_current_one(make_server, api_for) -> None:  # type: ignore[no-untyped-def]
    server = make_server(extra_config={"lookup": {**ROTATION, "previous_pepper_grace_seconds": 1}})
    api = api_for(server)
    user = api.register()
    email = f"grace-{uuid.uuid4().hex[:8]}@people.test"
    api.bind_email(email, user)
    old = api.hash_details(user)["lookup_pepper"]
    rotate(server, activate_in=1)
    wait_until(lambda: api.hash_details(user)["lookup_pepper"] != old, 30, "the switch")
    new = api.hash_details(user)["lookup_pepper"]

    def refused() -> bool:
        return bool(api.lookup(user, [sha256_address(email, "email", old)], "sha256", old).status_code == 400)

    wait_until(refused, 30, "the previous pepper refused")
    for algorithm, address in (("sha256", sha256_address(email, "email", old)), ("none", f"{email} email")):
        resp = api.lookup(user, [address], algorithm, old)
        assert resp.status_code == 400, resp.text
        body = resp.json()
        assert body["errcode"] == "M_INVALID_PEPPER" and body["algorithm"] == algorithm, body
        assert body["lookup_pepper"] == new, body
    # The retry the error invites is answered.
    resp = api.lookup(user, [sha256_address(email, "email", new)], "sha256", new)
    assert resp.status_code == 200 and resp.json()["mappings"] == {sha256_address(email, "email", new): user.user_id}, (
        resp.text
    )


def test_hash_details_switches_at_the_scheduled_moment_not_before(make_server, api_for) -> None:  # type: ignore[no-untyped-def]
    server = make_server(extra_config={"lookup": ROTATION})
    api = api_for(server)
    user = api.register()
    old = api.hash_details(user)["lookup_pepper"]
    rotate(server, activate_in=3600)  # prepared now, current in an hour
    rows = peppers_in_db(server.database_url)
    assert len(rows) == 2 and rows[-1]["activates_ms"] > time.time() * 1000 + 3000 * 1000
    assert api.hash_details(user)["lookup_pepper"] == old  # not current yet
    new = rows[-1]["pepper"]
    # A second rotation while one is scheduled is refused; the schedule is shown without peppers.
    again = run_cli(server, "pepper", "rotate")
    assert again.returncode == 1 and "already under way" in again.stderr, again.stderr
    show = run_cli(server, "pepper", "show")
    assert show.returncode == 0 and "current:" in show.stdout and "next:" in show.stdout, show.stdout
    assert old not in show.stdout and new not in show.stdout
    # Bring the activation forward (as if the hour had passed): the server follows the schedule.
    sql(
        server.database_url,
        "UPDATE lookup_peppers SET activates_ms = ? WHERE id = ?",
        int(time.time() * 1000),
        rows[-1]["id"],
    )
    sql(
        server.database_url,
        "UPDATE lookup_peppers SET retires_ms = ? WHERE id = ?",
        int(time.time() * 1000) + 600_000,
        rows[0]["id"],
    )
    wait_until(lambda: api.hash_details(user)["lookup_pepper"] == new, 30, "the switch")
    ok = api.lookup(user, [], "sha256", old)
    assert ok.status_code == 200, ok.text  # the previous one, within its grace window


def test_the_schedule_rotates_on_its_own(make_server, api_for) -> None:  # type: ignore[no-untyped-def]
    lookup = {"pepper_rotation_seconds": 3, "previous_pepper_grace_seconds": 1, "pepper_activation_delay_seconds": 1}
    server = make_server(extra_config={"lookup": lookup})
    api = api_for(server)
    user = api.register()
    email = f"sched-{uuid.uuid4().hex[:8]}@people.test"
    api.bind_email(email, user)
    seen = [api.hash_details(user)["lookup_pepper"]]

    def rotated() -> bool:
        pepper = api.hash_details(user)["lookup_pepper"]
        if pepper != seen[-1]:
            seen.append(pepper)
        return len(seen) >= 3

    wait_until(rotated, 60, "two scheduled rotations")
    assert len(set(seen)) == len(seen)
    assert api.lookup_email(user, email) == user.user_id


# --- the race, forced ---------------------------------------------------------------------------


@pytest.fixture
def database_url(db_factory) -> str:  # type: ignore[no-untyped-def]
    return str(db_factory.create().url)


def test_a_bind_after_the_rehash_passed_its_row_still_gets_the_new_hash(database_url: str, tmp_path: Path) -> None:
    """The bind's process has not seen the rotation (its schedule is stale) and binds after the
    rehash finished: the bind sees the new pepper under the lock and writes its hash too."""
    from sydent_lite.config import config_from_dict
    from sydent_lite.context import operator_context
    from sydent_lite.services.hashing import lookup_hash
    from sydent_lite.services.peppers import RotationSettings, prepare_pepper, start_or_resume
    from sydent_lite.storage.peppers import PepperStore

    config = config_from_dict({"database": {"url": database_url}, "signing_key_path": str(tmp_path / "k")})

    async def go() -> tuple[str, str]:
        async with operator_context(config) as ctx:
            service = await ctx.associations()  # its schedule: the first pepper only
            await service.bind("email", "before@people.test", "@a:hs.test")
            store = PepperStore(ctx.database)
            row = await start_or_resume(store, "test")
            assert row is not None
            scheduled = await prepare_pepper(store, row, "test", RotationSettings(activation_delay_seconds=0))
            assert scheduled is not None
            await service.bind("email", "after@people.test", "@b:hs.test")  # stale schedule
            return row.pepper, ("lookup_hash", "lookup_hash_b")[row.slot]

    pepper, column = asyncio.run(go())
    rows = {r["address"]: r["h"] for r in sql(database_url, f"SELECT address, {column} AS h FROM associations")}
    assert rows == {a: lookup_hash(a, "email", pepper) for a in ("before@people.test", "after@people.test")}


@pytest.mark.parametrize("both_keys", [False, True])
def test_a_pepper_written_by_an_import_becomes_the_current_one(database_url: str, both_keys: bool) -> None:
    """An import (Sydent's pepper) writes server_state's `lookup_pepper` (and perhaps
    `lookup_hashes_pepper`), or calls set_current_pepper: after a rotation too, that pepper is
    the current one from then on, alone, with every hash recomputed for it."""
    from sydent_lite.services.hashing import HASHED_WITH_KEY, PEPPER_KEY, load_pepper, lookup_hash
    from sydent_lite.services.peppers import RotationSettings, prepare_pepper, start_or_resume
    from sydent_lite.storage.associations import AssociationStore, StoredAssociation
    from sydent_lite.storage.database import migrate, open_database
    from sydent_lite.storage.peppers import PepperStore
    from sydent_lite.storage.state import ServerStateStore

    async def go() -> None:
        database = open_database(database_url)
        try:
            await migrate(database)
            state, store, peppers = ServerStateStore(database), AssociationStore(database), PepperStore(database)
            first = await load_pepper(state, store)
            h = lookup_hash("a@people.test", "email", first)
            await store.upsert(StoredAssociation("email", "a@people.test", h, "@a:hs.test", 1, 1, 2, "{}"))
            row = await start_or_resume(peppers, "t")
            assert row is not None
            await prepare_pepper(peppers, row, "t", RotationSettings(activation_delay_seconds=0))
            assert await load_pepper(state, store) == row.pepper  # rotated: the new one is current
            await state.set(PEPPER_KEY, "sydentpepper")
            if both_keys:
                await state.set(HASHED_WITH_KEY, "sydentpepper")
            assert await load_pepper(state, store) == "sydentpepper"
            rows = await peppers.rows()
            assert [(r.pepper, r.slot) for r in rows] == [("sydentpepper", 0)]
            stored = await store.get("email", "a@people.test")
            assert stored is not None and stored.lookup_hash == lookup_hash("a@people.test", "email", "sydentpepper")
            assert await load_pepper(state, store) == "sydentpepper"  # and it stays
            await peppers.set_current_pepper("another", 5)
            assert await load_pepper(state, store) == "another"
        finally:
            await database.dispose()

    asyncio.run(go())


def test_a_stalled_rehash_is_taken_over_where_it_stopped(database_url: str) -> None:
    """A rehasher that stops (its process died) keeps its claim for a while; then another takes
    over from its progress and finishes, and the first one, should it wake, writes nothing."""
    from sydent_lite.services.hashing import load_pepper, lookup_hash
    from sydent_lite.services.peppers import CLAIM_MS, RotationSettings, prepare_pepper, start_or_resume
    from sydent_lite.storage.associations import AssociationStore, StoredAssociation
    from sydent_lite.storage.database import migrate, open_database
    from sydent_lite.storage.peppers import PepperStore
    from sydent_lite.storage.state import ServerStateStore

    async def go() -> tuple[str, str]:
        database = open_database(database_url)
        try:
            await migrate(database)
            state, store, peppers = ServerStateStore(database), AssociationStore(database), PepperStore(database)
            pepper = await load_pepper(state, store)
            for i in range(5):
                a = f"p{i}@people.test"
                await store.upsert(
                    StoredAssociation("email", a, lookup_hash(a, "email", pepper), "@a:hs.test", 1, 1, 2, "{}")
                )
            row = await start_or_resume(peppers, "first")
            assert row is not None
            first_batch = await peppers.threepids_after(0, 2)
            hashes = [(i, lookup_hash(a, m, row.pepper)) for i, m, a in first_batch]
            assert await peppers.write_rehash_batch(row.id, "first", row.slot, hashes, now_ms(), CLAIM_MS)
            assert await start_or_resume(peppers, "second") is None  # the claim holds
            later = now_ms() + CLAIM_MS + 1
            taken = await start_or_resume(peppers, "second", clock=lambda: later)
            assert taken is not None and taken.rehashed_through == first_batch[-1][0]
            assert not await peppers.write_rehash_batch(row.id, "first", row.slot, hashes, later, CLAIM_MS)
            done = await prepare_pepper(peppers, taken, "second", RotationSettings(activation_delay_seconds=0))
            assert done is not None and done.activates_ms is not None
            return row.pepper, ("lookup_hash", "lookup_hash_b")[row.slot]
        finally:
            await database.dispose()

    def now_ms() -> int:
        return int(time.time() * 1000)

    pepper, column = asyncio.run(go())
    rows = sql(database_url, f"SELECT address, {column} AS h FROM associations")
    assert len(rows) == 5 and all(r["h"] == lookup_hash_of(r["address"], pepper) for r in rows), rows


def lookup_hash_of(address: str, pepper: str) -> str:
    from sydent_lite.services.hashing import lookup_hash

    return lookup_hash(address, "email", pepper)


def test_rows_imported_after_a_rotation_get_every_live_peppers_hash(database_url: str) -> None:
    """import-sydent writes `lookup_hash` with the current pepper; after a rotation the current
    pepper's slot may be the other one, and a previous pepper may still be live:
    hash_for_live_peppers puts each live pepper's hash in its slot."""
    from sydent_lite.services.hashing import hash_for_live_peppers, load_pepper, lookup_hash
    from sydent_lite.services.peppers import RotationSettings, prepare_pepper, start_or_resume
    from sydent_lite.storage.associations import AssociationStore, StoredAssociation
    from sydent_lite.storage.database import migrate, open_database
    from sydent_lite.storage.peppers import PepperStore
    from sydent_lite.storage.state import ServerStateStore

    async def go() -> tuple[str, str, int]:
        database = open_database(database_url)
        try:
            await migrate(database)
            state, store, peppers = ServerStateStore(database), AssociationStore(database), PepperStore(database)
            first = await load_pepper(state, store)
            assert await hash_for_live_peppers(store) == 0  # one live pepper, in slot 0: nothing to do
            row = await start_or_resume(peppers, "t")
            assert row is not None and row.slot == 1
            await prepare_pepper(peppers, row, "t", RotationSettings(activation_delay_seconds=0))
            current = await load_pepper(state, store)
            assert current == row.pepper
            a = "imported@people.test"  # as the import writes it
            await store.upsert(
                StoredAssociation("email", a, lookup_hash(a, "email", current), "@i:hs.test", 1, 1, 2, "{}")
            )
            assert await hash_for_live_peppers(store) == 1
            return first, current, row.slot
        finally:
            await database.dispose()

    first, current, _ = asyncio.run(go())
    (found,) = sql(database_url, "SELECT lookup_hash, lookup_hash_b FROM associations")
    assert found == {
        "lookup_hash": lookup_hash_of("imported@people.test", first),  # the previous one, in its grace window
        "lookup_hash_b": lookup_hash_of("imported@people.test", current),
    }


def test_the_rehash_vacuums_the_table_before_scheduling_on_postgresql(database_url: str) -> None:
    """Each rehashed row leaves a dead version behind (PostgreSQL): the rotation vacuums the
    table itself before the pepper is scheduled (where autovacuum is off nothing else would)."""
    from sydent_lite.services.hashing import load_pepper, lookup_hash
    from sydent_lite.services.peppers import RotationSettings, prepare_pepper, start_or_resume
    from sydent_lite.storage.associations import AssociationStore, StoredAssociation
    from sydent_lite.storage.database import migrate, open_database
    from sydent_lite.storage.peppers import PepperStore
    from sydent_lite.storage.state import ServerStateStore

    if not database_url.startswith("postgresql"):
        pytest.skip("SQLite updates rows in place")

    def vacuums() -> int:
        (row,) = sql(database_url, "SELECT vacuum_count FROM pg_stat_user_tables WHERE relname = 'associations'")
        return int(row["vacuum_count"])

    async def go() -> None:
        database = open_database(database_url)
        try:
            await migrate(database)
            state, store, peppers = ServerStateStore(database), AssociationStore(database), PepperStore(database)
            pepper = await load_pepper(state, store)
            a = "v@people.test"
            await store.upsert(
                StoredAssociation("email", a, lookup_hash(a, "email", pepper), "@v:hs.test", 1, 1, 2, "{}")
            )
            before = vacuums()
            row = await start_or_resume(peppers, "t")
            assert row is not None
            assert await prepare_pepper(peppers, row, "t", RotationSettings(activation_delay_seconds=0)) is not None
            assert vacuums() == before + 1
        finally:
            await database.dispose()

    asyncio.run(go())


class _SlowVacuumStore:
    """The part of PepperStore a rehash uses, with no rows to rehash and a VACUUM that takes
    as long as the test says: what the rehash does with its claim meanwhile."""

    def __init__(self, renewals_granted: int, vacuum_fails: bool = False) -> None:
        self.renewals_granted = renewals_granted
        self.vacuum_fails = vacuum_fails
        self.renewals = 0
        self.scheduled = False
        self.vacuum_cancelled = False
        self.vacuum_may_end = asyncio.Event()

    async def threepids_after(self, after_id: int, batch: int) -> list[tuple[int, str, str]]:
        return []

    async def vacuum_associations(self, cost_delay_ms: float, cost_limit: int) -> None:
        if self.vacuum_fails:
            raise RuntimeError("VACUUM failed")
        try:
            await self.vacuum_may_end.wait()
        except asyncio.CancelledError:
            self.vacuum_cancelled = True
            raise

    async def claim(self, row_id: int, claimer: str, now: int, lease_ms: int) -> object | None:
        self.renewals += 1
        if self.renewals > self.renewals_granted:
            return None
        if self.renewals == self.renewals_granted:
            self.vacuum_may_end.set()
        return object()

    async def schedule(self, row_id: int, claimer: str, activates_ms: int, grace_ms: int) -> bool:
        self.scheduled = True
        return True

    async def rows(self) -> list[Any]:
        return []


@pytest.mark.parametrize(("granted", "fails"), [(2, False), (0, False), (0, True)])
def test_the_rehash_keeps_its_claim_through_the_vacuum(
    monkeypatch: pytest.MonkeyPatch, granted: int, fails: bool
) -> None:
    """A VACUUM of a big table outlasts the claim's lease: the claim is renewed meanwhile; if
    a renewal fails (another process took over), the VACUUM is cancelled and nothing is
    scheduled; a VACUUM that fails does not stop the rotation."""
    from sydent_lite.services import peppers as service
    from sydent_lite.storage.peppers import PepperRow

    monkeypatch.setattr(service, "CLAIM_MS", 40)  # renewals every 10 ms
    store = _SlowVacuumStore(granted, vacuum_fails=fails)
    row = PepperRow(1, "p", 1, 0, None, None, 0, "t", 0)

    async def go() -> None:
        settings = service.RotationSettings(activation_delay_seconds=0)
        await asyncio.wait_for(service.prepare_pepper(store, row, "t", settings), 10)  # type: ignore[arg-type]

    asyncio.run(go())
    if fails:
        assert store.scheduled and store.renewals == 0
    elif granted:
        assert store.scheduled and store.renewals == granted and not store.vacuum_cancelled
    else:
        assert not store.scheduled and store.renewals == 1 and store.vacuum_cancelled
