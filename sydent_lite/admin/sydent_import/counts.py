"""What an import did, counted per kind of record (the command prints one line per count)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

# The tables copied row by row, each counted as "<name>_imported" and "<name>_already_present".
CopiedKind = Literal["invites", "ephemeral_keys", "sessions", "account_tokens", "terms_acceptances"]


@dataclass
class ImportCounts:
    """In the order the command prints them."""

    associations_imported: int = 0
    associations_already_present: int = 0
    associations_newer_here_kept: int = 0
    associations_resigned: int = 0
    associations_unbound_in_sydent: int = 0
    associations_unusable_skipped: int = 0
    invites_imported: int = 0
    invites_already_present: int = 0
    ephemeral_keys_imported: int = 0
    ephemeral_keys_already_present: int = 0
    sessions_imported: int = 0
    sessions_already_present: int = 0
    sessions_without_token_skipped: int = 0
    account_tokens_imported: int = 0
    account_tokens_already_present: int = 0
    terms_acceptances_imported: int = 0
    terms_acceptances_already_present: int = 0
    signing_key_imported: int = 0
    signing_key_already_present: int = 0
    sydent_rows_unreadable_skipped: int = 0

    def add_copied(self, kind: CopiedKind, imported: int, already_present: int) -> None:
        name_imported, name_present = f"{kind}_imported", f"{kind}_already_present"
        setattr(self, name_imported, getattr(self, name_imported) + imported)
        setattr(self, name_present, getattr(self, name_present) + already_present)

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    def lines(self) -> list[str]:
        """`name: count`, one per kind, as the command prints them."""
        return [f"{name}: {count}" for name, count in self.as_dict().items()]
