"""Invitations for 3PIDs not on Matrix yet (spec "Invitation storage", "Ephemeral invitation signing")."""

from __future__ import annotations

import logging
import re
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

import signedjson.key
import signedjson.sign
from unpaddedbase64 import encode_base64

from sydent_lite.clock import SYSTEM_CLOCK, Clock
from sydent_lite.config import Config, ConfigError
from sydent_lite.delivery.email import EmailSender, EmailSendError
from sydent_lite.errors import ErrorCode, MatrixError, invalid_param
from sydent_lite.observability import metrics
from sydent_lite.secrets_util import random_string, secrets_equal
from sydent_lite.signing import ServerSigner
from sydent_lite.storage.associations import AssociationStore
from sydent_lite.storage.invites import InviteStore, StoredInvite
from sydent_lite.templating import INVITE_TEMPLATE, TemplateStore
from sydent_lite.threepids import normalise_email, user_id_server

logger = logging.getLogger(__name__)

INVITE_TOKEN_LENGTH = 32
# Spec store-invite fields that reach templates even when absent (as "", as Sydent does).
OPTIONAL_FIELDS = (
    "room_alias",
    "room_avatar_url",
    "room_join_rules",
    "room_name",
    "sender_display_name",
    "sender_avatar_url",
    "room_type",
    "guest_access_token",
    "guest_user_id",
)
# Values put into the join link are cut short: SMTP refuses lines over 998 octets.
_LINK_FIELD_MAX = 64
_LINK_MAX = 900


class _Fields(dict[str, str]):
    """%-format mapping for subjects: a field the request did not send reads as ""."""

    def __missing__(self, key: str) -> str:
        return ""


def check_subject_format(subject: str, key: str) -> None:
    try:
        subject % _Fields()
    except (ValueError, TypeError) as e:
        raise ConfigError(f"config key '{key}' is not a valid %-format string: {e}") from None


def check_web_client_locations(locations: list[str], key: str) -> None:
    for i, location in enumerate(locations):
        if web_client_base(location) is None:
            raise ConfigError(
                f"config key '{key}[{i}]' is not an http(s) base URL (no user name, query or fragment): {location!r}"
            )


def redact_part(part: str, reveal: int) -> str:
    """Sydent's redaction of one part of an address: its first `reveal` characters and "...";
    a part no longer than that shows 3 characters (over 5), 1 (over 1) or none. Never all of it."""
    if len(part) <= reveal:
        if len(part) > 5:
            return part[:3] + "..."
        if len(part) > 1:
            return part[0] + "..."
        return "..."
    return part[:reveal] + "..."


def redact_address(address: str, reveal_local: int = 3, reveal_domain: int = 3) -> str:
    """`david@example.com` -> `dav...@exa...` (Sydent's store-invite `display_name`): enough for
    the inviter to recognise, never the address."""
    local, _, domain = address.rpartition("@")
    return f"{redact_part(local, reveal_local)}@{redact_part(domain, reveal_domain)}"


# Sydent cuts what an inviter names themselves and the room before it goes into the mail (and
# its subject): it bounds how much text of their choosing anyone can mail to anyone.
SENDER_DISPLAY_NAME_MAX = 20  # a longer one keeps 19 characters and "…"
ROOM_NAME_MAX = 30
ROOM_NAME_KEPT = 25  # of a longer one, before "…"
# The longest `org.matrix.web_client_location` honoured: a base URL, not a message.
WEB_CLIENT_LOCATION_MAX = 255
# Characters RFC 3986 never allows in a URL, and the ones that would end it in a mail's text.
_NOT_IN_URL = re.compile(r'[^\x21-\x7e]|["<>\\^`{|}]')


def web_client_base(url: str) -> tuple[str, str, str] | None:
    """(scheme, host[:port], path) of an absolute http(s) base URL fit to start a join link, or
    None: ASCII only (no look-alike Unicode hosts), no user name (`https://app.element.io@evil`),
    no query or fragment (the templates append `/#/room/...`)."""
    if len(url) > WEB_CLIENT_LOCATION_MAX or _NOT_IN_URL.search(url):
        return None
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        return None
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname or "@" in parts.netloc:
        return None
    if parts.query or parts.fragment or "?" in url or "#" in url:
        return None
    return parts.scheme.lower(), parts.netloc.lower(), parts.path.rstrip("/")


# Sydent's answer to a blocked invitation (store_invite_servlet.py).
INVITE_NOT_ALLOWED = "Invite not allowed"
# Fields the inviter does not write: the same in every invitation, so a keyword in them would
# block all of them ("mail" in medium "email"). The brand picks a template folder.
_KEYWORD_EXEMPT = frozenset({"medium", "brand"})
_WEB_CLIENT_FIELD = "org.matrix.web_client_location"
_SCHEME = re.compile(r"^https?://", re.IGNORECASE)


def blocked_keyword(fields: dict[str, str], keywords: frozenset[str]) -> tuple[str, str] | None:
    """(keyword, field) of the first blocked keyword found in what the inviter wrote, or None.

    As Sydent: case-insensitive substring matches in every string field of the request (room
    name, sender display name, room alias, sender, address, ...). The web client location that
    Synapse adds to every invitation is matched without its scheme: Sydent learnt that a
    keyword "http" (to block links in room names) otherwise refused every invitation
    (sydent#540).
    """
    for name, value in fields.items():
        if name in _KEYWORD_EXEMPT:
            continue
        if name == _WEB_CLIENT_FIELD:
            value = _SCHEME.sub("", value)
        folded = value.casefold()
        for keyword in keywords:
            if keyword in folded:
                return keyword, name
    return None


class InviteService:
    def __init__(
        self,
        config: Config,
        store: InviteStore,
        associations: AssociationStore,
        signer: ServerSigner,
        templates: TemplateStore,
        email: EmailSender,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self._config = config
        self._store = store
        self._associations = associations
        self._signer = signer
        self._templates = templates
        self._email = email
        self._clock = clock
        invites = config.invites
        self._blocked_servers = frozenset(server.lower() for server in invites.blocked_homeservers)
        self._blocked_rooms = frozenset(invites.blocked_room_ids)
        self._blocked_keywords = frozenset(keyword.casefold() for keyword in invites.blocked_keywords)

    def check_allowed(self, fields: dict[str, str]) -> None:
        """Refuse (403 M_UNAUTHORIZED, as Sydent) an invitation from a blocked homeserver, to
        a blocked room, or with a blocked keyword in what the inviter wrote."""
        if user_id_server(fields["sender"]).lower() in self._blocked_servers:
            logger.info("refused an invitation from a user of %s: blocked homeserver", user_id_server(fields["sender"]))
            raise MatrixError(403, ErrorCode.UNAUTHORIZED, INVITE_NOT_ALLOWED)
        if fields["room_id"] in self._blocked_rooms:
            logger.info("refused an invitation to a blocked room")
            raise MatrixError(403, ErrorCode.UNAUTHORIZED, INVITE_NOT_ALLOWED)
        found = blocked_keyword(fields, self._blocked_keywords) if self._blocked_keywords else None
        if found is not None:
            # The keyword is the operator's; the field's value (an address, a name) is not logged.
            logger.info("refused an invitation: blocked keyword %r in field %r", *found)
            raise MatrixError(403, ErrorCode.UNAUTHORIZED, INVITE_NOT_ALLOWED)

    @property
    def _expiry_ms(self) -> int:
        return self._config.invites.expiry_seconds * 1000

    async def store_invite(
        self, fields: dict[str, str], brand: str | None, *, verified_sender: str | None
    ) -> dict[str, Any]:
        """Store an invitation and mail it. `verified_sender`: the access token's user on v2,
        who is the `sender`; None on v1, where nobody vouches for the sender."""
        medium = fields["medium"]
        if medium != "email":
            raise MatrixError(400, ErrorCode.UNRECOGNIZED, "Only email invitations are supported")
        address = normalise_email(fields["address"])
        bound = await self._associations.get(medium, address)
        if bound is not None:
            raise MatrixError(
                400, ErrorCode.THREEPID_IN_USE, "This address is already bound to a Matrix ID", mxid=bound.mxid
            )

        token = random_string(INVITE_TOKEN_LENGTH)
        ephemeral = signedjson.key.generate_signing_key("0")
        # URL-safe, as Sydent: templates put the private key into the join link as it is
        # (Sydent's legacy ones unquoted), where a "+" would read as a space.
        ephemeral_public = encode_base64(ephemeral.verify_key.encode(), urlsafe=True)
        ephemeral_private = encode_base64(ephemeral.encode(), urlsafe=True)

        # The mail (its join link) is the private key's only copy: whoever holds it may sign.
        variables = self.mail_variables(
            fields,
            address=address,
            token=token,
            ephemeral_private_key=ephemeral_private,
            verified_sender=verified_sender,
        )
        await self._send_invite_mail(variables, address, brand)
        await self._store.add(
            StoredInvite(
                token=token,
                medium=medium,
                address=address,
                room_id=fields["room_id"],
                sender=fields["sender"],
                ephemeral_public_key=ephemeral_public,
                created_ts=self._clock.time_ms(),
            )
        )
        base = self._config.base_url
        logger.info("stored an invitation to an email address from a user of %s", user_id_server(fields["sender"]))
        invites = self._config.invites
        return {
            "token": token,
            # As Sydent: from the address as typed.
            "display_name": redact_address(
                fields["address"], invites.display_name_reveal_local_part, invites.display_name_reveal_domain
            ),
            "public_keys": [
                {
                    "public_key": self._signer.public_key_base64,
                    "key_validity_url": f"{base}/_matrix/identity/v2/pubkey/isvalid",
                },
                {
                    "public_key": ephemeral_public,
                    "key_validity_url": f"{base}/_matrix/identity/v2/pubkey/ephemeral/isvalid",
                },
            ],
            "public_key": self._signer.public_key_base64,
        }

    def web_client_location(self, fields: dict[str, str]) -> str:
        """Where the mail sends the invitee: the invite's `org.matrix.web_client_location` (which
        Synapse fills in from its `email.invite_client_location`) if it is an http(s) base URL
        the operator allows, else `email.web_client_location`."""
        default = self._config.email.web_client_location
        wanted = fields.get("org.matrix.web_client_location")
        if wanted is None or wanted == default:
            return default
        base = web_client_base(wanted)
        allowed = self._config.email.allowed_web_client_locations
        if base is not None and (not allowed or base in {web_client_base(a) for a in allowed}):
            return wanted
        logger.info("ignored an invitation's org.matrix.web_client_location: not an allowed http(s) base URL")
        return default

    def mail_variables(
        self,
        fields: dict[str, str],
        *,
        address: str,
        token: str,
        ephemeral_private_key: str,
        verified_sender: str | None,
    ) -> dict[str, str]:
        """The invite template's variables, with Sydent's values (store_invite_servlet.py):
        every string field of the request; `sender_display_name` cut to 20 characters and
        `room_name` to 26 (Sydent's limits); `bracketed_room_name` "(<room name>) " and
        `bracketed_verified_sender` "(<sender>) " (v2 only: "" on v1), each with the trailing
        space Sydent's templates expect; `web_client_location`; "" for fields not sent. Ours
        besides: `verified_sender`, `server_name`, `join_link`."""
        variables: dict[str, str] = dict.fromkeys(OPTIONAL_FIELDS, "")
        variables.update(fields)
        display_name = variables["sender_display_name"]
        if len(display_name) > SENDER_DISPLAY_NAME_MAX:
            display_name = display_name[: SENDER_DISPLAY_NAME_MAX - 1] + "…"
        room_name = variables["room_name"]
        if len(room_name) > ROOM_NAME_MAX:
            room_name = room_name[:ROOM_NAME_KEPT] + "…"
        location = self.web_client_location(fields)
        variables.update(
            {
                "token": token,
                "sender_display_name": display_name,
                "room_name": room_name,
                "bracketed_room_name": f"({room_name}) " if room_name else "",
                "bracketed_verified_sender": f"({verified_sender}) " if verified_sender else "",
                "verified_sender": verified_sender or "",
                "ephemeral_private_key": ephemeral_private_key,
                "web_client_location": location,
                "server_name": self._config.effective_server_name,
            }
        )
        variables["join_link"] = self._join_link(variables, location, address, token, ephemeral_private_key)
        return variables

    def _join_link(
        self, variables: dict[str, str], location: str, address: str, token: str, ephemeral_private: str
    ) -> str:
        sign_url = f"{self._config.base_url}/_matrix/identity/api/v1/sign-ed25519?" + urlencode(
            {"token": token, "private_key": ephemeral_private}
        )
        # The query Element's invite page reads (as Sydent builds it).
        params = {"email": address, "signurl": sign_url}
        base = f"{location.rstrip('/')}/#/room/{quote(variables['room_id'], safe='')}"
        with_extras = dict(params)
        for key, field in (
            ("room_name", "room_name"),
            ("inviter_name", "sender_display_name"),
            ("room_type", "room_type"),
        ):
            if variables.get(field):
                with_extras[key] = variables[field][:_LINK_FIELD_MAX]
        link = f"{base}?{urlencode(with_extras)}"
        # The extras only decorate Element's page: drop them before the link outgrows a mail line.
        return link if len(link) <= _LINK_MAX else f"{base}?{urlencode(params)}"

    async def _send_invite_mail(self, variables: dict[str, str], address: str, brand: str | None) -> None:
        subject_format = (
            self._config.email.invite_subject_space
            if variables["room_type"] == "m.space"
            else self._config.email.invite_subject
        )
        # Without a display name the sender's ID stands in (Sydent's subject would start with
        # " has invited you"). Subjects are one line: the Subject header refuses line breaks.
        subject_fields = _Fields(variables, sender_display_name=variables["sender_display_name"] or variables["sender"])
        subject = " ".join((subject_format % subject_fields).split())
        try:
            message = self._templates.render_email(
                INVITE_TEMPLATE, brand, to=address, from_=self._config.email_from, subject=subject, variables=variables
            )
        except ValueError:
            raise invalid_param("The invitation contains characters that cannot go into an email") from None
        try:
            await self._email.send(address, message, kind="invite")
        except EmailSendError as e:
            metrics.EMAILS_FAILED.labels(kind="invite").inc()
            logger.warning("invitation mail not sent: %s", e)
            raise MatrixError(400, ErrorCode.EMAIL_SEND_ERROR, "The invitation email could not be sent") from None
        metrics.EMAILS_SENT.labels(kind="invite").inc()

    async def ephemeral_key_is_valid(self, public_key: str) -> bool:
        return await self._store.ephemeral_key_exists(public_key, self._clock.time_ms() - self._expiry_ms)

    async def sign_ed25519(self, mxid: str, token: str, private_key: str) -> dict[str, Any]:
        """Sign {mxid, sender, token} with the invitation's ephemeral key, which the caller must
        hold: the token alone is public (it is the state key of the room's invite event)."""
        invite = await self._store.get(token)
        if invite is None or invite.created_ts < self._clock.time_ms() - self._expiry_ms:
            raise MatrixError(404, ErrorCode.UNRECOGNIZED, "Didn't recognise token")
        try:
            key = signedjson.key.decode_signing_key_base64("ed25519", "0", private_key)
        except Exception:
            raise invalid_param("'private_key' is not an unpadded base64 ed25519 seed") from None
        # Invites imported from Sydent have no ephemeral key of their own to check against ("").
        # Invites stored before we wrote keys URL-safe hold the standard alphabet.
        public = key.verify_key.encode()
        stored = invite.ephemeral_public_key
        if stored and not any(secrets_equal(encode_base64(public, urlsafe=u), stored) for u in (True, False)):
            raise invalid_param("'private_key' is not this invitation's ephemeral key")
        return signedjson.sign.sign_json(
            {"mxid": mxid, "sender": invite.sender, "token": token}, self._config.effective_server_name, key
        )

    async def expire(self) -> tuple[int, int]:
        return await self._store.delete_older_than(self._clock.time_ms() - self._expiry_ms)
