"""Random tokens, secret hashing and constant-time comparison."""

from __future__ import annotations

import functools
import hashlib
import hmac
import re
import secrets
import string
import time

_ALPHANUMERIC = string.ascii_letters + string.digits

# sid, client_secret and invite tokens: spec "[0-9a-zA-Z.=_-]", 1 to 255 characters.
OPAQUE_ID_RE = re.compile(r"^[0-9a-zA-Z.=_-]{1,255}$")


def random_string(length: int, alphabet: str = _ALPHANUMERIC) -> str:
    """`length` characters of `alphabet` (ASCII), each uniform and independent, from the OS's
    CSPRNG: random bytes mapped onto the alphabet by one `translate` (in C), the bytes at or
    above the largest multiple of its size dropped so that no character is likelier than
    another. (secrets.choice per character cost ~1 us each: 7% of a requestToken.)"""
    table, dropped = _byte_map(alphabet)
    drawn = b""
    while len(drawn) < length:
        drawn += secrets.token_bytes(length + 16).translate(table, dropped)
    return drawn[:length].decode("ascii")


@functools.lru_cache(maxsize=16)
def _byte_map(alphabet: str) -> tuple[bytes, bytes]:
    """(byte -> character table, the bytes to drop) for `alphabet`."""
    size = len(alphabet)
    if not (alphabet.isascii() and 0 < size <= 256 and len(set(alphabet)) == size):
        raise ValueError("random_string needs up to 256 distinct ASCII characters")
    keep = 256 - 256 % size
    table = bytes(ord(alphabet[b % size]) for b in range(256))
    return table, bytes(range(keep, 256))


def hash_secret(value: str) -> str:
    """SHA-256 hex of a secret, so the database never holds it in the clear."""
    return hashlib.sha256(value.encode("utf-8")).hexdigest()


def secrets_equal(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode("utf-8"), b.encode("utf-8"))


def now_ms() -> int:
    return int(time.time() * 1000)
