"""A homeserver stand-in, served over HTTPS by uvicorn in a background thread.

- Its certificate is issued for the IP 127.0.0.1 by a private trustme CA (`ca_path`), which the
  identity server under test trusts through `federation.ca_file`.
- `server_name` is `127.0.0.1:<port>`; it has its own ed25519 signing key.
- `GET /_matrix/federation/v1/openid/userinfo?access_token=T` answers `{"sub": tokens[T]}`
  (a localpart given to `openid_token` becomes `@localpart:<server_name>`; a full `@user:server`
  ID, or any string with raw=True, is answered as given), else 401 M_UNKNOWN_TOKEN.
- `GET /_matrix/key/v2/server[/<key_id>]` publishes the signing key, signed.
- `set_handler(method, path, fn)` adds or overrides an endpoint (for federation tests).
- `POST /_matrix/federation/v1/3pid/onbind` (as Synapse serves it) answers 200 `{}`; per
  bound user it can answer something else instead (`set_onbind_status`, `fail_onbind`).
  `onbind_requests(...)` / `wait_for_onbind(...)` find the callbacks received.
- Every request is recorded in `requests`, with the status it was answered (`status`).

`TarpitHomeserver` is a homeserver that accepts TLS connections and never answers (a tarpit).
"""

from __future__ import annotations

import json
import socket
import ssl
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import signedjson.key
import signedjson.sign
import trustme
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from unpaddedbase64 import encode_base64

OPENID_USERINFO_PATH = "/_matrix/federation/v1/openid/userinfo"
KEY_SERVER_PATH = "/_matrix/key/v2/server"
ONBIND_PATH = "/_matrix/federation/v1/3pid/onbind"


@dataclass
class RecordedRequest:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes
    time: float = field(default_factory=time.time)
    status: int | None = None  # the status the stand-in answered (None while being handled)

    @property
    def json(self) -> Any:
        return json.loads(self.body) if self.body else None

    def query_value(self, name: str) -> str | None:
        values = self.query.get(name)
        return values[0] if values else None

    @property
    def json_or_none(self) -> Any:
        """The JSON body, or None when the body is not JSON."""
        try:
            return self.json
        except ValueError:
            return None


# A handler gets the recorded request and returns (status, JSON-able body) or a Response.
Handler = Callable[[RecordedRequest], "tuple[int, Any] | Response"]


class HomeserverStandIn:
    def __init__(self, workdir: Path, ca: trustme.CA | None = None, key_version: str = "hs1") -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        self.ca = ca or trustme.CA()
        self.ca_path = workdir / "homeserver-ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_path))
        self.cert_path = workdir / "homeserver-cert-and-key.pem"
        self.ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(self.cert_path))
        self.signing_key = signedjson.key.generate_signing_key(key_version)
        self.key_id = f"{self.signing_key.alg}:{self.signing_key.version}"
        self.tokens: dict[str, str] = {}
        self.requests: list[RecordedRequest] = []
        self._handlers: dict[tuple[str, str], Handler] = {}
        # onbind answers per bound user (the body's `mxid`): a fixed status, or a queue of
        # statuses answered first (then the fixed one, then 200).
        self._onbind_status: dict[str, int] = {}
        self._onbind_queue: dict[str, list[int]] = {}
        self._lock = threading.Lock()
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self.port: int | None = None
        self._app = Starlette(
            routes=[
                Route(
                    "/{path:path}",
                    self._endpoint,
                    methods=["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"],
                )
            ]
        )

    # --- lifecycle ------------------------------------------------------------------------

    def start(self, timeout: float = 15.0) -> HomeserverStandIn:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            self._app,
            ssl_certfile=str(self.cert_path),
            ssl_keyfile=str(self.cert_path),
            log_level="warning",
            access_log=False,
            lifespan="off",
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, name="homeserver-stand-in", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the homeserver stand-in did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
            assert self._thread is not None
            self._thread.join(timeout=10)
            self._server = None
            self._thread = None

    @property
    def server_name(self) -> str:
        assert self.port is not None, "not started"
        return f"127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return f"https://{self.server_name}"

    # --- users and OpenID -------------------------------------------------------------------

    def user_id(self, localpart: str) -> str:
        return f"@{localpart}:{self.server_name}"

    def add_openid_token(self, localpart_or_user_id: str, token: str | None = None, raw: bool = False) -> str:
        """Make `token` (random by default) valid for userinfo; returns the token.

        The userinfo `sub` is `@<localpart>:<server_name>` for a localpart, or the value as
        given when it starts with `@` or `raw` is set (to answer nonsense on purpose).
        """
        token = token or "openid_" + uuid.uuid4().hex
        sub = localpart_or_user_id
        if not raw and not sub.startswith("@"):
            sub = self.user_id(sub)
        self.tokens[token] = sub
        return token

    def openid_token(self, localpart_or_user_id: str, raw: bool = False) -> dict[str, Any]:
        """A fresh OpenID token object, as `/openid/request_token` would answer it."""
        return {
            "access_token": self.add_openid_token(localpart_or_user_id, raw=raw),
            "token_type": "Bearer",
            "matrix_server_name": self.server_name,
            "expires_in": 3600,
        }

    # --- recording and custom handlers ----------------------------------------------------------

    def set_handler(self, method: str, path: str, handler: Handler | None) -> None:
        """Serve `method path` with `handler` (None removes it again)."""
        if handler is None:
            self._handlers.pop((method.upper(), path), None)
        else:
            self._handlers[(method.upper(), path)] = handler

    def requests_to(self, path: str, method: str | None = None) -> list[RecordedRequest]:
        with self._lock:
            return [r for r in self.requests if r.path == path and (method is None or r.method == method)]

    def requests_since(self, since: float) -> list[RecordedRequest]:
        """Every request received at or after `since` (a time.time() value)."""
        with self._lock:
            return [r for r in self.requests if r.time >= since]

    def clear_requests(self) -> None:
        with self._lock:
            self.requests.clear()

    # --- onbind callbacks ---------------------------------------------------------------------

    def set_onbind_status(self, mxid: str, status: int | None) -> None:
        """Answer onbind callbacks for `mxid` with `status` (None: back to 200 `{}`)."""
        with self._lock:
            if status is None:
                self._onbind_status.pop(mxid, None)
            else:
                self._onbind_status[mxid] = status

    def fail_onbind(self, mxid: str, times: int, status: int = 503) -> None:
        """Answer the next `times` onbind callbacks for `mxid` with `status`."""
        with self._lock:
            self._onbind_queue.setdefault(mxid, []).extend([status] * times)

    def reset_onbind(self, mxid: str) -> None:
        """onbind callbacks for `mxid` are answered 200 `{}` again (queued failures dropped)."""
        with self._lock:
            self._onbind_status.pop(mxid, None)
            self._onbind_queue.pop(mxid, None)

    def _onbind_answer(self, record: RecordedRequest) -> Response:
        body = record.json_or_none
        mxid = body.get("mxid") if isinstance(body, dict) else None
        with self._lock:
            queue = self._onbind_queue.get(mxid) if isinstance(mxid, str) else None
            if queue:
                status = queue.pop(0)
            elif isinstance(mxid, str):
                status = self._onbind_status.get(mxid, 200)
            else:
                status = 200
        if 200 <= status < 300:
            return JSONResponse({}, status_code=status)
        return JSONResponse({"errcode": "M_UNKNOWN", "error": f"stand-in answers {status}"}, status_code=status)

    def onbind_requests(
        self, mxid: str | None = None, address: str | None = None, since: float | None = None
    ) -> list[RecordedRequest]:
        """Requests to the onbind path (any method) whose body names `mxid` / `address`."""
        out = []
        for r in self.requests_to(ONBIND_PATH):
            body = r.json_or_none
            if not isinstance(body, dict):
                body = {}
            if mxid is not None and body.get("mxid") != mxid:
                continue
            if address is not None and body.get("address") != address:
                continue
            if since is not None and r.time < since:
                continue
            out.append(r)
        return out

    def wait_for_onbind(
        self, mxid: str, *, address: str | None = None, successful: bool = True, timeout: float = 20.0
    ) -> RecordedRequest:
        """The first onbind callback for `mxid` (that was answered 2xx, if `successful`)."""
        deadline = time.monotonic() + timeout
        while True:
            for r in self.onbind_requests(mxid, address):
                if r.status is not None and (not successful or 200 <= r.status < 300):
                    return r
            if time.monotonic() > deadline:
                seen = [(r.method, r.status) for r in self.onbind_requests(mxid, address)]
                raise AssertionError(
                    f"no {'successful ' if successful else ''}onbind callback for {mxid} within {timeout}s "
                    f"(received for this user: {seen})"
                )
            time.sleep(0.05)

    # --- signing ----------------------------------------------------------------------------

    @property
    def verify_key_base64(self) -> str:
        return encode_base64(self.signing_key.verify_key.encode())

    def sign_json(self, obj: dict[str, Any]) -> dict[str, Any]:
        return signedjson.sign.sign_json(dict(obj), self.server_name, self.signing_key)

    def server_keys(self) -> dict[str, Any]:
        return self.sign_json(
            {
                "server_name": self.server_name,
                "valid_until_ts": int(time.time() * 1000) + 24 * 3600 * 1000,
                "verify_keys": {self.key_id: {"key": self.verify_key_base64}},
                "old_verify_keys": {},
            }
        )

    def x_matrix_authorization(
        self,
        method: str,
        uri: str,
        destination: str,
        content: Any = None,
        destination_field: str = "destination_is",
    ) -> str:
        """An `Authorization: X-Matrix ...` header value signed by this homeserver.

        Synapse signs `{method, uri, origin, destination_is, content}`; the spec's field is
        `destination` (pass destination_field="destination").
        """
        obj: dict[str, Any] = {"method": method, "uri": uri, "origin": self.server_name, destination_field: destination}
        if content is not None:
            obj["content"] = content
        signed = self.sign_json(obj)
        sig = signed["signatures"][self.server_name][self.key_id]
        return f'X-Matrix origin="{self.server_name}",key="{self.key_id}",sig="{sig}",destination="{destination}"'

    # --- the ASGI endpoint ----------------------------------------------------------------

    async def _endpoint(self, request: Request) -> Response:
        body = await request.body()
        record = RecordedRequest(
            method=request.method,
            path=request.url.path,
            query=urllib.parse.parse_qs(request.url.query, keep_blank_values=True),
            headers={k.lower(): v for k, v in request.headers.items()},
            body=body,
        )
        with self._lock:
            self.requests.append(record)

        response = self._respond(record)
        record.status = response.status_code
        return response

    def _respond(self, record: RecordedRequest) -> Response:
        handler = self._handlers.get((record.method, record.path))
        if handler is not None:
            result = handler(record)
            if isinstance(result, Response):
                return result
            status, payload = result
            return JSONResponse(payload, status_code=status)

        if record.path == ONBIND_PATH and record.method == "POST":
            return self._onbind_answer(record)

        if record.path == OPENID_USERINFO_PATH and record.method == "GET":
            sub = self.tokens.get(record.query_value("access_token") or "")
            if sub is None:
                return JSONResponse(
                    {"errcode": "M_UNKNOWN_TOKEN", "error": "Access Token unknown or expired"}, status_code=401
                )
            return JSONResponse({"sub": sub})

        if record.method == "GET" and (record.path == KEY_SERVER_PATH or record.path.startswith(KEY_SERVER_PATH + "/")):
            return JSONResponse(self.server_keys())

        return JSONResponse({"errcode": "M_UNRECOGNIZED", "error": "Unrecognized request"}, status_code=404)


@dataclass
class TarpitConnection:
    opened: float  # time.time() the TLS handshake completed
    request: bytes = b""  # what the client sent (never answered)
    closed: float | None = None  # when the client gave up (closed it)


class TarpitHomeserver:
    """A homeserver that accepts TLS connections, reads the request, and never answers.

    Its certificate, for 127.0.0.1, comes from the stand-in's CA (`ca`), so the server under
    test trusts it as it trusts the stand-in; `server_name` is `127.0.0.1:<port>`. Every
    connection is recorded in `connections` (opened, the request bytes, closed by the client).
    Bounded: at most `max_connections` are held (more are closed at once), each thread polls
    for `stop()`, which closes everything.
    """

    def __init__(self, workdir: Path, ca: trustme.CA, max_connections: int = 200) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.cert_path = workdir / "tarpit-cert-and-key.pem"
        ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(self.cert_path))
        self.max_connections = max_connections
        self.connections: list[TarpitConnection] = []
        self._lock = threading.Lock()
        self._open = 0
        self.max_open = 0  # the most connections held at once
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._sock: socket.socket | None = None
        self.port: int | None = None

    @property
    def server_name(self) -> str:
        assert self.port is not None, "not started"
        return f"127.0.0.1:{self.port}"

    def start(self) -> TarpitHomeserver:
        self._ssl = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._ssl.load_cert_chain(str(self.cert_path))
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        sock.listen(256)
        sock.settimeout(0.2)
        self._sock = sock
        self.port = sock.getsockname()[1]
        self._spawn(self._accept_loop, "tarpit-accept")
        return self

    def stop(self) -> None:
        self._stopping.set()
        for t in self._threads:
            t.join(timeout=5)
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def open_connections(self) -> list[TarpitConnection]:
        with self._lock:
            return [c for c in self.connections if c.closed is None]

    def requests_received(self) -> list[TarpitConnection]:
        with self._lock:
            return [c for c in self.connections if c.request]

    def _spawn(self, target: Callable[..., None], name: str, *args: Any) -> None:
        t = threading.Thread(target=target, args=args, name=name, daemon=True)
        self._threads.append(t)
        t.start()

    def _accept_loop(self) -> None:
        assert self._sock is not None
        while not self._stopping.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                full = self._open >= self.max_connections
            if full:
                conn.close()
                continue
            self._spawn(self._hold, "tarpit-conn", conn)

    def _hold(self, raw: socket.socket) -> None:
        raw.settimeout(5.0)
        try:
            conn = self._ssl.wrap_socket(raw, server_side=True)
        except OSError:
            raw.close()
            return
        record = TarpitConnection(opened=time.time())
        with self._lock:
            self.connections.append(record)
            self._open += 1
            self.max_open = max(self.max_open, self._open)
        conn.settimeout(0.2)
        try:
            while not self._stopping.is_set():
                try:
                    data = conn.recv(65536)
                except TimeoutError:
                    continue
                except OSError:
                    break
                if not data:
                    break
                with self._lock:
                    record.request += data
        finally:
            with self._lock:
                record.closed = time.time()
                self._open -= 1
            conn.close()
