"""The front door (sydent_lite.http.app.FrontDoor): exact routes are called without Starlette's
stack, so every answer Starlette's stack would give must come out the same: Matrix errors,
HTTP errors, unexpected exceptions (500 M_UNKNOWN, no traceback), HEAD, 404, 405 and OPTIONS,
each with the CORS headers and a request id. Served by uvicorn on a real socket.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import httpx
import pytest
import uvicorn
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from sydent_lite.errors import MatrixError
from sydent_lite.http.app import FrontDoor, starlette_app


async def ok(request: Request) -> Response:
    return JSONResponse({"ok": True, "app": request.app.state.marker})


async def matrix_error(request: Request) -> Response:
    raise MatrixError(403, "M_FORBIDDEN", "Not for you")


async def http_error(request: Request) -> Response:
    raise HTTPException(400, "Bad form")


async def crash(request: Request) -> Response:
    raise RuntimeError("internal detail token=SEKRIT")


@pytest.fixture(scope="module")
def front_door() -> Iterator[httpx.Client]:
    app = starlette_app(
        [
            Route("/ok", ok, methods=["GET", "POST"]),
            Route("/matrix", matrix_error, methods=["GET"]),
            Route("/http", http_error, methods=["GET"]),
            Route("/crash", crash, methods=["GET"]),
        ]
    )
    app.state.marker = "the app"
    server = uvicorn.Server(
        uvicorn.Config(FrontDoor(app), host="127.0.0.1", port=0, log_config=None, lifespan="off", ws="none")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
        yield client
    server.should_exit = True
    thread.join(10)


def _assert_common_headers(resp: httpx.Response) -> None:
    assert resp.headers["access-control-allow-origin"] == "*"
    assert resp.headers["x-request-id"]


def test_exact_route_reaches_the_endpoint_with_the_app(front_door: httpx.Client) -> None:
    for method in ("GET", "POST"):
        resp = front_door.request(method, "/ok")
        assert resp.status_code == 200 and resp.json() == {"ok": True, "app": "the app"}, resp.text
        _assert_common_headers(resp)
    resp = front_door.head("/ok")
    assert resp.status_code == 200 and resp.content == b""
    _assert_common_headers(resp)


def test_errors_raised_by_endpoints(front_door: httpx.Client) -> None:
    cases = [
        ("/matrix", 403, {"errcode": "M_FORBIDDEN", "error": "Not for you"}),
        ("/http", 400, {"errcode": "M_UNKNOWN", "error": "Bad form"}),
        ("/crash", 500, {"errcode": "M_UNKNOWN", "error": "Internal server error"}),
    ]
    for path, status, body in cases:
        resp = front_door.get(path)
        assert resp.status_code == status and resp.json() == body, (path, resp.text)
        _assert_common_headers(resp)
    assert "SEKRIT" not in front_door.get("/crash").text


def test_what_no_exact_route_matches_goes_through_starlette(front_door: httpx.Client) -> None:
    resp = front_door.get("/nowhere")
    assert resp.status_code == 404 and resp.json()["errcode"] == "M_UNRECOGNIZED"
    _assert_common_headers(resp)
    resp = front_door.put("/ok")
    assert resp.status_code == 405 and resp.json()["errcode"] == "M_UNRECOGNIZED"
    assert resp.headers["allow"] == "GET, HEAD, OPTIONS, POST"
    _assert_common_headers(resp)
    # A trailing slash is no other spelling of a path: 404, not a redirect.
    for method in ("GET", "POST"):
        resp = front_door.request(method, "/ok/")
        assert resp.status_code == 404 and resp.json()["errcode"] == "M_UNRECOGNIZED", resp.text
        assert "location" not in resp.headers
        _assert_common_headers(resp)
    resp = front_door.options("/anything", headers={"Origin": "https://app.example"})
    assert resp.status_code == 200
    _assert_common_headers(resp)
    # A request id given by the caller is kept on every road.
    for method, path in (("GET", "/ok"), ("GET", "/nowhere"), ("GET", "/crash")):
        assert (
            front_door.request(method, path, headers={"X-Request-Id": "abc-123"}).headers["x-request-id"] == "abc-123"
        )
