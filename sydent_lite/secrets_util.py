"""Random tokens, secret hashing and constant-time comparison."""

from __future__ import annotations

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
    return "".join(secrets.choice(alphabet) for _ in range(length))


def hash_secret(value: str) -> str:
    """SHA-256 hex of a secret, so the database never holds it in the clear."""
    return hashlib.sha256(value.encode("utf-8")).hexdigest()


def secrets_equal(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode("utf-8"), b.encode("utf-8"))


def now_ms() -> int:
    return int(time.time() * 1000)
