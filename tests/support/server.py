"""Run sydent_lite as a subprocess and drive it the way clients and homeservers do.

`SydentServer` writes a config file, starts `python -m sydent_lite serve --config ...`, waits
for `listening on` in its output, and stops it with SIGTERM. `restart()` keeps the database,
the signing key file and the port.

`IdentityApi` wraps the usual flows (register with an OpenID token, accept the terms, request
and submit an email token, bind, hash_details, lookup) on top of an `httpx.Client`.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import httpx
import yaml

from .homeserver import HomeserverStandIn
from .smtp import ReceivedMail, SmtpSink, free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
EMAIL_FROM = "Identity Server <noreply@id.test>"
V1 = "/_matrix/identity/api/v1"
V2 = "/_matrix/identity/v2"

# Sydent's terms.yaml format. Two policies, each in two languages.
DEFAULT_TERMS: dict[str, Any] = {
    "master_version": "test-1",
    "docs": {
        "terms_of_service": {
            "version": "1.0",
            "langs": {
                "en": {"name": "Terms of Service", "url": "https://terms.id.test/tos-1.0-en.html"},
                "fr": {"name": "Conditions d'utilisation", "url": "https://terms.id.test/tos-1.0-fr.html"},
            },
        },
        "privacy_policy": {
            "version": "2.1",
            "langs": {
                "en": {"name": "Privacy Policy", "url": "https://terms.id.test/privacy-2.1-en.html"},
                "fr": {"name": "Politique de confidentialité", "url": "https://terms.id.test/privacy-2.1-fr.html"},
            },
        },
    },
}


def expected_policies(terms: dict[str, Any]) -> dict[str, Any]:
    """What GET /v2/terms should answer for a Sydent terms.yaml structure."""
    out: dict[str, Any] = {}
    for doc_id, doc in terms["docs"].items():
        policy: dict[str, Any] = {"version": doc["version"]}
        for lang, info in doc["langs"].items():
            policy[lang] = {"name": info["name"], "url": info["url"]}
        out[doc_id] = policy
    return {"policies": out}


def write_terms(path: Path, terms: dict[str, Any] = DEFAULT_TERMS) -> Path:
    path.write_text(yaml.safe_dump(terms, allow_unicode=True), encoding="utf-8")
    return path


def sha256_address(address: str, medium: str, pepper: str) -> str:
    """The spec's sha256 lookup hash: URL-safe unpadded base64 of sha256("<address> <medium> <pepper>")."""
    digest = hashlib.sha256(f"{address} {medium} {pepper}".encode()).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def unique_email(prefix: str = "user") -> str:
    return f"{prefix}.{uuid.uuid4().hex[:16]}@example.test"


def new_secret() -> str:
    return "secret_" + uuid.uuid4().hex


def now_ms() -> int:
    return int(time.time() * 1000)


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


class ServerStartError(RuntimeError):
    pass


class SydentServer:
    def __init__(
        self,
        workdir: Path,
        *,
        database_url: str,
        smtp_port: int,
        ca_file: str | Path | None,
        terms_path: str | Path | None = None,
        templates_dir: str | Path | None = None,
        session_lifetime: int | None = None,
        extra_config: dict[str, Any] | None = None,
        name: str = "sydent_lite",
    ) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        self.name = name
        self.database_url = database_url
        self.smtp_port = smtp_port
        self.ca_file = str(ca_file) if ca_file else None
        self.terms_path = str(terms_path) if terms_path else None
        self.templates_dir = str(templates_dir) if templates_dir else None
        self.session_lifetime = session_lifetime
        self.extra_config = extra_config or {}
        # Run in the child before exec (e.g. to lower its open-file limit).
        self.preexec_fn: Callable[[], None] | None = None
        self.port = free_port()
        self.config_path = workdir / "config.yaml"
        self.signing_key_path = workdir / "signing.key"
        self.log_path = workdir / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._output: deque[str] = deque(maxlen=5000)
        self._readers: list[threading.Thread] = []
        self._ready = threading.Event()
        self._client: httpx.Client | None = None
        self.starts = 0

    # --- config -----------------------------------------------------------------------------

    @property
    def server_name(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def config(self) -> dict[str, Any]:
        cfg: dict[str, Any] = {
            "server_name": self.server_name,
            "public_baseurl": self.base_url,
            "listen": {"host": "127.0.0.1", "port": self.port},
            "database": {"url": self.database_url},
            "signing_key_path": str(self.signing_key_path),
            "email": {
                "transport": "smtp",
                "smtp": {"host": "127.0.0.1", "port": self.smtp_port, "security": "none"},
                "from": EMAIL_FROM,
                "templates_dir": self.templates_dir,
            },
            "terms_path": self.terms_path,
            "federation": {
                "verify_tls": True,
                "ca_file": self.ca_file,
                "ip_allowlist": ["127.0.0.0/8", "::1/128"],
            },
            "rate_limits": {"enabled": False},
            # The lookup index's snapshots (PostgreSQL) beside this server's other files.
            "lookup": {"index_snapshot_dir": str(self.signing_key_path.parent / "lookup-index")},
        }
        if self.session_lifetime is not None:
            cfg["sessions"] = {"lifetime_seconds": self.session_lifetime}
        return _deep_merge(cfg, self.extra_config)

    def write_config(self) -> None:
        self.config_path.write_text(yaml.safe_dump(self.config(), sort_keys=False), encoding="utf-8")

    # --- process ----------------------------------------------------------------------------

    def _pump(self, stream: Any, label: str) -> None:
        with open(self.log_path, "a", encoding="utf-8") as log:
            for raw in iter(stream.readline, b""):
                line = raw.decode("utf-8", "replace").rstrip("\n")
                self._output.append(f"[{label}] {line}")
                log.write(f"[{label}] {line}\n")
                log.flush()
                if "listening on" in line:
                    self._ready.set()
        stream.close()

    def serve_args(self) -> list[str]:
        """Extra arguments of `sydent-lite serve` (subclasses: `--workers N`)."""
        return []

    def start(self, timeout: float = 30.0) -> SydentServer:
        assert self.proc is None, "already running"
        self.write_config()
        self._ready.clear()
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sydent_lite", "serve", "--config", str(self.config_path), *self.serve_args()],
            cwd=str(REPO_ROOT),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            preexec_fn=self.preexec_fn,
        )
        self.starts += 1
        self._readers = [
            threading.Thread(target=self._pump, args=(self.proc.stdout, "out"), daemon=True),
            threading.Thread(target=self._pump, args=(self.proc.stderr, "err"), daemon=True),
        ]
        for t in self._readers:
            t.start()

        deadline = time.monotonic() + timeout
        while not self._ready.wait(0.05):
            if self.proc.poll() is not None:
                self._fail_start(f"exited with status {self.proc.returncode} before it was ready")
            if time.monotonic() > deadline:
                self._fail_start(f"did not print 'listening on' within {timeout:.0f}s")
        # Ready by its own account; make sure the port really accepts connections.
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self._fail_start("printed 'listening on' but does not accept connections")
                time.sleep(0.05)
        return self

    def _fail_start(self, why: str) -> None:
        self.stop()
        raise ServerStartError(
            f"{self.name} {why}.\n--- config ({self.config_path}) ---\n{self.config_path.read_text()}"
            f"--- output ---\n{self.output(200)}"
        )

    def stop(self, timeout: float = 10.0) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._output.append("[test] server did not stop on SIGTERM; killed")
                proc.kill()
                proc.wait(5)
        for t in self._readers:
            t.join(timeout=5)
        self.proc = None

    def restart(self) -> SydentServer:
        self.stop()
        return self.start()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def output(self, last: int | None = None) -> str:
        lines = list(self._output)
        if last is not None:
            lines = lines[-last:]
        return "\n".join(lines)

    # --- HTTP ---------------------------------------------------------------------------------

    @property
    def client(self) -> httpx.Client:
        if self._client is None:
            self._client = self.new_client()
        return self._client

    def new_client(self) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=20.0, follow_redirects=False)


@dataclass
class User:
    user_id: str
    token: str
    localpart: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


@dataclass
class EmailSession:
    email: str  # as given to requestToken
    client_secret: str
    sid: str
    mail: ReceivedMail

    @property
    def token(self) -> str:
        return self.mail.token


class IdentityApi:
    """Client-side flows against one identity server."""

    def __init__(
        self, server: SydentServer, smtp: SmtpSink, homeserver: HomeserverStandIn, client: httpx.Client | None = None
    ) -> None:
        self.server = server
        self.smtp = smtp
        self.hs = homeserver
        self.client = client or server.client

    # --- accounts and terms -------------------------------------------------------------------

    def register(self, localpart: str | None = None, accept_terms: bool = True) -> User:
        localpart = localpart or "u" + uuid.uuid4().hex[:12]
        resp = self.client.post(f"{V2}/account/register", json=self.hs.openid_token(localpart))
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert isinstance(body.get("token"), str) and body["token"], body
        user = User(self.hs.user_id(localpart), body["token"], localpart)
        if accept_terms:
            self.accept_all_terms(user)
        return user

    def terms(self) -> dict[str, Any]:
        resp = self.client.get(f"{V2}/terms")
        assert resp.status_code == 200, resp.text
        return cast("dict[str, Any]", resp.json())

    def accept_terms(self, user: User, urls: list[str]) -> httpx.Response:
        return self.client.post(f"{V2}/terms", json={"user_accepts": urls}, headers=user.headers)

    def accept_all_terms(self, user: User, lang: str = "en") -> None:
        urls = [policy[lang]["url"] for policy in self.terms()["policies"].values()]
        if urls:
            resp = self.accept_terms(user, urls)
            assert resp.status_code == 200, resp.text

    # --- email validation -----------------------------------------------------------------------

    def request_email_token(
        self,
        email: str,
        client_secret: str,
        send_attempt: int = 1,
        *,
        user: User | None = None,
        v1: bool = False,
        next_link: str | None = None,
        brand: str | None = None,
        form: bool = False,
    ) -> httpx.Response:
        body: dict[str, Any] = {"email": email, "client_secret": client_secret, "send_attempt": send_attempt}
        if next_link is not None:
            body["next_link"] = next_link
        params = {}
        if brand is not None:
            # Sydent reads the brand from the query string; also send it in the body.
            body["brand"] = brand
            params["brand"] = brand
        path = f"{V1 if v1 else V2}/validate/email/requestToken"
        headers = user.headers if user is not None else {}
        if form:
            return self.client.post(path, data={k: str(v) for k, v in body.items()}, params=params, headers=headers)
        return self.client.post(path, json=body, params=params, headers=headers)

    def start_email_session(
        self, email: str, *, user: User | None = None, v1: bool = False, client_secret: str | None = None, **kwargs: Any
    ) -> EmailSession:
        """requestToken, expecting success, and the mail it sent."""
        secret = client_secret or new_secret()
        resp = self.request_email_token(email, secret, user=user, v1=v1, **kwargs)
        assert resp.status_code == 200, resp.text
        sid = resp.json()["sid"]
        mail = self.smtp.wait_for(email)
        return EmailSession(email, secret, sid, mail)

    def submit_token(
        self,
        session: EmailSession,
        token: str | None = None,
        *,
        user: User | None = None,
        v1: bool = False,
        client_secret: str | None = None,
        sid: str | None = None,
    ) -> httpx.Response:
        body = {
            "sid": sid or session.sid,
            "client_secret": client_secret or session.client_secret,
            "token": token if token is not None else session.token,
        }
        headers = user.headers if user is not None else {}
        return self.client.post(f"{V1 if v1 else V2}/validate/email/submitToken", json=body, headers=headers)

    def validated_email_session(
        self, email: str, *, user: User | None = None, v1: bool = False, **kwargs: Any
    ) -> EmailSession:
        """A session for `email` whose token has been submitted (POST)."""
        session = self.start_email_session(email, user=user, v1=v1, **kwargs)
        resp = self.submit_token(session, user=user, v1=v1)
        assert resp.status_code == 200, resp.text
        assert resp.json() == {"success": True}, resp.text
        return session

    def get_validated(
        self,
        session: EmailSession,
        *,
        user: User | None = None,
        v1: bool = False,
        client_secret: str | None = None,
        sid: str | None = None,
    ) -> httpx.Response:
        params = {"sid": sid or session.sid, "client_secret": client_secret or session.client_secret}
        headers = user.headers if user is not None else {}
        return self.client.get(f"{V1 if v1 else V2}/3pid/getValidated3pid", params=params, headers=headers)

    # --- associations and lookups -----------------------------------------------------------------

    def bind(
        self,
        session: EmailSession,
        mxid: str,
        *,
        user: User | None = None,
        v1: bool = False,
        client_secret: str | None = None,
        sid: str | None = None,
    ) -> httpx.Response:
        body = {"sid": sid or session.sid, "client_secret": client_secret or session.client_secret, "mxid": mxid}
        headers = user.headers if user is not None else {}
        return self.client.post(f"{V1 if v1 else V2}/3pid/bind", json=body, headers=headers)

    def bind_email(self, email: str, user: User) -> tuple[EmailSession, dict[str, Any]]:
        """The whole v2 flow: requestToken, submitToken, bind to `user`. Returns the signed association."""
        session = self.validated_email_session(email, user=user)
        resp = self.bind(session, user.user_id, user=user)
        assert resp.status_code == 200, resp.text
        return session, resp.json()

    def hash_details(self, user: User) -> dict[str, Any]:
        resp = self.client.get(f"{V2}/hash_details", headers=user.headers)
        assert resp.status_code == 200, resp.text
        return cast("dict[str, Any]", resp.json())

    def lookup(
        self, user: User, addresses: list[str], algorithm: str = "sha256", pepper: str | None = None
    ) -> httpx.Response:
        if pepper is None:
            pepper = self.hash_details(user)["lookup_pepper"]
        body = {"algorithm": algorithm, "pepper": pepper, "addresses": addresses}
        return self.client.post(f"{V2}/lookup", json=body, headers=user.headers)

    def lookup_email(self, user: User, address: str) -> str | None:
        """The mxid a sha256 lookup answers for `address`, or None."""
        pepper = self.hash_details(user)["lookup_pepper"]
        h = sha256_address(address, "email", pepper)
        resp = self.lookup(user, [h], pepper=pepper)
        assert resp.status_code == 200, resp.text
        mappings = resp.json()["mappings"]
        assert set(mappings) <= {h}, mappings
        return cast("str | None", mappings.get(h))

    def v1_lookup(self, medium: str, address: str) -> httpx.Response:
        return self.client.get(f"{V1}/lookup", params={"medium": medium, "address": address})


def wait_until(predicate: Callable[[], bool], timeout: float = 20.0, what: str = "condition") -> None:
    """Poll predicate until it holds (or fail saying what was awaited)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not reached within {timeout}s")
        time.sleep(0.05)
