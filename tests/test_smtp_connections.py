"""SMTP connections kept open between messages (delivery.email.SmtpEmailSender), against a real
SMTP server (aiosmtpd) on loopback: messages share a connection, and a relay that hangs up or
limits messages per connection loses none of them."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from support.clock import FakeClock
from support.smtp import SmtpSink

from sydent_lite.config import SmtpConfig
from sydent_lite.delivery.email import EmailSendError, SmtpEmailSender

FROM = "Identity Server <noreply@id.test>"


def message(n: int) -> bytes:
    return f"From: {FROM}\r\nTo: user{n}@example.org\r\nSubject: message {n}\r\n\r\nbody {n}\r\n".encode()


@pytest.fixture
def sink() -> Iterator[SmtpSink]:
    sink = SmtpSink().start()
    yield sink
    sink.stop()


def sender(sink: SmtpSink, clock: FakeClock | None = None) -> SmtpEmailSender:
    return SmtpEmailSender(SmtpConfig(host=sink.host, port=sink.port), FROM, "id.test", clock or FakeClock())


async def send_all(s: SmtpEmailSender, numbers: range) -> None:
    for n in numbers:
        await s.send(f"user{n}@example.org", message(n))


def send_in_turn(sink: SmtpSink, numbers: range) -> None:
    """Messages `numbers`, one after another, through one sender."""

    async def run() -> None:
        s = sender(sink)
        await send_all(s, numbers)
        await s.aclose()

    asyncio.run(run())


def connections(sink: SmtpSink, numbers: range) -> list[int]:
    return [sink.wait_for(f"user{n}@example.org").connection for n in numbers]


def test_messages_one_after_another_share_one_connection(sink: SmtpSink) -> None:
    send_in_turn(sink, range(5))
    assert connections(sink, range(5)) == [1] * 5


def test_concurrent_messages_each_get_a_connection_and_all_arrive(sink: SmtpSink) -> None:
    async def run() -> None:
        s = sender(sink)
        await asyncio.gather(*(s.send(f"user{n}@example.org", message(n)) for n in range(8)))
        await send_all(s, range(8, 12))  # then over the kept ones
        await s.aclose()

    asyncio.run(run())
    used = connections(sink, range(12))
    assert len(set(used[:8])) == 8
    assert set(used[8:]) <= set(used[:8])


def test_an_idle_connection_is_not_kept_past_its_time(sink: SmtpSink) -> None:
    clock = FakeClock()

    async def run() -> None:
        s = sender(sink, clock)
        await send_all(s, range(2))
        clock.advance(SmtpEmailSender.IDLE_SECONDS + 1)
        await send_all(s, range(2, 3))
        await s.aclose()

    asyncio.run(run())
    assert connections(sink, range(3)) == [1, 1, 2]


def test_a_connection_the_relay_closed_while_idle_is_not_used(sink: SmtpSink) -> None:
    sink.close_after_message()

    async def run() -> None:
        s = sender(sink)
        for n in range(3):
            await s.send(f"user{n}@example.org", message(n))
            await asyncio.sleep(0.3)  # the relay hangs up meanwhile
        await s.aclose()

    asyncio.run(run())
    assert connections(sink, range(3)) == [1, 2, 3]


def test_a_relay_that_hangs_up_as_the_connection_is_reused_loses_nothing(sink: SmtpSink) -> None:
    sink.hang_up_on_reuse()
    send_in_turn(sink, range(3))
    assert connections(sink, range(3)) == [1, 2, 3]
    assert len(sink.messages) == 3  # each once


def test_a_relay_that_takes_one_message_per_connection_loses_none(sink: SmtpSink) -> None:
    sink.one_per_connection()
    send_in_turn(sink, range(3))
    assert connections(sink, range(3)) == [1, 2, 3]


def test_a_refused_message_is_an_error_and_its_connection_is_not_reused(sink: SmtpSink) -> None:
    async def run() -> None:
        s = sender(sink)
        await send_all(s, range(1))
        sink.refuse()
        with pytest.raises(EmailSendError, match=r"refused the message \(550"):
            await s.send("user1@example.org", message(1))
        sink.accept()
        await send_all(s, range(2, 3))
        await s.aclose()

    asyncio.run(run())
    assert connections(sink, range(1)) == [1]
    assert connections(sink, range(2, 3)) == [2]


def test_a_relay_gone_for_good_is_an_error_not_a_retry_loop(sink: SmtpSink) -> None:
    async def run() -> None:
        s = sender(sink)
        await send_all(s, range(1))
        sink.down()
        with pytest.raises(EmailSendError, match="cannot send mail through"):
            await s.send("user1@example.org", message(1))
        await s.aclose()

    asyncio.run(run())
