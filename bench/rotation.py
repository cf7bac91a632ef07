"""The rotation scenario (`bench/run.py --rotation`): a pepper rotation under lookup load.

One sydent_lite with N workers on PostgreSQL, N associations. wrk sends v2 lookups (1,000
hashes, 10% bound) in back-to-back slices of a couple of seconds, with the pepper the server
had at the start (answered throughout: the grace window is an hour). Meanwhile a checker
(one Python client) looks up a batch with the pepper hash_details gives *now* and one with the
first pepper, a few times a second, and compares every mapping with the dataset: a wrong
answer, a missing mapping or an error is counted. After the steady slices, `sydent-lite pepper
rotate --activate-in S` prepares a new pepper (the rehash: its run time) and the load goes on
until a while after the switch.

Reported: the rehash's duration; lookup throughput and p99 of the slices before the rotation
(steady) and of those overlapping the rehash (during: their lowest throughput and highest p99);
the switch (when hash_details changed); errors and wrong answers; the server's peak RSS.
"""

from __future__ import annotations

import json
import random
import statistics
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dataset
import httpx
import procstat
from loadgen import Workload, run_wrk

SLICE_SECONDS = 2.0


@dataclass
class Slice:
    start: float
    end: float
    rps: float
    p99_ms: float
    errors: int


@dataclass
class Checks:
    lookups: int = 0
    wrong: int = 0
    errors: int = 0
    switched_at: float | None = None
    notes: list[str] = field(default_factory=list)


def _check_loop(base_url: str, token: str, n: int, first: str, stop: threading.Event, checks: Checks) -> None:
    rng = random.Random(5)
    headers = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=base_url, timeout=30) as client:
        while not stop.is_set():
            try:
                current = client.get("/_matrix/identity/v2/hash_details", headers=headers).json()["lookup_pepper"]
                if current != first and checks.switched_at is None:
                    checks.switched_at = time.monotonic()
                for pepper in {current, first}:
                    bound = [rng.randrange(n) for _ in range(20)]
                    unbound = [n + rng.randrange(10 * n) for _ in range(180)]
                    hashes = {dataset.lookup_hash(dataset.address(i), "email", pepper): i for i in bound + unbound}
                    body = {"algorithm": "sha256", "pepper": pepper, "addresses": list(hashes)}
                    resp = client.post("/_matrix/identity/v2/lookup", headers=headers, json=body)
                    checks.lookups += 1
                    if resp.status_code != 200:
                        checks.errors += 1
                        checks.notes.append(f"{resp.status_code} {resp.text[:200]}")
                        continue
                    want = {h: dataset.mxid(i) for h, i in hashes.items() if i < n}
                    if resp.json()["mappings"] != want:
                        checks.wrong += 1
            except (httpx.HTTPError, KeyError, ValueError) as e:
                checks.errors += 1
                checks.notes.append(repr(e)[:200])
            time.sleep(0.2)


def run_rotation(
    *,
    base_url: str,
    token: str,
    server_pid: int,
    config: Path,
    n: int,
    connections: int,
    steady_seconds: float,
    after_seconds: float,
    activate_in: int,
    cli: list[str],
) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {token}"}
    first = httpx.get(f"{base_url}/_matrix/identity/v2/hash_details", headers=headers, timeout=30).json()[
        "lookup_pepper"
    ]
    load = Workload(
        "v2_lookup", "POST", "/_matrix/identity/v2/lookup", headers, bodies=dataset.hashed_lookup_bodies(n, first)
    )
    run_wrk(base_url, load, seconds=2, connections=connections)  # warm-up
    slices: list[Slice] = []
    stop = threading.Event()
    checks = Checks()

    def load_loop() -> None:
        while not stop.is_set():
            t0 = time.monotonic()
            r = run_wrk(base_url, load, seconds=SLICE_SECONDS, connections=connections)
            slices.append(Slice(t0, time.monotonic(), r.rps, r.p99_ms, r.errors))

    loader = threading.Thread(target=load_loop, daemon=True)
    checker = threading.Thread(target=_check_loop, args=(base_url, token, n, first, stop, checks), daemon=True)
    loader.start()
    checker.start()
    time.sleep(steady_seconds)
    rotate_start = time.monotonic()
    out = subprocess.run(
        [*cli, "pepper", "rotate", "--activate-in", str(activate_in), "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=3600,
    )
    rotate_end = time.monotonic()
    if out.returncode != 0:
        stop.set()
        raise RuntimeError(f"pepper rotate failed: {out.stdout} {out.stderr}")
    deadline = time.monotonic() + activate_in + 60
    while checks.switched_at is None and time.monotonic() < deadline:
        time.sleep(0.5)
    time.sleep(after_seconds)
    stop.set()
    loader.join()
    checker.join()
    rss = procstat.peak_rss_mib(server_pid)

    steady = [s for s in slices if s.end <= rotate_start]
    during = [s for s in slices if s.start < rotate_end and s.end > rotate_start]
    after = [s for s in slices if checks.switched_at is not None and s.start >= checks.switched_at]
    # From the rehash's end to the end: the processes load the new pepper's index meanwhile.
    loads = [s for s in slices if s.end > rotate_end]
    # From the rehash's end to the switch (the loads are in there), and after the switch.
    between = [s for s in loads if checks.switched_at is None or s.start < checks.switched_at]
    result = {
        "associations": n,
        "rehash_seconds": round(rotate_end - rotate_start, 1),
        "steady_rps_median": round(statistics.median(s.rps for s in steady), 1) if steady else None,
        "steady_p99_ms_median": round(statistics.median(s.p99_ms for s in steady), 1) if steady else None,
        "during_rps_min": round(min(s.rps for s in during), 1) if during else None,
        "during_rps_median": round(statistics.median(s.rps for s in during), 1) if during else None,
        "during_p99_ms_max": round(max(s.p99_ms for s in during), 1) if during else None,
        "after_rehash_rps_min": round(min(s.rps for s in loads), 1) if loads else None,
        "to_switch_rps_min": round(min(s.rps for s in between), 1) if between else None,
        "to_switch_rps_median": round(statistics.median(s.rps for s in between), 1) if between else None,
        "after_switch_rps_min": round(min(s.rps for s in after), 1) if after else None,
        "after_switch_p99_ms_max": round(max(s.p99_ms for s in after), 1) if after else None,
        "to_switch_p99_ms_max": round(max(s.p99_ms for s in between), 1) if between else None,
        "after_switch_rps_median": round(statistics.median(s.rps for s in after), 1) if after else None,
        "switched_s_after_rehash": round(checks.switched_at - rotate_end, 1) if checks.switched_at else None,
        "wrk_errors": sum(s.errors for s in slices),
        "checked_lookups": checks.lookups,
        "checked_wrong": checks.wrong,
        "checked_errors": checks.errors,
        "peak_rss_mib": round(rss, 1),
        "slices": [[round(s.start - rotate_start, 1), round(s.rps, 1), round(s.p99_ms, 1)] for s in slices],
        "notes": checks.notes[:5],
        "rotate_output": (out.stdout + out.stderr)[-2000:],
    }
    return result


def report_lines(r: dict[str, Any], workers: int) -> list[str]:
    return [
        f"## Pepper rotation: PostgreSQL, {r['associations']:,} associations, {workers} workers, under v2 lookup load",
        "",
        "| rehash | steady req/s (median) | during: lowest / median req/s | rehash to switch (index loads): lowest "
        "/ median | after the switch: lowest / median "
        "| steady p99 | during: worst p99 | switch after rehash | errors (wrk / checker) | wrong answers (of checked) "
        "| peak RSS |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {r['rehash_seconds']} s | {r['steady_rps_median']} | {r['during_rps_min']} / {r['during_rps_median']} "
        f"| {r.get('to_switch_rps_min')} / {r.get('to_switch_rps_median')} "
        f"| {r.get('after_switch_rps_min')} / {r['after_switch_rps_median']} "
        f"| {r['steady_p99_ms_median']} ms | {r['during_p99_ms_max']} ms "
        f"| {r['switched_s_after_rehash']} s "
        f"| {r['wrk_errors']} / {r['checked_errors']} | {r['checked_wrong']} (of {r['checked_lookups']}) "
        f"| {r['peak_rss_mib']} MiB |",
        "",
        "Slices (seconds from the rotation's start, req/s, p99 ms): " + json.dumps(r["slices"]),
        "",
    ]


def seed(url: str, n: int, key_line: str, marker: Path, log: Any) -> None:
    """`n` associations of the dataset in sydent_lite's tables at `url` (migrated first), hashed
    with its current pepper; kept between runs (the marker)."""
    import asyncio

    if marker.exists() and marker.read_text() == f"{url}|{n}":
        return

    async def go() -> None:
        import asyncpg

        from sydent_lite.services.hashing import load_pepper, lookup_hash
        from sydent_lite.storage.associations import AssociationStore
        from sydent_lite.storage.database import migrate, open_database
        from sydent_lite.storage.state import ServerStateStore

        database = open_database(url)
        try:
            await migrate(database)
            # A database an earlier run rotated: its schedule may have the current pepper in
            # slot b, which the COPY below does not fill. Start the schedule afresh (slot a).
            conn = await asyncpg.connect(url)
            try:
                await conn.execute("TRUNCATE associations, lookup_peppers")
            finally:
                await conn.close()
            pepper = await load_pepper(ServerStateStore(database), AssociationStore(database))
        finally:
            await database.dispose()
        conn = await asyncpg.connect(url)
        try:
            t0 = time.monotonic()
            batch: list[tuple[Any, ...]] = []
            columns = ["medium", "address", "lookup_hash", "mxid", "ts", "not_before", "not_after", "signed_json"]
            for medium, address, mxid, ts, nb, na, signed in dataset.rows(n, key_line):
                batch.append((medium, address, lookup_hash(address, medium, pepper), mxid, ts, nb, na, signed))
                if len(batch) == 50_000:
                    await conn.copy_records_to_table("associations", records=batch, columns=columns)
                    batch = []
            if batch:
                await conn.copy_records_to_table("associations", records=batch, columns=columns)
            # TRUNCATE, not DELETE: with autovacuum off (this machine) a DELETE left a million
            # dead rows in the change log's index, which every change poll (from id 0: nothing
            # was pruned) walked through, ~10 ms of PostgreSQL CPU a poll. A production server's
            # log is pruned (the poll starts past the pruned ids) and vacuumed.
            await conn.execute("TRUNCATE association_changes")
            # As a table that has been in use for a while: hint bits and visibility map set.
            await conn.execute("VACUUM ANALYZE associations")
            await conn.execute("ANALYZE")
            log(f"seeded {n:,} associations in {time.monotonic() - t0:.1f}s")
        finally:
            await conn.close()

    asyncio.run(go())
    marker.write_text(f"{url}|{n}")
