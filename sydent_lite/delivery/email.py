"""Delivering rendered mail (validation and invitation): SMTP for real use, a Maildir for the
embedded defaults.

The message arrives fully rendered (headers included, CRLF line endings) and is sent verbatim:
what the operator's template produced is exactly what the recipient gets.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import mailbox
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from email.utils import parseaddr
from pathlib import Path
from typing import Literal, assert_never

import aiosmtplib

from sydent_lite.clock import SYSTEM_CLOCK, Clock
from sydent_lite.config import ConfigError, EmailConfig, SmtpConfig

logger = logging.getLogger(__name__)


# What a message is, for the log line that says it was sent (its text is the caller's).
MailKind = Literal["validation", "invite"]


class EmailSendError(Exception):
    """The message could not be handed over. The text never holds credentials or the token."""


def _domain(address: str) -> str:
    # Logs name the recipient's domain only: the full address is personal data.
    return address.rpartition("@")[2] or "?"


class EmailSender(ABC):
    @abstractmethod
    async def send(self, to_addr: str, message: bytes, kind: MailKind = "validation") -> None:
        """Deliver `message` (a complete RFC 5322 message, a `kind` mail) to `to_addr`, or raise
        EmailSendError."""

    async def aclose(self) -> None:  # noqa: B027 (a sender that holds nothing needs no override)
        """Let go of what is held between messages (connections)."""


def ehlo_name(server_name: str) -> str:
    """Our name in EHLO: the server name's host ([address] for an IP literal, RFC 5321 4.1.3)."""
    host = server_name
    if host.startswith("["):
        host = host[1 : host.index("]")]
    elif host.count(":") == 1:
        host = host.rsplit(":", 1)[0]
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return host
    return f"[{host}]" if ":" not in host else f"[IPv6:{host}]"


class SmtpEmailSender(EmailSender):
    """Sends over SMTP, keeping a few connections open between messages.

    Connecting, the server's greeting, EHLO (and STARTTLS and AUTH where configured) and QUIT
    were most of what a message cost us (profiled: about a quarter of a requestToken's CPU);
    an open connection takes the next message with MAIL, RCPT and DATA alone. RFC 5321 lets a
    client send many messages in one session; a relay that limits that answers 421 or closes,
    and the connection is then dropped. A connection is used by one message at a time, kept at
    most IDLE_SECONDS (well inside a relay's idle timeout: RFC 5321 4.5.3.2 asks servers to
    wait 5 minutes) and for at most MESSAGES_PER_CONNECTION messages.
    """

    POOL_SIZE = 4  # idle connections kept (concurrent sends open more; the extras are closed)
    IDLE_SECONDS = 30.0
    MESSAGES_PER_CONNECTION = 100

    def __init__(
        self, smtp: SmtpConfig, from_header: str, local_hostname: str | None = None, clock: Clock = SYSTEM_CLOCK
    ) -> None:
        self._smtp = smtp
        # Given, not looked up: aiosmtplib would otherwise call socket.getfqdn() (a resolver
        # round trip in a thread) for every message.
        self._local_hostname = local_hostname
        self._clock = clock
        # The envelope sender (MAIL FROM) is the bare address of the From header.
        self._envelope_from = parseaddr(from_header)[1]
        if "@" not in self._envelope_from:
            raise ConfigError(f"config key 'email.from' has no usable email address: {from_header!r}")
        self._idle: list[_PooledConnection] = []

    def _client(self) -> aiosmtplib.SMTP:
        cfg = self._smtp
        return aiosmtplib.SMTP(
            hostname=cfg.host,
            port=cfg.port,
            local_hostname=self._local_hostname,
            timeout=cfg.timeout_seconds,
            use_tls=cfg.security == "tls",
            # "none" means plaintext: no opportunistic STARTTLS that could fail on a local relay.
            start_tls=cfg.security == "starttls",
            username=cfg.username or None,
            password=cfg.password or None,
        )

    def _take_idle(self) -> _PooledConnection | None:
        now = self._clock.monotonic()
        while self._idle:
            conn = self._idle.pop()  # the most recently used: the likeliest to be alive
            if conn.client.is_connected and now - conn.idle_since < self.IDLE_SECONDS:
                return conn
            conn.client.close()  # the relay closed it, or it sat too long: not worth a QUIT
        return None

    async def _connect(self) -> _PooledConnection:
        client = self._client()
        await client.connect()
        if client.is_ehlo_or_helo_needed:
            await client.ehlo()
        return _PooledConnection(client)

    async def _transaction(self, conn: _PooledConnection, to_addr: str, message: bytes) -> None:
        # MAIL, RCPT and DATA as aiosmtplib's sendmail() sends them, minus what it repeats for
        # one known recipient: it parses both addresses twice and rewrites the message's line
        # endings twice (profiled: ~6% of a requestToken's CPU).
        client = conn.client
        options: list[str] = []
        encoding = "ascii"
        # Declare what the message needs so a strict server neither refuses nor mangles it.
        if not (to_addr.isascii() and self._envelope_from.isascii()):
            if not client.supports_extension("smtputf8"):
                raise aiosmtplib.SMTPNotSupported("SMTPUTF8 is not supported by this server")
            options.append("SMTPUTF8")
            encoding = "utf-8"
        if not message.isascii() and client.supports_extension("8bitmime"):
            options.append("BODY=8BITMIME")
        if client.supports_extension("size"):
            options.insert(0, f"SIZE={wire_size(message)}")
        try:
            await client.mail(self._envelope_from, options=options, encoding=encoding)
            await client.rcpt(to_addr, encoding=encoding)
            await client.data(message)
        except aiosmtplib.SMTPResponseException:
            # Leave the session clean for its next use, as sendmail() does (a refused
            # connection is closed by send() anyway: a relay that refused may be in any state).
            with contextlib.suppress(aiosmtplib.SMTPException, OSError):
                await client.rset()
            raise
        conn.sent += 1

    def _release(self, conn: _PooledConnection) -> None:
        if conn.sent < self.MESSAGES_PER_CONNECTION and len(self._idle) < self.POOL_SIZE:
            conn.idle_since = self._clock.monotonic()
            self._idle.append(conn)
        else:
            conn.client.close()

    async def send(self, to_addr: str, message: bytes, kind: MailKind = "validation") -> None:
        cfg = self._smtp
        where = f"{cfg.host}:{cfg.port}"
        conn = self._take_idle()
        sent = False
        try:
            if conn is not None:
                try:
                    await self._transaction(conn, to_addr, message)
                except aiosmtplib.SMTPException as e:
                    if not _closing(e):
                        raise
                    # The relay closed the kept connection, or is closing it (421), before it
                    # took the message (a message is taken only by DATA's final 250): send it
                    # once more over a new connection.
                    conn.client.close()
                    conn = None
            if conn is None:
                conn = await self._connect()
                await self._transaction(conn, to_addr, message)
            sent = True
        except aiosmtplib.SMTPAuthenticationError as e:
            raise EmailSendError(f"SMTP server {where} refused the login ({e.code})") from None
        except aiosmtplib.SMTPRecipientRefused as e:
            raise EmailSendError(f"SMTP server {where} refused the recipient ({e.code})") from None
        except aiosmtplib.SMTPResponseException as e:
            # Server texts can echo addresses; the code and the stage are enough to act on.
            raise EmailSendError(f"SMTP server {where} refused the message ({e.code}, {type(e).__name__})") from None
        except (aiosmtplib.SMTPException, OSError, ValueError) as e:
            # Connection refused/reset, timeouts (TimeoutError is an OSError), TLS failures,
            # STARTTLS or SMTPUTF8 not offered, an address aiosmtplib cannot send.
            raise EmailSendError(f"cannot send mail through {where}: {type(e).__name__}: {e}") from None
        finally:
            # A connection that failed is not reused (a refused envelope has been reset, but
            # a relay that refused once may be in any state); one that worked is kept.
            if conn is not None:
                if sent:
                    self._release(conn)
                else:
                    conn.client.close()
        logger.info("sent %s mail to a recipient at %s via SMTP", kind, _domain(to_addr))

    async def aclose(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            with contextlib.suppress(aiosmtplib.SMTPException, OSError):
                await conn.client.quit()
            conn.client.close()


def _closing(e: aiosmtplib.SMTPException) -> bool:
    """Whether `e` says the connection went or is going away (not that the message was refused)."""
    if isinstance(e, aiosmtplib.SMTPServerDisconnected):
        return True
    return isinstance(e, aiosmtplib.SMTPResponseException) and e.code == aiosmtplib.SMTPStatus.domain_unavailable


def wire_size(message: bytes) -> int:
    """The message's size as DATA sends it (RFC 1870: octets, CRLF pairs included, before
    dot-stuffing): a lone LF or CR is sent as CRLF, and a last line gets its CRLF."""
    pairs = message.count(b"\r\n")
    size = len(message) + (message.count(b"\n") - pairs) + (message.count(b"\r") - pairs)
    return size if message.endswith((b"\n", b"\r")) else size + 2


@dataclass
class _PooledConnection:
    client: aiosmtplib.SMTP
    sent: int = 0
    idle_since: float = 0.0


class MaildirEmailSender(EmailSender):
    """Files each message into a local Maildir instead of sending it (no SMTP server needed)."""

    def __init__(self, path: str | Path) -> None:
        self._path = Path(path)

    def _write(self, message: bytes) -> None:
        # Create the parents too (data/outbox in a fresh data/), and the Maildir's subfolders
        # even when the folder itself already exists (mailbox only creates them for a new one).
        for sub in ("tmp", "new", "cur"):
            (self._path / sub).mkdir(mode=0o700, parents=True, exist_ok=True)
        # Maildir files use local (LF) line endings; CRLF is SMTP's wire form, and mail readers
        # (and a newcomer's grep) would see the stray carriage returns.
        mailbox.Maildir(os.fspath(self._path), create=True).add(message.replace(b"\r\n", b"\n"))

    async def send(self, to_addr: str, message: bytes, kind: MailKind = "validation") -> None:
        try:
            await asyncio.to_thread(self._write, message)
        except OSError as e:
            raise EmailSendError(f"cannot write to maildir {self._path}: {e.strerror}") from None
        logger.info("stored %s mail for a recipient at %s in the maildir", kind, _domain(to_addr))


def make_email_sender(
    config: EmailConfig, from_header: str, server_name: str | None = None, clock: Clock = SYSTEM_CLOCK
) -> EmailSender:
    # The config admits only these transports (email.transport); mypy checks that each is served.
    match config.transport:
        case "smtp":
            # email.hostname as given (Sydent's), else derived from the server name.
            local_hostname = config.hostname or (ehlo_name(server_name) if server_name else None)
            return SmtpEmailSender(config.smtp, from_header, local_hostname, clock)
        case "maildir":
            return MaildirEmailSender(config.maildir)
        case _:
            assert_never(config.transport)
