"""Choosing the association to import for each 3PID, and the signed JSON it goes with.

Sydent keeps one row per 3PID in `local_threepid_associations` and possibly several in
`global_threepid_associations`; we keep one, the newest. Its signed JSON is Sydent's
`sgAssoc` when it has one that verifies with the key we serve (or, for an association Sydent
got from a replication peer, the peer's signature, verbatim); else the association re-signed
(ed25519 is deterministic: with Sydent's key the signature is the one Sydent made). An
unbinding newer than every binding imports nothing.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple

import signedjson.key
import signedjson.sign
from canonicaljson import encode_canonical_json
from signedjson.types import SigningKey

from sydent_lite.admin.sydent_import.errors import SydentImportError
from sydent_lite.admin.sydent_import.read import SydentAssociation, SydentSource
from sydent_lite.signing import ServerSigner
from sydent_lite.threepids import stored_address

logger = logging.getLogger(__name__)


class ChosenAssociation(NamedTuple):  # a tuple: cheap to make and to pickle back from the worker
    medium: str
    address: str
    mxid: str
    ts: int
    not_before: int
    not_after: int
    signed_json: str
    resigned: bool


@dataclass
class PlannedBatch:
    chosen: list[ChosenAssociation]
    unbound: int
    unusable: int
    signed_as: list[str]  # names first seen signed in this batch


class AssociationPlanner:
    """Chooses the association of each 3PID, one batch of 3PIDs at a time, and counts what it
    leaves out. `own_names`: the names Sydent's own associations were pushed under (`own_names`)."""

    def __init__(self, signer: ServerSigner, own_names: set[str]) -> None:
        self.signer = signer
        self.own_names = own_names
        self.unbound = 0  # 3PIDs whose newest row is an unbinding
        self.unusable = 0  # a peer's association without a signature we could keep
        self._signed_as: dict[str, None] = {}  # the names Sydent's own signatures were made under

    def plan(self, groups: Iterable[list[SydentAssociation]]) -> list[ChosenAssociation]:
        """The association to import of each 3PID (a group: all its rows), signed."""
        chosen_all = []
        for rows in groups:
            newest = max(rows, key=_rank)
            if newest.mxid is None:
                self.unbound += 1
                continue
            chosen = _signed(newest, rows, self.signer, self.own_names, self._signed_as)
            if chosen is None:
                self.unusable += 1
            else:
                chosen_all.append(chosen)
        return chosen_all

    def plan_counted(self, groups: Iterable[list[SydentAssociation]]) -> PlannedBatch:
        """`plan`, with what it counted for this batch (for a planner in another process)."""
        unbound, unusable, names = self.unbound, self.unusable, len(self._signed_as)
        chosen = self.plan(groups)
        return PlannedBatch(chosen, self.unbound - unbound, self.unusable - unusable, list(self._signed_as)[names:])

    def absorb(self, planned: PlannedBatch) -> list[ChosenAssociation]:
        """Count what another process's planner counted; returns its associations."""
        self.unbound += planned.unbound
        self.unusable += planned.unusable
        self._signed_as.update(dict.fromkeys(planned.signed_as))
        return planned.chosen

    def warn_of_names(self) -> None:
        for name in self._signed_as:
            if name != self.signer.server_name:
                logger.warning(
                    "Sydent signed associations as %r but server_name is %r: clients check the signature "
                    "against the server they asked; set server_name to Sydent's server.name",
                    name,
                    self.signer.server_name,
                )


def own_names(source: SydentSource, signer: ServerSigner) -> set[str]:
    """The names Sydent pushed its own associations under (its server_name), and ours: the
    origins of global rows that copy a local binding. Only the origins that are not ours
    already need a pass over the associations, which stops once each is known to be own."""
    names = {signer.server_name}
    open_origins = source.origins() - names
    if not open_origins:
        return names
    for rows in source.association_groups(signatures=False):
        for local in rows:
            if local.origin is not None or local.mxid is None:
                continue
            for g in rows:
                if g.origin in open_origins and _same_binding(g, local):
                    names.add(g.origin)
                    open_origins.discard(g.origin)
        if not open_origins:
            break
    return names


def check_sydent_signed(source: SydentSource, own: set[str], sydent_key: SigningKey) -> None:
    """SydentImportError if `sydent_key` (given with --signing-key) signed none of the
    associations Sydent signed: it is not Sydent's key. Stops at the first it signed."""
    own_signed = 0
    for g in source.global_associations():
        if g.origin in own and (sg := _parse_sg(g)) is not None:
            if _signed_by(sg, sydent_key):
                return
            own_signed += 1
    if own_signed:
        raise SydentImportError(
            f"the signing key given ({sydent_key.alg}:{sydent_key.version}) did not sign any of the "
            f"{own_signed} associations Sydent signed: is it Sydent's key?"
        )


def _signed(
    newest: SydentAssociation,
    rows: list[SydentAssociation],
    signer: ServerSigner,
    own_names: set[str],
    signed_as: dict[str, None],
) -> ChosenAssociation | None:
    """The binding `newest` with the signed JSON we keep for it, or None if there is none
    (a peer's association whose signature did not come along)."""
    own = newest.origin is None or newest.origin in own_names
    row, sg = _signed_copy(newest, rows)
    if sg is not None and not own:
        return _chosen(row, row.sg_assoc, resigned=False)  # from a replication peer: its signature, verbatim
    if sg is not None:
        name = _signed_by(sg, signer.key)
        if name is not None:
            signed_as[name] = None
            return _chosen(row, row.sg_assoc, resigned=False)
    if not own:
        return None
    unsigned = {
        "medium": row.medium,
        "address": row.address,
        "mxid": row.mxid,
        "ts": row.ts,
        "not_before": row.not_before,
        "not_after": row.not_after,
    }
    return _chosen(row, json.dumps(signer.sign(unsigned)), resigned=True)


def _chosen(row: SydentAssociation, signed_json: str | None, *, resigned: bool) -> ChosenAssociation:
    # A binding (mxid set) always has its times (read.py), and a parsed sgAssoc its text.
    assert row.mxid is not None and row.not_before is not None and row.not_after is not None
    assert signed_json is not None
    return ChosenAssociation(
        row.medium, row.address, row.mxid, row.ts, row.not_before, row.not_after, signed_json, resigned
    )


def _signed_copy(
    newest: SydentAssociation, rows: list[SydentAssociation]
) -> tuple[SydentAssociation, dict[str, Any] | None]:
    """The row whose signed JSON stands for the binding, with that JSON parsed (None: none
    that says what the row says). For a local binding, Sydent's signed copy of it in the
    global table, if its pusher got that far."""
    sg = _parse_sg(newest)
    if sg is None and newest.origin is None:
        for g in rows:
            if g.origin is not None and _same_binding(g, newest) and (g_sg := _parse_sg(g)) is not None:
                return g, g_sg
    return newest, sg


def _parse_sg(a: SydentAssociation) -> dict[str, Any] | None:
    """Sydent's signed JSON for this row if it parses and says what the row says."""
    if not a.sg_assoc:
        return None
    try:
        sg = json.loads(a.sg_assoc)
    except ValueError:
        return None
    if not isinstance(sg, dict) or not isinstance(sg.get("address"), str):
        return None
    same = (
        sg.get("medium") == a.medium
        and stored_address(a.medium, sg["address"]) == a.address
        and sg.get("mxid") == a.mxid
        and sg.get("ts") == a.ts
        and sg.get("not_before") == a.not_before
        and sg.get("not_after") == a.not_after
    )
    return sg if same else None


def _signed_by(sg: dict[str, Any], key: SigningKey) -> str | None:
    """The server name under which `key` signed `sg`, or None."""
    key_id = f"{key.alg}:{key.version}"
    named = [
        (name, sigs[key_id])
        for name, sigs in (sg.get("signatures") or {}).items()
        if isinstance(sigs, dict) and key_id in sigs
    ]
    if not named:
        return None
    # ed25519 is deterministic: signing the JSON again makes the signature the key made, and
    # signing costs a third of verifying (the import's largest cost). One that differs may
    # still verify (another signer's nonce, another base64 form): it is verified as before.
    try:
        message = encode_canonical_json({k: v for k, v in sg.items() if k not in ("signatures", "unsigned")})
    except (TypeError, ValueError):
        return None  # not JSON that a signature could have been made over
    ours = base64.b64encode(key.sign(message).signature).rstrip(b"=").decode()  # unpadded, as signedjson
    verify_key = None
    for name, signature in named:
        if signature == ours:
            return str(name)
        verify_key = verify_key or signedjson.key.get_verify_key(key)
        try:
            signedjson.sign.verify_signed_json(sg, name, verify_key)
        except (signedjson.sign.SignatureVerifyException, ValueError):
            continue
        return str(name)
    return None


def _same_binding(a: SydentAssociation, b: SydentAssociation) -> bool:
    return (a.key, a.mxid, a.ts, a.not_before, a.not_after) == (b.key, b.mxid, b.ts, b.not_before, b.not_after)


def _rank(a: SydentAssociation) -> tuple[int, int]:
    # Newest first; at equal ts an unbinding beats a binding, and Sydent's signed copy
    # (global) beats the unsigned local row of the same binding.
    return (a.ts, 3 if a.mxid is None else (2 if a.origin is not None else 1))


# --- planning in a worker process ------------------------------------------------------------------

_worker: AssociationPlanner | None = None


def start_worker(server_name: str, alg: str, version: str, seed_base64: str, own: set[str]) -> None:
    """ProcessPoolExecutor initializer: the planner of this (worker) process."""
    global _worker
    key = signedjson.key.decode_signing_key_base64(alg, version, seed_base64)
    _worker = AssociationPlanner(ServerSigner(server_name, key), own)


def plan_in_worker(groups: list[list[SydentAssociation]]) -> PlannedBatch:
    assert _worker is not None, "start_worker first"
    return _worker.plan_counted(groups)
