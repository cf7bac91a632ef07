"""Observability: Prometheus metrics on a listener of their own, request ids, log hygiene, health.

End-to-end tests run the real server (`make_server` / `idserver`) and scrape it over HTTP; the
log filters, the metrics listener and multiprocess mode are also tested in-process.
"""

from __future__ import annotations

import asyncio
import inspect
import io
import logging
import os
import re
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from support.server import V1, V2, IdentityApi, SydentServer, new_secret, unique_email
from support.smtp import free_port

from sydent_lite.observability import logs, metrics

HEX16 = re.compile(r"[0-9a-f]{16}")
REQUEST_TOKEN_ROUTE = f"{V2}/validate/email/requestToken"
SUBMIT_TOKEN_ROUTE = f"{V2}/validate/email/submitToken"
BIND_ROUTE = f"{V2}/3pid/bind"


# --- helpers --------------------------------------------------------------------------------------


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(url: str) -> tuple[httpx.Response, Samples]:
    resp = httpx.get(url, timeout=10)
    assert resp.status_code == 200, resp.text
    samples: Samples = {}
    for family in text_string_to_metric_families(resp.text):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return resp, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def series(samples: Samples, name: str) -> list[dict[str, str]]:
    return [dict(labels) for (n, labels) in samples if n == name]


def wait_for_output(server: SydentServer, predicate: Callable[[str], bool], timeout: float = 5.0) -> str:
    """The server's output once `predicate` holds for it (log lines arrive through a pipe)."""
    deadline = time.monotonic() + timeout
    while True:
        out = server.output()
        if predicate(out) or time.monotonic() > deadline:
            return out
        time.sleep(0.05)


def wired(module: str, name: str) -> bool:
    """Whether the lead has added the counter's call site in `module` yet."""
    import importlib

    return name in inspect.getsource(importlib.import_module(module))


# --- end to end: metrics ------------------------------------------------------------------------


def test_metrics_listener_counts_requests_by_route_and_status(
    make_server: Callable[..., SydentServer], api_for: Callable[[SydentServer], IdentityApi]
) -> None:
    metrics_port = free_port()
    server = make_server(
        extra_config={"metrics": {"enabled": True, "host": "127.0.0.1", "port": metrics_port, "path": "/metrics"}}
    )
    api: IdentityApi = api_for(server)
    url = f"http://127.0.0.1:{metrics_port}/metrics"

    # Before any traffic: the listener answers, the pre-declared series exist at 0.
    resp, before = scrape(url)
    assert resp.headers["content-type"].startswith("text/plain")
    assert value(before, "sydent_onbind_pending") == 0
    assert ("sydent_emails_sent_total", frozenset({("kind", "validation")})) in before

    for _ in range(3):
        assert api.client.get("/_matrix/identity/versions").status_code == 200
    unknown = "/_matrix/identity/v2/no/such/thing/" + new_secret()
    assert api.client.get(unknown).status_code == 404
    assert api.client.get(f"{V2}/account").status_code == 401  # no token
    assert api.client.get("/_sydent_lite/health").status_code == 200

    user = api.register()
    email = unique_email("metrics")
    session, _ = api.bind_email(email, user)
    assert api.lookup_email(user, email) == user.user_id
    assert api.v1_lookup("email", email).status_code == 200

    _, after = scrape(url)
    requests = "sydent_requests_total"
    assert value(after, requests, route="/_matrix/identity/versions", method="GET", status="200") == 3
    assert value(after, requests, route="unmatched", method="GET", status="404") == 1
    assert value(after, requests, route=f"{V2}/account", method="GET", status="401") == 1
    assert value(after, requests, route=REQUEST_TOKEN_ROUTE, method="POST", status="200") == 1
    assert value(after, requests, route=SUBMIT_TOKEN_ROUTE, method="POST", status="200") == 1
    assert value(after, requests, route=BIND_ROUTE, method="POST", status="200") == 1
    assert value(after, requests, route=f"{V1}/lookup", method="GET", status="200") == 1

    # Route templates only: no raw paths, query strings, sids or addresses in any label.
    routes = {labels["route"] for labels in series(after, requests)}
    assert all(r == "unmatched" or r.startswith("/") for r in routes), routes
    scraped = httpx.get(url, timeout=10).text
    for leaked in (unknown, session.sid, session.client_secret, email, user.token):
        assert leaked not in scraped

    # Health probes are not client traffic: not counted.
    assert "/_sydent_lite/health" not in routes

    # Latency histogram, per route and method.
    hist = "sydent_request_duration_seconds"
    assert value(after, hist + "_count", route=BIND_ROUTE, method="POST") == 1
    assert value(after, hist + "_bucket", route=BIND_ROUTE, method="POST", le="+Inf") == 1
    assert value(after, hist + "_sum", route=BIND_ROUTE, method="POST") > 0

    assert value(after, "sydent_onbind_pending") == 0

    # Counters whose call sites live in the services (added by the lead; checked once wired).
    if wired("sydent_lite.services.sessions", "EMAILS_SENT"):
        assert value(after, "sydent_emails_sent_total", kind="validation") == 1
        assert value(after, "sydent_emails_failed_total", kind="validation") == 0
    if wired("sydent_lite.http.routes.lookup", "LOOKUPS"):
        assert value(after, "sydent_lookups_total", api="v2") >= 1
        assert value(after, "sydent_lookups_total", api="v1") == 1

    # Only the configured path, only on the metrics listener.
    assert httpx.get(f"http://127.0.0.1:{metrics_port}/other", timeout=10).status_code == 404
    assert api.client.get("/metrics").status_code == 404


def test_metrics_listener_stops_with_the_server(make_server: Callable[..., SydentServer]) -> None:
    metrics_port = free_port()
    server = make_server(extra_config={"metrics": {"enabled": True, "host": "127.0.0.1", "port": metrics_port}})
    path = server.config()["metrics"].get("path") or "/metrics"
    assert httpx.get(f"http://127.0.0.1:{metrics_port}{path}", timeout=10).status_code == 200
    server.stop()
    assert "Traceback" not in server.output()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", metrics_port), timeout=1).close()


def test_no_metrics_listener_unless_enabled(idserver: SydentServer, client: httpx.Client) -> None:
    assert client.get("/metrics").status_code == 404
    assert "metrics listening on" not in idserver.output()


# --- end to end: request ids, health, logs ---------------------------------------------------------


def test_health_answers_with_a_request_id(client: httpx.Client) -> None:
    resp = client.get("/_sydent_lite/health")
    assert resp.status_code == 200 and resp.json() == {"status": "ok"}
    assert HEX16.fullmatch(resp.headers["x-request-id"])


def test_request_id_is_echoed_when_plain_and_replaced_otherwise(client: httpx.Client) -> None:
    resp = client.get("/_matrix/identity/versions", headers={"X-Request-Id": "lb-Req-42"})
    assert resp.headers["x-request-id"] == "lb-Req-42"
    bad_ids: list[str | bytes] = ["x" * 65, "has space", "semi;colon", "ünï".encode(), "a_b", ""]
    for bad in bad_ids:
        resp = client.get(
            "/_matrix/identity/versions", headers=[(b"X-Request-Id", bad if isinstance(bad, bytes) else bad.encode())]
        )
        assert HEX16.fullmatch(resp.headers["x-request-id"]), bad
    # Fresh ids differ; errors and CORS pre-flights get one too.
    a = client.get("/_matrix/identity/versions").headers["x-request-id"]
    b = client.get("/_matrix/identity/versions").headers["x-request-id"]
    assert a != b
    assert HEX16.fullmatch(client.get("/nothing/here").headers["x-request-id"])
    preflight = client.options(
        f"{V2}/3pid/bind", headers={"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
    )
    assert HEX16.fullmatch(preflight.headers["x-request-id"])
    assert "x-request-id" in preflight.headers.get("access-control-expose-headers", "").lower()


def test_logs_carry_the_request_id_and_no_secrets(api: IdentityApi, idserver: SydentServer) -> None:
    user = api.register()
    email = unique_email("logcheck")
    request_id = "logcheck-" + new_secret()[7:27]
    resp = api.client.get("/_matrix/identity/versions", headers={"X-Request-Id": request_id})
    assert resp.headers["x-request-id"] == request_id

    session, _ = api.bind_email(email, user)
    assert api.lookup_email(user, email) == user.user_id
    # A refused submitToken (wrong token) and an unknown session: the error paths log too.
    wrong = api.submit_token(session, token="wrong" + session.token[5:], user=user)
    assert wrong.status_code in (200, 400, 404), wrong.text
    assert api.client.get(
        f"{V2}/3pid/getValidated3pid",
        params={"sid": "nope", "client_secret": session.client_secret},
        headers=user.headers,
    ).status_code in (400, 404)

    line_re = re.compile(
        rf"\S+ \S+ INFO sydent_lite\.access \[{re.escape(request_id)}\] "
        r"127\.0\.0\.1 GET /_matrix/identity/versions 200 [\d.]+ms"
    )
    # Every request of the flow has an access line with some request id, by route template.
    # (A line is written after its response has gone: wait for the last request's too.)
    lines = [
        rf"INFO sydent_lite\.access \[[0-9A-Za-z-]+\] 127\.0\.0\.1 {method} {re.escape(route)} \d{{3}} "
        for method, route in (
            ("POST", REQUEST_TOKEN_ROUTE),
            ("POST", SUBMIT_TOKEN_ROUTE),
            ("POST", BIND_ROUTE),
            ("POST", f"{V2}/lookup"),
            ("GET", f"{V2}/3pid/getValidated3pid"),
        )
    ]
    out = wait_for_output(idserver, lambda o: bool(line_re.search(o)) and all(re.search(x, o) for x in lines))
    assert line_re.search(out), out[-3000:]
    for line in lines:
        assert re.search(line, out), line
    # Log lines from inside a request carry its id (the mail sender's INFO line, here).
    assert re.search(r"INFO sydent_lite\.delivery\.email \[[0-9a-f]{16}\] ", out), out[-3000:]

    secrets = {
        "access token": user.token,
        "client secret": session.client_secret,
        "email token": session.token,
        "email address": email,
        "email local part": email.split("@")[0],
    }
    for what, secret in secrets.items():
        assert secret not in out, f"{what} appears in the server's log output"


# --- in-process: log filters -----------------------------------------------------------------------


@pytest.fixture
def log_capture() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    stream = io.StringIO()
    handler = logs.make_handler("text", stream)
    logger = logging.getLogger("test_observability.capture")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    yield logger, stream
    logger.handlers[:] = []


def test_redaction_masks_obvious_secrets_at_info_and_above(log_capture: tuple[logging.Logger, io.StringIO]) -> None:
    logger, stream = log_capture
    logger.info("GET /x?access_token=AT123&client_secret=CS456&sid=abc&token=TK789&sig=SG000")
    logger.warning("body %s", {"client_secret": "CS-json", "token": "TK-json", "code": 424242, "sid": "S1"})
    logger.error("header Authorization: Bearer syt_BEARER.tok= from %s", "alice.smith@mail.example.org")
    logger.info("db postgresql+asyncpg://sydent:PGPASS@db.example/sydent")
    try:
        raise ValueError("failed with token=EXC-TOKEN for bob@example.net")
    except ValueError:
        logger.exception("boom")
    out = stream.getvalue()
    for secret in (
        "AT123",
        "CS456",
        "TK789",
        "SG000",
        "CS-json",
        "TK-json",
        "424242",
        "syt_BEARER",
        "alice.smith",
        "PGPASS",
        "EXC-TOKEN",
        "bob@",
    ):
        assert secret not in out, (secret, out)
    assert "sid=abc" in out and "'sid': 'S1'" in out  # not secret
    assert "a...@mail.example.org" in out and "b...@example.net" in out
    assert "Bearer <redacted>" in out
    assert "ValueError" in out  # the traceback is still there, redacted


def test_redaction_leaves_debug_alone_and_other_text_intact(log_capture: tuple[logging.Logger, io.StringIO]) -> None:
    logger, stream = log_capture
    logger.debug("debug keeps token=DBG-TOKEN")
    logger.info("bound @alice:example.org to a 3pid; errcode=M_UNKNOWN; room !abc:example.org; 100% done")
    out = stream.getvalue()
    assert "token=DBG-TOKEN" in out
    assert "@alice:example.org" in out and "errcode=M_UNKNOWN" in out and "100% done" in out
    assert logs.redact(logs.redact("x alice@example.org")) == "x a...@example.org"


def test_redaction_skips_only_patterns_that_cannot_match() -> None:
    # redact() runs a pattern only when its needed substring is present: the result must be
    # what running every pattern gives, for every kind of line (case, quotes, '=', '@', URLs).
    def every_pattern(text: str) -> str:
        for _needs, pattern, replacement in logs._PATTERNS:
            text = pattern.sub(replacement, text)
        return text

    import random

    pieces = [
        "BEARER ",
        "Bearer ",
        "bEaReR\t",
        "syt_abc.def=",
        "token",
        "Access_Token",
        "=",
        "==x",
        "&",
        '"',
        "'",
        ":",
        " : ",
        "client_secret",
        "SIG",
        "code",
        "42",
        "@",
        "x@y.example",
        "ALICE@MAIL.EXAMPLE.ORG",
        "://",
        "postgresql://u:p@h/d",
        "https://h/p?",
        "\u212a",
        "\u017f",
        "\u0130",
        "é",
        " ",
        "\\",
    ]
    rnd = random.Random(18)
    lines = ["".join(rnd.choice(pieces) for _ in range(rnd.randrange(1, 14))) for _ in range(20_000)]
    lines += ["Authorization: BEARER TOK", '{"TOKEN": "x"}', "{'Client_Secret': 'y'}", 'x "code": 7']
    for line in lines:
        assert logs.redact(line) == every_pattern(line), line


def test_request_id_in_every_record(log_capture: tuple[logging.Logger, io.StringIO]) -> None:
    logger, stream = log_capture
    logger.info("outside")
    token = logs.REQUEST_ID.set("0123456789abcdef")
    try:
        logger.info("inside")
    finally:
        logs.REQUEST_ID.reset(token)
    lines = stream.getvalue().splitlines()
    assert re.fullmatch(r"\S+ \S+ INFO test_observability\.capture \[-\] outside", lines[0]), lines
    assert re.fullmatch(r"\S+ \S+ INFO test_observability\.capture \[0123456789abcdef\] inside", lines[1]), lines


def test_json_log_lines() -> None:
    import json

    stream = io.StringIO()
    logger = logging.getLogger("test_observability.json")
    logger.handlers[:] = [logs.make_handler("json", stream)]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    token = logs.REQUEST_ID.set("req-1")
    try:
        logger.warning("sent to %s with client_secret=%s", "carol@example.com", "SEKRIT")
    finally:
        logs.REQUEST_ID.reset(token)
        logger.handlers[:] = []
    record = json.loads(stream.getvalue())
    assert record["level"] == "WARNING" and record["logger"] == "test_observability.json"
    assert record["request_id"] == "req-1"
    assert record["message"] == "sent to c...@example.com with client_secret=<redacted>"


def test_request_id_header_validation() -> None:
    assert logs.request_id_from_header("abc-DEF-123") == "abc-DEF-123"
    assert logs.request_id_from_header("a" * 64) == "a" * 64
    for bad in (None, "", "a" * 65, "a b", "a\nb", "a_b", "x;y"):
        assert HEX16.fullmatch(logs.request_id_from_header(bad)), bad


# --- in-process: the metrics listener, multiprocess mode ---------------------------------------------


async def test_metrics_server_serves_its_path_and_stops() -> None:
    scrapes = 0

    async def before_scrape() -> None:
        nonlocal scrapes
        scrapes += 1

    server = metrics.MetricsServer("127.0.0.1", 0, "/custom/metrics", before_scrape=before_scrape)
    await server.start()
    try:
        async with httpx.AsyncClient(timeout=10) as c:
            resp = await c.get(f"http://127.0.0.1:{server.port}/custom/metrics")
            assert resp.status_code == 200
            assert resp.headers["content-type"].startswith("text/plain; version=")
            assert "# TYPE sydent_requests_total counter" in resp.text
            assert "# TYPE sydent_request_duration_seconds histogram" in resp.text
            assert "sydent_onbind_pending" in resp.text
            assert scrapes == 1
            assert (await c.get(f"http://127.0.0.1:{server.port}/metrics")).status_code == 404
            assert (await c.post(f"http://127.0.0.1:{server.port}/custom/metrics")).status_code == 405
        # A client that connects and says nothing does not hold up shutdown.
        _reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        await asyncio.sleep(0.05)
    finally:
        await asyncio.wait_for(server.stop(), 5)
    writer.close()
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", server.port)


def test_multiprocess_mode_sums_over_workers(tmp_path: Path) -> None:
    """Two worker processes count into the shared directory; a scrape of either sees both."""
    script = textwrap.dedent(
        """
        import sys
        from sydent_lite.observability import metrics
        metrics.REQUESTS.labels(route="/r", method="GET", status="200").inc(int(sys.argv[1]))
        metrics.ONBIND_PENDING.set(int(sys.argv[1]))
        if len(sys.argv) > 2:
            sys.stdout.write(metrics.render().decode())
        """
    )
    env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=str(tmp_path))
    subprocess.run([sys.executable, "-c", script, "2"], env=env, check=True)
    out = subprocess.run(
        [sys.executable, "-c", script, "5", "render"], env=env, check=True, capture_output=True, text=True
    ).stdout
    samples = {
        (s.name, frozenset(s.labels.items())): s.value for f in text_string_to_metric_families(out) for s in f.samples
    }
    assert value(samples, "sydent_requests_total", route="/r", method="GET", status="200") == 7
    assert value(samples, "sydent_onbind_pending") == 5  # most recent, not the sum


def test_prepare_and_clean_up_multiprocess(monkeypatch: pytest.MonkeyPatch) -> None:
    from sydent_lite import observability

    monkeypatch.delenv(observability.MULTIPROC_ENV, raising=False)
    assert observability.prepare_multiprocess(1) is None
    assert observability.MULTIPROC_ENV not in os.environ
    path = observability.prepare_multiprocess(4)
    assert path is not None and Path(path).is_dir() and os.environ[observability.MULTIPROC_ENV] == path
    observability.cleanup_multiprocess(path)
    assert not Path(path).exists() and observability.MULTIPROC_ENV not in os.environ


@pytest.fixture
def installed_logging() -> Iterator[None]:
    """setup_logging() changes the root logger and the access lane: put both back afterwards."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level, logs._active_handler
    yield
    root.handlers[:], level, logs._active_handler = saved
    root.setLevel(level)


def _setup_logging_alone(level: str, fmt: str, stream: io.StringIO) -> logs.LogHandler:
    """setup_logging(), and no other handler on the root (pytest adds its own during a test)."""
    handler = logs.setup_logging(level, fmt, stream)
    logging.getLogger().handlers[:] = [handler]
    assert isinstance(handler, logs.LogHandler)
    return handler


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_access_lines_through_the_fast_lane_look_like_records(fmt: str, installed_logging: None) -> None:
    stream = io.StringIO()
    handler = _setup_logging_alone("INFO", fmt, stream)
    access = logging.getLogger("sydent_lite.access")
    assert logs.access_lane(access) is handler

    # The same text as the logging machinery makes of a record with these fields.
    record = logging.LogRecord("sydent_lite.access", logging.INFO, __file__, 1, "GET /x 200 1.5ms", None, None)
    record.request_id = "rid-1"
    assert handler.line_formatter.format_line(
        record.created, "INFO", "sydent_lite.access", "rid-1", record.getMessage()
    ) == handler.format(record)

    handler.access("sydent_lite.access", "rid-2", "GET /y 404 0.1ms")  # no event loop: written at once
    assert "GET /y 404 0.1ms" in stream.getvalue() and "rid-2" in stream.getvalue()


def test_access_lines_keep_their_place_among_other_records(installed_logging: None) -> None:
    stream = io.StringIO()
    handler = _setup_logging_alone("INFO", "text", stream)

    async def in_a_request() -> str:
        handler.access("sydent_lite.access", "rid-1", "first")
        handler.access("sydent_lite.access", "rid-2", "second")
        pending = stream.getvalue()  # batched until the loop turns...
        logging.getLogger("sydent_lite.other").warning("third")  # ...or another record comes
        handler.access("sydent_lite.access", "rid-3", "fourth")
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        return pending

    assert asyncio.run(in_a_request()) == ""
    messages = [line.rsplit(" ", 1)[-1] for line in stream.getvalue().splitlines()]
    assert messages == ["first", "second", "third", "fourth"], stream.getvalue()


def test_info_records_join_the_batch_and_a_warning_is_written_at_once(installed_logging: None) -> None:
    # In a request, INFO lines (access or not) are one write per loop turn; a WARNING writes
    # what is pending and itself at once (what explains a crash is on disk before it), and
    # every line keeps its place.
    stream = io.StringIO()
    handler = _setup_logging_alone("INFO", "text", stream)
    writes: list[str] = []
    write = stream.write

    def recording_write(text: str) -> int:
        writes.append(text)
        return write(text)

    stream.write = recording_write  # type: ignore[method-assign]
    other = logging.getLogger("sydent_lite.other")

    async def in_a_request() -> tuple[str, str]:
        handler.access("sydent_lite.access", "rid-1", "first")
        other.info("second")
        other.info("third %s", "3")
        batched = stream.getvalue()
        await asyncio.sleep(0)
        after_a_turn = stream.getvalue()
        other.info("fourth")
        other.warning("fifth")
        return batched, after_a_turn

    batched, after_a_turn = asyncio.run(in_a_request())
    assert batched == ""
    assert [line.rsplit(" ", 1)[-1] for line in after_a_turn.splitlines()] == ["first", "second", "3"]
    assert writes[0] == after_a_turn  # the three lines in one write
    messages = [line.rsplit(" ", 1)[-1] for line in stream.getvalue().splitlines()]
    assert messages == ["first", "second", "3", "fourth", "fifth"], stream.getvalue()
    other.info("outside a loop")  # no loop to wait for: written at once
    assert stream.getvalue().endswith("outside a loop\n")


def test_no_fast_lane_when_logging_is_set_up_otherwise(installed_logging: None) -> None:
    access = logging.getLogger("sydent_lite.access")
    handler = _setup_logging_alone("INFO", "text", io.StringIO())
    assert logs.access_lane(access) is handler
    extra = logging.StreamHandler(io.StringIO())  # an operator's or a test's handler
    logging.getLogger().addHandler(extra)
    assert logs.access_lane(access) is None
    logging.getLogger().removeHandler(extra)
    access.setLevel(logging.WARNING)  # access lines switched off
    try:
        assert logs.access_lane(access) is None
    finally:
        access.setLevel(logging.NOTSET)
    _setup_logging_alone("WARNING", "text", io.StringIO())
    assert logs.access_lane(access) is None
