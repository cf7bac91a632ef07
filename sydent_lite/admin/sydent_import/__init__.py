"""`sydent-lite import-sydent`: move a Sydent server's data (its SQLite database) here.

What Sydent keeps, and where it goes (Sydent 2.x schema, `sydent/db/*.sql` + `sqlitedb.py`):

- `local_threepid_associations` (medium, address, mxid, ts, notBefore, notAfter; one row per
  3PID, mxid NULL = unbound) and `global_threepid_associations` (the same plus originServer,
  originId and `sgAssoc`, the signed JSON; several rows per 3PID are possible, newest `ts`
  wins) -> `associations`, one row per 3PID: the newest association, `ts`/`not_before`/
  `not_after` kept, `signed_json` = Sydent's `sgAssoc` when it has one that verifies with the
  key we serve, else the association re-signed (ed25519 is deterministic: with Sydent's key
  the signature is the one Sydent made). Associations Sydent got from its replication peers
  keep their peer's signature. An unbinding newer than every binding imports nothing.
- `invite_tokens` -> `invites` (Sydent keeps no per-invite ephemeral key: "" for the public one;
  `received_ts`/`sent_ts` are in seconds in Sydent, milliseconds here).
- `ephemeral_public_keys` -> `ephemeral_public_keys` (`persistence_ts`, seconds).
- `threepid_validation_sessions` + `threepid_token_auths` (the latest token of a session) ->
  `validation_sessions`, sid = str(Sydent's integer id), client secret and token hashed.
- `accounts` + `tokens` -> `accounts` (one row per token, token hashed) and
  `accepted_terms_urls` -> `accepted_terms`.
- The signing key (`ed25519.signingkey` in sydent.conf) from `--signing-key FILE`.

Nothing in our database is overwritten by older data, and running the import twice changes
nothing. The Sydent database is opened read-only.

One module per step: `read` (Sydent's schema), `keys` (Sydent's key file, the key we serve),
`plan` (the association of each 3PID and its signature), `write` (into our tables), run in
that order by `importer.import_sydent`; `counts` is what the command prints. The associations
stream through read -> plan -> write in batches of whole 3PIDs (about 10,000 rows), inside the
one transaction: memory holds a batch, not Sydent's table.
"""

from sydent_lite.admin.sydent_import.counts import ImportCounts
from sydent_lite.admin.sydent_import.errors import SigningKeyMismatch, SydentImportError
from sydent_lite.admin.sydent_import.importer import import_sydent
from sydent_lite.admin.sydent_import.keys import read_signing_key_file
from sydent_lite.admin.sydent_import.read import SydentData, SydentSource

__all__ = [
    "ImportCounts",
    "SigningKeyMismatch",
    "SydentData",
    "SydentImportError",
    "SydentSource",
    "import_sydent",
    "read_signing_key_file",
]
