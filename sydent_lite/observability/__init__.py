"""Observability: Prometheus metrics (`metrics`) and logs with request ids and redaction (`logs`).

This module itself imports nothing heavy, on purpose: `prepare_multiprocess()` has to run
before prometheus_client is imported by the processes that serve requests, because
prometheus_client picks its value storage (in memory, or shared files in
PROMETHEUS_MULTIPROC_DIR) once, at import time.

Several worker processes (`serve --workers N`): call `prepare_multiprocess(N)` in the parent
before the workers are started (spawned workers inherit the environment variable; forked ones
must be forked before they import `sydent_lite.http.app`), and `cleanup_multiprocess(path)`
after they have all exited. Each worker then writes its counters into the shared directory,
every worker opens the metrics listener with SO_REUSEPORT, and whichever one the kernel hands
a scrape to answers with the sum over all workers (prometheus_client's MultiProcessCollector).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def multiprocess_dir() -> str | None:
    """The shared metrics directory when running in multiprocess mode, else None."""
    return os.environ.get(MULTIPROC_ENV) or None


def prepare_multiprocess(workers: int) -> str | None:
    """Set up prometheus_client's multiprocess mode for `workers` processes; returns the directory.

    With one worker nothing is needed (None). An operator-provided PROMETHEUS_MULTIPROC_DIR is
    used as is, minus the metric files a previous run left there; otherwise a fresh private
    directory is created. Pass the returned path to `cleanup_multiprocess` at shutdown.
    """
    if workers <= 1:
        return None
    existing = multiprocess_dir()
    if existing:
        path = Path(existing)
        path.mkdir(parents=True, exist_ok=True)
        for stale in path.glob("*.db"):  # counters of a previous run would be added to ours
            stale.unlink(missing_ok=True)
        return str(path)
    path_str = tempfile.mkdtemp(prefix="sydent-lite-metrics-")
    os.environ[MULTIPROC_ENV] = path_str
    return path_str


def cleanup_multiprocess(path: str | None) -> None:
    """Remove what `prepare_multiprocess` created (only our own temporary directory)."""
    if not path:
        return
    if Path(path).name.startswith("sydent-lite-metrics-"):
        shutil.rmtree(path, ignore_errors=True)
        if os.environ.get(MULTIPROC_ENV) == path:
            del os.environ[MULTIPROC_ENV]
