"""sydent_lite against Sydent 2.6.1, side by side on this machine.

    python bench/run.py                       # SQLite, 100,000 associations, every workload
    python bench/run.py --postgres postgresql://postgres@127.0.0.1:5432/test
                                              # also PostgreSQL: 100,000 and 1,000,000, 1 and 2 workers
    python bench/run.py --baseline 367ad84    # also sydent_lite as of that commit, in the same rounds
    python bench/run.py --rotation --postgres postgresql://postgres@127.0.0.1:5432/test --associations 1000000
                                              # a lookup pepper rotation under load (bench/rotation.py)

Both servers run on loopback with the same associations (Sydent's database is seeded through
its own schema; sydent_lite imports that database with `sydent-lite import-sydent`), send mail
to the same counting SMTP server, and get the same load from wrk (a separate process: 32
connections by default). Each round starts each server afresh (so peak RSS is per workload),
warms it up, then measures; rounds alternate sydent_lite, Sydent, sydent_lite, Sydent, ...
Printed and written (Markdown): medians over rounds of req/s, p50, p99, server CPU seconds per
1,000 requests and peak RSS, with the ratios sydent_lite/Sydent.
Sydent 2.6.1 is installed from PyPI into bench/.venvs/sydent on first use.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

# The bench's own modules sit beside this script: importable only after the line above (E402).
import dataset  # noqa: E402
import procstat  # noqa: E402
import sydent_ref  # noqa: E402
from loadgen import LoadResult, Workload, run_wrk  # noqa: E402
from smtp_sink import CountingSmtpSink  # noqa: E402

WORKLOADS = ("v2_get", "v2_lookup", "v1_lookup", "v1_bulk_lookup", "request_token", "store_invite")
BENCH_USER = "@bench:hs.bench.example"
# Sydent answers these a few times a second: measure longer to get enough samples.
SLOW_WORKLOADS = ("v2_lookup", "v1_bulk_lookup", "request_token", "store_invite")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# --- the servers --------------------------------------------------------------------------------


@dataclass
class Server:
    """How to start one server under test, and what the load needs to know about it."""

    label: str
    start: Callable[[], subprocess.Popen[bytes]]
    stop: Callable[[subprocess.Popen[bytes]], None]
    port: int
    token: str
    pepper: str = ""
    on_postgres: bool = False

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def wait_until_serving(proc: subprocess.Popen[bytes], port: int, log_path: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited ({proc.returncode}); log tail:\n{log_path.read_text()[-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/_matrix/identity/v2", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"server did not answer within {timeout}s; log tail:\n{log_path.read_text()[-3000:]}")


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def lite_config(workdir: Path, port: int, smtp_port: int, database_url: str) -> Path:
    """sydent_lite's config: production defaults, except limits high enough for a load test.

    The rate limiter stays on (its shared store is part of each request's cost); only its
    numbers are raised, since every request of the load comes from one address and one user:
    the lookups' address budget too (a 1,000-address lookup costs 1,000 of it), which the
    defaults would exhaust in a fraction of a second of a load test; and the per-address connection
    cap, for runs with more than its 100 connections.
    """
    huge = 10**9
    config = {
        "server_name": dataset.SERVER_NAME,
        "public_baseurl": f"http://127.0.0.1:{port}",
        "listen": {"host": "127.0.0.1", "port": port, "max_connections_per_ip": 100_000},
        "database": {"url": database_url},
        "signing_key_path": str(workdir / "signing.key"),
        "email": {
            "transport": "smtp",
            "smtp": {"host": "127.0.0.1", "port": smtp_port},
            "from": "bench@id.bench.example",
        },
        "rate_limits": {
            "request_token_per_ip_per_minute": huge,
            "request_token_per_ip_burst": huge,
            "store_invite_per_ip_per_minute": huge,
            "store_invite_per_ip_burst": huge,
            "store_invite_per_sender_per_hour": huge,  # every bench invite has one sender
            "store_invite_per_sender_burst": huge,
            "lookup_per_token_per_minute": huge,
            "lookup_per_token_burst": huge,
            "lookup_addresses_per_minute": huge,
            "lookup_addresses_burst": huge,
        },
    }
    path = workdir / f"config-{port}.yaml"  # one per server: several may share a workdir (database)
    path.write_text(json.dumps(config, indent=2))  # JSON is YAML
    return path


def sydent_lite_cmd() -> list[str]:
    return [sys.executable, "-m", "sydent_lite"]


def create_token(config: Path, env: dict[str, str], cwd: Path) -> str:
    """An access token for BENCH_USER, made by the build under test (`env`, run in `cwd`)."""
    return subprocess.run(
        [*sydent_lite_cmd(), "create-token", "--user-id", BENCH_USER, "--config", str(config)],
        capture_output=True,
        text=True,
        check=True,
        env=env,
        cwd=cwd,
    ).stdout.strip()


@dataclass(frozen=True)
class Build:
    """Which sydent_lite runs: this checkout (source None), or an exported older commit."""

    label: str
    source: Path | None = None

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        if self.source is not None:
            env["PYTHONPATH"] = str(self.source)  # ahead of the installed (editable) package
        return env


THIS_BUILD = Build("sydent_lite")


def export_build(ref: str, workdir: Path) -> Build:
    """`ref` of this repository, exported (git archive) into workdir: the "before" of a change."""
    repo = BENCH_DIR.parent
    sha = subprocess.run(
        ["git", "-C", str(repo), "rev-parse", "--short", ref], capture_output=True, text=True, check=True
    ).stdout.strip()
    dest = workdir / f"build-{sha}"
    if not (dest / "sydent_lite").is_dir():
        dest.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "-C", str(repo), "archive", sha], capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return Build(f"sydent_lite@{sha}", dest)


def fit_config_to_build(config: Path, build: Build) -> None:
    """Drop the config keys an older build does not know (its loading is strict: an unknown key
    stops it), one at a time as it names them."""
    import re

    data = json.loads(config.read_text())
    for _ in range(50):
        probe = subprocess.run(
            [
                sys.executable,
                "-c",
                "import sys; from sydent_lite.config import load_config; load_config(sys.argv[1])",
                str(config),
            ],
            capture_output=True,
            text=True,
            env=build.env(),
            cwd=config.parent,  # not this checkout: `-c` puts the working directory first on sys.path
        )
        # The exception's own line, not the traceback's copy of the source line that raised it.
        found = re.search(r"ConfigError: unknown config key '([^']+)'", probe.stderr)
        if probe.returncode == 0 or found is None:
            return
        *parents, leaf = found.group(1).split(".")
        node = data
        for key in parents:
            node = node[key]
        del node[leaf]
        config.write_text(json.dumps(data, indent=2))


def prepare_lite(
    workdir: Path,
    sydent_db: Path,
    key_file: Path,
    database_url: str,
    smtp_port: int,
    workers: int,
    label: str,
    build: Build = THIS_BUILD,
) -> Server:
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = lite_config(workdir, port, smtp_port, database_url)
    fit_config_to_build(config, build)
    env = build.env()
    marker = workdir / "imported"
    if not marker.exists() or marker.read_text() != f"{sydent_db}|{database_url}":
        log(f"{label}: importing {sydent_db.name} with `sydent-lite import-sydent`")
        t0 = time.monotonic()
        out = subprocess.run(
            [
                *sydent_lite_cmd(),
                "import-sydent",
                str(sydent_db),
                "--signing-key",
                str(key_file),
                "--config",
                str(config),
            ],
            capture_output=True,
            text=True,
            check=False,
            env=env,
            cwd=workdir,  # as the probe: the build under test, not this checkout's package
        )
        if out.returncode != 0:
            raise RuntimeError(f"import-sydent failed: {out.stdout[-2000:]} {out.stderr[-2000:]}")
        log(f"{label}: imported in {time.monotonic() - t0:.1f}s")
        marker.write_text(f"{sydent_db}|{database_url}")
    token = create_token(config, env, workdir)
    log_path = workdir / f"server-{workers}w.log"

    def start() -> subprocess.Popen[bytes]:
        cmd = [*sydent_lite_cmd(), "serve", "--config", str(config)]
        if workers > 1:
            cmd += ["--workers", str(workers)]
        with log_path.open("ab") as out:
            proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, cwd=workdir, start_new_session=True, env=env
            )
        wait_until_serving(proc, port, log_path)
        return proc

    return Server(
        label=label,
        start=start,
        stop=stop_process,
        port=port,
        token=token,
        on_postgres=database_url.startswith("postgresql"),
    )


def prepare_sydent(workdir: Path, n: int, key_line: str, smtp_port: int, venv_python: Path) -> tuple[Server, Path]:
    """Sydent with n associations; its database is kept between runs (bench/work)."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    # Sydent's own defaults (INFO logs, as ours), but for its mail rate limit (5 mails, then one
    # per 5 minutes per account): raised as far as ours is.
    config = sydent_ref.write_config(
        workdir,
        port=port,
        smtp_port=smtp_port,
        server_name=dataset.SERVER_NAME,
        signing_key=key_line,
        templates_dir=sydent_ref.templates_dir_for(venv_python.parent.parent),
        log_level="INFO",
        email_ratelimit_burst=10**9,
        email_ratelimit_rate_hz=10**9,
    )
    db = workdir / "sydent.db"
    marker = workdir / "seeded"
    if not marker.exists() or marker.read_text() != str(n):
        db.unlink(missing_ok=True)
        log(f"Sydent: creating its schema and seeding {n:,} associations")
        sydent_ref.init_db(venv_python, config, workdir)
        t0 = time.monotonic()
        sydent_ref.seed(db, dataset.rows(n, key_line), dataset_pepper(), server_name=dataset.SERVER_NAME)
        log(f"Sydent: seeded in {time.monotonic() - t0:.1f}s")
        marker.write_text(str(n))
    token = sydent_ref.create_token(db, BENCH_USER)

    def start() -> subprocess.Popen[bytes]:
        return sydent_ref.start(venv_python, config, workdir, port)

    return Server(label="Sydent 2.6.1", start=start, stop=sydent_ref.stop, port=port, token=token), db


def dataset_pepper() -> str:
    return "benchpepper0123456789"


# --- workloads ---------------------------------------------------------------------------------


def workload(name: str, server: Server, n: int) -> Workload:
    auth = {"Authorization": f"Bearer {server.token}"}
    if name == "v2_get":
        return Workload(name, "GET", "/_matrix/identity/v2")
    if name == "v2_lookup":
        return Workload(
            name, "POST", "/_matrix/identity/v2/lookup", auth, bodies=dataset.hashed_lookup_bodies(n, server.pepper)
        )
    if name == "v1_lookup":
        return Workload(name, "GET", "/", paths=dataset.v1_lookup_paths(n))
    if name == "v1_bulk_lookup":
        return Workload(name, "POST", "/_matrix/identity/api/v1/bulk_lookup", bodies=dataset.bulk_lookup_bodies(n))
    if name == "request_token":
        body = json.dumps({"client_secret": "cs-UNIQ__", "email": "rt-UNIQ__@mail.bench.example", "send_attempt": 1})
        return Workload(
            name, "POST", "/_matrix/identity/v2/validate/email/requestToken", auth, body_template=body, sends_mail=True
        )
    if name == "store_invite":
        body = json.dumps(
            {
                "medium": "email",
                "address": "inv-UNIQ__@mail.bench.example",
                "room_id": "!room:hs.bench.example",
                "sender": BENCH_USER,
                "room_name": "Benchmark room",
                "sender_display_name": "Alice",
            }
        )
        return Workload(name, "POST", "/_matrix/identity/v2/store-invite", auth, body_template=body, sends_mail=True)
    raise ValueError(name)


@dataclass
class Measurement:
    server: str
    workload: str
    round: int
    rps: float
    p50_ms: float
    p99_ms: float
    cpu_s_per_1k: float
    peak_rss_mib: float
    ok: int
    errors: int
    mails_delivered: int | None
    db_cpu_s_per_1k: float | None = None  # PostgreSQL's backends, for runs on PostgreSQL


def measure(server: Server, load: Workload, args: argparse.Namespace, sink: CountingSmtpSink, rnd: int) -> Measurement:
    proc = server.start()
    try:
        if not server.pepper:
            details = httpx.get(
                f"{server.base_url}/_matrix/identity/v2/hash_details",
                headers={"Authorization": f"Bearer {server.token}"},
                timeout=10,
            ).json()
            server.pepper = details["lookup_pepper"]
            if load.name == "v2_lookup":  # the bodies carry the pepper
                load = workload(load.name, server, args.associations_for_run)
        run_wrk(server.base_url, load, seconds=args.warmup, connections=args.connections)  # warm-up
        # A single-threaded server still works through the requests wrk abandoned at the end
        # of the warm-up: wait until it answers again, so the measured run starts clean.
        httpx.get(f"{server.base_url}/_matrix/identity/v2", timeout=300)
        mails_before = sink.count
        cpu_before = procstat.cpu_seconds(proc.pid)
        db_cpu_before = procstat.cpu_seconds_of_command("postgres") if server.on_postgres else 0.0
        seconds = max(args.seconds, args.slow_seconds) if load.name in SLOW_WORKLOADS else args.seconds
        result: LoadResult = run_wrk(server.base_url, load, seconds=seconds, connections=args.connections)
        cpu = procstat.cpu_seconds(proc.pid) - cpu_before
        db_cpu = procstat.cpu_seconds_of_command("postgres") - db_cpu_before if server.on_postgres else None
        delivered = None
        if load.sends_mail:
            # Requests cut off at the end of the run may still send their mail: wait for quiet.
            last, quiet_since = sink.count, time.monotonic()
            while time.monotonic() - quiet_since < 2.0:
                time.sleep(0.2)
                if sink.count != last:
                    last, quiet_since = sink.count, time.monotonic()
            delivered = sink.count - mails_before
        rss = procstat.peak_rss_mib(proc.pid)
    finally:
        server.stop(proc)
    errors = result.errors
    if delivered is not None and delivered < result.ok:
        errors += result.ok - delivered  # an answer without its mail is a failure
    m = Measurement(
        server=server.label,
        workload=load.name,
        round=rnd,
        rps=result.rps,
        p50_ms=result.p50_ms,
        p99_ms=result.p99_ms,
        cpu_s_per_1k=cpu / (result.requests / 1000) if result.requests else float("nan"),
        peak_rss_mib=rss,
        ok=result.ok,
        errors=errors,
        mails_delivered=delivered,
        db_cpu_s_per_1k=db_cpu / (result.requests / 1000) if db_cpu is not None and result.requests else None,
    )
    log(
        f"  {m.server:<28} {m.workload:<15} round {rnd}: {m.rps:9.1f} req/s  p50 {m.p50_ms:8.1f} ms  "
        f"p99 {m.p99_ms:8.1f} ms  cpu/1k {m.cpu_s_per_1k:7.3f} s  rss {m.peak_rss_mib:6.1f} MiB  "
        f"ok {m.ok} err {m.errors}"
        + (f" mails {delivered}" if delivered is not None else "")
        + (f"  db cpu/1k {m.db_cpu_s_per_1k:.3f} s" if m.db_cpu_s_per_1k is not None else "")
    )
    return m


def compare(
    servers: list[Server], names: list[str], n: int, args: argparse.Namespace, sink: CountingSmtpSink
) -> list[Measurement]:
    """Every workload, round after round, each server in turn (A B A B ...)."""
    args.associations_for_run = n
    out = []
    for name in names:
        for rnd in range(1, args.rounds + 1):
            for server in servers:
                out.append(measure(server, workload(name, server, n), args, sink, rnd))
    return out


# --- reporting ---------------------------------------------------------------------------------


def medians(ms: list[Measurement], server: str, name: str) -> dict[str, float] | None:
    rows = [m for m in ms if m.server == server and m.workload == name]
    if not rows:
        return None
    return {
        "rps": statistics.median(m.rps for m in rows),
        "p50": statistics.median(m.p50_ms for m in rows),
        "p99": statistics.median(m.p99_ms for m in rows),
        "cpu": statistics.median(m.cpu_s_per_1k for m in rows),
        "db_cpu": statistics.median(db)
        if (db := [m.db_cpu_s_per_1k for m in rows if m.db_cpu_s_per_1k is not None])
        else float("nan"),
        "rss": statistics.median(m.peak_rss_mib for m in rows),
        "errors": sum(m.errors for m in rows),
        "ok": sum(m.ok for m in rows),
    }


def comparison_table(ms: list[Measurement], a: str, b: str, names: list[str]) -> str:
    lines = [
        f"| workload | req/s {a} | req/s {b} | ×req/s | p50 ms | p99 ms | p99 {b}/{a} "  # noqa: RUF001 - the multiplication sign is meant
        "| CPU s/1k req | peak RSS MiB | errors |",
        "|---|---:|---:|---:|---|---|---:|---|---|---|",
    ]
    for name in names:
        x, y = medians(ms, a, name), medians(ms, b, name)
        if x is None or y is None or not x["rps"] or not y["rps"]:
            continue
        lines.append(
            f"| {name} | {x['rps']:,.1f} | {y['rps']:,.1f} | **{x['rps'] / y['rps']:.1f}×** | "  # noqa: RUF001 - the multiplication sign is meant
            f"{x['p50']:.1f} / {y['p50']:.1f} | {x['p99']:.1f} / {y['p99']:.1f} | {y['p99'] / x['p99']:.1f} | "
            f"{x['cpu']:.3f} / {y['cpu']:.3f} | {x['rss']:.0f} / {y['rss']:.0f} "
            f"({x['rss'] / y['rss']:.2f}×) | "  # noqa: RUF001 - the multiplication sign is meant
            f"{x['errors']} / {y['errors']} |"
        )
    return "\n".join(lines)


def single_table(ms: list[Measurement], labels: list[str], names: list[str]) -> str:
    lines = [
        "| server | workload | req/s | p50 ms | p99 ms | CPU s/1k req | PostgreSQL CPU s/1k req "
        "| peak RSS MiB | errors |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label in labels:
        for name in names:
            x = medians(ms, label, name)
            if x is not None:
                lines.append(
                    f"| {label} | {name} | {x['rps']:,.1f} | {x['p50']:.1f} | {x['p99']:.1f} | {x['cpu']:.3f} | "
                    f"{x['db_cpu']:.3f} | {x['rss']:.0f} | {x['errors']} |"
                )
    return "\n".join(lines)


def scaling_lines(ms: list[Measurement], names: list[str], args: argparse.Namespace) -> list[str]:
    """The two PostgreSQL ratios of issue 7: N workers against one, and the large table
    against the small one (medians of req/s)."""
    big, small = args.pg_associations, args.associations
    one, many = f"PostgreSQL {big:,}, 1 worker", f"PostgreSQL {big:,}, {args.workers} workers"
    out = []
    for name in names:
        a, b, c = medians(ms, many, name), medians(ms, one, name), medians(ms, f"PostgreSQL {small:,}, 1 worker", name)
        parts = []
        if a and b and b["rps"]:
            ratio = a["rps"] / b["rps"]
            parts.append(f"{args.workers} workers / 1 worker at {big:,}: **{ratio:.2f}×**")  # noqa: RUF001 - the multiplication sign is meant
        if b and c and c["rps"]:
            slower = 100 * (1 - b["rps"] / c["rps"])
            parts.append(
                f"{big:,} against {small:,}, 1 worker: {abs(slower):.0f}% {'slower' if slower >= 0 else 'faster'}"
            )
        if parts:
            out.append(f"- {name}: " + "; ".join(parts))
    return out


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"{cpu}, {os.cpu_count()} cores, {mem_gib:.0f} GiB; {platform.platform()}; Python {platform.python_version()}; "
        f"SQLite {sqlite3.sqlite_version}"
    )


# --- main --------------------------------------------------------------------------------------


def create_pg_database(base_url: str, name: str) -> str:
    """A database next to base_url's (created if missing); returns its URL."""
    import asyncpg

    async def run() -> None:
        conn = await asyncpg.connect(base_url.replace("postgresql+asyncpg://", "postgresql://"))
        try:
            if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name):
                await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()

    asyncio.run(run())
    return base_url.rsplit("/", 1)[0] + "/" + name


def rotation_main(args: argparse.Namespace) -> int:
    import rotation

    workdir: Path = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    key_file = workdir / "signing.key"
    if not key_file.exists():
        key_file.write_text(dataset.new_signing_key() + "\n")
    sink = CountingSmtpSink(free_port())
    sink.start()
    n = args.associations
    try:
        # No Sydent here: the associations are written straight into sydent_lite's tables.
        url = create_pg_database(args.postgres, f"bench_lite_rot_{n}")
        where = workdir / f"lite-pg-rot-{n}"
        where.mkdir(parents=True, exist_ok=True)
        port = free_port()
        config = lite_config(where, port, sink.port, url)
        shutil.copy(key_file, where / "signing.key")
        rotation.seed(url, n, key_file.read_text().strip(), where / "seeded", log)
        token = subprocess.run(
            [*sydent_lite_cmd(), "create-token", "--user-id", BENCH_USER, "--config", str(config)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        label = f"PostgreSQL {n:,}, {args.workers} workers"
        log_path = where / "server.log"

        def start() -> subprocess.Popen[bytes]:
            cmd = [*sydent_lite_cmd(), "serve", "--config", str(config), "--workers", str(args.workers)]
            with log_path.open("ab") as out:
                proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=where, start_new_session=True)
            wait_until_serving(proc, port, log_path)
            return proc

        server = Server(label=label, start=start, stop=stop_process, port=port, token=token, on_postgres=True)
        proc = server.start()
        try:
            log(f"rotation under load: {label}")
            result = rotation.run_rotation(
                base_url=server.base_url,
                token=server.token,
                server_pid=proc.pid,
                config=config,
                n=n,
                connections=args.connections,
                steady_seconds=args.rotation_steady_seconds,
                after_seconds=args.rotation_after_seconds,
                activate_in=args.rotation_activate_in,
                cli=sydent_lite_cmd(),
            )
        finally:
            server.stop(proc)
    finally:
        sink.stop()
    lines = [f"Machine: {machine()}", "", *rotation.report_lines(result, args.workers)]
    text = "\n".join(lines)
    print("\n" + text)
    output = args.output or workdir / "rotation.md"
    output.write_text(text + "\n")
    (workdir / "rotation.json").write_text(json.dumps(result, indent=1))
    log(f"report written to {output}")
    return 0 if not result["checked_wrong"] and not result["checked_errors"] and not result["wrk_errors"] else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--associations", type=int, default=100_000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=10.0, help="measured seconds per run")
    p.add_argument("--slow-seconds", type=float, default=20.0, help="measured seconds for " + ", ".join(SLOW_WORKLOADS))
    p.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds before each run")
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated, of: " + ", ".join(WORKLOADS))
    p.add_argument(
        "--postgres", metavar="URL", help="also run on PostgreSQL (databases bench_lite_* are created there)"
    )
    p.add_argument("--pg-associations", type=int, default=1_000_000)
    p.add_argument(
        "--pg-sizes",
        default="",
        help="comma-separated association counts for PostgreSQL (default: --associations and --pg-associations)",
    )
    p.add_argument("--pg-workloads", default="v2_lookup,v1_bulk_lookup")
    p.add_argument("--workers", type=int, default=2, help="workers for the PostgreSQL multi-worker run")
    p.add_argument("--skip-sqlite", action="store_true", help="only the PostgreSQL runs")
    p.add_argument("--workdir", type=Path, default=BENCH_DIR / "work")
    p.add_argument(
        "--output", type=Path, default=None, help="write the Markdown report here (default: workdir/report.md)"
    )
    p.add_argument(
        "--baseline",
        metavar="GIT_REF",
        action="append",
        default=[],
        help="also run sydent_lite as of this commit (exported from this repository), in the same rounds: "
        "a change's before and after in one run (repeatable)",
    )
    p.add_argument(
        "--rotation",
        action="store_true",
        help="only the rotation scenario (bench/rotation.py): needs --postgres; --associations, --workers",
    )
    p.add_argument("--rotation-steady-seconds", type=float, default=20.0)
    p.add_argument("--rotation-activate-in", type=int, default=60, help="pepper rotate --activate-in")
    p.add_argument("--rotation-after-seconds", type=float, default=10.0, help="load kept on after the switch")
    args = p.parse_args(argv)
    if args.rotation:
        if not args.postgres:
            p.error("--rotation needs --postgres")
        return rotation_main(args)
    names = [w for w in args.workloads.split(",") if w]
    unknown = set(names) - set(WORKLOADS)
    if unknown:
        p.error(f"unknown workloads: {', '.join(sorted(unknown))}")
    workdir: Path = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    if shutil.which("wrk") is None:
        p.error("wrk is not installed (apt-get install wrk)")

    key_file = workdir / "signing.key"
    if not key_file.exists():
        key_file.write_text(dataset.new_signing_key() + "\n")
    key_line = key_file.read_text().strip()

    sink = CountingSmtpSink(free_port())
    sink.start()
    log("installing/checking Sydent 2.6.1 in bench/.venvs/sydent")
    venv_python = sydent_ref.ensure_venv(BENCH_DIR / ".venvs" / "sydent")
    report = [
        f"# Benchmark run {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}",
        "",
        f"Machine: {machine()}",
        "",
        f"Load: wrk, {args.connections} connections, 2 threads, {args.seconds:.0f} s measured "
        f"after {args.warmup:.0f} s "
        f"warm-up, {args.rounds} rounds (servers alternating, each restarted per run); medians.",
        "",
    ]
    all_ms: list[Measurement] = []
    baselines = [export_build(ref, workdir) for ref in args.baseline]
    try:
        if not args.skip_sqlite:
            n = args.associations
            sydent, sydent_db = prepare_sydent(workdir / f"sydent-{n}", n, key_line, sink.port, venv_python)
            lite = prepare_lite(
                workdir / f"lite-sqlite-{n}",
                sydent_db,
                key_file,
                f"sqlite:///{workdir / f'lite-sqlite-{n}' / 'sydent_lite.db'}",
                sink.port,
                1,
                "sydent_lite",
            )
            olds = []
            for build in baselines:
                where = workdir / f"lite-sqlite-{n}-{build.label.rsplit('@', 1)[1]}"
                olds.append(
                    prepare_lite(
                        where,
                        sydent_db,
                        key_file,
                        f"sqlite:///{where / 'sydent_lite.db'}",
                        sink.port,
                        1,
                        build.label,
                        build,
                    )
                )
            log(f"SQLite, {n:,} associations: {', '.join(names)}")
            ms = compare([lite, *olds, sydent], names, n, args, sink)
            all_ms += ms
            report += [
                f"## SQLite, {n:,} associations: sydent_lite / Sydent 2.6.1",
                "",
                "Cells with two values are sydent_lite / Sydent.",
                "",
                comparison_table(ms, lite.label, sydent.label, names),
                "",
            ]
            for old in olds:
                report += [
                    f"## SQLite, {n:,} associations: {old.label} (before) / Sydent 2.6.1",
                    "",
                    comparison_table(ms, old.label, sydent.label, names),
                    "",
                    f"## SQLite, {n:,} associations: sydent_lite (after) / {old.label} (before)",
                    "",
                    comparison_table(ms, lite.label, old.label, names),
                    "",
                ]
        if args.postgres:
            pg_names = [w for w in args.pg_workloads.split(",") if w]
            labels = []
            pg_ms: list[Measurement] = []
            for n in (
                [int(x) for x in args.pg_sizes.split(",")]
                if args.pg_sizes
                else (args.associations, args.pg_associations)
            ):
                _, sydent_db = prepare_sydent(workdir / f"sydent-{n}", n, key_line, sink.port, venv_python)
                url = create_pg_database(args.postgres, f"bench_lite_{n}")
                servers = [
                    prepare_lite(
                        workdir / f"lite-pg-{n}", sydent_db, key_file, url, sink.port, 1, f"PostgreSQL {n:,}, 1 worker"
                    )
                ]
                for build in baselines:
                    sha = build.label.rsplit("@", 1)[1]
                    old_url = create_pg_database(args.postgres, f"bench_lite_{n}_{sha}")
                    servers.append(
                        prepare_lite(
                            workdir / f"lite-pg-{n}-{sha}",
                            sydent_db,
                            key_file,
                            old_url,
                            sink.port,
                            1,
                            f"PostgreSQL {n:,}, 1 worker, {build.label}",
                            build,
                        )
                    )
                if n == args.pg_associations and args.workers > 1:
                    servers.append(
                        prepare_lite(
                            workdir / f"lite-pg-{n}",
                            sydent_db,
                            key_file,
                            url,
                            sink.port,
                            args.workers,
                            f"PostgreSQL {n:,}, {args.workers} workers",
                        )
                    )
                log(f"PostgreSQL, {n:,} associations: {', '.join(pg_names)}")
                pg_ms += compare(servers, pg_names, n, args, sink)
                labels += [s.label for s in servers]
            all_ms += pg_ms
            report += [
                "## sydent_lite on PostgreSQL",
                "",
                single_table(pg_ms, labels, pg_names),
                "",
                *scaling_lines(pg_ms, pg_names, args),
                "",
            ]
    finally:
        sink.stop()
    text = "\n".join(report)
    print("\n" + text)
    output = args.output or workdir / "report.md"
    output.write_text(text + "\n")
    (workdir / "measurements.json").write_text(json.dumps([asdict(m) for m in all_ms], indent=1))
    log(f"report written to {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
