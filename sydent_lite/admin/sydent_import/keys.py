"""Sydent's signing key: reading its file, and which key we serve once the import is done.

With Sydent's key, the signatures Sydent made (and that clients kept) stay valid: it is
installed as our key if we have none, and it must be the one we have otherwise. Without it,
the key we have must be Sydent's (it signed Sydent's associations: a rerun), or the operator
asks for a new one in so many words (--new-signing-key), which then signs what Sydent signed.
"""

from __future__ import annotations

import configparser
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import signedjson.key
from signedjson.types import SigningKey
from unpaddedbase64 import encode_base64

from sydent_lite.admin.sydent_import.errors import SigningKeyMismatch, SydentImportError
from sydent_lite.admin.sydent_import.ownership import give_to_folder_owner
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
    if re.search(r"^\s*\[", text, re.MULTILINE):  # an INI file: sydent.conf, read as Sydent does
        parser = configparser.ConfigParser(interpolation=None)
        try:
            parser.read_string(text, source=str(path))
        except configparser.Error as e:
            raise SydentImportError(f"cannot read {path} as Sydent does: {e}") from None
        value = parser.get("crypto", "ed25519.signingkey", fallback="")
        key = parse_signing_key_value(value) if value.strip() else None
        if key is not None:
            return key
    else:
        lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
        key = parse_signing_key_value(lines[0]) if lines else None
        if key is not None:
            return key
    raise SydentImportError(
        f"{path} holds no signing key in 'ed25519 <version> <base64 seed>' format"
        " (or sydent.conf's 'ed25519.signingkey = ...')"
    )


def parse_signing_key_value(value: str) -> SigningKey | None:
    """`[crypto] ed25519.signingkey` as Sydent reads it (sydent/config/crypto.py): "ed25519
    <version> <base64 seed>", or the old hex-only seed (version 0). None: neither."""
    parts = value.split()
    try:
        if len(parts) == 3 and parts[0] == "ed25519":
            return signedjson.key.decode_signing_key_base64(parts[0], parts[1], parts[2])
        if len(parts) == 1 and _HEX_SEED.match(parts[0]):
            seed = encode_base64(bytes.fromhex(parts[0]))
            return signedjson.key.decode_signing_key_base64(signedjson.key.NACL_ED25519, "0", seed)
    except ValueError:  # bad base64 or seed length (nacl's errors are ValueErrors)
        pass
    return None


def same_key(a: SigningKey, b: SigningKey) -> bool:
    return (a.alg, a.version, bytes(a.encode())) == (b.alg, b.version, bytes(b.encode()))


@dataclass(frozen=True)
class ServingKey:
    """The key we serve from now on, and what becomes of Sydent's."""

    key: SigningKey
    sydents: SigningKey | None  # the key given with --signing-key; None: ours serves
    install_at: Path | None  # where the key goes (we had none); None: nothing to write

    @property
    def already_present(self) -> bool:
        """Sydent's key was given, and it is already ours."""
        return self.sydents is not None and self.install_at is None


def choose_serving_key(our_key_path: Path, sydents: SigningKey | None, given_as: str, new_key: bool) -> ServingKey:
    """Sydent's key if given (SigningKeyMismatch if we hold another). Without it: our key if we
    have one (the plan then checks it is Sydent's, unless `new_key`), or, only with `new_key`
    (the operator asked in so many words), a new one. Nothing is written yet: see `install`."""
    if sydents is None:
        if our_key_path.exists():
            return ServingKey(load_or_create_signing_key(our_key_path), None, None)
        if not new_key:
            raise SydentImportError(
                "no Sydent signing key: give --signing-key (Sydent's sydent.conf, whose [crypto] ed25519.signingkey "
                "holds it) so that the signatures clients kept from Sydent stay valid; or, to sign everything anew "
                "with a new key of ours (those signatures stop verifying), --new-signing-key"
            )
        return ServingKey(signedjson.key.generate_signing_key("0"), None, our_key_path)
    if not our_key_path.exists():
        return ServingKey(sydents, sydents, our_key_path)
    ours = load_or_create_signing_key(our_key_path)
    if not same_key(ours, sydents):
        raise SigningKeyMismatch(
            f"{our_key_path} (signing_key_path) holds a different key ({ours.alg}:{ours.version}) than "
            f"{given_as} ({sydents.alg}:{sydents.version}); refusing to import: "
            f"signatures made with either key would stop verifying. Move {our_key_path} away "
            "(if nothing was signed with it yet) and run again: the rerun puts Sydent's signatures back."
        )
    return ServingKey(sydents, sydents, None)


def install(serving: ServingKey) -> bool:
    """Write the key we serve (Sydent's, or a new one asked for), if it is to be installed;
    True if Sydent's was. Owned like the folder it goes in (ownership.py)."""
    if serving.install_at is None:
        return False
    try:
        write_key_file(serving.install_at, serving.key)
    except FileExistsError:
        raise SigningKeyMismatch(f"{serving.install_at} appeared while importing; run again") from None
    give_to_folder_owner(serving.install_at)
    whose = "Sydent's" if serving.sydents is not None else "a new"
    logger.info("installed %s signing key %s:%s at %s", whose, serving.key.alg, serving.key.version, serving.install_at)
    return serving.sydents is not None
