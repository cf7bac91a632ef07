"""Hashed lookups at two sizes, alternating, in one run (issue 18: "no more than 20% slower").

    flock /tmp/bench.lock python bench/lookup_scaling.py \
        --small postgresql://.../bench100k:100000 --large postgresql://.../bench10m:10000000 \
        [--workers 2] [--rounds 5] [--seconds 10]

Both databases are seeded beforehand (bench/index_memory.py's way: `import-sydent`). One
`serve --workers N` per database runs throughout (each with its own snapshot directory; the
large one's first start builds its index); then wrk (32 connections, 1,000 hashes a lookup,
10% of them bound) runs against each in turn, `--rounds` times, after a warm-up of each, so
that drift in the machine's speed falls on both alike. Prints each round's lookups/s and the
median ratio large/small.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

import dataset
from loadgen import Workload, run_wrk
from run import create_token, free_port, lite_config, sydent_lite_cmd, wait_until_serving


def start(url: str, workdir: Path, workers: int) -> tuple[subprocess.Popen[bytes], str, str]:
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = lite_config(workdir, port, 1, url)
    data = json.loads(config.read_text())
    data["lookup"] = {"index_snapshot_dir": str(workdir / "snapshots")}
    config.write_text(json.dumps(data))
    if not (workdir / "signing.key").exists():
        (workdir / "signing.key").write_text(dataset.new_signing_key() + "\n")
    env = dict(os.environ)
    token = create_token(config, env, workdir)
    log = (workdir / "server.log").open("ab")
    cmd = [*sydent_lite_cmd(), "serve", "--config", str(config), "--workers", str(workers)]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=workdir, start_new_session=True, env=env)
    wait_until_serving(proc, port, workdir / "server.log", timeout=900)
    return proc, f"http://127.0.0.1:{port}", token


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--small", required=True, help="URL:ASSOCIATIONS")
    p.add_argument("--large", required=True, help="URL:ASSOCIATIONS")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/bench-lookup-scaling"))
    args = p.parse_args()
    servers = {}
    try:
        for name in ("small", "large"):
            url, n = getattr(args, name).rsplit(":", 1)
            t0 = time.monotonic()
            proc, base, token = start(url, args.workdir / name, args.workers)
            print(f"{name}: serving after {time.monotonic() - t0:.1f} s", flush=True)
            headers = {"Authorization": f"Bearer {token}"}
            pepper = httpx.get(f"{base}/_matrix/identity/v2/hash_details", headers=headers, timeout=30).json()
            load = Workload(
                "v2_lookup",
                "POST",
                "/_matrix/identity/v2/lookup",
                headers,
                bodies=dataset.hashed_lookup_bodies(int(n), pepper["lookup_pepper"]),
            )
            servers[name] = (proc, base, load)
        for _, base, load in servers.values():
            run_wrk(base, load, seconds=5, connections=32)  # warm-up: the mapped pages touched
        rates: dict[str, list[float]] = {"small": [], "large": []}
        for r in range(args.rounds):
            for name, (_, base, load) in servers.items():
                m = run_wrk(base, load, seconds=args.seconds, connections=32)
                rates[name].append(m.rps)
                print(f"round {r + 1}: {name} {m.rps:.1f} lookups/s, {m.errors} errors", flush=True)
        ratios = [large / small for small, large in zip(rates["small"], rates["large"], strict=True)]
        print(
            json.dumps(
                {
                    "workers": args.workers,
                    "small_median": round(statistics.median(rates["small"]), 1),
                    "large_median": round(statistics.median(rates["large"]), 1),
                    "large_over_small_median": round(statistics.median(ratios), 3),
                    "ratios": [round(x, 3) for x in ratios],
                }
            ),
            flush=True,
        )
    finally:
        for proc, _, _ in servers.values():
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
