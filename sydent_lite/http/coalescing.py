"""A transport that sends what one turn of the event loop writes in one `send`.

uvicorn writes a response's status line and headers, then its body, each with its own
`transport.write`, and a write to an idle socket is a `send` system call at once: two per
response. On these virtual machines a system call is several microseconds, and py-spy put a
quarter of a small request's CPU (`GET /v2`, a v1 lookup) on those two calls. Here a write is
held until the loop's next turn (`call_soon`), by which time the rest of the response has been
written too: one call.

Anything that ends or orders the stream (close, write_eof, a buffer-size query) sends what is
held first; abort drops it, as it drops the socket's own buffer. Everything else is the
wrapped transport's.
"""

from __future__ import annotations

import asyncio
from typing import Any


class CoalescingTransport:
    __slots__ = ("_held", "_loop", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._held: list[bytes | bytearray | memoryview] = []

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            return
        if not self._held:
            self._loop.call_soon(self.flush)
        self._held.append(data)

    def writelines(self, chunks: Any) -> None:
        for data in chunks:
            self.write(data)

    def flush(self) -> None:
        held = self._held
        if not held:
            return
        self._held = []
        if self._transport.is_closing():
            return  # closed meanwhile (abort, or the peer went): nothing more can be sent
        self._transport.write(held[0] if len(held) == 1 else b"".join(held))

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def write_eof(self) -> None:
        self.flush()
        self._transport.write_eof()

    def abort(self) -> None:
        self._held = []
        self._transport.abort()

    def get_write_buffer_size(self) -> int:
        self.flush()
        return self._transport.get_write_buffer_size()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)
