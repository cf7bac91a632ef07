"""An SMTP sink on 127.0.0.1 that collects every message the identity server sends.

It can also misbehave on purpose: `refuse()` answers 550 to everything (MAIL, RCPT and DATA),
`down()` stops listening so connections are refused; `accept()` goes back to normal.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import re
import socket
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from email.message import EmailMessage
from typing import cast

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

# The validation link the identity server mails (v2 path, see the contract in docs/).
LINK_RE = re.compile(r"https?://[^\s<>\"'()]+/_matrix/identity/v2/validate/email/submitToken\?[^\s<>\"'()]+")


def free_port() -> int:
    """A local port nothing listens on now (bound, then released): for a server to listen on,
    or for a client to find closed."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class ReceivedMail:
    """One message as the SMTP server received it (dot-stuffing already undone by aiosmtpd)."""

    mail_from: str
    rcpt_tos: list[str]
    raw: bytes
    received_at: float = field(default_factory=time.time)
    ehlo_name: str = ""  # the name the client gave in EHLO/HELO
    connection: int = 0  # which SMTP connection brought it (numbered from 1 per sink)

    @property
    def message(self) -> EmailMessage:
        return email.message_from_bytes(self.raw, policy=email.policy.default)

    @property
    def text(self) -> str:
        """The decoded text/plain part (or the body of a single-part text/plain message)."""
        msg = self.message
        part = msg.get_body(preferencelist=("plain",))
        if part is None:
            raise AssertionError(f"mail has no text/plain part:\n{self.raw.decode('utf-8', 'replace')}")
        return cast("str", part.get_content())

    @property
    def link(self) -> str:
        """The submitToken link in the text/plain part."""
        match = LINK_RE.search(self.text)
        if match is None:
            raise AssertionError(f"no submitToken link in the text/plain part:\n{self.text}")
        return match.group(0)

    @property
    def link_params(self) -> dict[str, str]:
        query = urllib.parse.urlsplit(self.link).query
        params = urllib.parse.parse_qs(query, keep_blank_values=True, strict_parsing=True)
        for key, values in params.items():
            assert len(values) == 1, f"query parameter {key} repeated in {self.link}"
        return {key: values[0] for key, values in params.items()}

    @property
    def token(self) -> str:
        return self.link_params["token"]

    @property
    def sid(self) -> str:
        return self.link_params["sid"]

    @property
    def client_secret(self) -> str:
        return self.link_params["client_secret"]

    def normalised(self) -> str:
        """The raw message as text with LF line endings (for byte-for-byte comparisons)."""
        return self.raw.decode("utf-8").replace("\r\n", "\n")


class _Handler:
    def __init__(self, sink: SmtpSink) -> None:
        self.sink = sink

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, mail_options: list[str]
    ) -> str:
        if self.sink.mode == "refuse":
            return "550 5.7.1 Refused by the test sink"
        reused = self.sink._delivered.get(self.sink._connection_of(session), 0) > 0
        if self.sink.mode == "one_per_connection" and reused:
            return "421 4.7.0 One message per connection, come back"
        if self.sink.mode == "hang_up_on_reuse" and reused and server.transport is not None:
            server.transport.close()  # without a word: the client finds out at this MAIL
            return "421 4.7.0 (never seen: the connection is closed)"
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, rcpt_options: list[str]
    ) -> str:
        if self.sink.mode == "refuse":
            return "550 5.1.1 Refused by the test sink"
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.sink.mode == "refuse":
            return "550 5.7.1 Refused by the test sink"
        content = envelope.original_content if envelope.original_content is not None else envelope.content
        if isinstance(content, str):  # only with decode_data=True, which we do not use
            content = content.encode("utf-8")
        assert envelope.mail_from is not None and content is not None
        mail = ReceivedMail(
            envelope.mail_from,
            list(envelope.rcpt_tos),
            bytes(content),
            ehlo_name=session.host_name or "",
            connection=self.sink._connection_of(session),
        )
        self.sink._record(mail)
        self.sink._delivered[mail.connection] = self.sink._delivered.get(mail.connection, 0) + 1
        if self.sink.mode == "close_after_message" and server.transport is not None:
            # After the reply has gone out (it is written once this returns).
            asyncio.get_running_loop().call_later(0.05, server.transport.close)
        return "250 Message accepted for delivery"


class SmtpSink:
    """Collects messages; `wait_for(address)` hands each message out once, in arrival order."""

    def __init__(self, host: str = "127.0.0.1", port: int | None = None) -> None:
        self.host = host
        self.port = port or free_port()
        self.mode = "accept"
        self.messages: list[ReceivedMail] = []
        self._taken: set[int] = set()
        self._cond = threading.Condition()
        self._controller: Controller | None = None
        self._connections = 0
        self._delivered: dict[int, int] = {}  # connection number -> messages it brought

    def _connection_of(self, session: Session) -> int:
        number: int | None = getattr(session, "sink_connection", None)
        if number is None:
            self._connections += 1
            number = session.sink_connection = self._connections  # type: ignore[attr-defined]  # ours, on its session
        return number

    # --- lifecycle ------------------------------------------------------------------------

    def start(self) -> SmtpSink:
        if self._controller is None:
            self._controller = Controller(
                _Handler(self),
                hostname=self.host,
                port=self.port,
                ready_timeout=10,
                decode_data=False,
                enable_SMTPUTF8=True,
            )
            self._controller.start()
        return self

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    # --- modes ------------------------------------------------------------------------------

    def accept(self) -> None:
        """Normal operation: listening, accepting every message."""
        self.mode = "accept"
        self.start()

    def refuse(self) -> None:
        """Listening, but answering 550 to MAIL, RCPT and DATA."""
        self.start()
        self.mode = "refuse"

    def one_per_connection(self) -> None:
        """Like a relay that limits messages per connection: a second MAIL on a connection gets
        421 (and the client is to go away)."""
        self.start()
        self.mode = "one_per_connection"

    def close_after_message(self) -> None:
        """Like a relay that hangs up after each message, without a word."""
        self.start()
        self.mode = "close_after_message"

    def hang_up_on_reuse(self) -> None:
        """Like a relay whose idle timeout struck just as the client reused the connection: the
        connection closes at a second MAIL, unanswered."""
        self.start()
        self.mode = "hang_up_on_reuse"

    def down(self) -> None:
        """Not listening at all: connections are refused."""
        self.mode = "down"
        self.stop()

    # --- messages ---------------------------------------------------------------------------

    def _record(self, mail: ReceivedMail) -> None:
        with self._cond:
            self.messages.append(mail)
            self._cond.notify_all()

    @staticmethod
    def _matches(mail: ReceivedMail, rcpt: str | None) -> bool:
        if rcpt is None:
            return True
        return any(r.casefold() == rcpt.casefold() for r in mail.rcpt_tos)

    def _first_untaken(self, rcpt: str | None) -> int | None:
        for i, mail in enumerate(self.messages):
            if i not in self._taken and self._matches(mail, rcpt):
                return i
        return None

    def wait_for(self, rcpt: str | None = None, timeout: float = 15.0) -> ReceivedMail:
        """The next not yet handed out message to `rcpt` (case-insensitive), waiting for it."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                i = self._first_untaken(rcpt)
                if i is not None:
                    self._taken.add(i)
                    return self.messages[i]
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    seen = [m.rcpt_tos for m in self.messages[-10:]]
                    raise AssertionError(f"no mail to {rcpt!r} within {timeout}s (last recipients: {seen})")
                self._cond.wait(remaining)

    def pending(self, rcpt: str | None = None) -> list[ReceivedMail]:
        """Messages to `rcpt` not handed out yet (without taking them)."""
        with self._cond:
            return [m for i, m in enumerate(self.messages) if i not in self._taken and self._matches(m, rcpt)]

    def all_to(self, rcpt: str) -> list[ReceivedMail]:
        with self._cond:
            return [m for m in self.messages if self._matches(m, rcpt)]

    def assert_no_mail(self, rcpt: str, wait: float = 0.3) -> None:
        """No new (not handed out) message to `rcpt` arrives within `wait` seconds."""
        time.sleep(wait)
        extra = self.pending(rcpt)
        assert not extra, f"unexpected mail to {rcpt}: {[m.raw[:200] for m in extra]}"
