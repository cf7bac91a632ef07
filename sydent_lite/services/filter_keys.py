"""The lookup index's keys for lookup hashes: keyed, 32 bits, a whole lookup's at once.

A v2 lookup asks about up to 10,000 hashes, of which most are of nobody bound: the lookup
index sorts them out with a slot filter (services.lookup_index.SlotFilter), which needs a key
per hash. One Python call per hash (Python's `hash`, or CRC-32, then the slot, then the probe:
four C calls, each a new int object) cost ~0.45 ms per 1,000 hashes, a third of a lookup.
Here the lookup's hashes are joined into one buffer and keyed with numpy: ~0.08 ms per 1,000,
and the probe that follows is one gather (services.lookup_index).

The key is keyed, so that nobody can make up hashes that all pass the filter (each one that
passes costs a confirmation in the mxid table or the database): NH (the hash of UMAC,
RFC 4418's construction, ε-almost-universal with ε = 2^-32 for inputs of one length) over the
hash's 43 bytes, then multiply-shift (Dietzfelbinger: the top bits of a random odd multiple)
for the slot, since NH's low bits depend on the input's low bits alone. The secret is random
per index, or read from the snapshot that holds the filter (services.index_snapshot): every
process probing a shared filter keys as the one that wrote it.

Every lookup hash this server writes is 43 ASCII characters (unpadded base64 of SHA-256). A
string of another shape (a client's garbage; a row written by hand) gets a keyed BLAKE2b of
its UTF-8 instead, one call each: the same string gets the same key however it arrives.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterable

import numpy as np
import numpy.typing as npt

HASH_SIZE = 43  # unpadded base64 of a SHA-256 digest
_PADDED = 48  # 12 words of 32 bits for NH
_WORDS = _PADDED // 4
SECRET_SIZE = 4 * _WORDS + 8  # NH's key words and the multiplier

FilterKeyArray = npt.NDArray[np.uint32]


class HashKeys:
    """The keys of lookup hashes under one secret."""

    def __init__(self, secret: bytes) -> None:
        if len(secret) != SECRET_SIZE:
            raise ValueError(f"a filter key secret is {SECRET_SIZE} bytes")
        self.secret = bytes(secret)
        self._nh_key = np.frombuffer(secret[: 4 * _WORDS], dtype="<u4").astype(np.uint32)
        self._multiplier = np.uint64(int.from_bytes(secret[4 * _WORDS :], "little") | 1)

    @classmethod
    def random(cls) -> HashKeys:
        return cls(secrets.token_bytes(SECRET_SIZE))

    def __call__(self, values: Iterable[str]) -> FilterKeyArray:
        """The key of each of `values` (lookup hashes), in order."""
        hashes = values if isinstance(values, list | tuple) else list(values)
        n = len(hashes)
        joined = "".join(hashes)
        if len(joined) == HASH_SIZE * n and joined.isascii() and (n == 0 or max(map(len, hashes)) == HASH_SIZE):
            return self._of_joined(joined.encode("ascii"), n)
        # Some of another shape: the rest keyed together all the same, those one by one.
        keys = np.empty(n, dtype=np.uint32)
        regular: list[int] = []
        odd: list[int] = []
        for i, h in enumerate(hashes):
            (regular if len(h) == HASH_SIZE and h.isascii() else odd).append(i)
        if regular:
            keys[regular] = self._of_joined("".join(hashes[i] for i in regular).encode("ascii"), len(regular))
        keys[odd] = [self._odd(hashes[i]) for i in odd]
        return keys

    def _of_joined(self, data: bytes, n: int) -> FilterKeyArray:
        padded = np.zeros((n, _PADDED), dtype=np.uint8)
        padded[:, :HASH_SIZE] = np.frombuffer(data, dtype=np.uint8).reshape(n, HASH_SIZE)
        words = (padded.view("<u4") + self._nh_key).astype(np.uint64)  # + mod 2^32, then widened
        nh = (words[:, 0::2] * words[:, 1::2]).sum(axis=1, dtype=np.uint64)  # mod 2^64
        keys: FilterKeyArray = ((nh * self._multiplier) >> np.uint64(32)).astype(np.uint32)
        return keys

    def _odd(self, value: str) -> int:
        # surrogatepass: a lookup may carry any JSON string, lone surrogates too.
        digest = hashlib.blake2b(value.encode("utf-8", "surrogatepass"), digest_size=4, key=self.secret).digest()
        return int.from_bytes(digest, "little")
