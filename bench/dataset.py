"""The benchmark's data: N bound email addresses, signed as a server binding them would have.

Deterministic: association i is `user{i}@bench.example` -> `@user{i}:hs.bench.example`, so the
load scripts can name bound and unbound addresses without asking either server. Both servers
get the same associations: Sydent through its own SQLite schema (bench/sydent_ref.py), and
sydent_lite by importing that database with `sydent-lite import-sydent`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import random
from collections.abc import Iterator

import signedjson.key
import signedjson.sign

SERVER_NAME = "id.bench.example"
BASE_TS = 1_700_000_000_000
TEN_YEARS_MS = 10 * 365 * 24 * 3600 * 1000


def address(i: int) -> str:
    return f"user{i}@bench.example"


def mxid(i: int) -> str:
    return f"@user{i}:hs.bench.example"


def new_signing_key() -> str:
    """A key file's contents, 'ed25519 0 <seed>' (Synapse/Sydent format)."""
    key = signedjson.key.generate_signing_key("0")
    return f"ed25519 0 {signedjson.key.encode_signing_key_base64(key)}"


def rows(n: int, key_line: str) -> Iterator[tuple[str, str, str, int, int, int, str]]:
    """(medium, address, mxid, ts, not_before, not_after, signed JSON) for i in 0..n-1."""
    _, version, seed = key_line.split()
    key = signedjson.key.decode_signing_key_base64("ed25519", version, seed)
    for i in range(n):
        ts = BASE_TS + i
        assoc = {
            "medium": "email",
            "address": address(i),
            "mxid": mxid(i),
            "ts": ts,
            "not_before": ts,
            "not_after": ts + TEN_YEARS_MS,
        }
        signed = signedjson.sign.sign_json(assoc, SERVER_NAME, key)
        yield ("email", address(i), mxid(i), ts, ts, ts + TEN_YEARS_MS, json.dumps(signed))


def lookup_hash(addr: str, medium: str, pepper: str) -> str:
    digest = hashlib.sha256(f"{addr} {medium} {pepper}".encode()).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def _batch_indexes(rng: random.Random, n: int, size: int, bound_share: float) -> list[int]:
    """`size` association indexes: bound_share of them < n (bound), the rest >= n (unknown)."""
    bound = int(size * bound_share)
    return [rng.randrange(n) for _ in range(bound)] + [n + rng.randrange(10 * n) for _ in range(size - bound)]


def hashed_lookup_bodies(n: int, pepper: str, count: int = 32, size: int = 1000, bound_share: float = 0.1) -> list[str]:
    """v2 /lookup bodies: `size` sha256 hashes each, `bound_share` of them of bound addresses."""
    rng = random.Random(7)
    bodies = []
    for _ in range(count):
        hashes = [lookup_hash(address(i), "email", pepper) for i in _batch_indexes(rng, n, size, bound_share)]
        bodies.append(json.dumps({"algorithm": "sha256", "pepper": pepper, "addresses": hashes}))
    return bodies


def bulk_lookup_bodies(n: int, count: int = 32, size: int = 1000, bound_share: float = 0.1) -> list[str]:
    """v1 /bulk_lookup bodies: `size` [medium, address] pairs, `bound_share` of them bound."""
    rng = random.Random(11)
    return [
        json.dumps({"threepids": [["email", address(i)] for i in _batch_indexes(rng, n, size, bound_share)]})
        for _ in range(count)
    ]


def v1_lookup_paths(n: int, count: int = 2000) -> list[str]:
    """v1 /lookup paths of bound addresses (every answer is a signed association)."""
    rng = random.Random(13)
    return [
        f"/_matrix/identity/api/v1/lookup?medium=email&address={address(rng.randrange(n)).replace('@', '%40')}"
        for _ in range(count)
    ]
