"""Validation sessions: proving a person controls a 3PID (spec "Establishing associations")."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from urllib.parse import urlencode

from sydent_lite.config import Config
from sydent_lite.delivery.email import EmailSender, EmailSendError
from sydent_lite.delivery.sms import SmsProvider, SmsSendError, originator_for
from sydent_lite.errors import (
    MatrixError,
    no_valid_session,
    session_expired,
    session_not_validated,
)
from sydent_lite.observability import metrics
from sydent_lite.secrets_util import hash_secret, now_ms, random_string, secrets_equal
from sydent_lite.services.ratelimit import RateLimiter, client_subject
from sydent_lite.storage.sessions import SessionStore, ValidationSession
from sydent_lite.templating import TemplateStore
from sydent_lite.threepids import PhoneNumber, normalise_email, parse_phone_number

logger = logging.getLogger(__name__)

SID_LENGTH = 24


class TokenIncorrect(MatrixError):
    def __init__(self) -> None:
        # One answer for a wrong token and a wrong client secret: a guesser learns nothing.
        super().__init__(400, "M_TOKEN_INCORRECT", "The token or client secret is incorrect")


class SessionService:
    def __init__(
        self,
        config: Config,
        store: SessionStore,
        templates: TemplateStore,
        email_sender: EmailSender,
        sms_provider: SmsProvider,
        rate_limiter: RateLimiter,
    ) -> None:
        self._config = config
        self._store = store
        self._templates = templates
        self._email = email_sender
        self._sms = sms_provider
        self._limits = rate_limiter
        self._lifetime_ms = config.sessions.lifetime_seconds * 1000

    def _expired(self, session: ValidationSession, now: int) -> bool:
        return now - session.mtime > self._lifetime_ms

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
        address = normalise_email(email)

        async def send(sid: str, token: str) -> None:
            await self._send_validation_mail(sid, address, token, client_secret, brand, client_ip)

        token_factory = lambda: random_string(self._config.sessions.email_token_length)  # noqa: E731
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
        if number.region and number.region in self._config.sms.refused_countries:
            raise MatrixError(400, "M_DESTINATION_REJECTED", "This server does not send SMS to that country")

        async def send(sid: str, token: str) -> None:
            text = self._config.sms.template.replace("{token}", token)
            try:
                await self._sms.send(number.msisdn, text, originator_for(self._config.sms, number.calling_code))
            except SmsSendError as e:
                metrics.SMS_FAILED.inc()
                logger.warning("validation SMS for session %s not sent: %s", sid, e)
                raise MatrixError(400, "M_SEND_ERROR", "The validation SMS could not be sent") from None
            metrics.SMS_SENT.inc()

        digits = "0123456789"
        token_factory = lambda: random_string(self._config.sms.code_length, digits)  # noqa: E731
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
        now = now_ms()
        existing = await self._store.find(medium, address, secret_hash)
        if existing is not None and not self._expired(existing, now):
            if send_attempt <= existing.send_attempt:
                return existing.sid  # a retry: same session, nothing sent again
            await self._check_limits(address, client_ip)
            await send(existing.sid, existing.token)
            await self._store.set_send_attempt(existing.sid, send_attempt, now, next_link, brand)
            return existing.sid

        await self._check_limits(address, client_ip)
        session = ValidationSession(
            sid=random_string(SID_LENGTH),
            medium=medium,
            address=address,
            client_secret_hash=secret_hash,
            token=token_factory(),
            send_attempt=send_attempt,
            next_link=next_link,
            brand=brand,
            created_ts=now,
            mtime=now,
            validated=False,
            validated_at=None,
        )
        # Send first: a session whose message never left is of no use to anyone.
        await send(session.sid, session.token)
        await self._store.create(session)
        return session.sid

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
        self, sid: str, address: str, token: str, client_secret: str, brand: str | None, client_ip: str
    ) -> None:
        message = self._templates.render_email(
            "verification_template.eml.j2",
            brand,
            to=address,
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
            await self._email.send(address, message)
        except EmailSendError as e:
            metrics.EMAILS_FAILED.labels(kind="validation").inc()
            logger.warning("validation mail for session %s not sent: %s", sid, e)
            raise MatrixError(400, "M_EMAIL_SEND_ERROR", "The validation email could not be sent") from None
        metrics.EMAILS_SENT.labels(kind="validation").inc()

    # --- submitToken and checks ---------------------------------------------------------

    async def _session_with_secret(self, sid: str, client_secret: str) -> ValidationSession | None:
        session = await self._store.get(sid)
        if session is None:
            return None
        if not secrets_equal(session.client_secret_hash, hash_secret(client_secret)):
            return None
        return session

    async def submit_token(self, sid: str, client_secret: str, token: str, medium: str | None = None) -> ValidationSession:
        session = await self._store.get(sid)
        if session is None or (medium is not None and session.medium != medium):
            raise no_valid_session()
        secret_ok = secrets_equal(session.client_secret_hash, hash_secret(client_secret))
        token_ok = secrets_equal(session.token, token)
        if not secret_ok:
            raise TokenIncorrect()
        now = now_ms()
        if self._expired(session, now):
            raise session_expired()
        if not token_ok:
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
        return await self._store.delete_expired(now_ms() - 2 * self._lifetime_ms)

    async def get_session(self, sid: str) -> ValidationSession | None:
        return await self._store.get(sid)

    async def validated_session(self, sid: str, client_secret: str) -> ValidationSession:
        """The session if it is validated and not expired, else the spec's error."""
        session = await self._session_with_secret(sid, client_secret)
        if session is None:
            raise no_valid_session()
        if self._expired(session, now_ms()):
            raise session_expired()
        if not session.validated:
            raise session_not_validated()
        return session
