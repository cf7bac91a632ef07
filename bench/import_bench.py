"""`import-sydent` alone, timed: a Sydent database of N associations into SQLite or PostgreSQL.

    python bench/import_bench.py --assocs 100000 --target postgres [--source DIR] [--rerun]

The Sydent database is made once per N (Sydent 2.6.1's own schema, bench/sydent_ref.py; the
data of bench/dataset.py) and kept under --work. The import runs as the command an operator
runs (`python -m sydent_lite import-sydent`), in a child process: its wall time and peak RSS
(getrusage of the child) are printed as one JSON line. A PostgreSQL target is a fresh
database, dropped afterwards. `--source DIR` runs another checkout's sydent_lite (before/after).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import dataset
import procstat
import sydent_ref

DEFAULT_PG = "postgresql://postgres@127.0.0.1:5432"
SYDENT_VENV = Path(os.environ.get("SYDENT_VENV", Path(__file__).resolve().parent / ".venvs" / "sydent"))


def sydent_db(work: Path, n: int) -> tuple[Path, Path]:
    """(Sydent's database, its key file) with n associations, made once."""
    d = work / f"sydent-{n}"
    db, key = d / "sydent.db", d / "signing.key"
    if (d / "seeded").exists():
        return db, key
    d.mkdir(parents=True, exist_ok=True)
    db.unlink(missing_ok=True)
    python = sydent_ref.ensure_venv(SYDENT_VENV)
    key_line = dataset.new_signing_key()
    key.write_text(key_line + "\n")
    config = sydent_ref.write_config(
        d,
        port=1,
        smtp_port=1,
        server_name=dataset.SERVER_NAME,
        signing_key=key_line,
        templates_dir=sydent_ref.templates_dir_for(SYDENT_VENV),
    )
    sydent_ref.init_db(python, config, d)
    t0 = time.monotonic()
    sydent_ref.seed(db, dataset.rows(n, key_line), "benchpepper0123456789", server_name=dataset.SERVER_NAME)
    print(f"seeded {n} in {time.monotonic() - t0:.1f}s", file=sys.stderr)
    (d / "seeded").write_text("ok")
    return db, key


async def _pg(admin_url: str, sql: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(admin_url + "/postgres")
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def run_import(
    source: Path, config: Path, db: Path, key: Path, profile: Path | None
) -> tuple[float, int, int, float, str]:
    env = dict(os.environ, PYTHONPATH=str(source))
    cmd = [sys.executable, "-m", "sydent_lite", "import-sydent", str(db), "--signing-key", str(key)]
    if profile is not None:  # py-spy's collapsed stacks (its own overhead is in the time then)
        cmd = [
            str(Path(sys.executable).parent / "py-spy"),
            "record",
            "--subprocesses",  # the import's worker too
            "-r",
            "50",
            "-f",
            "raw",
            "-o",
            str(profile),
            "--",
            *cmd,
        ]
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    before, cpu_before = usage.ru_maxrss, usage.ru_utime + usage.ru_stime
    t0 = time.monotonic()
    tree_peak = 0.0
    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
        child = subprocess.Popen([*cmd, "--config", str(config)], stdout=stdout, stderr=stderr, env=env, cwd=source)
        # The import may start a worker process: the sum over the tree, sampled (VmHWM of each
        # living process), is what the machine must hold; getrusage gives the largest process.
        while child.poll() is None:
            tree_peak = max(tree_peak, procstat.peak_rss_mib(child.pid))
            time.sleep(0.5)
        elapsed = time.monotonic() - t0
        stdout.seek(0)
        stderr.seek(0)
        out_text, err_text = stdout.read(), stderr.read()
    if child.returncode != 0:
        raise RuntimeError(f"import-sydent failed: {out_text[-2000:]} {err_text[-2000:]}")
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    # CPU of the import and its worker (waited for by it): less sensitive to a shared machine than wall time.
    cpu = usage.ru_utime + usage.ru_stime - cpu_before
    # ru_maxrss of children is the largest child so far: the imports run biggest last, or one per process.
    return elapsed, max(usage.ru_maxrss, before), round(tree_peak), cpu, out_text


def report(args: argparse.Namespace, which: str, run: tuple[float, int, int, float, str]) -> None:
    elapsed, peak_kib, tree_peak_mib, cpu, stdout = run
    imported = next((int(line.split(":")[1]) for line in stdout.splitlines() if "associations_imported" in line), 0)
    line = {
        "source": str(args.source),
        "target": args.target,
        "assocs": args.assocs,
        "run": which,
        "seconds": round(elapsed, 1),
        "assocs_per_s": round(args.assocs / elapsed),
        "peak_rss_mib": round(peak_kib / 1024),
        "peak_rss_tree_mib": tree_peak_mib,
        "cpu_s": round(cpu, 1),
        "associations_imported": imported,
    }
    print(json.dumps(line), flush=True)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--assocs", type=int, required=True)
    p.add_argument("--target", choices=["sqlite", "postgres"], required=True)
    p.add_argument("--source", type=Path, default=Path(__file__).resolve().parent.parent)
    p.add_argument("--work", type=Path, default=Path("/tmp/import-bench"))
    p.add_argument("--pg", default=DEFAULT_PG)
    p.add_argument("--rerun", action="store_true", help="import a second time (nothing changes)")
    p.add_argument("--profile", type=Path, help="run the first import under py-spy, stacks to this file")
    args = p.parse_args()
    db, key = sydent_db(args.work, args.assocs)
    run_dir = args.work / f"run-{args.target}-{args.assocs}-{os.getpid()}"
    run_dir.mkdir(parents=True)
    pg_name = f"import_bench_{os.getpid()}"
    if args.target == "postgres":
        url = f"{args.pg.replace('postgresql://', 'postgresql://')}/{pg_name}"
        asyncio.run(_pg(args.pg, f'CREATE DATABASE "{pg_name}"'))
    else:
        url = f"sqlite:///{run_dir / 'lite.db'}"
    config = run_dir / "config.yaml"
    config.write_text(
        json.dumps(
            {
                "server_name": dataset.SERVER_NAME,
                "public_baseurl": "http://127.0.0.1:1",
                "database": {"url": url},
                "signing_key_path": str(run_dir / "signing.key"),
            }
        )
    )
    try:
        report(args, "first", run_import(args.source, config, db, key, args.profile))
        if args.rerun:
            report(args, "rerun", run_import(args.source, config, db, key, None))
    finally:
        if args.target == "postgres":
            asyncio.run(_pg(args.pg, f'DROP DATABASE IF EXISTS "{pg_name}"'))
    return 0


if __name__ == "__main__":
    sys.exit(main())
