"""Long lists in batches (a statement's bound parameters are limited)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TypeVar

T = TypeVar("T")


def chunks(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    """`items` in consecutive slices of at most `size` (itertools.batched, from Python 3.12)."""
    for i in range(0, len(items), size):
        yield items[i : i + size]
