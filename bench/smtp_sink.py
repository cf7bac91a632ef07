"""A real SMTP server (aiosmtpd) on loopback that accepts and counts mail.

requestToken and store-invite send one mail per request; a response whose mail never arrived
is counted as a failure, not as speed.
"""

from __future__ import annotations

import threading

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

# RFC 5321's 1,000-octet line limit is aiosmtpd's default; Sydent's stock templates have longer
# lines, which real MTAs take (Postfix folds them). Accept them rather than fail Sydent's mail.
SMTP.line_length_limit = 1 << 16


class _Counter:
    def __init__(self) -> None:
        self.count = 0
        self._lock = threading.Lock()

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        with self._lock:
            self.count += len(envelope.rcpt_tos)
        return "250 OK"


class CountingSmtpSink:
    def __init__(self, port: int) -> None:
        self._handler = _Counter()
        self._controller = Controller(
            self._handler, hostname="127.0.0.1", port=port, server_hostname="sink.bench.example"
        )
        self.port = port

    def start(self) -> None:
        self._controller.start()

    def stop(self) -> None:
        self._controller.stop()

    @property
    def count(self) -> int:
        return self._handler.count
