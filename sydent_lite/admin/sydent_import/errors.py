"""Why an import cannot go ahead."""

from __future__ import annotations

from sydent_lite.signing import SigningKeyError


class SydentImportError(Exception):
    """The import cannot go ahead; the message says why (nothing has been written)."""


class SigningKeyMismatch(SydentImportError, SigningKeyError):
    """Our signing key file holds a different key than the one given with --signing-key."""
