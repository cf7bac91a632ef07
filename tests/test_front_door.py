"""The dispatcher (sydent_lite.http.app.Dispatcher), with stand-in endpoints: dispatch by path
then method, the answers for no route (404, 405 with Allow, OPTIONS, trailing slashes), errors
raised by endpoints (Matrix errors, unexpected exceptions: 500 M_UNKNOWN, no traceback to the
client), HEAD, a `{name}` segment, the lifespan, and the access line with and without the
client's address. Served by uvicorn on a real socket.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Literal

import httpx
import pytest
import uvicorn
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from sydent_lite.errors import ErrorCode, MatrixError
from sydent_lite.http.app import Dispatcher
from sydent_lite.http.routes import Route


async def ok(request: Request) -> Response:
    return JSONResponse({"ok": True, "app": request.app.state.marker, "method": request.method})


async def matrix_error(request: Request) -> Response:
    raise MatrixError(403, ErrorCode.FORBIDDEN, "Not for you", extra_field=1)


async def crash(request: Request) -> Response:
    raise RuntimeError("internal detail token=SEKRIT")


async def key(request: Request) -> Response:
    return JSONResponse({"key": request.path_params["key_id"]})


async def key_list(request: Request) -> Response:
    return JSONResponse({"list": True})


ROUTES = [
    Route("/ok", ok, ["GET"]),
    Route("/ok", ok, ["POST"]),  # a path may have one route per method
    Route("/matrix", matrix_error, ["GET"]),
    Route("/crash", crash, ["GET"]),
    Route("/key/{key_id}", key, ["GET"]),
    Route("/key/list", key_list, ["GET"]),  # static paths win, whatever the order
]


class Served:
    def __init__(self, app: Dispatcher, lifespan: Literal["on", "off"] = "off") -> None:
        self.server = uvicorn.Server(
            # proxy_headers off, as sydent_lite.server runs it: X-Forwarded-For is the app's to judge.
            uvicorn.Config(
                app, host="127.0.0.1", port=0, log_config=None, lifespan=lifespan, ws="none", proxy_headers=False
            )
        )
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.exit_code: object = None

    def _run(self) -> None:
        try:
            self.server.run()
        except SystemExit as e:  # uvicorn's answer to a failed start-up
            self.exit_code = e.code

    def __enter__(self) -> httpx.Client:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert self.thread.is_alive(), "uvicorn stopped before serving"
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10)
        return self.client

    def __exit__(self, *exc: object) -> None:
        self.client.close()
        self.server.should_exit = True
        self.thread.join(10)
        assert not self.thread.is_alive()


@pytest.fixture(scope="module")
def front_door() -> Iterator[httpx.Client]:
    app = Dispatcher(ROUTES)
    app.state.marker = "the app"
    with Served(app) as client:
        yield client


def _assert_common_headers(resp: httpx.Response) -> None:
    assert resp.headers["access-control-allow-origin"] == "*"
    assert resp.headers["x-content-type-options"] == "nosniff"
    assert resp.headers["x-request-id"]


def test_a_route_reaches_its_endpoint_with_the_app(front_door: httpx.Client) -> None:
    for method in ("GET", "POST"):
        resp = front_door.request(method, "/ok")
        assert resp.status_code == 200, resp.text
        assert resp.json() == {"ok": True, "app": "the app", "method": method}
        _assert_common_headers(resp)
    resp = front_door.head("/ok")
    assert resp.status_code == 200 and resp.content == b""
    _assert_common_headers(resp)


def test_a_parameter_segment(front_door: httpx.Client) -> None:
    assert front_door.get("/key/ed25519:0").json() == {"key": "ed25519:0"}
    assert front_door.get("/key/ed25519%3A0").json() == {"key": "ed25519:0"}  # decoded, as Starlette's router
    assert front_door.get("/key/list").json() == {"list": True}
    for path in ("/key/", "/key/a/b", "/key"):
        resp = front_door.get(path)
        assert resp.status_code == 404 and resp.json()["errcode"] == "M_UNRECOGNIZED", (path, resp.text)


def test_errors_raised_by_endpoints(front_door: httpx.Client, caplog: pytest.LogCaptureFixture) -> None:
    resp = front_door.get("/matrix")
    assert resp.status_code == 403
    assert resp.content == b'{"errcode":"M_FORBIDDEN","error":"Not for you","extra_field":1}'
    _assert_common_headers(resp)
    with caplog.at_level(logging.ERROR, logger="sydent_lite.http.app"):
        resp = front_door.get("/crash")
    assert resp.status_code == 500 and resp.json() == {"errcode": "M_UNKNOWN", "error": "Internal server error"}
    assert "SEKRIT" not in resp.text and "Traceback" not in resp.text
    _assert_common_headers(resp)
    # The traceback goes to the log instead.
    crashes = [r for r in caplog.records if r.name == "sydent_lite.http.app" and r.exc_info]
    assert crashes and isinstance(crashes[0].exc_info[1], RuntimeError)  # type: ignore[index]


def test_what_no_route_answers(front_door: httpx.Client) -> None:
    resp = front_door.get("/nowhere")
    assert resp.status_code == 404
    assert resp.json() == {"errcode": "M_UNRECOGNIZED", "error": "Unrecognized request"}
    _assert_common_headers(resp)
    for method in ("PUT", "DELETE", "PATCH"):
        resp = front_door.request(method, "/ok")
        assert resp.status_code == 405, method
        assert resp.json() == {"errcode": "M_UNRECOGNIZED", "error": "Method not allowed"}
        assert resp.headers["allow"] == "GET, HEAD, OPTIONS, POST"
        _assert_common_headers(resp)
    assert front_door.post("/key/ed25519:0").headers["allow"] == "GET, HEAD, OPTIONS"
    # A trailing slash is no other spelling of a path: 404, not a redirect.
    for method in ("GET", "POST"):
        resp = front_door.request(method, "/ok/")
        assert resp.status_code == 404 and resp.json()["errcode"] == "M_UNRECOGNIZED", resp.text
        assert "location" not in resp.headers
        _assert_common_headers(resp)
    for path in ("/anything", "/ok"):
        resp = front_door.options(path, headers={"Origin": "https://app.example"})
        assert resp.status_code == 200 and resp.json() == {}
        assert "OPTIONS" in resp.headers["access-control-allow-methods"]
        _assert_common_headers(resp)
    # A request id given by the caller is kept on every road.
    for method, path in (("GET", "/ok"), ("GET", "/nowhere"), ("PUT", "/ok"), ("GET", "/crash"), ("OPTIONS", "/x")):
        resp = front_door.request(method, path, headers={"X-Request-Id": "abc-123"})
        assert resp.headers["x-request-id"] == "abc-123", (method, path)


def test_the_lifespan_runs_around_serving() -> None:
    events: list[str] = []

    @asynccontextmanager
    async def lifespan(app: Dispatcher) -> AsyncIterator[None]:
        app.state.marker = "set at start-up"
        events.append("start")
        yield
        events.append("stop")

    with Served(Dispatcher(ROUTES, lifespan=lifespan), lifespan="on") as client:
        assert events == ["start"]
        assert client.get("/ok").json()["app"] == "set at start-up"
    assert events == ["start", "stop"]


def test_a_failed_start_up_stops_the_server() -> None:
    @asynccontextmanager
    async def lifespan(app: Dispatcher) -> AsyncIterator[None]:
        raise RuntimeError("no database")
        yield

    served = Served(Dispatcher(ROUTES, lifespan=lifespan), lifespan="on")
    served.thread.start()
    served.thread.join(10)
    assert not served.thread.is_alive() and not served.server.started
    assert served.exit_code == 3  # uvicorn's STARTUP_FAILURE


def _access_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "sydent_lite.access"]


@pytest.mark.parametrize("log_client_address", [True, False])
def test_the_access_line_and_the_client_address(log_client_address: bool, caplog: pytest.LogCaptureFixture) -> None:
    app = Dispatcher(ROUTES, log_client_address=log_client_address)
    app.state.marker = "x"
    with Served(app) as client, caplog.at_level(logging.INFO, logger="sydent_lite.access"):
        client.get("/ok", params={"access_token": "SEKRIT", "address": "alice@example.org"})
        client.get("/nowhere/alice@example.org")
        # Not from a trusted proxy: X-Forwarded-For is anyone's to write, and ignored.
        client.get("/matrix", headers={"X-Forwarded-For": "198.51.100.66"})
    lines = _access_lines(caplog)
    prefix = "127.0.0.1 " if log_client_address else ""
    assert [line.rsplit(" ", 1)[0] for line in lines] == [
        f"{prefix}GET /ok 200",
        f"{prefix}GET unmatched 404",
        f"{prefix}GET /matrix 403",
    ], lines
    assert all(line.endswith("ms") for line in lines)
    assert not any("SEKRIT" in line or "alice" in line or "198.51.100.66" in line for line in lines)


def test_the_access_line_names_the_client_behind_a_trusted_proxy(caplog: pytest.LogCaptureFixture) -> None:
    app = Dispatcher(ROUTES, trusted_proxies=["127.0.0.1"])
    app.state.marker = "x"
    with Served(app) as client, caplog.at_level(logging.INFO, logger="sydent_lite.access"):
        client.get("/ok", headers={"X-Forwarded-For": "203.0.113.9"})
        # Left of our proxy's hop is the client's own writing: the proxy's entry counts.
        client.get("/ok", headers={"X-Forwarded-For": "198.51.100.66, 203.0.113.10"})
        client.get("/ok")
    assert [line.split(" ", 1)[0] for line in _access_lines(caplog)] == ["203.0.113.9", "203.0.113.10", "127.0.0.1"]
