"""Operator commands: keys, associations (show, delete everything about a person), manual bind."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import signedjson.key
from sqlalchemy import delete, select

from sydent_lite.config import Config
from sydent_lite.errors import MatrixError
from sydent_lite.resources import example_config
from sydent_lite.services.associations import AssociationService
from sydent_lite.services.hashing import load_pepper
from sydent_lite.services.lookup_confirmers import DatabaseConfirmer
from sydent_lite.services.lookup_index import LookupIndex
from sydent_lite.services.onbind_queue import OnbindQueue
from sydent_lite.signing import ServerSigner, load_or_create_signing_key
from sydent_lite.storage.association_changes import AssociationChangeStore
from sydent_lite.storage.associations import AssociationStore
from sydent_lite.storage.database import migrate, open_database
from sydent_lite.storage.invites import InviteStore
from sydent_lite.storage.state import ServerStateStore
from sydent_lite.storage.tables import (
    accepted_terms,
    accounts,
    associations,
    invites,
    onbind_callbacks,
    validation_sessions,
)
from sydent_lite.threepids import is_valid_user_id, normalise_email, parse_phone_number


def generate_config(server_name: str | None) -> str:
    """The documented example config, with `server_name`/`public_baseurl` filled in."""
    text = example_config().read_text(encoding="utf-8")
    if server_name:
        text = text.replace("server_name: id.example.org", f"server_name: {server_name}", 1)
        text = text.replace("public_baseurl: https://id.example.org", f"public_baseurl: https://{server_name}", 1)
    return text


def show_key(config: Config) -> str:
    if not Path(config.signing_key_path).exists():
        raise FileNotFoundError(f"no signing key at {config.signing_key_path} yet: `keys generate` or `serve` creates it")
    signer = ServerSigner(config.effective_server_name, load_or_create_signing_key(config.signing_key_path))
    return f"{signer.key_id} {signer.public_key_base64}"


def generate_key(path: str | Path) -> str:
    """Write a new key file; refuses to replace one (every signature made depends on it)."""
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} exists: refusing to replace the key every signature depends on")
    key = load_or_create_signing_key(path)
    return f"{key.alg}:{key.version} {signedjson.key.encode_verify_key_base64(signedjson.key.get_verify_key(key))}"


def stored_address(medium: str, address: str) -> str:
    if medium == "email":
        return normalise_email(address)
    if medium == "msisdn":
        # Given as digits (E.164 without +) or in international form.
        return parse_phone_number("", address if address.startswith("+") else "+" + address).msisdn
    raise MatrixError(400, "M_UNRECOGNIZED", f"unknown medium {medium!r}")


@dataclass
class Removed:
    associations: list[dict] = field(default_factory=list)
    invites: int = 0
    callbacks: int = 0
    sessions: int = 0
    tokens: int = 0
    terms: int = 0

    def report(self) -> str:
        lines = [f"associations removed: {len(self.associations)}"]
        lines += [f"  {a['medium']} {a['address']} -> {a['mxid']}" for a in self.associations]
        lines += [
            f"pending invites removed: {self.invites}",
            f"undelivered onbind callbacks removed: {self.callbacks}",
            f"validation sessions removed: {self.sessions}",
            f"access tokens removed: {self.tokens}",
            f"terms acceptances removed: {self.terms}",
        ]
        return "\n".join(lines)


async def _with_engine(config: Config, work):  # type: ignore[no-untyped-def]
    engine = open_database(config.database.url)
    try:
        await migrate(engine)
        return await work(engine)
    finally:
        await engine.dispose()


async def show_associations(config: Config, *, medium: str | None, address: str | None, mxid: str | None) -> list[dict]:
    async def work(engine):  # type: ignore[no-untyped-def]
        query = select(associations.c.medium, associations.c.address, associations.c.mxid, associations.c.ts)
        if mxid is not None:
            query = query.where(associations.c.mxid == mxid)
        else:
            assert medium is not None and address is not None
            query = query.where(associations.c.medium == medium, associations.c.address == stored_address(medium, address))
        async with engine.connect() as conn:
            return [dict(r) for r in (await conn.execute(query.order_by(associations.c.ts))).mappings()]

    return await _with_engine(config, work)


async def delete_person(config: Config, *, medium: str | None, address: str | None, mxid: str | None) -> Removed:
    """Everything stored about one 3PID, or about one Matrix user and all their 3PIDs."""

    async def work(engine):  # type: ignore[no-untyped-def]
        removed = Removed()
        async with engine.begin() as conn:
            if mxid is not None:
                rows = (await conn.execute(select(associations.c.medium, associations.c.address, associations.c.mxid)
                                           .where(associations.c.mxid == mxid))).mappings().all()
                threepids = [(r["medium"], r["address"]) for r in rows]
            else:
                assert medium is not None and address is not None
                threepids = [(medium, stored_address(medium, address))]
                rows = (await conn.execute(select(associations.c.medium, associations.c.address, associations.c.mxid)
                                           .where(associations.c.medium == threepids[0][0],
                                                  associations.c.address == threepids[0][1]))).mappings().all()
            removed.associations = [dict(r) for r in rows]
            for m, a in threepids:
                await conn.execute(delete(associations).where(associations.c.medium == m, associations.c.address == a))
                callback_ids = [r[0] for r in await conn.execute(
                    select(invites.c.callback_id).where(invites.c.medium == m, invites.c.address == a,
                                                        invites.c.callback_id.is_not(None),
                                                        # a delivered invite's id may be reused (SQLite)
                                                        invites.c.delivered_ts.is_(None)))]
                if callback_ids:
                    result = await conn.execute(delete(onbind_callbacks).where(onbind_callbacks.c.id.in_(callback_ids)))
                    removed.callbacks += result.rowcount
                result = await conn.execute(delete(invites).where(invites.c.medium == m, invites.c.address == a))
                removed.invites += result.rowcount
                result = await conn.execute(
                    delete(validation_sessions).where(validation_sessions.c.medium == m, validation_sessions.c.address == a))
                removed.sessions += result.rowcount
            if mxid is not None:
                removed.tokens = (await conn.execute(delete(accounts).where(accounts.c.user_id == mxid))).rowcount
                removed.terms = (await conn.execute(delete(accepted_terms).where(accepted_terms.c.user_id == mxid))).rowcount
        return removed

    return await _with_engine(config, work)


async def bind_by_hand(config: Config, *, medium: str, address: str, mxid: str) -> dict:
    """Bind as an operator (as Sydent's script does): sign and store, replacing any other."""
    if not is_valid_user_id(mxid):
        raise MatrixError(400, "M_INVALID_PARAM", f"{mxid!r} is not a Matrix user ID")
    address = stored_address(medium, address)

    async def work(engine):  # type: ignore[no-untyped-def]
        signer = ServerSigner(config.effective_server_name, load_or_create_signing_key(config.signing_key_path))
        store = AssociationStore(engine)
        pepper = await load_pepper(ServerStateStore(engine), store)
        # The same path as /bind: pending invites for the address are queued in the bind's
        # transaction; the running server's delivery loop picks the callback up from the database.
        onbind = OnbindQueue(signer, config.invites, InviteStore(engine))
        # No lookups here: the index stays empty (the running server sees the bind in its own).
        index = LookupIndex(AssociationChangeStore(engine), store, DatabaseConfirmer(store))
        return await AssociationService(store, signer, pepper, index, onbind).bind(medium, address, mxid)

    return await _with_engine(config, work)


def dumps(obj: object) -> str:
    return json.dumps(obj, indent=2, sort_keys=True)
