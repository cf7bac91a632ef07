"""Sydent's signing key: reading its file, and which key we serve once the import is done.

With Sydent's key, the signatures Sydent made (and that clients kept) stay valid: it is
installed as our key if we have none, and it must be the one we have otherwise. Without it,
our key (created if needed, as `serve` would) signs what Sydent signed.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import signedjson.key
from signedjson.types import SigningKey
from unpaddedbase64 import encode_base64

from sydent_lite.admin.sydent_import.errors import SigningKeyMismatch, SydentImportError
from sydent_lite.signing import load_or_create_signing_key, write_key_file

logger = logging.getLogger(__name__)

_HEX_SEED = re.compile(r"^[0-9a-fA-F]{64}$")


def read_signing_key_file(path: Path) -> SigningKey:
    """Sydent's key: a one-line key file ("ed25519 <version> <base64 seed>", as ours and
    Synapse's), or sydent.conf itself (`ed25519.signingkey = ed25519 0 <seed>`, or the old
    hex-only form, which Sydent reads as version 0)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"no signing key file at {path}") from None
    except OSError as e:
        raise SydentImportError(f"cannot read the signing key file {path}: {e.strerror}") from None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        if not line.startswith("ed25519 "):
            name, sep, value = line.partition("=")
            if not sep:
                break
            if name.strip() != "ed25519.signingkey":
                continue  # another sydent.conf setting
            line = value.strip()
        parts = line.split()
        try:
            if len(parts) == 3 and parts[0] == "ed25519":
                return signedjson.key.decode_signing_key_base64(parts[0], parts[1], parts[2])
            if len(parts) == 1 and _HEX_SEED.match(parts[0]):
                seed = encode_base64(bytes.fromhex(parts[0]))
                return signedjson.key.decode_signing_key_base64(signedjson.key.NACL_ED25519, "0", seed)
        except ValueError:  # bad base64 or seed length (nacl's errors are ValueErrors)
            pass
        break
    raise SydentImportError(
        f"{path} holds no signing key in 'ed25519 <version> <base64 seed>' format"
        " (or sydent.conf's 'ed25519.signingkey = ...')"
    )


def same_key(a: SigningKey, b: SigningKey) -> bool:
    return (a.alg, a.version, bytes(a.encode())) == (b.alg, b.version, bytes(b.encode()))


@dataclass(frozen=True)
class ServingKey:
    """The key we serve from now on, and what becomes of Sydent's."""

    key: SigningKey
    sydents: SigningKey | None  # the key given with --signing-key; None: ours serves
    install_at: Path | None  # where Sydent's key goes (we had none); None: nothing to write

    @property
    def already_present(self) -> bool:
        """Sydent's key was given, and it is already ours."""
        return self.sydents is not None and self.install_at is None


def choose_serving_key(our_key_path: Path, sydent_key_file: Path | None) -> ServingKey:
    """Sydent's key if given (SigningKeyMismatch if we hold another), else ours (created if
    there is none). Nothing is written yet: see `install`."""
    if sydent_key_file is None:
        return ServingKey(load_or_create_signing_key(our_key_path), None, None)
    sydents = read_signing_key_file(Path(sydent_key_file))
    if not our_key_path.exists():
        return ServingKey(sydents, sydents, our_key_path)
    ours = load_or_create_signing_key(our_key_path)
    if not same_key(ours, sydents):
        raise SigningKeyMismatch(
            f"{our_key_path} (signing_key_path) holds a different key ({ours.alg}:{ours.version}) than "
            f"{sydent_key_file} ({sydents.alg}:{sydents.version}); refusing to import: "
            f"signatures made with either key would stop verifying. Move {our_key_path} away "
            "(if nothing was signed with it yet) and run again."
        )
    return ServingKey(sydents, sydents, None)


def install(serving: ServingKey) -> bool:
    """Write Sydent's key as ours, if it is to be installed; True if it was."""
    if serving.install_at is None:
        return False
    try:
        write_key_file(serving.install_at, serving.key)
    except FileExistsError:
        raise SigningKeyMismatch(f"{serving.install_at} appeared while importing; run again") from None
    logger.info("installed Sydent's signing key %s:%s at %s", serving.key.alg, serving.key.version, serving.install_at)
    return True
