"""uvicorn's httptools protocol with the limits a server facing the Internet needs.

uvicorn 0.54 with httptools applies no timeout before a request is complete, checks its
concurrency limit only once headers are parsed, and bounds neither header size nor count
(llhttp hands a header value over only when it ends, so httptools accumulates it, however
long). One client could therefore hold every file descriptor with half-sent requests, or
grow the process by hundreds of MiB with a few unfinished header values (issue 13). This
subclass, given to uvicorn as its `http` protocol, adds per connection:

- a header deadline: within `header_timeout` of the accept (the TLS handshake included), of
  the first byte of a request, or of the end of the previous response, the request line and
  headers must be complete. A connection that sent nothing is closed; one that sent part of a
  request gets 408.
- a body deadline: at most `body_idle_timeout` between two pieces of a body and
  `body_timeout` for all of it, else 408.
- bounds on the head of a request, counted on the bytes as they arrive (before llhttp has seen
  the end of anything): `max_header_bytes` for the request line and headers, `max_headers`
  header fields (431), `max_url_bytes` for the request target (414).
- a cap on open connections per process, and per client address (IPv6: per /64; trusted
  proxies exempt, every client comes through them). Beyond it a plain-HTTP connection gets
  503 at once and is closed; a TLS one is closed at once (an answer would need a handshake).
- TLS, when configured, done here with `loop.start_tls` rather than by uvicorn, so a
  connection is counted, capped and timed from its accept, the handshake included (uvicorn's
  own TLS shows us a connection only once its handshake is done, and allows 60 s for it).

Refusals are Matrix errors with `Connection: close`; the server then stops writing and reads
what the client still sends for a moment before closing, so the client sees the answer rather
than a reset. Deadlines are checked by one sweep per process, every quarter of the shortest
timeout, which reads where each connection is from uvicorn's own state: no per-request work
but counting the bytes of a head (a deadline is noticed up to a sweep late).

The settings are per process: `configure()` is called by `server.serve` and, in each worker
process, by `server.app_from_env`. Until then the defaults apply.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import json
import logging
import ssl
import time
from asyncio import TimerHandle
from dataclasses import dataclass, field
from typing import Any

import httptools
from uvicorn.config import SSL_PROTOCOL_VERSION, Config, create_ssl_context
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from sydent_lite.config import ConfigError, ListenConfig
from sydent_lite.errors import ErrorCode
from sydent_lite.http.coalescing import CoalescingTransport
from sydent_lite.http.file_limit import connections_that_fit, raise_file_limit

logger = logging.getLogger(__name__)

PROTOCOL = "sydent_lite.http.protocol:GuardedHttpToolsProtocol"  # uvicorn's `http` option

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# After a refusal: how long, and how much, we keep reading (and dropping) what the client still
# sends, so that its request is not cut by a reset before it has read our answer.
LINGER_SECONDS = 2.0
LINGER_BYTES = 1024 * 1024
# At most this many refused-at-accept connections linger at once; more are closed right away.
MAX_LINGERING_REFUSALS = 64
# Warnings about refused connections: at most one per kind per this many seconds.
WARNING_INTERVAL = 60.0

# What a connection is doing, as the sweep sees it (derived from uvicorn's own state).
_NOT_YET = -2  # no HTTP yet (a TLS handshake): what arrives waits for it
_REFUSED = -1  # refused: what arrives is dropped
_HANDSHAKE = 0  # TLS handshake (no HTTP yet)
_IDLE = 1  # waiting for a request: nothing of it has arrived
_HEADERS = 2  # the rest of a request's head
_BODY = 3  # the rest of a request's body
_APP = 4  # the application's answer: no deadline of ours
# The sweep looks at every connection this often, as a share of the shortest timeout: a
# deadline is noticed up to this share late (a 10 s header timeout: between 10 and 12.5 s).
SWEEP_SHARE = 0.25


@dataclass(frozen=True)
class Limits:
    header_timeout: float = 10.0
    body_idle_timeout: float = 15.0
    body_timeout: float = 60.0
    max_header_bytes: int = 32 * 1024
    max_headers: int = 100
    max_url_bytes: int = 8 * 1024
    max_connections: int = 4096
    max_connections_per_ip: int = 100
    exempt: tuple[Network, ...] = ()  # listen.trusted_proxies: no per-address cap
    tls: ssl.SSLContext | None = field(default=None, compare=False)


class _Admission:
    """The connections this process holds, in all and per client address."""

    def __init__(self) -> None:
        self.open = 0
        self.per_address: dict[str, int] = {}
        self.lingering_refusals = 0
        self._warned: dict[str, float] = {}
        # The counted connections, looked at by one periodic sweep (not a timer each).
        self.live: set[GuardedHttpToolsProtocol] = set()
        self._sweep: TimerHandle | None = None
        self._sweep_loop: asyncio.AbstractEventLoop | None = None

    def watch(self, protocol: GuardedHttpToolsProtocol, loop: asyncio.AbstractEventLoop, every: float) -> None:
        self.live.add(protocol)
        if self._sweep is None or self._sweep_loop is not loop:
            self._sweep_loop = loop
            self._sweep = loop.call_later(every, self._run_sweep, loop, every)

    def _run_sweep(self, loop: asyncio.AbstractEventLoop, every: float) -> None:
        if loop is not self._sweep_loop:
            return  # a sweep of an event loop gone by
        self._sweep = None
        now = loop.time()
        for protocol in list(self.live):
            protocol._check(now)
        if self.live:
            self._sweep = loop.call_later(every, self._run_sweep, loop, every)

    def admit(self, key: str | None, limits: Limits) -> str | None:
        """Count a new connection in, or say why not ("server" or "address")."""
        if self.open >= limits.max_connections:
            return "server"
        if key is not None:
            held = self.per_address.get(key, 0)
            if held >= limits.max_connections_per_ip:
                return "address"
            self.per_address[key] = held + 1
        self.open += 1
        return None

    def release(self, key: str | None) -> None:
        self.open -= 1
        if key is not None:
            held = self.per_address.get(key, 1) - 1
            if held > 0:
                self.per_address[key] = held
            else:
                self.per_address.pop(key, None)

    def warn(self, kind: str, message: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._warned.get(kind, -WARNING_INTERVAL) >= WARNING_INTERVAL:
            self._warned[kind] = now
            logger.warning(message, *args)


_limits = Limits()
_admission = _Admission()


def limits_from_config(listen: ListenConfig) -> Limits:
    """The limits of `listen.*`, with the TLS context built as uvicorn would build it."""
    tls = None
    if listen.tls_certificate:
        # uvicorn's own function and defaults (what `ssl_certfile`/`ssl_keyfile` gave before).
        try:
            tls = create_ssl_context(
                certfile=listen.tls_certificate,
                keyfile=listen.tls_private_key,
                password=None,
                ssl_version=SSL_PROTOCOL_VERSION,
                cert_reqs=ssl.CERT_NONE,
                ca_certs=None,
                ciphers=None,
            )
        except (OSError, ssl.SSLError) as e:
            raise ConfigError(f"cannot use listen.tls_certificate and listen.tls_private_key: {e}") from None
    return Limits(
        header_timeout=listen.header_timeout_seconds,
        body_idle_timeout=listen.body_idle_timeout_seconds,
        body_timeout=listen.body_timeout_seconds,
        max_header_bytes=listen.max_header_bytes,
        max_headers=listen.max_headers,
        max_url_bytes=listen.max_url_bytes,
        max_connections=listen.max_connections,
        max_connections_per_ip=listen.max_connections_per_ip,
        exempt=tuple(ipaddress.ip_network(n, strict=False) for n in listen.trusted_proxies),
        tls=tls,
    )


def configure(limits: Limits) -> Limits:
    """Use `limits` for this process's connections from now on, the connection cap lowered to
    what the open-file limit (raised to its hard limit first) leaves room for."""
    global _limits
    file_limit = raise_file_limit()
    fitting = connections_that_fit(limits.max_connections, file_limit)
    if fitting < limits.max_connections:
        logger.warning(
            "listen.max_connections %d does not fit under the open-file limit %d: using %d "
            "(raise the limit: LimitNOFILE= in the systemd unit, ulimit -n)",
            limits.max_connections,
            file_limit,
            fitting,
        )
        limits = dataclasses.replace(limits, max_connections=fitting)
    _limits = limits
    return limits


def _address_key(peer: Any, exempt: tuple[Network, ...]) -> str | None:
    """What the per-address cap counts a peer under: IPv4 address, IPv6 /64; None: not capped."""
    if not isinstance(peer, (tuple, list)) or not peer or not isinstance(peer[0], str):
        return None  # not an IP peer (a Unix socket): nothing to group by
    host = peer[0]
    if ":" not in host and not exempt:
        return host  # the common case, without parsing
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if any(ip in net for net in exempt):
        return None
    if isinstance(ip, ipaddress.IPv6Address):
        # One IPv6 client (a home, a phone, a VM) is usually given a whole /64.
        return str(ipaddress.IPv6Network((int(ip) >> 64 << 64, 64)))
    return str(ip)


class _LimitExceeded(Exception):
    """Raised inside a parser callback to stop parsing; the refusal is in `_violation`."""


def _refusal(status: int, reason: bytes, message: str, extra_headers: bytes = b"") -> bytes:
    body = json.dumps({"errcode": ErrorCode.UNKNOWN, "error": message}).encode()
    return b"".join(
        [
            b"HTTP/1.1 %d %s\r\n" % (status, reason),
            b"content-type: application/json\r\n",
            b"content-length: %d\r\n" % len(body),
            b"access-control-allow-origin: *\r\n",  # so that a web client can read why
            extra_headers,
            b"connection: close\r\n\r\n",
            body,
        ]
    )


_REQUEST_TIMEOUT = _refusal(408, b"Request Timeout", "The request did not arrive in time")
_HEADERS_TOO_LARGE = _refusal(431, b"Request Header Fields Too Large", "The request headers are too large")
_TOO_MANY_HEADERS = _refusal(431, b"Request Header Fields Too Large", "The request has too many header fields")
_URI_TOO_LONG = _refusal(414, b"URI Too Long", "The request target is too long")
_BUSY = _refusal(503, b"Service Unavailable", "Too many connections: try again later", b"retry-after: 1\r\n")
_BAD_REQUEST = _refusal(400, b"Bad Request", "The request is not valid HTTP")
_BUSY_ADDRESS = _refusal(
    503, b"Service Unavailable", "Too many connections from your address: try again later", b"retry-after: 1\r\n"
)


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """HttpToolsProtocol with deadlines, head limits, connection caps and TLS of its own.

    Only data_received (head bytes) and on_url/on_header (replaced, not wrapped) run per
    request; the per-request callbacks stay uvicorn's. Deadlines are checked by a sweep that
    reads where each connection is from uvicorn's state (`scope`, `cycle`): wrapping the
    callbacks instead cost ~7% of `GET /v2` end to end (docs/design.md).
    """

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        limits = _limits
        self._limits = limits
        self._max_headers = limits.max_headers
        self._max_header_bytes = limits.max_header_bytes
        self._max_url_bytes = limits.max_url_bytes
        self._raw: asyncio.Transport | None = None  # the TCP transport (under TLS: below it)
        self._address: str | None = None
        self._counted = False  # holds a slot in _admission (released exactly once)
        self._http = False  # HttpToolsProtocol.connection_made has run
        self._closed = False
        self._handshake_task: asyncio.Task[None] | None = None
        self._early: list[bytes] | None = None  # TLS: data decrypted before start_tls returned
        self._special = _NOT_YET  # _NOT_YET (TLS handshake), _REFUSED, or 0 once serving HTTP
        self._reads = 0  # reads so far (progress, for the sweep)
        self._head_scope: object = None  # the scope whose head bytes are being counted
        self._header_room = limits.max_header_bytes  # bytes that head may still take
        self._violation: bytes | None = None
        self._refused = False  # a refusal is written (or the connection dropped): ignore input
        self._lingered = 0
        self._linger_timer: TimerHandle | None = None
        self._lingering_at_accept = False
        # What the sweep saw last: the phase, the object it is about (scope or cycle), since
        # when, and the reads then (a body is idle while they do not change).
        self._seen_phase = _HANDSHAKE
        self._seen_of: object = None
        self._seen_since = 0.0
        self._seen_reads = 0
        self._idle_since = 0.0

    # --- connection ---------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        limits = self._limits
        self._raw = transport
        self._address = _address_key(transport.get_extra_info("peername"), limits.exempt)
        refused = _admission.admit(self._address, limits)
        if refused is not None:
            self._refuse_at_accept(transport, refused)
            return
        self._counted = True
        self._seen_since = self._idle_since = self.loop.time()
        every = max(0.05, SWEEP_SHARE * min(limits.header_timeout, limits.body_idle_timeout))
        _admission.watch(self, self.loop, every)
        if limits.tls is None:
            self._start_http(transport)
        else:
            transport.pause_reading()  # nothing reaches us until start_tls has taken over
            self._early = []
            self._handshake_task = self.loop.create_task(self._handshake(transport, limits.tls))

    async def _handshake(self, raw: asyncio.Transport, context: ssl.SSLContext) -> None:
        try:
            tls = await self.loop.start_tls(
                raw,
                self,
                context,
                server_side=True,
                ssl_handshake_timeout=self._limits.header_timeout,
                # Closing waits this long at most for the client's close_notify.
                ssl_shutdown_timeout=LINGER_SECONDS,
            )
        except BaseException as e:  # failed, timed out, cancelled at shutdown
            self._drop()
            raw.abort()
            if isinstance(e, asyncio.CancelledError):
                raise
            logger.debug("TLS handshake failed: %r", e)
            return
        finally:
            self._handshake_task = None
        if tls is None or self._closed or tls.is_closing():
            self._drop()
            return
        self._start_http(tls)
        early, self._early = self._early or [], None
        for data in early:
            if self._closed or self._refused:
                break
            self.data_received(data)

    def _start_http(self, transport: asyncio.Transport) -> None:
        self._http = True
        self._special = 0
        # Waiting for the first request, since the accept (the TLS handshake counts in it).
        self._seen_phase, self._seen_of = _IDLE, None
        # A response's head and body in one send (http.coalescing).
        HttpToolsProtocol.connection_made(self, CoalescingTransport(transport, self.loop))  # type: ignore[arg-type]

    def connection_lost(self, exc: Exception | None) -> None:
        if self._closed:
            return
        self._drop()
        if self._http:
            super().connection_lost(exc)
        self.parser = None  # type: ignore[assignment]

    def _drop(self) -> None:
        """Forget this connection: sweep and timers off, slot released (each exactly once)."""
        self._closed = True
        _admission.live.discard(self)
        if self._linger_timer is not None:
            self._linger_timer.cancel()
            self._linger_timer = None
        if self._counted:
            self._counted = False
            _admission.release(self._address)
        if self._lingering_at_accept:
            self._lingering_at_accept = False
            _admission.lingering_refusals -= 1

    # --- incoming bytes -------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._special:
            self._not_for_http(data)
            return
        self._reads += 1
        cycle = self.cycle
        scope = self.scope
        if cycle is None or cycle.scope is not scope:
            # In a head (a cycle starts when a head ends): count its bytes. On a kept-alive
            # connection the first read of a request comes before its head has a scope and is
            # not counted: a head can exceed the bound by at most one read (256 KiB).
            if scope is not self._head_scope:
                self._head_scope = scope
                self._header_room = self._max_header_bytes
            room = self._header_room
            if len(data) > room:
                self._head_beyond_room(data, room, scope)
                return
            self._header_room = room - len(data)
            if self._feed(data) and self.scope is not scope:
                self._new_head(scope, len(data))
            return
        # uvicorn's data_received, with our refusals (inline: this is every request's path).
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._upgrade()
        except httptools.HttpParserError:
            self._parse_error()

    def _new_head(self, scope_before: object, counted: int) -> None:
        """A message began during a read we counted: count its head from here on. Only the
        connection's first head (no cycle yet) is charged the read; otherwise it starts afresh."""
        self._head_scope = self.scope
        first = scope_before is None and self.cycle is None
        self._header_room = self._max_header_bytes - (counted if first else 0)

    def _feed(self, data: bytes | memoryview) -> bool:
        """data_received's parsing, for pieces of a read; False once the connection is done."""
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._upgrade()
        except httptools.HttpParserError:
            self._parse_error()
            return False
        return not (self._refused or self.transport.is_closing())

    def _head_beyond_room(self, data: bytes, room: int, scope: object) -> None:
        # Feed what the head may still take and, if it has not ended within that, refuse.
        # What follows a completed head is fed as usual.
        if data.find(b"\r\n\r\n", 0, room) != -1:
            # The usual case (a request with a body, in one read): the head ends in time.
            if self._feed(data) and self.scope is not scope:
                self._new_head(scope, 0)
            return
        view = memoryview(data)
        if not self._feed(view[:room]):
            return
        cycle = self.cycle
        if cycle is None or cycle.scope is None or (cycle.scope is not scope and cycle.scope is not self.scope):
            self._refuse(_HEADERS_TOO_LARGE)  # the head has not ended within the bound
            return
        if self._feed(view[room:]) and self.scope is not scope:
            self._new_head(scope, 0)

    def _not_for_http(self, data: bytes) -> None:
        if self._special == _REFUSED:  # lingering after a refusal: drop it, up to a point
            self._lingered += len(data)
            if self._lingered > LINGER_BYTES:
                self._close()
        elif self._early is not None:  # TLS: decrypted before start_tls handed us the transport
            self._early.append(data)

    def _upgrade(self) -> None:
        if self._should_upgrade():
            self.handle_websocket_upgrade()
        else:
            self._unsupported_upgrade_warning()

    def _parse_error(self) -> None:
        if self._violation is not None:
            self._refuse(self._violation)
        else:
            logger.debug("invalid HTTP request received")
            self._refuse(_BAD_REQUEST)

    # --- parser callbacks (replacing uvicorn's, one frame each as before) ------------------------

    def on_url(self, url: bytes) -> None:
        self.url += url
        if len(self.url) > self._max_url_bytes:
            self._violation = _URI_TOO_LONG
            raise _LimitExceeded

    def on_header(self, name: bytes, value: bytes) -> None:
        # uvicorn's on_header, with the count checked first.
        if len(self.headers) >= self._max_headers:
            self._violation = _TOO_MANY_HEADERS
            raise _LimitExceeded
        name = name.lower()
        if name == b"expect" and value.lower() == b"100-continue":
            self.expect_100_continue = True
        self.headers.append((name, value))

    # --- deadlines (the sweep) ------------------------------------------------------------------

    def _where(self) -> tuple[int, object]:
        """What this connection is doing, read from uvicorn's state, and the object it is about."""
        if not self._http:
            return _HANDSHAKE, None
        cycle = self.cycle
        scope = self.scope
        if cycle is None or cycle.scope is not scope:
            return (_IDLE if scope is None else _HEADERS), scope
        if cycle.response_complete:
            return _IDLE, cycle  # waiting for the next request (its head starts a new scope)
        return (_BODY if cycle.more_body else _APP), cycle

    def _check(self, now: float) -> None:
        """Called by the sweep: act on a deadline that has passed."""
        if self._closed or self._refused:
            return
        phase, of = self._where()
        if phase != self._seen_phase or of is not self._seen_of:
            # Something new since the last sweep: its clock starts now (up to a sweep late).
            self._seen_phase, self._seen_of = phase, of
            self._seen_since = self._idle_since = now
            self._seen_reads = self._reads
            return
        limits = self._limits
        elapsed = now - self._seen_since
        if phase == _HANDSHAKE:
            if elapsed >= limits.header_timeout:
                self._abort()  # start_tls's own timeout is the same; whichever comes first
        elif phase == _IDLE:
            if elapsed >= limits.header_timeout:
                if self._reads != self._seen_reads:
                    self._refuse(_REQUEST_TIMEOUT)  # bytes came, but no request
                else:
                    self._close()  # nothing came: nobody to answer
        elif phase == _HEADERS:
            if elapsed >= limits.header_timeout:
                self._refuse(_REQUEST_TIMEOUT)
        elif phase == _BODY:
            if self.flow.read_paused:
                # We stopped reading (a pipelined request waits for the one before it, or the
                # application has not read the body so far): not the client's delay.
                self._idle_since = now
                self._seen_since = max(self._seen_since, now - limits.body_timeout + limits.body_idle_timeout)
                return
            if self._reads != self._seen_reads:  # progress
                self._seen_reads = self._reads
                self._idle_since = now
            if now - self._idle_since >= limits.body_idle_timeout or elapsed >= limits.body_timeout:
                self._refuse(_REQUEST_TIMEOUT, own_cycle=True)

    # --- refusing and closing -------------------------------------------------------------------

    def _refuse(self, response: bytes, *, own_cycle: bool = False) -> None:
        """Answer `response` (Connection: close), then linger a moment and close.

        own_cycle: the request refused is the current cycle's (its body was being read).
        Otherwise the current cycle is an earlier request's; if its response is not complete,
        anything we wrote would be read as (part of) that response: we only close.
        """
        if self._refused or self._closed:
            return
        self._refused = True
        self._special = _REFUSED
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            if not own_cycle or cycle.response_started or self.pipeline:
                self._close()
                return
            cycle.disconnected = True  # the application sees a disconnect; its answer goes nowhere
            cycle.message_event.set()
        self.transport.write(response)
        self._linger(self.transport)

    def _linger(self, transport: asyncio.Transport) -> None:
        # Stop writing, keep reading (and dropping) for a moment: closing with unread bytes
        # sends a reset, which can destroy our answer before the client reads it. A TLS
        # transport cannot half-close (and closing it aborts on the next application data):
        # it stays open for the moment, the answer's Content-Length tells the client it ended.
        if transport.can_write_eof():
            transport.write_eof()
        transport.resume_reading()
        self._linger_timer = self.loop.call_later(LINGER_SECONDS, self._close)

    def _refuse_at_accept(self, transport: asyncio.Transport, why: str) -> None:
        limits = self._limits
        if why == "server":
            _admission.warn(
                "server",
                "refusing connections: %d open, listen.max_connections is %d",
                _admission.open,
                limits.max_connections,
            )
        else:
            _admission.warn(
                "address",
                "refusing connections from one address: listen.max_connections_per_ip (%d) reached",
                limits.max_connections_per_ip,
            )
        self._refused = True
        self._special = _REFUSED
        if limits.tls is not None:
            transport.abort()  # no handshake for a refused connection: closed at once
            return
        transport.write(_BUSY if why == "server" else _BUSY_ADDRESS)
        if _admission.lingering_refusals >= MAX_LINGERING_REFUSALS:
            transport.close()
            return
        _admission.lingering_refusals += 1
        self._lingering_at_accept = True
        self._linger(transport)

    def _close(self) -> None:
        transport = self.transport if self._http else self._raw
        if transport is not None and not transport.is_closing():
            transport.close()

    def _abort(self) -> None:
        transport = self.transport if self._http else self._raw
        if transport is not None:
            transport.abort()
