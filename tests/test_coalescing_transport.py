"""http.coalescing: what one turn of the loop writes reaches the socket in one write, in order,
and nothing held is lost or sent after the stream ends."""

from __future__ import annotations

import asyncio
from typing import Any

from sydent_lite.http.coalescing import CoalescingTransport


class RecordingTransport:
    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.closing = False

    def write(self, data: bytes) -> None:
        self.calls.append(("write", bytes(data)))

    def close(self) -> None:
        self.calls.append(("close", None))
        self.closing = True

    def write_eof(self) -> None:
        self.calls.append(("write_eof", None))

    def abort(self) -> None:
        self.calls.append(("abort", None))
        self.closing = True

    def is_closing(self) -> bool:
        return self.closing

    def get_write_buffer_size(self) -> int:
        return 7

    def get_extra_info(self, name: str) -> str:
        return f"extra {name}"


async def turn() -> None:
    await asyncio.sleep(0)


async def test_one_turns_writes_are_one_write() -> None:
    raw = RecordingTransport()
    transport = CoalescingTransport(raw, asyncio.get_running_loop())  # type: ignore[arg-type]
    transport.write(b"HTTP/1.1 200 OK\r\n\r\n")
    transport.write(b"")
    transport.write(memoryview(b"{}"))
    assert raw.calls == []
    await turn()
    assert raw.calls == [("write", b"HTTP/1.1 200 OK\r\n\r\n{}")]
    transport.writelines([b"a", b"b"])
    await turn()
    transport.write(b"c")
    await turn()
    assert raw.calls[1:] == [("write", b"ab"), ("write", b"c")]
    await turn()
    assert len(raw.calls) == 3  # nothing held: no empty write


async def test_what_ends_the_stream_sends_what_is_held_first() -> None:
    loop = asyncio.get_running_loop()
    raw = RecordingTransport()
    transport = CoalescingTransport(raw, loop)  # type: ignore[arg-type]
    transport.write(b"answer")
    transport.write_eof()
    transport.write(b"more")
    assert transport.get_write_buffer_size() == 7
    transport.write(b"last")
    transport.close()
    await turn()
    assert raw.calls == [
        ("write", b"answer"),
        ("write_eof", None),
        ("write", b"more"),
        ("write", b"last"),
        ("close", None),
    ]


async def test_abort_drops_what_is_held_and_nothing_is_written_after() -> None:
    raw = RecordingTransport()
    transport = CoalescingTransport(raw, asyncio.get_running_loop())  # type: ignore[arg-type]
    transport.write(b"never sent")
    transport.abort()
    await turn()
    assert raw.calls == [("abort", None)]
    raw2 = RecordingTransport()
    transport2 = CoalescingTransport(raw2, asyncio.get_running_loop())  # type: ignore[arg-type]
    transport2.write(b"too late")
    raw2.closing = True  # the peer went meanwhile
    await turn()
    assert raw2.calls == []


async def test_everything_else_is_the_wrapped_transports() -> None:
    transport = CoalescingTransport(RecordingTransport(), asyncio.get_running_loop())  # type: ignore[arg-type]
    assert transport.get_extra_info("peername") == "extra peername"
    assert transport.is_closing() is False
