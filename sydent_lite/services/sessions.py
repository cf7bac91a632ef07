"""Validation sessions: proving a person controls a 3PID (spec "Establishing associations")."""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from urllib.parse import urlencode

from sydent_lite.clock import SYSTEM_CLOCK, Clock
from sydent_lite.config import Config
from sydent_lite.delivery.email import EmailSender, EmailSendError
from sydent_lite.delivery.sms import SmsProvider, SmsSendError, originator_for
from sydent_lite.errors import (
    ErrorCode,
    MatrixError,
    no_valid_session,
    session_expired,
    session_not_validated,
)
from sydent_lite.observability import metrics
from sydent_lite.secrets_util import hash_secret, random_string, secrets_equal
from sydent_lite.services.ratelimit import RateLimiter, client_subject
from sydent_lite.storage.sessions import SessionStore, ValidationSession
from sydent_lite.templating import TemplateStore
from sydent_lite.threepids import PhoneNumber, check_email, parse_phone_number

logger = logging.getLogger(__name__)

SID_LENGTH = 24


class TokenIncorrect(MatrixError):
    def __init__(self) -> None:
        # One answer for a wrong token and a wrong client secret: a guesser learns nothing.
        super().__init__(400, ErrorCode.TOKEN_INCORRECT, "The token or client secret is incorrect")


class SessionLocked(MatrixError):
    """A dead session: it took sessions.max_token_attempts wrong tokens and can never be
    validated; requestToken starts a new one."""

    def __init__(self) -> None:
        super().__init__(
            400,
            ErrorCode.SESSION_EXPIRED,
            "Too many incorrect codes were tried for this validation session: request a new code",
        )


class SessionService:
    def __init__(
        self,
        config: Config,
        store: SessionStore,
        templates: TemplateStore,
        email_sender: EmailSender,
        sms_provider: SmsProvider,
        rate_limiter: RateLimiter,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self._config = config
        self._store = store
        self._templates = templates
        self._email = email_sender
        self._sms = sms_provider
        self._limits = rate_limiter
        self._clock = clock
        self._lifetime_ms = config.sessions.lifetime_seconds * 1000

    def _expired(self, session: ValidationSession, now: int) -> bool:
        return now - session.mtime > self._lifetime_ms

    def _dead(self, session: ValidationSession) -> bool:
        """Too many wrong tokens: the session can no longer be validated (a validated one never dies)."""
        return not session.validated and session.failed_attempts >= self._config.sessions.max_token_attempts

    # --- requestToken -------------------------------------------------------------------

    async def request_email_token(
        self,
        *,
        client_secret: str,
        email: str,
        send_attempt: int,
        next_link: str | None,
        brand: str | None,
        client_ip: str,
    ) -> str:
        # The mail goes to the mailbox as typed in this request (a resend's too); the session is
        # keyed, limited, validated and bound by the 3PID, the case-folded form (appendix
        # "3PID Types"), so `Alice@x` and `alice@x` are one address for every limit.
        mailbox = check_email(email)
        address = mailbox.casefold()

        async def send(sid: str, token: str) -> None:
            await self._send_validation_mail(sid, mailbox, token, client_secret, brand, client_ip)

        token_factory = functools.partial(random_string, self._config.sessions.email_token_length)
        return await self._request_token(
            "email", address, client_secret, send_attempt, next_link, brand, client_ip, token_factory, send
        )

    async def request_msisdn_token(
        self,
        *,
        client_secret: str,
        country: str,
        phone_number: str,
        send_attempt: int,
        next_link: str | None,
        brand: str | None,
        client_ip: str,
    ) -> tuple[str, PhoneNumber]:
        number = parse_phone_number(country, phone_number)
        sms = self._config.sms
        refused = number.region in sms.refused_countries if number.region else False
        # An allow-list admits only its countries; a number of no known country is not in it.
        if refused or (sms.allowed_countries and number.region not in sms.allowed_countries):
            raise MatrixError(400, ErrorCode.DESTINATION_REJECTED, "This server does not send SMS to that country")

        async def send(sid: str, token: str) -> None:
            # Taken only when an SMS is about to leave (a retry of the same send_attempt sends
            # nothing and costs nothing).
            await self._check_country_limit(number.region)
            text = sms.template.replace("{token}", token)
            try:
                await self._sms.send(number.msisdn, text, originator_for(sms, number.calling_code, number.msisdn))
            except SmsSendError as e:
                metrics.SMS_FAILED.inc()
                logger.warning("validation SMS for session %s not sent: %s", sid, e)
                raise MatrixError(400, ErrorCode.SEND_ERROR, "The validation SMS could not be sent") from None
            metrics.SMS_SENT.inc()

        digits = "0123456789"
        token_factory = functools.partial(random_string, self._config.sms.code_length, digits)
        sid = await self._request_token(
            "msisdn", number.msisdn, client_secret, send_attempt, next_link, brand, client_ip, token_factory, send
        )
        return sid, number

    async def _request_token(
        self,
        medium: str,
        address: str,
        client_secret: str,
        send_attempt: int,
        next_link: str | None,
        brand: str | None,
        client_ip: str,
        token_factory: Callable[[], str],
        send: Callable[[str, str], Awaitable[None]],
    ) -> str:
        secret_hash = hash_secret(client_secret)
        now = self._clock.time_ms()
        existing = await self._store.find(medium, address, secret_hash)
        # An expired or dead session is never handed back: the same key starts a new one.
        if existing is not None and not self._expired(existing, now) and not self._dead(existing):
            if send_attempt <= existing.send_attempt:
                return existing.sid  # a retry: same session, nothing sent again
            await self._check_limits(address, client_ip)
            # Only a hash of the old token is stored, so a resend is a new token; it replaces the old.
            token = token_factory()
            await send(existing.sid, token)
            await self._store.set_send_attempt(existing.sid, send_attempt, now, next_link, brand, hash_secret(token))
            return existing.sid

        await self._check_limits(address, client_ip)
        sid = random_string(SID_LENGTH)
        token = token_factory()
        # Send first: a session whose message never left is of no use to anyone.
        await send(sid, token)
        await self._store.create(
            ValidationSession(
                sid=sid,
                medium=medium,
                address=address,
                client_secret_hash=secret_hash,
                token_hash=hash_secret(token),
                send_attempt=send_attempt,
                next_link=next_link,
                brand=brand,
                created_ts=now,
                mtime=now,
                validated=False,
                validated_at=None,
            )
        )
        return sid

    async def _check_country_limit(self, region: str | None) -> None:
        """rate_limits.sms_per_country_per_hour: each country its own bucket, at its own limit
        or else at "default"'s (as Sydent's country.ratelimit.*, one bucket per country)."""
        per_country = self._config.rate_limits.sms_per_country_per_hour
        per_hour = (per_country.get(region) if region else None) or per_country.get("default")
        if per_hour is not None:
            await self._limits.check(f"sms-country:{region or '?'}", per_hour / 3600, per_hour)

    async def _check_limits(self, address: str, client_ip: str) -> None:
        rl = self._config.rate_limits
        await self._limits.check(
            f"rt-ip:{client_subject(client_ip)}", rl.request_token_per_ip_per_minute / 60, rl.request_token_per_ip_burst
        )
        await self._limits.check(
            f"rt-addr:{address}", rl.request_token_per_address_per_hour / 3600, rl.request_token_per_address_burst
        )

    def validation_link(self, sid: str, client_secret: str, token: str) -> str:
        query = urlencode({"token": token, "client_secret": client_secret, "sid": sid})
        return f"{self._config.base_url}/_matrix/identity/v2/validate/email/submitToken?{query}"

    async def _send_validation_mail(
        self, sid: str, mailbox: str, token: str, client_secret: str, brand: str | None, client_ip: str
    ) -> None:
        """Mail the token to `mailbox`, the address as typed (envelope and To alike)."""
        message = self._templates.render_email(
            "verification_template.eml.j2",
            brand,
            to=mailbox,
            from_=self._config.email_from,
            subject=self._config.email.validation_subject,
            variables={
                "token": token,
                "link": self.validation_link(sid, client_secret, token),
                "ipaddress": client_ip,
                "server_name": self._config.effective_server_name,
                "sid": sid,
            },
        )
        try:
            await self._email.send(mailbox, message, kind="validation")
        except EmailSendError as e:
            metrics.EMAILS_FAILED.labels(kind="validation").inc()
            logger.warning("validation mail for session %s not sent: %s", sid, e)
            raise MatrixError(400, ErrorCode.EMAIL_SEND_ERROR, "The validation email could not be sent") from None
        metrics.EMAILS_SENT.labels(kind="validation").inc()

    # --- submitToken and checks ---------------------------------------------------------

    async def _session_with_secret(self, sid: str, client_secret: str) -> ValidationSession | None:
        session = await self._store.get(sid)
        if session is None:
            return None
        if not secrets_equal(session.client_secret_hash, hash_secret(client_secret)):
            return None
        return session

    async def submit_token(
        self, sid: str, client_secret: str, token: str, medium: str | None = None, *, client_ip: str
    ) -> ValidationSession:
        """Validate a session with its token.

        Guessing is bounded three ways: every call takes from the client address's budget; a
        call with the right client secret takes from the address's own budget (shared by all
        its sessions) before the token is compared; and each unvalidated session survives at
        most sessions.max_token_attempts wrong tokens.
        """
        rl = self._config.rate_limits
        await self._limits.check(
            f"st-ip:{client_subject(client_ip)}", rl.submit_token_per_ip_per_minute / 60, rl.submit_token_per_ip_burst
        )
        session = await self._store.get(sid)
        if session is None or (medium is not None and session.medium != medium):
            raise no_valid_session()
        # A wrong client secret counts against nothing but the caller's address: only the
        # session's holder can use up (and so kill) the session.
        if not secrets_equal(session.client_secret_hash, hash_secret(client_secret)):
            raise TokenIncorrect()
        now = self._clock.time_ms()
        if self._expired(session, now):
            raise session_expired()
        token_hash = hash_secret(token)
        if not session.validated:
            if self._dead(session):
                raise SessionLocked()
            await self._limits.check(
                f"st-addr:{session.medium} {session.address}",
                rl.submit_token_per_address_per_day / 86400,
                rl.submit_token_per_address_burst,
            )
            if not await self._store.take_attempt(sid, self._config.sessions.max_token_attempts):
                # Another request took the last attempt, or validated the session, meanwhile.
                latest = await self._store.get(sid)
                if latest is None or not latest.validated:
                    raise SessionLocked()
                session = latest
        # A validated session has nothing left to guess: its token is compared without counting.
        if not secrets_equal(session.token_hash, token_hash):
            raise TokenIncorrect()
        if not session.validated:
            await self._store.mark_validated(sid, now)
            session.validated, session.validated_at, session.mtime = True, now, now
        return session

    async def aclose(self) -> None:
        await self._sms.aclose()

    async def delete_expired(self) -> int:
        """Forget sessions expired for a whole further lifetime (until then they still answer
        M_SESSION_EXPIRED rather than M_NO_VALID_SESSION)."""
        return await self._store.delete_expired(self._clock.time_ms() - 2 * self._lifetime_ms)

    async def get_session(self, sid: str) -> ValidationSession | None:
        return await self._store.get(sid)

    async def validated_session(self, sid: str, client_secret: str) -> ValidationSession:
        """The session if it is validated and not expired, else the spec's error."""
        session = await self._session_with_secret(sid, client_secret)
        if session is None:
            raise no_valid_session()
        if self._expired(session, self._clock.time_ms()):
            raise session_expired()
        if not session.validated:
            raise session_not_validated()
        return session
