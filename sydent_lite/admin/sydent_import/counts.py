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
    associations_signature_repaired: int = 0  # ours was signed with another key: Sydent's put back
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
    lookup_pepper_from_sydent: int = 0
    sydent_rows_unreadable_skipped: int = 0
    # Rows of people erased here (`associations delete`): left out, so the erasure sticks.
    erased_associations_skipped: int = 0
    erased_sessions_skipped: int = 0
    erased_invites_skipped: int = 0
    erased_account_tokens_skipped: int = 0
    erased_terms_acceptances_skipped: int = 0

    def add_copied(self, kind: CopiedKind, imported: int, already_present: int) -> None:
        name_imported, name_present = f"{kind}_imported", f"{kind}_already_present"
        setattr(self, name_imported, getattr(self, name_imported) + imported)
        setattr(self, name_present, getattr(self, name_present) + already_present)

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    def lines(self) -> list[str]:
        """`name: count`, one per kind, as the command prints them; then why rows were left out."""
        lines = [f"{name}: {count}" for name, count in self.as_dict().items()]
        erased = sum(count for name, count in self.as_dict().items() if name.startswith("erased_"))
        if erased:
            lines.append(
                f"skipped {erased} row(s) of people erased here with `associations delete` (the erasure record "
                "holds hashes of their addresses and user IDs) - Sydent still holds them, the erasure stands"
            )
        return lines
