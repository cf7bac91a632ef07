"""The lookup index's in-memory table of lookup hash -> mxid (services.mxid_table), checked
against a plain dict through long random runs of binds, rebinds and removals."""

from __future__ import annotations

import random

import pytest

from sydent_lite.services import mxid_table
from sydent_lite.services.hashing import lookup_hash
from sydent_lite.services.mxid_table import MxidTable


def test_matches_a_dict_through_random_binds_rebinds_and_removals() -> None:
    rng = random.Random(5)
    keys = [lookup_hash(f"user{i}@example.test", "email", "pepper") for i in range(3000)]
    # Hashes of another shape (hand-written SQL could store them): kept, under their exact text.
    keys += ["short", "x" * 42 + "é", "y" * 44]
    model: dict[str, tuple[str, int]] = {}
    table = MxidTable()
    for step in range(60_000):
        key = rng.choice(keys)
        association_id = rng.randrange(1, 3)
        if rng.random() < 0.6:
            mxid = f"@user{rng.randrange(4)}:hs{rng.randrange(2)}.test"
            table.set(key, mxid, association_id)
            model[key] = (mxid, association_id)
        else:
            # A removal names its association: another association's entry stays.
            table.discard(key, association_id)
            if model.get(key, ("", 0))[1] == association_id:
                del model[key]
        if step % 3000 == 0:
            assert table.get_many(keys) == {k: m for k, (m, _) in model.items()}, step
            assert len(table) == len(model)
    assert table.get_many(keys) == {k: m for k, (m, _) in model.items()}


def test_only_the_exact_string_matches() -> None:
    table = MxidTable()
    bound = lookup_hash("alice@example.test", "email", "pepper")
    table.set(bound, "@alice:hs.test", 1)
    other_last = "B" if bound[-1] != "B" else "C"
    near = [bound[:-1] + other_last, bound.lower(), bound[:-1], bound + "A", bound.replace(bound[5], "+", 1)]
    assert table.get_many([bound, *near]) == {bound: "@alice:hs.test"}


def test_grows_and_keeps_every_entry_reachable(monkeypatch: pytest.MonkeyPatch) -> None:
    # A tiny table, so that it resizes many times and runs of occupied slots wrap around.
    monkeypatch.setattr(mxid_table, "MIN_SLOTS", 8)
    table = MxidTable()
    keys = [lookup_hash(f"u{i}@example.test", "email", "p") for i in range(5000)]
    for i, key in enumerate(keys):
        table.set(key, f"@u{i}:hs.test", i + 1)
    assert len(table._slots) >= len(keys) / mxid_table.MAX_LOAD
    for i, key in enumerate(keys):
        if i % 2 == 0:
            table.discard(key, i + 1)
    assert table.get_many(keys) == {k: f"@u{i}:hs.test" for i, k in enumerate(keys) if i % 2}
    assert table.get_many(["not-a-hash", keys[0]]) == {}
