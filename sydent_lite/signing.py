"""Our long-term ed25519 signing key: loading, creating and signing JSON with it."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import signedjson.key
import signedjson.sign
from signedjson.types import SigningKey
from unpaddedbase64 import encode_base64

logger = logging.getLogger(__name__)


class SigningKeyError(Exception):
    pass


def _reject_floats(value: Any, path: str = "") -> None:
    # canonicaljson 2.x encodes floats; the spec's canonical JSON forbids them.
    if isinstance(value, float):
        raise ValueError(f"floats cannot be signed (at {path or 'top level'})")
    if isinstance(value, dict):
        for k, v in value.items():
            _reject_floats(v, f"{path}.{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _reject_floats(v, f"{path}[{i}]")


class ServerSigner:
    """Signs JSON objects as `server_name` with the key `ed25519:<version>`."""

    def __init__(self, server_name: str, key: SigningKey) -> None:
        self.server_name = server_name
        self.key = key
        self.key_id = f"{key.alg}:{key.version}"
        self.public_key_base64 = encode_base64(key.verify_key.encode())

    def sign(self, obj: dict[str, Any]) -> dict[str, Any]:
        _reject_floats(obj)
        return signedjson.sign.sign_json(dict(obj), self.server_name, self.key)


def load_or_create_signing_key(path: str | Path) -> SigningKey:
    """Read a key file in Synapse/Sydent format ("ed25519 <version> <seed>"), creating it if absent."""
    path = Path(path)
    try:
        exists = path.exists()
    except PermissionError:  # a folder on the way we may not enter
        raise SigningKeyError(
            f"cannot reach signing key file {path}: permission denied on a folder on its way"
            f" (this process runs as uid {os.geteuid()})"
        ) from None
    if exists:
        try:
            text = path.read_text()
        except PermissionError:
            raise SigningKeyError(_unreadable(path)) from None
        except OSError as e:
            raise SigningKeyError(f"cannot read signing key file {path}: {e.strerror}") from None
        try:
            keys = signedjson.key.read_signing_keys(text.splitlines())
        except Exception:
            raise SigningKeyError(
                f"signing key file {path} is not in 'ed25519 <version> <base64 seed>' format"
            ) from None
        if not keys:
            raise SigningKeyError(f"signing key file {path} holds no key")
        return keys[0]
    key = signedjson.key.generate_signing_key("0")
    write_key_file(path, key)
    logger.info("created a new signing key at %s", path)
    return key


def _unreadable(path: Path) -> str:
    """Why we cannot read the key file, with who owns it and who we are (the usual cause: an
    operator command run as root wrote it, and the server runs as its own user)."""
    import pwd

    def user(uid: int) -> str:
        try:
            return pwd.getpwuid(uid).pw_name
        except KeyError:
            return str(uid)

    st = path.stat()
    return (
        f"cannot read signing key file {path}: permission denied (owner {user(st.st_uid)}, mode "
        f"{st.st_mode & 0o777:03o}; this process runs as {user(os.geteuid())}): "
        f"`chown {user(os.geteuid())}: {path}`, or run operator commands as the service user"
    )


def write_key_file(path: str | Path, key: SigningKey) -> None:
    """Write `key` in the one-line format to a new file (FileExistsError if there is one:
    a key every signature depends on is never replaced)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Written with 0600 from the start: the seed is the server's identity.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        signedjson.key.write_signing_keys(f, [key])
