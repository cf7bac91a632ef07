"""Memory, start and restart times of the lookup index with several workers (issue 18).

    flock /tmp/bench.lock python bench/index_memory.py --database-url postgresql://.../db \
        --associations 1000000 --workers 2,4 [--source CHECKOUT] [--seconds 10]

The database is seeded beforehand (bench/import_bench.py's path: `import-sydent`). For each
worker count: `serve --workers N` from cold (no snapshot files: the directory is emptied first),
the time to "listening"; hashed lookups of 1,000 by wrk (32 connections); then each worker's RSS,
PSS and USS (/proc/PID/smaps_rollup: a page mapped by several processes counts in each one's
RSS, a share of it in PSS, and only in USS if it is the process's own) and peak RSS (VmHWM);
then one worker is killed (SIGKILL) and the time until the supervisor's new worker has
started its application is taken from the log (uvicorn's "Application startup complete");
lookups again; then binds committed through the project's store, each looked up at once on
new connections (every worker): how long until all answer it, and how many did not.
`--source`: another checkout's sydent_lite (before/after).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

import dataset
import procstat
from loadgen import Workload, run_wrk
from run import create_token, free_port, lite_config, sydent_lite_cmd, wait_until_serving


def memory_of(pid: int) -> dict[str, float]:
    """RSS, PSS, USS (private clean + dirty) and peak RSS of one process, in MiB."""
    fields: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, value = line.split(":", 1)
        fields[name] = int(value.split()[0]) / 1024
    hwm = next(ln for ln in Path(f"/proc/{pid}/status").read_text().splitlines() if ln.startswith("VmHWM"))
    return {
        "rss": fields["Rss"],
        "pss": fields["Pss"],
        "uss": fields["Private_Clean"] + fields["Private_Dirty"],
        "peak_rss": int(hwm.split()[1]) / 1024,
    }


class BuilderPeak:
    """The highest peak RSS (VmHWM) of any snapshot builder process (services.index_builder, a
    worker's child while it writes a snapshot), sampled every 0.2 s in a thread."""

    def __init__(self, root: int) -> None:
        self.root, self.mib, self.seen = root, 0.0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        pids: set[int] = set()
        while not self._stop.wait(0.2):
            for pid in procstat.tree(self.root):
                try:
                    if b"index_builder" not in Path(f"/proc/{pid}/cmdline").read_bytes():
                        continue
                    self.mib = max(self.mib, memory_of(pid)["peak_rss"])
                    pids.add(pid)
                except (OSError, StopIteration, KeyError):
                    pass  # gone meanwhile
            self.seen = len(pids)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def workers_of(root: int) -> list[int]:
    """The supervisor's worker processes (not multiprocessing's resource tracker)."""
    return [p for p in procstat.tree(root) if b"spawn_main" in Path(f"/proc/{p}/cmdline").read_bytes()]


def bind_visibility(
    database_url: str, base: str, token: str, pepper: str, binds: int = 20, probes: int = 8
) -> dict[str, Any]:
    """Binds committed through the project's store (as any worker's bind is: the change log's
    triggers), each followed at once by `probes` lookups of its hash, each on a new connection
    (spread over the workers by the kernel's accept). Every lookup that starts after the commit
    must find it. Times are from the commit to each answer (the clients are made beforehand:
    an httpx client's TLS context alone takes tens of ms of this process's CPU)."""
    import asyncio
    import statistics

    from sydent_lite.services.hashing import lookup_hash
    from sydent_lite.storage.associations import AssociationStore, StoredAssociation
    from sydent_lite.storage.database import open_database

    headers = {"Authorization": f"Bearer {token}"}

    async def probe(client: httpx.AsyncClient, body: dict[str, Any], h: str, mxid: str, committed: float) -> float:
        r = await client.post(f"{base}/_matrix/identity/v2/lookup", json=body, headers=headers)
        return time.monotonic() - committed if r.json().get("mappings", {}).get(h) == mxid else -1.0

    async def go() -> dict[str, Any]:
        database = open_database(database_url)
        store = AssociationStore(database)
        times: list[float] = []
        try:
            for i in range(binds):
                address = f"visibility-{os.getpid()}-{time.time_ns()}-{i}@bench.example"
                h = lookup_hash(address, "email", pepper)
                mxid = f"@visible{i}:hs.bench.example"
                body = {"algorithm": "sha256", "pepper": pepper, "addresses": [h]}
                clients = [httpx.AsyncClient(timeout=30) for _ in range(probes)]  # a connection each
                try:
                    await store.upsert(StoredAssociation("email", address, h, mxid, 1, 1, 2**62, "{}"))
                    committed = time.monotonic()
                    times += await asyncio.gather(*(probe(c, body, h, mxid, committed) for c in clients))
                finally:
                    for c in clients:
                        await c.aclose()
                await store.delete("email", address, mxid)
        finally:
            await database.dispose()
        seen = [t for t in times if t >= 0]
        return {
            "binds": binds,
            "lookups": len(times),
            "not_seen": len(times) - len(seen),
            "commit_to_answer_median_s": round(statistics.median(seen), 3) if seen else None,
            "commit_to_answer_max_s": round(max(seen), 3) if seen else None,
        }

    return asyncio.run(go())


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--database-url", required=True)
    p.add_argument("--associations", type=int, required=True)
    p.add_argument("--workers", default="2,4")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--source", type=Path, help="a checkout whose sydent_lite runs (default: the installed one)")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/bench-index-memory"))
    args = p.parse_args()
    workdir: Path = args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    if args.source:
        env["PYTHONPATH"] = str(args.source.resolve())
    snapshots = workdir / "snapshots"
    port = free_port()
    config = lite_config(workdir, port, 1, args.database_url)
    data = json.loads(config.read_text())
    data["lookup"] = {"index_snapshot_dir": str(snapshots)}
    if args.source and "index_snapshot_dir" not in (args.source / "sydent_lite" / "config.py").read_text():
        del data["lookup"]  # a build without snapshots
    config.write_text(json.dumps(data))
    if not (workdir / "signing.key").exists():
        (workdir / "signing.key").write_text(dataset.new_signing_key() + "\n")
    cmd = sydent_lite_cmd()
    token = create_token(config, env, workdir)
    results = []
    for n_workers in [int(x) for x in args.workers.split(",")]:
        shutil.rmtree(snapshots, ignore_errors=True)
        log_path = workdir / f"server-{n_workers}w.log"
        log_path.write_text("")
        t0 = time.monotonic()
        with log_path.open("ab") as out:
            proc = subprocess.Popen(
                [*cmd, "serve", "--config", str(config), "--workers", str(n_workers)],
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=workdir,
                start_new_session=True,
                env=env,
            )
        builders = BuilderPeak(proc.pid)
        try:
            wait_until_serving(proc, port, log_path, timeout=900)
            while "listening on" not in log_path.read_text():
                time.sleep(0.2)
            start_s = time.monotonic() - t0
            base = f"http://127.0.0.1:{port}"
            pepper = httpx.get(
                f"{base}/_matrix/identity/v2/hash_details", headers={"Authorization": f"Bearer {token}"}, timeout=30
            ).json()["lookup_pepper"]
            load = Workload(
                "v2_lookup",
                "POST",
                "/_matrix/identity/v2/lookup",
                {"Authorization": f"Bearer {token}"},
                bodies=dataset.hashed_lookup_bodies(args.associations, pepper),
            )
            run_wrk(base, load, seconds=2, connections=32)  # warm-up
            lookups = run_wrk(base, load, seconds=args.seconds, connections=32)
            mem = {pid: memory_of(pid) for pid in workers_of(proc.pid)}
            victim = next(iter(mem))
            started_before = log_path.read_text().count("Application startup complete")
            t1 = time.monotonic()
            os.kill(victim, signal.SIGKILL)
            while log_path.read_text().count("Application startup complete") <= started_before:
                if time.monotonic() - t1 > 900:
                    raise RuntimeError("the killed worker was not replaced within 900 s")
                time.sleep(0.1)
            restart_s = time.monotonic() - t1
            after = run_wrk(base, load, seconds=args.seconds, connections=32)
            mem_after = {pid: memory_of(pid) for pid in workers_of(proc.pid)}
            visibility = bind_visibility(args.database_url, base, token, pepper)
            loads = re.findall(r"lookup index (?:loaded|mapped)[^\n]*", log_path.read_text())
        finally:
            builders.stop()
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
        r = {
            "workers": n_workers,
            "start_to_listening_s": round(start_s, 1),
            "restart_to_ready_s": round(restart_s, 1),
            "lookups_per_s": round(lookups.rps, 1),
            "lookups_per_s_after_restart": round(after.rps, 1),
            "errors": lookups.errors + after.errors,
            "per_worker_mib": {str(k): {f: round(v) for f, v in m.items()} for k, m in mem.items()},
            "total_rss_mib": round(sum(m["rss"] for m in mem.values())),
            "total_pss_mib": round(sum(m["pss"] for m in mem.values())),
            "after_restart_mib": {str(k): {f: round(v) for f, v in m.items()} for k, m in mem_after.items()},
            "bind_visibility": visibility,
            "builder_processes": builders.seen,
            "builder_peak_rss_mib": round(builders.mib),
            "index_log": loads[-2 * n_workers :],
        }
        print(json.dumps(r, indent=1), flush=True)
        results.append(r)
    (workdir / "results.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
