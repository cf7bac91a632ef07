"""Operator commands: keys, associations (show, delete everything about a person), manual bind."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import signedjson.key

from sydent_lite.config import Config
from sydent_lite.context import load_signer, operator_context
from sydent_lite.errors import ErrorCode, MatrixError
from sydent_lite.resources import example_config
from sydent_lite.signing import load_or_create_signing_key
from sydent_lite.storage.people import MatrixUser, Person, Removed, ThreePid
from sydent_lite.threepids import is_valid_user_id, normalise_address


def generate_config(server_name: str | None) -> str:
    """The documented example config, with `server_name`, `public_baseurl` and `email.from`
    (noreply@ the server's host) filled in."""
    text = example_config().read_text(encoding="utf-8")
    if server_name:
        text = text.replace("server_name: id.example.org", f"server_name: {server_name}", 1)
        text = text.replace("public_baseurl: https://id.example.org", f"public_baseurl: https://{server_name}", 1)
        host = server_name.rsplit(":", 1)[0] if not server_name.endswith("]") else server_name
        text = text.replace("noreply@id.example.org", f"noreply@{host}", 1)
    return text


def show_key(config: Config) -> str:
    if not Path(config.signing_key_path).exists():
        raise FileNotFoundError(
            f"no signing key at {config.signing_key_path} yet: `keys generate` or `serve` creates it"
        )
    signer = load_signer(config)
    return f"{signer.key_id} {signer.public_key_base64}"


def generate_key(path: str | Path) -> str:
    """Write a new key file; refuses to replace one (every signature made depends on it)."""
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} exists: refusing to replace the key every signature depends on")
    key = load_or_create_signing_key(path)
    return f"{key.alg}:{key.version} {signedjson.key.encode_verify_key_base64(signedjson.key.get_verify_key(key))}"


def person_as_typed(*, medium: str | None, address: str | None, mxid: str | None) -> Person:
    """Who a command is about: a Matrix user ID as given (not checked: whatever got stored must
    be reachable), else a medium and an address, checked and in its stored form (MatrixError)."""
    if mxid is not None:
        return MatrixUser(mxid)
    if medium is None or address is None:
        raise ValueError("a person is a Matrix user ID, or a medium and an address")
    return ThreePid(medium, normalise_address(medium, address))


def removed_report(removed: Removed) -> str:
    lines = [f"associations removed: {len(removed.associations)}"]
    lines += [f"  {b.medium} {b.address} -> {b.mxid}" for b in removed.associations]
    lines += [
        f"pending invites removed: {removed.invites}",
        f"undelivered onbind callbacks removed: {removed.callbacks}",
        f"validation sessions removed: {removed.sessions}",
        f"access tokens removed: {removed.tokens}",
        f"terms acceptances removed: {removed.terms}",
    ]
    return "\n".join(lines)


async def show_associations(config: Config, person: Person) -> list[dict[str, Any]]:
    async with operator_context(config) as ctx:
        return [dataclasses.asdict(b) for b in await ctx.people.associations_of(person)]


async def delete_person(config: Config, person: Person) -> Removed:
    """Everything stored about one 3PID, or about one Matrix user and all their 3PIDs."""
    async with operator_context(config) as ctx:
        return await ctx.people.delete_person(person)


async def bind_by_hand(config: Config, *, medium: str, address: str, mxid: str) -> dict[str, Any]:
    """Bind as an operator (as Sydent's script does): sign and store, replacing any other. The
    same path as /bind: the address's pending invites are queued for the homeserver with it."""
    if not is_valid_user_id(mxid):
        raise MatrixError(400, ErrorCode.INVALID_PARAM, f"{mxid!r} is not a Matrix user ID")
    address = normalise_address(medium, address)
    async with operator_context(config) as ctx:
        associations = await ctx.associations()
        return await associations.bind(medium, address, mxid)


def dumps(obj: object) -> str:
    return json.dumps(obj, indent=2, sort_keys=True)
