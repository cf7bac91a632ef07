"""secrets_util.random_string: the tokens, sids and codes a guesser must not be able to narrow."""

from __future__ import annotations

import collections
import math
import secrets
import string

import pytest

from sydent_lite.secrets_util import random_string


@pytest.mark.parametrize("alphabet", [string.ascii_letters + string.digits, string.digits, "ab", "x"])
def test_every_character_equally_likely(alphabet: str) -> None:
    # 1,000,000 characters: each character's count within five standard deviations of its
    # share (a chance failure: ~1 in 20,000 runs). A byte mapped by `% size` without dropping
    # the top bytes makes the first 256 % size characters likelier: by 4% for the digits'
    # first six (~13 deviations here), by 25% for the alphanumerics' first eight (~32).
    drawn = "".join(random_string(10_000, alphabet) for _ in range(100))
    assert set(drawn) == set(alphabet)
    counts = collections.Counter(drawn)
    p = 1 / len(alphabet)
    share = len(drawn) * p
    allowed = 5 * math.sqrt(share * (1 - p)) if p < 1 else 0
    assert all(abs(n - share) <= allowed for n in counts.values()), counts.most_common(3)


def test_lengths_are_exact_and_strings_differ() -> None:
    assert [len(random_string(n)) for n in (0, 1, 6, 32, 255, 5000)] == [0, 1, 6, 32, 255, 5000]
    assert len({random_string(16) for _ in range(1000)}) == 1000


def test_drawn_from_the_os_csprng(monkeypatch: pytest.MonkeyPatch) -> None:
    # The bytes come from secrets (the OS), whatever `random` is seeded with; a short draw
    # (every byte dropped) draws again.
    calls = []

    def token_bytes(n: int) -> bytes:
        calls.append(n)
        return b"\xff" * n if len(calls) == 1 else bytes(range(n))

    monkeypatch.setattr(secrets, "token_bytes", token_bytes)
    assert random_string(10, string.digits) == "0123456789"
    assert len(calls) == 2


def test_refuses_an_alphabet_it_cannot_draw_from_evenly() -> None:
    for bad in ("", "aa", "é"):
        with pytest.raises(ValueError):
            random_string(4, bad)
