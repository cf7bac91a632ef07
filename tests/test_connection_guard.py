"""One client cannot take the server down: the attacks of issue 13 (items 3 and 4), run for real.

Each test starts its own server process (SQLite: nothing here touches storage) and attacks it
over loopback the way the red team did: sockets that send half a request and wait, more of
them than the server has file descriptors; a connection that sends nothing; a body dripping
in a byte at a time; a 32 MiB header value; too many headers; more connections from one
address than it may hold; and the same against direct TLS. A "normal client" talks from
another loopback address (127.0.0.2: all of 127/8 is loopback on Linux), as another user
would. Waits are bounded by socket timeouts: a hang fails the test, it does not stall it.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import resource
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trustme
from support.db import DatabaseFactory
from support.homeserver import HomeserverStandIn
from support.server import V2, SydentServer, wait_until
from support.smtp import SmtpSink

V1 = "/_matrix/identity/api/v1"
HALF_REQUEST = b"GET /_matrix/identity/v2 HTTP/1.1\r\nHost: id.test\r\nUser-Agent: slow"
NORMAL = "127.0.0.2"  # the address of the normal client
ANSWER_WITHIN = 15.0  # seconds a test waits for an answer before calling it a hang


# --- servers and sockets ------------------------------------------------------------------------


@pytest.fixture
def sqlite_dbs(tmp_path: Path) -> Iterator[DatabaseFactory]:
    factory = DatabaseFactory("sqlite", tmp_path / "db")
    yield factory
    factory.cleanup()


class GuardedServer(SydentServer):
    """A server started with `--workers N` when asked."""

    workers = 1

    def serve_args(self) -> list[str]:
        return ["--workers", str(self.workers)] if self.workers > 1 else []


ServerFactory = Callable[..., GuardedServer]


@pytest.fixture
def start_server(
    sqlite_dbs: DatabaseFactory,
    smtp_sink: SmtpSink,
    homeserver: HomeserverStandIn,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> Iterator[ServerFactory]:
    """`start_server(listen={...}, file_limit=None, workers=1)`: a started server."""
    servers: list[GuardedServer] = []
    request.node.extra_sydent_servers = servers

    def start(listen: dict[str, Any] | None = None, file_limit: int | None = None, workers: int = 1) -> GuardedServer:
        server = GuardedServer(
            tmp_path / f"server{len(servers) + 1}",
            database_url=sqlite_dbs.create().url,
            smtp_port=smtp_sink.port,
            ca_file=homeserver.ca_path,
            extra_config={"listen": listen or {}},
            name=f"guarded sydent_lite #{len(servers) + 1}",
        )
        server.workers = workers
        if file_limit is not None:
            # The server's own file limit, soft and hard (it raises soft to hard at start):
            # makes running out of descriptors cheap to reach.
            server.preexec_fn = lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (file_limit, file_limit))
        servers.append(server)
        return server.start()  # type: ignore[return-value]

    yield start
    for server in servers:
        server.stop()


def connect(port: int, source: str = "127.0.0.1", timeout: float = ANSWER_WITHIN) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    return sock


def read_until_closed(sock: socket.socket, limit: int = 1 << 20) -> bytes:
    """Everything the server sends until it closes (a reset after data counts as closed).
    socket.timeout (a hang) propagates."""
    chunks = []
    size = 0
    while size < limit:
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, BrokenPipeError, ssl.SSLEOFError):
            break
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def parse_response(raw: bytes) -> tuple[int, bytes, dict[str, Any] | None]:
    """Status, head and JSON body of one response."""
    assert raw.startswith(b"HTTP/1.1 "), raw[:200]
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), head, (json.loads(body) if body else None)


def expect_refusal(sock: socket.socket, status: int) -> dict[str, Any]:
    """Reads the response: `status` with a Matrix error, Connection: close, then the close."""
    got, head, body = parse_response(read_until_closed(sock))
    assert got == status, (got, body)
    assert b"connection: close" in head.lower(), head
    assert body is not None and body["errcode"] == "M_UNKNOWN" and body["error"], body
    return body


def normal_client(server: SydentServer, **kwargs: Any) -> httpx.Client:
    transport = httpx.HTTPTransport(local_address=NORMAL, **kwargs.pop("transport_options", {}))
    return httpx.Client(
        base_url=kwargs.pop("base_url", server.base_url), transport=transport, timeout=ANSWER_WITHIN, **kwargs
    )


def vm_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def open_half_requests(port: int, count: int, sources: list[str]) -> list[socket.socket]:
    """`count` connections spread over `sources`, each sending half a request and waiting.
    Opened 32 at a time: connections beyond a full listen backlog wait for a SYN retry."""

    def open_one(i: int) -> socket.socket | None:
        try:
            sock = connect(port, sources[i % len(sources)], timeout=5)
        except OSError:  # refused or reset at once by a server that is full: also fine here
            return None
        with contextlib.suppress(OSError):
            sock.sendall(HALF_REQUEST)
        sock.settimeout(ANSWER_WITHIN)
        return sock

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        return [sock for sock in pool.map(open_one, range(count)) if sock is not None]


def open_connections(port: int, count: int) -> list[socket.socket]:
    """`count` connections that send nothing, opened 32 at a time as in `open_half_requests`
    (one after another, each beyond the full backlog waited a second for its SYN retry)."""

    def open_one(_: int) -> socket.socket | None:
        try:
            return connect(port, timeout=5)
        except OSError:
            return None

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        return [sock for sock in pool.map(open_one, range(count)) if sock is not None]


def close_all(socks: list[socket.socket]) -> None:
    for sock in socks:
        sock.close()


# --- slow clients ---------------------------------------------------------------------------------


def test_many_half_requests_from_one_address_leave_others_served(start_server: ServerFactory) -> None:
    # The red team's attack: more half-sent requests than the server has descriptors.
    server = start_server({"max_connections_per_ip": 40, "header_timeout_seconds": 60}, file_limit=256)
    attack = open_half_requests(server.port, 400, ["127.0.0.1"])
    try:
        with normal_client(server) as client:
            for _ in range(3):
                assert client.get(V2).status_code == 200
        # The attacker's connections beyond its 40 were refused at once, not held.
        for sock in attack[-20:]:
            body = expect_refusal(sock, 503)
            assert "your address" in body["error"]
    finally:
        close_all(attack)
    assert "Too many open files" not in server.output()


def test_half_requests_from_many_addresses_get_a_clear_503_not_a_hang(start_server: ServerFactory) -> None:
    # A file limit of 256 leaves room for 80 connections (128 kept, 3 backlogs of 16): the
    # default max_connections (4096) is lowered to that, with a warning, instead of running out
    # of descriptors. The header timeout outlasts the attack's set-up (connections beyond the
    # listen backlog wait for a SYN retry): the server is still full when the normal client comes.
    server = start_server({"max_connections_per_ip": 40, "header_timeout_seconds": 10}, file_limit=256)
    sources = [f"127.0.0.{i}" for i in range(10, 20)]
    attack = open_half_requests(server.port, 300, sources)
    try:
        # Full: a normal client is told so at once ...
        with normal_client(server) as client:
            resp = client.get(V2)
            assert resp.status_code == 503, resp.text
            assert resp.json()["errcode"] == "M_UNKNOWN" and resp.headers["retry-after"] == "1"
        # ... and served again once the half requests have timed out (each got a 408).
        for sock in attack[:5]:
            expect_refusal(sock, 408)

        def served() -> bool:
            with normal_client(server) as client:
                return client.get(V2).status_code == 200

        wait_until(served, timeout=40, what="served after the attack timed out")
    finally:
        close_all(attack)
    assert "Too many open files" not in server.output()
    assert "does not fit under the open-file limit 256: using 80" in server.output()


def test_a_connection_that_sends_nothing_is_closed(start_server: ServerFactory) -> None:
    server = start_server({"header_timeout_seconds": 1})
    with connect(server.port) as sock:
        assert read_until_closed(sock) == b""  # closed, nothing to answer


def test_half_a_request_gets_408(start_server: ServerFactory) -> None:
    server = start_server({"header_timeout_seconds": 1})
    with connect(server.port) as sock:
        sock.sendall(HALF_REQUEST)
        expect_refusal(sock, 408)


def test_headers_dripping_in_are_cut_off(start_server: ServerFactory) -> None:
    # Slowloris: a header line every 0.2 s keeps the request "alive" forever on a server that
    # times out only on silence.
    server = start_server({"header_timeout_seconds": 2})
    with connect(server.port) as sock:
        sock.sendall(b"GET /_matrix/identity/v2 HTTP/1.1\r\nHost: id.test\r\n")
        sent = 0
        with contextlib.suppress(OSError):
            for sent in range(1, 76):  # 15 s of dripping at most
                sock.sendall(b"X-Drip-%d: x\r\n" % sent)
                time.sleep(0.2)
        assert sent < 75, "the server let the headers drip for 15 s"
        expect_refusal(sock, 408)


def test_a_dripping_body_is_cut_off(start_server: ServerFactory) -> None:
    server = start_server({"body_idle_timeout_seconds": 2, "body_timeout_seconds": 3})
    head = (
        b"POST " + V1.encode() + b"/validate/email/requestToken HTTP/1.1\r\nHost: id.test\r\n"
        b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
    )
    with connect(server.port) as sock:
        sock.sendall(head)
        sent = 0
        with contextlib.suppress(OSError):
            # a byte every 0.2 s: never idle for 2 s, 15 s at most (`sent` is read after the loop)
            for sent in range(1, 76):  # noqa: B007
                sock.sendall(b" ")
                time.sleep(0.2)
        assert sent < 75, "the server let the body drip for 15 s"
        expect_refusal(sock, 408)
    # A body that stops: cut after the idle timeout.
    with connect(server.port) as sock:
        sock.sendall(head + b'{"email": ')
        expect_refusal(sock, 408)


# --- request heads ----------------------------------------------------------------------------------


def test_a_32_mib_header_value_gets_431(start_server: ServerFactory) -> None:
    server = start_server()
    request = b"GET /_matrix/identity/v2 HTTP/1.1\r\nHost: id.test\r\nX-Big: " + b"a" * (32 << 20) + b"\r\n\r\n"
    with connect(server.port) as sock:
        with contextlib.suppress(OSError):  # the server stops reading long before the end
            sock.sendall(request)
        expect_refusal(sock, 431)
    # The same as the second request of a kept-alive connection.
    with connect(server.port) as sock:
        sock.sendall(b"GET /_matrix/identity/v2 HTTP/1.1\r\nHost: id.test\r\n\r\n")
        first = b""
        while b"\r\n\r\n{}" not in first:
            chunk = sock.recv(65536)
            assert chunk, first
            first += chunk
        assert first.startswith(b"HTTP/1.1 200 ")
        with contextlib.suppress(OSError):
            sock.sendall(request)
        expect_refusal(sock, 431)
    # A head just under the limit is served.
    with connect(server.port) as sock:
        filler = b"a" * (32 * 1024 - 200)
        sock.sendall(
            b"GET /_matrix/identity/v2 HTTP/1.1\r\nHost: id.test\r\nX-Big: " + filler + b"\r\nConnection: close\r\n\r\n"
        )
        assert read_until_closed(sock).startswith(b"HTTP/1.1 200 ")


def test_unfinished_huge_headers_do_not_grow_the_server(start_server: ServerFactory) -> None:
    # Ten connections each sending 32 MiB of one header value, never finished: an unprotected
    # server accumulates it all (86 -> 475 MiB in the red team's run).
    server = start_server()
    assert server.proc is not None
    with normal_client(server) as client:
        assert client.get(V2).status_code == 200
    before = vm_rss_kib(server.proc.pid)
    chunk = b"a" * (1 << 20)
    socks = []
    try:
        for _ in range(10):
            sock = connect(server.port)
            socks.append(sock)
            with contextlib.suppress(OSError):
                sock.sendall(b"GET /_matrix/identity/v2 HTTP/1.1\r\nHost: id.test\r\nX-Big: ")
                for _ in range(32):
                    sock.sendall(chunk)
        grown = (vm_rss_kib(server.proc.pid) - before) / 1024
        assert grown < 40, f"the server grew by {grown:.0f} MiB"
        for sock in socks:
            expect_refusal(sock, 431)
    finally:
        close_all(socks)
    with normal_client(server) as client:
        assert client.get(V2).status_code == 200


def test_too_many_headers_get_431(start_server: ServerFactory) -> None:
    server = start_server()

    def request(extra_headers: int) -> bytes:
        lines = b"".join(b"X-H-%d: %d\r\n" % (i, i) for i in range(extra_headers))
        with connect(server.port) as sock:
            sock.sendall(
                b"GET /_matrix/identity/v2 HTTP/1.1\r\nHost: id.test\r\nConnection: close\r\n" + lines + b"\r\n"
            )
            return read_until_closed(sock)

    assert request(98).startswith(b"HTTP/1.1 200 ")  # 100 header fields in all
    for extra in (99, 5000):
        status, head, body = parse_response(request(extra))
        assert status == 431 and body is not None and body["errcode"] == "M_UNKNOWN", (status, body)
        assert b"connection: close" in head


def test_an_overlong_request_target_gets_414(start_server: ServerFactory) -> None:
    server = start_server()
    with normal_client(server) as client:
        resp = client.get(V2, params={"padding": "a" * 8200})
        assert resp.status_code == 414 and resp.json()["errcode"] == "M_UNKNOWN"
    with normal_client(server) as client:
        assert client.get(V2, params={"padding": "a" * 8000}).status_code == 200


# --- connection caps -----------------------------------------------------------------------------------


def test_over_the_per_address_cap_gets_503_at_once(start_server: ServerFactory) -> None:
    server = start_server({"max_connections_per_ip": 5})
    held = [connect(server.port) for _ in range(5)]
    try:
        with connect(server.port) as sixth:
            sixth.sendall(b"GET /_matrix/identity/v2 HTTP/1.1\r\nHost: id.test\r\n\r\n")
            body = expect_refusal(sixth, 503)
            assert "your address" in body["error"]
        with normal_client(server) as client:  # another address is not affected
            assert client.get(V2).status_code == 200
        held.pop().close()  # a slot comes free ...

        def served() -> bool:  # ... once the server has seen the close
            with httpx.Client(base_url=server.base_url, timeout=ANSWER_WITHIN) as client:
                return client.get(V2).status_code == 200

        wait_until(served, timeout=10, what="a connection from 127.0.0.1 served again")
    finally:
        close_all(held)


def test_trusted_proxies_are_not_capped_per_address(start_server: ServerFactory) -> None:
    server = start_server({"max_connections_per_ip": 3, "trusted_proxies": ["127.0.0.1/32"]})
    held = [connect(server.port) for _ in range(5)]
    try:
        with httpx.Client(base_url=server.base_url, timeout=ANSWER_WITHIN) as proxy:
            assert proxy.get(V2).status_code == 200  # the proxy's 6th connection
        others = [connect(server.port, NORMAL) for _ in range(3)]
        try:
            with connect(server.port, NORMAL) as fourth:
                expect_refusal(fourth, 503)
        finally:
            close_all(others)
    finally:
        close_all(held)


# --- direct TLS ------------------------------------------------------------------------------------------


@pytest.fixture
def tls_files(tmp_path: Path) -> dict[str, str]:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    paths = {name: str(tmp_path / f"{name}.pem") for name in ("cert", "key", "ca")}
    cert.cert_chain_pems[0].write_to_path(paths["cert"])
    for blob in cert.cert_chain_pems[1:]:
        blob.write_to_path(paths["cert"], append=True)
    cert.private_key_pem.write_to_path(paths["key"])
    ca.cert_pem.write_to_path(paths["ca"])
    return paths


def tls_listen(files: dict[str, str], **limits: Any) -> dict[str, Any]:
    return {"tls_certificate": files["cert"], "tls_private_key": files["key"], **limits}


def tls_client(server: SydentServer, files: dict[str, str], source: str = NORMAL) -> httpx.Client:
    context = ssl.create_default_context(cafile=files["ca"])
    return (
        normal_client(server, base_url=f"https://127.0.0.1:{server.port}", transport_options={"verify": context})
        if source == NORMAL
        else httpx.Client(base_url=f"https://127.0.0.1:{server.port}", verify=context, timeout=ANSWER_WITHIN)
    )


def tls_connect(server: SydentServer, files: dict[str, str], source: str = "127.0.0.1") -> ssl.SSLSocket:
    context = ssl.create_default_context(cafile=files["ca"])
    return context.wrap_socket(connect(server.port, source), server_hostname="127.0.0.1")


def test_tls_connection_without_a_handshake_is_closed(start_server: ServerFactory, tls_files: dict[str, str]) -> None:
    # uvicorn's TLS waits 60 s for a handshake, and the connection is invisible to any cap meanwhile.
    server = start_server(tls_listen(tls_files, header_timeout_seconds=1))
    with connect(server.port) as sock:
        assert read_until_closed(sock) == b""
    with connect(server.port) as sock:  # half a ClientHello
        sock.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
        assert read_until_closed(sock) == b""


def test_tls_half_request_gets_408_and_big_heads_431(start_server: ServerFactory, tls_files: dict[str, str]) -> None:
    server = start_server(tls_listen(tls_files, header_timeout_seconds=1))
    with tls_connect(server, tls_files) as sock:
        sock.sendall(HALF_REQUEST)
        expect_refusal(sock, 408)
    with tls_connect(server, tls_files) as sock:
        with contextlib.suppress(OSError):  # the server stops reading long before the end
            sock.sendall(
                b"GET /_matrix/identity/v2 HTTP/1.1\r\nHost: id.test\r\nX-Big: " + b"a" * (1 << 19) + b"\r\n\r\n"
            )
        expect_refusal(sock, 431)
    with tls_client(server, tls_files) as client:
        resp = client.get(V2)
        assert resp.status_code == 200 and resp.json() == {}


def test_tls_many_unfinished_connections_leave_others_served(
    start_server: ServerFactory, tls_files: dict[str, str]
) -> None:
    # More connections than descriptors, none of which ever starts its handshake.
    server = start_server(tls_listen(tls_files, max_connections_per_ip=40, header_timeout_seconds=60), file_limit=256)
    attack = []
    try:
        attack = open_connections(server.port, 400)
        with tls_client(server, tls_files) as client:
            for _ in range(3):
                assert client.get(V2).status_code == 200
        # Beyond its 40 the attacker's connections were closed at once.
        for sock in attack[-20:]:
            assert read_until_closed(sock) == b""
        # And a handshake from over the cap fails at once rather than hanging.
        with pytest.raises((ssl.SSLError, ConnectionError)):
            tls_connect(server, tls_files).close()
    finally:
        close_all(attack)
    assert "Too many open files" not in server.output()


# --- worker processes ------------------------------------------------------------------------------------


def test_the_limits_hold_in_worker_processes(start_server: ServerFactory) -> None:
    server = start_server({"header_timeout_seconds": 1, "max_headers": 20}, workers=2)
    with connect(server.port) as sock:
        sock.sendall(HALF_REQUEST)
        expect_refusal(sock, 408)
    with connect(server.port) as sock:
        sock.sendall(b"GET /_matrix/identity/v2 HTTP/1.1\r\nHost: id.test\r\n" + b"X-H: 1\r\n" * 30 + b"\r\n")
        expect_refusal(sock, 431)
    with normal_client(server) as client:
        assert client.get(V2).status_code == 200


def test_pipelined_requests_are_answered_whole_and_in_order(start_server: ServerFactory) -> None:
    # Three requests in one send, the last asking to close: each answer whole, in order (the
    # transport holds a turn's writes and sends them together: http.coalescing), and the
    # closing answer is sent before the close, not dropped with it.
    server = start_server()
    with connect(server.port) as sock:
        sock.sendall(
            b"GET /_matrix/identity/v2 HTTP/1.1\r\nHost: id.test\r\n\r\n"
            b"GET /_matrix/identity/v2/nothing-here HTTP/1.1\r\nHost: id.test\r\n\r\n"
            b"GET /_matrix/identity/api/v1/pubkey/ed25519:0 HTTP/1.1\r\nHost: id.test\r\nConnection: close\r\n\r\n"
        )
        raw = read_until_closed(sock)
    answers = [b"HTTP/1.1 " + part for part in raw.split(b"HTTP/1.1 ")[1:]]
    assert len(answers) == 3, raw
    parsed = [parse_response(a) for a in answers]
    assert [status for status, _, _ in parsed] == [200, 404, 200]
    assert parsed[0][2] == {}
    assert parsed[1][2] is not None and parsed[1][2]["errcode"] == "M_UNRECOGNIZED"
    assert parsed[2][2] is not None and parsed[2][2]["public_key"]
    assert b"connection: close" in parsed[2][1].lower()
