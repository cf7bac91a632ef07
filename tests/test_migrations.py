"""Schema migrations that rewrite data, on SQLite and PostgreSQL.

0006: validation tokens and SMS codes, stored in clear until then, are hashed in place, and
sessions count their wrong tokens; sessions pending during the upgrade still validate with the
code or link they were sent. 0007: invites lose their ephemeral private keys; an invitation
stored before it is still signed with the key its mail carries. Both can be downgraded.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import signedjson.key
import signedjson.sign
from sqlalchemy import inspect, text
from support.db import DatabaseFactory
from support.server import V1, SydentServer
from support.smtp import SmtpSink
from unpaddedbase64 import encode_base64

from sydent_lite.storage.database import Database, _alembic_config, migrate, open_database

NOW = 1_800_000_000_000  # far enough ahead that nothing here has expired when the test runs
LONG_TOKEN = "T" * 100  # email_token_length may be up to 255: longer than the new 64-character column


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def _alembic(database: Database, action: Callable[..., None], revision: str) -> None:
    async with database.begin() as conn:
        await conn.run_sync(lambda c: action(_alembic_config(c), revision))


async def upgrade(database: Database, revision: str) -> None:
    from alembic import command

    await _alembic(database, command.upgrade, revision)


async def downgrade(database: Database, revision: str) -> None:
    from alembic import command

    await _alembic(database, command.downgrade, revision)


async def columns(database: Database, table: str) -> set[str]:
    async with database.connect() as conn:
        return set(await conn.run_sync(lambda c: [col["name"] for col in inspect(c).get_columns(table)]))


async def rows(database: Database, sql: str) -> list[dict[str, Any]]:
    async with database.connect() as conn:
        return [dict(r) for r in (await conn.execute(text(sql))).mappings()]


def sha256(value: str) -> str:
    return hashlib.sha256(value.encode("utf-8")).hexdigest()


async def _before_0006(url: str, ephemeral: Any) -> None:
    """A database at 0005 holding what an older version stored in clear."""
    database = open_database(url)
    try:
        await upgrade(database, "0005")
        async with database.begin() as conn:
            insert = text(
                "INSERT INTO validation_sessions (sid, medium, address, client_secret_hash, token, send_attempt,"
                " next_link, brand, created_ts, mtime, validated, validated_at) VALUES (:sid, :medium, :address,"
                " :secret, :token, 1, NULL, NULL, :now, :now, :validated, NULL)"
            )
            for sid, medium, address, secret, token in (
                ("pendingmail", "email", "pending@example.test", "secretmail", LONG_TOKEN),
                ("pendingsms", "msisdn", "447700900123", "secretsms", "123456"),
            ):
                await conn.execute(
                    insert,
                    {
                        "sid": sid,
                        "medium": medium,
                        "address": address,
                        "secret": sha256(secret),
                        "token": token,
                        "now": NOW,
                        "validated": False,
                    },
                )
            await conn.execute(
                text(
                    "INSERT INTO invites (token, medium, address, room_id, sender, ephemeral_public_key,"
                    " ephemeral_private_key, created_ts) VALUES ('oldinvite', 'email', 'invitee@example.test',"
                    " '!room:hs.test', '@alice:hs.test', :public, :private, :now)"
                ),
                {
                    "public": encode_base64(ephemeral.verify_key.encode()),
                    "private": encode_base64(ephemeral.encode()),
                    "now": NOW,
                },
            )
    finally:
        await database.dispose()


async def _upgraded(url: str) -> tuple[set[str], set[str], list[dict[str, Any]]]:
    database = open_database(url)
    try:
        await migrate(database)
        sessions = await rows(database, "SELECT sid, token_hash, failed_attempts FROM validation_sessions ORDER BY sid")
        return await columns(database, "validation_sessions"), await columns(database, "invites"), sessions
    finally:
        await database.dispose()


def test_0006_and_0007_keep_what_was_pending(db_factory: DatabaseFactory, smtp_sink: SmtpSink, tmp_path: Path) -> None:
    db = db_factory.create()
    # Invites of that time kept standard base64 keys; one with "+" or "/" shows it still signs
    # now that new keys are URL-safe. (Each try has them with odds of about 3 in 4.)
    for _ in range(200):
        ephemeral = signedjson.key.generate_signing_key("0")
        if set(encode_base64(ephemeral.verify_key.encode())) & set("+/"):
            break
    run(_before_0006(db.url, ephemeral))

    session_columns, invite_columns, sessions = run(_upgraded(db.url))
    assert {"token_hash", "failed_attempts"} <= session_columns and "token" not in session_columns
    assert "ephemeral_private_key" not in invite_columns and "ephemeral_public_key" in invite_columns
    assert sessions == [
        {"sid": "pendingmail", "token_hash": sha256(LONG_TOKEN), "failed_attempts": 0},
        {"sid": "pendingsms", "token_hash": sha256("123456"), "failed_attempts": 0},
    ]

    server = SydentServer(
        tmp_path / "server", database_url=db.url, smtp_port=smtp_sink.port, ca_file=None, name="sydent_lite (migrated)"
    )
    server.start()
    try:
        c = server.client
        # The link mailed before the upgrade, and the code sent by SMS, still validate.
        resp = c.get(
            f"{V1}/validate/email/submitToken",
            params={"sid": "pendingmail", "client_secret": "secretmail", "token": LONG_TOKEN},
        )
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/html"), resp.text
        resp = c.post(
            f"{V1}/validate/msisdn/submitToken",
            json={"sid": "pendingsms", "client_secret": "secretsms", "token": "123456"},
        )
        assert resp.status_code == 200 and resp.json() == {"success": True}, resp.text
        # The invitation's key is gone from the database, but the one in its mail still signs;
        # no other key does.
        body = {"mxid": "@bob:hs.test", "token": "oldinvite", "private_key": encode_base64(ephemeral.encode())}
        resp = c.post(f"{V1}/sign-ed25519", json=body)
        assert resp.status_code == 200, resp.text
        signedjson.sign.verify_signed_json(resp.json(), server.server_name, signedjson.key.get_verify_key(ephemeral))
        other = encode_base64(signedjson.key.generate_signing_key("0").encode())
        resp = c.post(f"{V1}/sign-ed25519", json=dict(body, private_key=other))
        assert resp.status_code == 400 and resp.json()["errcode"] == "M_INVALID_PARAM", resp.text
    finally:
        server.stop()


async def _down_and_up(url: str) -> list[tuple[set[str], set[str]]]:
    database = open_database(url)
    seen = []
    try:
        await migrate(database)
        for step in (downgrade, upgrade):
            await step(database, "0005" if step is downgrade else "head")
            seen.append((await columns(database, "validation_sessions"), await columns(database, "invites")))
    finally:
        await database.dispose()
    return seen


def test_0006_and_0007_downgrade(db_factory: DatabaseFactory) -> None:
    down, up = run(_down_and_up(db_factory.create().url))
    assert "token" in down[0] and not {"token_hash", "failed_attempts"} & down[0]
    assert "ephemeral_private_key" in down[1]
    assert {"token_hash", "failed_attempts"} <= up[0] and "ephemeral_private_key" not in up[1]
