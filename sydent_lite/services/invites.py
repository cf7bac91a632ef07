"""Invitations for 3PIDs not on Matrix yet (spec "Invitation storage", "Ephemeral invitation signing")."""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import quote, urlencode

import signedjson.key
import signedjson.sign
from unpaddedbase64 import encode_base64

from sydent_lite.config import Config, ConfigError
from sydent_lite.delivery.email import EmailSender, EmailSendError
from sydent_lite.errors import MatrixError, invalid_param
from sydent_lite.observability import metrics
from sydent_lite.secrets_util import now_ms, random_string, secrets_equal
from sydent_lite.signing import ServerSigner
from sydent_lite.storage.associations import AssociationStore
from sydent_lite.storage.invites import InviteStore, StoredInvite
from sydent_lite.templating import INVITE_TEMPLATE, TemplateStore
from sydent_lite.threepids import normalise_email, user_id_server

logger = logging.getLogger(__name__)

INVITE_TOKEN_LENGTH = 32
# Spec store-invite fields that reach templates even when absent (as "", as Sydent does).
OPTIONAL_FIELDS = (
    "room_alias", "room_avatar_url", "room_join_rules", "room_name", "sender_display_name",
    "sender_avatar_url", "room_type", "guest_access_token", "guest_user_id",
)
# Values put into the join link are cut short: SMTP refuses lines over 998 octets.
_LINK_FIELD_MAX = 64
_LINK_MAX = 900


class _Fields(dict):
    """%-format mapping for subjects: a field the request did not send reads as ""."""

    def __missing__(self, key: str) -> str:
        return ""


def check_subject_format(subject: str, key: str) -> None:
    try:
        subject % _Fields()
    except (ValueError, TypeError) as e:
        raise ConfigError(f"config key '{key}' is not a valid %-format string: {e}") from None


def redact_address(address: str) -> str:
    """`florence@bobs.burgers` -> `f...@b...`: enough for the inviter, never the address."""

    def cut(part: str) -> str:
        return part[0] + "..." if len(part) > 1 else "..."

    local, _, domain = address.rpartition("@")
    return f"{cut(local)}@{cut(domain)}" if local else cut(address)


class InviteService:
    def __init__(
        self,
        config: Config,
        store: InviteStore,
        associations: AssociationStore,
        signer: ServerSigner,
        templates: TemplateStore,
        email: EmailSender,
    ) -> None:
        self._config = config
        self._store = store
        self._associations = associations
        self._signer = signer
        self._templates = templates
        self._email = email

    @property
    def _expiry_ms(self) -> int:
        return self._config.invites.expiry_seconds * 1000

    async def store_invite(self, fields: dict[str, str], brand: str | None) -> dict[str, Any]:
        medium = fields["medium"]
        if medium != "email":
            raise MatrixError(400, "M_UNRECOGNIZED", "Only email invitations are supported")
        address = normalise_email(fields["address"])
        bound = await self._associations.get(medium, address)
        if bound is not None:
            raise MatrixError(400, "M_THREEPID_IN_USE", "This address is already bound to a Matrix ID", mxid=bound.mxid)

        token = random_string(INVITE_TOKEN_LENGTH)
        ephemeral = signedjson.key.generate_signing_key("0")
        ephemeral_public = encode_base64(ephemeral.verify_key.encode())
        ephemeral_private = encode_base64(ephemeral.encode())

        # The mail (its join link) is the private key's only copy: whoever holds it may sign.
        await self._send_invite_mail(fields, address, token, ephemeral_private, brand)
        await self._store.add(
            StoredInvite(
                token=token,
                medium=medium,
                address=address,
                room_id=fields["room_id"],
                sender=fields["sender"],
                ephemeral_public_key=ephemeral_public,
                created_ts=now_ms(),
            )
        )
        base = self._config.base_url
        logger.info("stored an invitation to an email address from a user of %s", user_id_server(fields["sender"]))
        return {
            "token": token,
            "display_name": redact_address(address),
            "public_keys": [
                {"public_key": self._signer.public_key_base64, "key_validity_url": f"{base}/_matrix/identity/v2/pubkey/isvalid"},
                {"public_key": ephemeral_public, "key_validity_url": f"{base}/_matrix/identity/v2/pubkey/ephemeral/isvalid"},
            ],
            "public_key": self._signer.public_key_base64,
        }

    def _join_link(self, fields: dict[str, str], address: str, token: str, ephemeral_private: str) -> str:
        sign_url = f"{self._config.base_url}/_matrix/identity/api/v1/sign-ed25519?" + urlencode(
            {"token": token, "private_key": ephemeral_private}
        )
        # The query Element's invite page reads (as Sydent builds it).
        params = {"email": address, "signurl": sign_url}
        location = self._config.email.web_client_location.rstrip("/")
        base = f"{location}/#/room/{quote(fields['room_id'], safe='')}"
        with_extras = dict(params)
        for key, field in (("room_name", "room_name"), ("inviter_name", "sender_display_name"), ("room_type", "room_type")):
            if fields.get(field):
                with_extras[key] = fields[field][:_LINK_FIELD_MAX]
        link = f"{base}?{urlencode(with_extras)}"
        # The extras only decorate Element's page: drop them before the link outgrows a mail line.
        return link if len(link) <= _LINK_MAX else f"{base}?{urlencode(params)}"

    async def _send_invite_mail(
        self, fields: dict[str, str], address: str, token: str, ephemeral_private: str, brand: str | None
    ) -> None:
        variables: dict[str, Any] = {name: "" for name in OPTIONAL_FIELDS}
        variables.update(fields)
        if not variables["sender_display_name"]:
            variables["sender_display_name"] = fields["sender"]
        room_name = variables["room_name"]
        variables.update(
            {
                "address": address,
                "token": token,
                "ephemeral_private_key": ephemeral_private,
                "web_client_location": self._config.email.web_client_location,
                "server_name": self._config.effective_server_name,
                "bracketed_room_name": f" ({room_name})" if room_name else "",
                "bracketed_verified_sender": f" ({fields['sender']})" if variables["sender_display_name"] else "",
                "join_link": self._join_link(fields, address, token, ephemeral_private),
            }
        )
        subject_format = (
            self._config.email.invite_subject_space
            if variables.get("room_type") == "m.space"
            else self._config.email.invite_subject
        )
        # Subjects are one line: the Subject header refuses line breaks.
        subject = " ".join((subject_format % _Fields(variables)).split())
        try:
            message = self._templates.render_email(
                INVITE_TEMPLATE, brand, to=address, from_=self._config.email_from, subject=subject, variables=variables
            )
        except ValueError:
            raise invalid_param("The invitation contains characters that cannot go into an email") from None
        try:
            await self._email.send(address, message)
        except EmailSendError as e:
            metrics.EMAILS_FAILED.labels(kind="invite").inc()
            logger.warning("invitation mail not sent: %s", e)
            raise MatrixError(400, "M_EMAIL_SEND_ERROR", "The invitation email could not be sent") from None
        metrics.EMAILS_SENT.labels(kind="invite").inc()

    async def ephemeral_key_is_valid(self, public_key: str) -> bool:
        return await self._store.ephemeral_key_exists(public_key, now_ms() - self._expiry_ms)

    async def sign_ed25519(self, mxid: str, token: str, private_key: str) -> dict[str, Any]:
        """Sign {mxid, sender, token} with the invitation's ephemeral key, which the caller must
        hold: the token alone is public (it is the state key of the room's invite event)."""
        invite = await self._store.get(token)
        if invite is None or invite.created_ts < now_ms() - self._expiry_ms:
            raise MatrixError(404, "M_UNRECOGNIZED", "Didn't recognise token")
        try:
            key = signedjson.key.decode_signing_key_base64("ed25519", "0", private_key)
        except Exception:
            raise invalid_param("'private_key' is not an unpadded base64 ed25519 seed") from None
        # Invites imported from Sydent have no ephemeral key of their own to check against ("").
        if invite.ephemeral_public_key and not secrets_equal(
            encode_base64(key.verify_key.encode()), invite.ephemeral_public_key
        ):
            raise invalid_param("'private_key' is not this invitation's ephemeral key")
        return signedjson.sign.sign_json(
            {"mxid": mxid, "sender": invite.sender, "token": token}, self._config.effective_server_name, key
        )

    async def expire(self) -> tuple[int, int]:
        return await self._store.delete_older_than(now_ms() - self._expiry_ms)
