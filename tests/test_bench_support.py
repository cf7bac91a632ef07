"""The benchmark's own helpers (bench/): they must compute what the servers compute.

No timing here: speed is measured by bench/run.py, never asserted in tests.
"""

from __future__ import annotations

import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

import dataset  # noqa: E402
import sydent_ref  # noqa: E402

from sydent_lite.services.hashing import lookup_hash  # noqa: E402


def test_bench_hashes_are_the_servers_hashes() -> None:
    for address in ("user1@bench.example", "alice@example.com"):
        ours = lookup_hash(address, "email", "matrixrocks")
        assert dataset.lookup_hash(address, "email", "matrixrocks") == ours
        assert sydent_ref.lookup_hash(address, "email", "matrixrocks") == ours


def test_lookup_bodies_hold_the_asked_share_of_bound_addresses() -> None:
    import json

    n = 1000
    bound = {dataset.lookup_hash(dataset.address(i), "email", "p") for i in range(n)}
    for body in dataset.hashed_lookup_bodies(n, "p", count=3):
        hashes = json.loads(body)["addresses"]
        assert len(hashes) == 1000
        assert sum(h in bound for h in hashes) == 100  # 10% bound, as the workload promises
