"""Phone numbers (msisdn): requestToken (v1 as Synapse proxies it, v2 with token and terms),
parsing and normalisation, the SMS (file outbox and webhook providers), send_attempt, provider
failures, submitToken (POST and GET), getValidated3pid, bind, lookups, unbind and rate limits.

Contract: docs/api-behaviour.md, "Phone numbers (msisdn)" and the email sections it refers to;
spec v2_phone_associations.yaml, definitions/request_msisdn_validation.yaml and the legacy v1
phone_associations.yaml; ../shared/notes (Synapse uses the v1 paths; `is_possible_number`).

How the code reaches the test: with `sms.provider: file` the server writes each SMS as a JSON
file `{"to": msisdn, "text": ..., "originator": {"type", "text"} | null}` into `sms.outbox`,
one file per SMS, names sorting in sending order. The webhook provider POSTs the same JSON.
"""

from __future__ import annotations

import json
import re
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
from support.asserts import assert_error, assert_html, assert_signed_association
from support.homeserver import HomeserverStandIn
from support.inprocess import InProcessServer
from support.server import (
    V1,
    V2,
    IdentityApi,
    SydentServer,
    User,
    new_secret,
    now_ms,
    sha256_address,
    unique_email,
)
from support.smtp import SmtpSink, free_port

SID_RE = re.compile(r"[0-9a-zA-Z]{24}")

# The shared SMS server's senders: alphanumeric for +44, a long number for everyone else.
ORIGINATORS = {"44": "alpha:Matrix", "default": "long:+15555550100"}
ALPHA_MATRIX = {"type": "alpha", "text": "Matrix"}
LONG_DEFAULT = {"type": "long", "text": "+15555550100"}


# --- helpers ------------------------------------------------------------------------------------


def random_gb() -> tuple[str, str]:
    """A fresh UK number in Ofcom's drama range: (as typed in GB, E.164 digits)."""
    n = f"{secrets.randbelow(100000):05d}"
    return f"07700 9{n[:2]} {n[2:]}", f"447700 9{n}".replace(" ", "")


def random_fr() -> tuple[str, str]:
    """A fresh French mobile number: (as typed in FR, E.164 digits)."""
    n = f"{secrets.randbelow(10**8):08d}"
    return f"06 {n[0:2]} {n[2:4]} {n[4:6]} {n[6:8]}", f"336{n}"


def other_code(code: str) -> str:
    """A code of the same length that is certainly wrong."""
    return f"{(int(code) + 1) % 10 ** len(code):0{len(code)}d}"


@dataclass
class Sms:
    name: str
    raw: dict[str, Any]

    @property
    def to(self) -> str:
        return cast("str", self.raw["to"])

    @property
    def text(self) -> str:
        return cast("str", self.raw["text"])

    @property
    def originator(self) -> Any:
        return self.raw.get("originator")

    @property
    def code(self) -> str:
        runs = re.findall(r"\d+", self.text)
        assert len(runs) == 1, f"expected exactly one run of digits (the code) in {self.text!r}"
        return cast("str", runs[0])


class SmsOutbox:
    """The `sms.outbox` folder of a server with `sms.provider: file`.

    Messages already there when it is created are ignored. `wait_for(msisdn)` claims the oldest
    unclaimed message to that number (names sort in sending order).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._read: set[str] = set(self._names())
        self._pending: list[Sms] = []

    def _names(self) -> list[str]:
        if not self.path.is_dir():
            return []
        return sorted(p.name for p in self.path.iterdir() if p.is_file() and not p.name.startswith("."))

    def _collect(self) -> None:
        for name in self._names():
            if name in self._read:
                continue
            try:
                raw = json.loads((self.path / name).read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue  # still being written (or a temporary file): look again later
            self._read.add(name)
            assert isinstance(raw, dict), f"SMS file {name} is not a JSON object: {raw!r}"
            self._pending.append(Sms(name, raw))
        self._pending.sort(key=lambda s: s.name)

    def _claim(self, msisdn: str) -> Sms | None:
        for sms in self._pending:
            if str(sms.raw.get("to", "")).lstrip("+") == msisdn:
                self._pending.remove(sms)
                return sms
        return None

    def wait_for(self, msisdn: str, timeout: float = 5.0) -> Sms:
        deadline = time.monotonic() + timeout
        while True:
            self._collect()
            sms = self._claim(msisdn)
            if sms is not None:
                return sms
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"no SMS to {msisdn} in {self.path} within {timeout}s; unclaimed: {[s.raw for s in self._pending]}"
                )
            time.sleep(0.05)

    def assert_none(self, msisdn: str, wait: float = 0.3) -> None:
        time.sleep(wait)
        self._collect()
        sms = self._claim(msisdn)
        assert sms is None, f"unexpected SMS to {msisdn}: {sms.raw if sms else None}"

    def all_new(self) -> list[Sms]:
        self._collect()
        out, self._pending = self._pending, []
        return out


class WebhookStandIn:
    """An SMS webhook: records every POST (headers and JSON body), answers `status` after `delay`."""

    def __init__(self, status: int = 200, delay: float = 0.0) -> None:
        self.status = status
        self.delay = delay
        self.requests: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                try:
                    parsed: Any = json.loads(body)
                except ValueError:
                    parsed = None
                with outer._lock:
                    outer.requests.append(
                        {
                            "path": self.path,
                            "headers": {k.lower(): v for k, v in self.headers.items()},
                            "body": body,
                            "json": parsed,
                        }
                    )
                    status, delay = outer.status, outer.delay
                if delay:
                    time.sleep(delay)
                payload = b"{}"
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except OSError:
                    pass  # the client gave up (timeout tests)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="sms-webhook", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/sms"

    def start(self) -> WebhookStandIn:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def messages(self) -> list[Any]:
        with self._lock:
            return [r["json"] for r in self.requests]


@dataclass
class MsisdnSession:
    msisdn: str
    client_secret: str
    sid: str
    sms: Sms | None = None
    response: dict[str, Any] = field(default_factory=dict)

    @property
    def code(self) -> str:
        assert self.sms is not None
        return self.sms.code


class Phone:
    """msisdn flows against one server (an IdentityApi for registering users, plus the outbox)."""

    def __init__(self, api: IdentityApi, outbox: SmsOutbox | None) -> None:
        self.api = api
        self.client = api.client
        self.server = api.server
        self._outbox = outbox

    @property
    def outbox(self) -> SmsOutbox:
        assert self._outbox is not None, "this server does not use the file provider"
        return self._outbox

    def request_token(
        self,
        country: str,
        phone_number: str,
        client_secret: str,
        send_attempt: Any = 1,
        *,
        user: User | None = None,
        v1: bool = False,
        form: bool = False,
        next_link: str | None = None,
        body: dict[str, Any] | None = None,
    ) -> httpx.Response:
        if body is None:
            body = {
                "client_secret": client_secret,
                "country": country,
                "phone_number": phone_number,
                "send_attempt": send_attempt,
            }
            if next_link is not None:
                body["next_link"] = next_link
        path = f"{V1 if v1 else V2}/validate/msisdn/requestToken"
        headers = user.headers if user is not None else {}
        if form:
            return self.client.post(path, data={k: str(v) for k, v in body.items()}, headers=headers)
        return self.client.post(path, json=body, headers=headers)

    def start(
        self,
        country: str,
        phone_number: str,
        msisdn: str,
        *,
        client_secret: str | None = None,
        send_attempt: int = 1,
        user: User | None = None,
        v1: bool = False,
        **kwargs: Any,
    ) -> MsisdnSession:
        """requestToken, expecting success, and the SMS it sent."""
        secret = client_secret or new_secret()
        resp = self.request_token(country, phone_number, secret, send_attempt, user=user, v1=v1, **kwargs)
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert body.get("msisdn") == msisdn, body
        sms = self.outbox.wait_for(msisdn) if self._outbox is not None else None
        return MsisdnSession(msisdn, secret, body["sid"], sms, body)

    def submit(
        self,
        session: MsisdnSession,
        token: str | None = None,
        *,
        user: User | None = None,
        v1: bool = False,
        form: bool = False,
        client_secret: str | None = None,
        sid: str | None = None,
    ) -> httpx.Response:
        body = {
            "sid": sid or session.sid,
            "client_secret": client_secret or session.client_secret,
            "token": token if token is not None else session.code,
        }
        path = f"{V1 if v1 else V2}/validate/msisdn/submitToken"
        headers = user.headers if user is not None else {}
        if form:
            return self.client.post(path, data=body, headers=headers)
        return self.client.post(path, json=body, headers=headers)

    def validated(
        self, country: str, phone_number: str, msisdn: str, *, user: User | None = None, v1: bool = False
    ) -> MsisdnSession:
        session = self.start(country, phone_number, msisdn, user=user, v1=v1)
        resp = self.submit(session, user=user, v1=v1)
        assert resp.status_code == 200 and resp.json() == {"success": True}, resp.text
        return session

    def get_validated(
        self, session: MsisdnSession, *, user: User | None = None, v1: bool = False, client_secret: str | None = None
    ) -> httpx.Response:
        params = {"sid": session.sid, "client_secret": client_secret or session.client_secret}
        headers = user.headers if user is not None else {}
        return self.client.get(f"{V1 if v1 else V2}/3pid/getValidated3pid", params=params, headers=headers)

    def bind(self, session: MsisdnSession, mxid: str, *, user: User | None = None, v1: bool = False) -> httpx.Response:
        body = {"sid": session.sid, "client_secret": session.client_secret, "mxid": mxid}
        headers = user.headers if user is not None else {}
        return self.client.post(f"{V1 if v1 else V2}/3pid/bind", json=body, headers=headers)

    def lookup_sha256(self, user: User, msisdn: str) -> str | None:
        pepper = self.api.hash_details(user)["lookup_pepper"]
        h = sha256_address(msisdn, "msisdn", pepper)
        resp = self.api.lookup(user, [h], "sha256", pepper)
        assert resp.status_code == 200, resp.text
        mappings = resp.json()["mappings"]
        assert set(mappings) <= {h}, mappings
        return cast("str | None", mappings.get(h))


def sms_server_config(outbox: Path, **sms: Any) -> dict[str, Any]:
    return {"sms": {"provider": "file", "outbox": str(outbox), **sms}}


# --- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sms_server(
    db_factory: Any,
    smtp_sink: SmtpSink,
    homeserver: HomeserverStandIn,
    terms_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
    backend: str,
) -> Iterator[SydentServer]:
    """A server of this module (terms of service, file SMS provider, per-country originators)."""
    workdir = tmp_path_factory.mktemp(f"msisdn-{backend}")
    outbox = workdir / "sms_outbox"
    outbox.mkdir()
    server = SydentServer(
        workdir / "server",
        database_url=db_factory.create().url,
        smtp_port=smtp_sink.port,
        ca_file=homeserver.ca_path,
        terms_path=terms_path,
        extra_config=sms_server_config(outbox, originators=dict(ORIGINATORS)),
        name=f"sydent_lite msisdn ({backend})",
    )
    server.sms_outbox = outbox  # type: ignore[attr-defined]
    server.start()
    yield server
    server.stop()


@pytest.fixture
def phone(sms_server: SydentServer, smtp_sink: SmtpSink, homeserver: HomeserverStandIn) -> Iterator[Phone]:
    with sms_server.new_client() as c:
        yield Phone(IdentityApi(sms_server, smtp_sink, homeserver, c), SmsOutbox(sms_server.sms_outbox))  # type: ignore[attr-defined]


@pytest.fixture
def phone_user(phone: Phone) -> User:
    return phone.api.register()


@pytest.fixture
def make_phone(
    make_inprocess_server: Any, smtp_sink: SmtpSink, homeserver: HomeserverStandIn, tmp_path: Path
) -> Iterator[Any]:
    """`make_phone(sms={...}, **server_kwargs)`: a dedicated server (file provider into a fresh
    outbox unless `sms` says otherwise, no terms) and a Phone for it."""
    clients: list[httpx.Client] = []
    count = [0]

    def make(sms: dict[str, Any] | None = None, extra_config: dict[str, Any] | None = None, **kwargs: Any) -> Phone:
        count[0] += 1
        sms = dict(sms or {})
        outbox: SmsOutbox | None = None
        if sms.get("provider", "file") == "file":
            folder = tmp_path / f"sms_outbox{count[0]}"
            folder.mkdir()
            sms.setdefault("provider", "file")
            sms["outbox"] = str(folder)
            outbox = SmsOutbox(folder)
        config = {**(extra_config or {}), "sms": sms}
        kwargs.setdefault("terms_path", None)
        server = make_inprocess_server(extra_config=config, **kwargs)
        c = server.new_client()
        clients.append(c)
        return Phone(IdentityApi(server, smtp_sink, homeserver, c), outbox)

    yield make
    for c in clients:
        c.close()


@pytest.fixture
def webhook() -> Iterator[WebhookStandIn]:
    hook = WebhookStandIn().start()
    yield hook
    hook.stop()


# --- requestToken: the answer and the SMS ---------------------------------------------------------------


@pytest.mark.parametrize(
    "v1,form",
    [(True, False), (True, True), (False, False), (False, True)],
    ids=["v1-json", "v1-form", "v2-json", "v2-form"],
)
def test_request_token_answers_and_sends_the_code(phone: Phone, phone_user: User, v1: bool, form: bool) -> None:
    national, msisdn = random_gb()
    secret = new_secret()
    resp = phone.request_token("GB", national, secret, 1, user=None if v1 else phone_user, v1=v1, form=form)
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    body = resp.json()
    sid = body.get("sid")
    assert isinstance(sid, str) and SID_RE.fullmatch(sid), body
    intl = "+44 7700 " + msisdn[-6:]
    assert body == {"success": True, "sid": sid, "msisdn": msisdn, "intl_fmt": intl}

    sms = phone.outbox.wait_for(msisdn)
    assert {"to", "text", "originator"} <= set(sms.raw), sms.raw
    assert sms.to == msisdn  # E.164 digits without "+", as stored
    assert re.fullmatch(r"\d{6}", sms.code), sms.text  # default code_length
    assert sms.text == f"Your code is {sms.code}"  # default template
    phone.outbox.assert_none(msisdn)  # exactly one SMS

    # The code validates this session.
    session = MsisdnSession(msisdn, secret, sid, sms)
    resp = phone.submit(session, user=None if v1 else phone_user, v1=v1)
    assert resp.status_code == 200 and resp.json() == {"success": True}, resp.text


def test_request_token_v2_needs_a_token_and_accepted_terms(phone: Phone) -> None:
    national, msisdn = random_gb()
    assert_error(phone.request_token("GB", national, new_secret()), 401, "M_UNAUTHORIZED")
    newcomer = phone.api.register(accept_terms=False)
    assert_error(phone.request_token("GB", national, new_secret(), user=newcomer), 403, "M_TERMS_NOT_SIGNED")
    phone.outbox.assert_none(msisdn)
    # v1 never needs a token.
    assert phone.request_token("GB", national, new_secret(), v1=True).status_code == 200
    phone.outbox.wait_for(msisdn)


@pytest.mark.parametrize(
    "country,phone_number,msisdn,intl_fmt",
    [
        ("GB", "07700 900001", "447700900001", "+44 7700 900001"),  # the spec's example
        ("GB", "07700900001", "447700900001", "+44 7700 900001"),
        ("gb", "07700 900001", "447700900001", "+44 7700 900001"),  # any case
        ("GB", "+44 (0)7700 900001", "447700900001", "+44 7700 900001"),
        ("GB", "0044 7700 900001", "447700900001", "+44 7700 900001"),  # international prefix from GB
        ("US", "(202) 555-0143", "12025550143", "+1 202-555-0143"),
        ("US", "202-555-0143", "12025550143", "+1 202-555-0143"),
        ("FR", "06 12 34 56 78", "33612345678", "+33 6 12 34 56 78"),
        ("DE", "0151 23456789", "4915123456789", "+49 1512 3456789"),
        ("US", "+44 7700 900001", "447700900001", "+44 7700 900001"),  # an international number wins
        ("FR", "+49 151 23456789", "4915123456789", "+49 1512 3456789"),
        ("DE", "+33612345678", "33612345678", "+33 6 12 34 56 78"),
    ],
)
def test_numbers_are_normalised(phone: Phone, country: str, phone_number: str, msisdn: str, intl_fmt: str) -> None:
    resp = phone.request_token(country, phone_number, new_secret(), v1=True)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["success"] is True, body
    assert body["msisdn"] == msisdn, body
    assert body["intl_fmt"] == intl_fmt, body
    assert phone.outbox.wait_for(msisdn).to == msisdn


@pytest.mark.parametrize(
    "country,phone_number",
    [
        ("GB", "12"),  # too short
        ("GB", "+44 1"),
        ("GB", "not a number"),
        ("GB", "0770090000112345"),  # too long
        ("GB", "+999 1234567"),  # no such calling code
        ("XX", "07700900001"),  # no such country
        ("ZZ", "07700900001"),
        ("GBR", "07700900001"),  # not an alpha-2 code
        ("G", "07700900001"),
    ],
)
def test_invalid_numbers_are_invalid_address(phone: Phone, country: str, phone_number: str) -> None:
    resp = phone.request_token(country, phone_number, new_secret(), v1=True)
    assert_error(resp, 400, "M_INVALID_ADDRESS")
    time.sleep(0.2)
    assert [s.raw for s in phone.outbox.all_new()] == [], "an SMS went out for an invalid number"


def test_absurdly_long_number(phone: Phone) -> None:
    # Unparseable (M_INVALID_ADDRESS), or refused by a field length check (M_INVALID_PARAM).
    resp = phone.request_token("GB", "1" * 100, new_secret(), v1=True)
    assert_error(resp, 400, ("M_INVALID_ADDRESS", "M_INVALID_PARAM"))
    time.sleep(0.2)
    assert [s.raw for s in phone.outbox.all_new()] == []


@pytest.mark.parametrize("country,phone_number", [("", "07700900001"), ("GB", "")])
def test_empty_country_or_number(phone: Phone, country: str, phone_number: str) -> None:
    # Present but empty: unparseable (M_INVALID_ADDRESS) or treated as missing; never a session.
    resp = phone.request_token(country, phone_number, new_secret(), v1=True)
    assert_error(resp, 400, ("M_INVALID_ADDRESS", "M_MISSING_PARAMS"))
    phone.outbox.assert_none("447700900001", wait=0.2)


@pytest.mark.parametrize("missing", ["client_secret", "country", "phone_number", "send_attempt"])
@pytest.mark.parametrize("form", [False, True], ids=["json", "form"])
def test_missing_params(phone: Phone, missing: str, form: bool) -> None:
    national, msisdn = random_gb()
    body = {"client_secret": new_secret(), "country": "GB", "phone_number": national, "send_attempt": 1}
    del body[missing]
    resp = phone.request_token("", "", "", body=body, v1=True, form=form)
    err = assert_error(resp, 400, "M_MISSING_PARAMS")
    assert missing in err["error"], err  # the message names the field
    phone.outbox.assert_none(msisdn, wait=0.2)


@pytest.mark.parametrize(
    "changes",
    [{"client_secret": "has space"}, {"client_secret": "x" * 256}, {"send_attempt": "first"}],
    ids=["secret-space", "secret-too-long", "send-attempt-not-a-number"],
)
def test_invalid_params(phone: Phone, changes: dict[str, Any]) -> None:
    national, msisdn = random_gb()
    body = {"client_secret": new_secret(), "country": "GB", "phone_number": national, "send_attempt": 1, **changes}
    assert_error(phone.request_token("", "", "", body=body, v1=True), 400, "M_INVALID_PARAM")
    phone.outbox.assert_none(msisdn, wait=0.2)


def test_originator_per_calling_code(phone: Phone) -> None:
    gb_national, gb = random_gb()
    fr_national, fr = random_fr()
    assert phone.request_token("GB", gb_national, new_secret(), v1=True).status_code == 200
    assert phone.request_token("FR", fr_national, new_secret(), v1=True).status_code == 200
    # The country given does not matter, the number's calling code does.
    assert phone.request_token("FR", "+" + gb, new_secret(), v1=True).status_code == 200
    assert phone.outbox.wait_for(gb).originator == ALPHA_MATRIX
    assert phone.outbox.wait_for(fr).originator == LONG_DEFAULT
    assert phone.outbox.wait_for(gb).originator == ALPHA_MATRIX


def test_codes_are_random_per_session(phone: Phone) -> None:
    national, msisdn = random_gb()
    sessions = [phone.start("GB", national, msisdn, v1=True) for _ in range(5)]
    assert len({s.sid for s in sessions}) == 5  # a new client secret: a new session
    codes = [s.code for s in sessions]
    assert all(re.fullmatch(r"\d{6}", c) for c in codes), codes
    assert len(set(codes)) > 1, codes
    # One session's code does not validate another (when they differ).
    a, b = sessions[0], sessions[1]
    if a.code != b.code:
        assert_error(phone.submit(b, a.code, v1=True), 400, "M_TOKEN_INCORRECT")
    assert phone.submit(b, v1=True).json() == {"success": True}


def test_code_length_and_template(make_phone: Any) -> None:
    template = "Matrix: enter {token} to confirm. Never share it."
    p = make_phone(sms={"code_length": 8, "template": template})
    national, msisdn = random_gb()
    session = p.start("GB", national, msisdn, v1=True)
    assert re.fullmatch(r"\d{8}", session.code), session.sms.text
    assert session.sms.text == template.replace("{token}", session.code)
    resp = p.submit(session, v1=True)
    assert resp.status_code == 200 and resp.json() == {"success": True}, resp.text


# --- send_attempt --------------------------------------------------------------------------------


def test_send_attempt_semantics(phone: Phone, phone_user: User) -> None:
    national, msisdn = random_gb()
    secret = new_secret()
    first = phone.start("GB", national, msisdn, client_secret=secret, user=phone_user)
    expected = first.response

    for attempt in (1, 0):  # a retry, or an older attempt: same session, no new SMS
        resp = phone.request_token("GB", national, secret, attempt, user=phone_user)
        assert resp.status_code == 200, resp.text
        assert resp.json() == expected
        phone.outbox.assert_none(msisdn, wait=0.2)

    resp = phone.request_token("GB", national, secret, 2, user=phone_user)
    assert resp.status_code == 200, resp.text
    assert resp.json() == expected  # same sid
    # A new code (only a hash of the old one is stored); it replaces the old one.
    again = phone.outbox.wait_for(msisdn)
    assert re.fullmatch(r"\d{6}", again.code), again.text

    resp = phone.request_token("GB", national, secret, 2, user=phone_user)
    assert resp.json() == expected
    phone.outbox.assert_none(msisdn, wait=0.2)

    resp = phone.request_token("GB", national, secret, 7, user=phone_user)
    assert resp.json() == expected
    newest = MsisdnSession(msisdn, secret, first.sid, phone.outbox.wait_for(msisdn))

    # Only the newest code is valid (6 digits: an older one may happen to equal it).
    for older in (first.code, again.code):
        if older != newest.code:
            assert_error(phone.submit(first, older, user=phone_user), 400, "M_TOKEN_INCORRECT")
    resp = phone.submit(newest, user=phone_user)
    assert resp.status_code == 200 and resp.json() == {"success": True}, resp.text


def test_send_attempt_as_a_digit_string(phone: Phone, phone_user: User) -> None:
    """matrix-js-sdk sends `"send_attempt": "1"`: a string of digits is that number."""
    national, msisdn = random_gb()
    secret = new_secret()
    resp = phone.request_token("GB", national, secret, "1", user=phone_user)
    assert resp.status_code == 200, resp.text
    expected = resp.json()
    first = phone.outbox.wait_for(msisdn)
    for again in ("1", 1, "01"):  # the same attempt: no new SMS
        resp = phone.request_token("GB", national, secret, again, user=phone_user)
        assert resp.status_code == 200 and resp.json() == expected, resp.text
    phone.outbox.assert_none(msisdn, wait=0.2)
    resp = phone.request_token("GB", national, secret, "2", user=phone_user)
    assert resp.status_code == 200 and resp.json() == expected, resp.text
    second = phone.outbox.wait_for(msisdn)
    if second.code != first.code:  # 6 digits: they may happen to be equal
        assert_error(
            phone.submit(MsisdnSession(msisdn, secret, expected["sid"], first), user=phone_user),
            400,
            "M_TOKEN_INCORRECT",
        )
    resp = phone.submit(MsisdnSession(msisdn, secret, expected["sid"], second), user=phone_user)
    assert resp.status_code == 200 and resp.json() == {"success": True}, resp.text


@pytest.mark.parametrize(
    "value",
    [" 1", "1.0", "+1", "--1", "²", "１"],  # noqa: RUF001 - a fullwidth digit is the point
    ids=["space", "decimal-point", "plus", "double-minus", "superscript-two", "fullwidth-one"],
)
def test_send_attempt_string_that_is_no_decimal_integer(phone: Phone, value: str) -> None:
    national, msisdn = random_gb()
    assert_error(phone.request_token("GB", national, new_secret(), value, v1=True), 400, "M_INVALID_PARAM")
    phone.outbox.assert_none(msisdn, wait=0.1)


def test_session_key_is_the_normalised_number(phone: Phone) -> None:
    # Keyed by (medium, address, client_secret), the address being the stored form: the same
    # number typed another way, with the same secret, is the same session.
    national, msisdn = random_gb()
    secret = new_secret()
    first = phone.start("GB", national, msisdn, client_secret=secret, v1=True)
    resp = phone.request_token("US", "+" + msisdn, secret, 1, v1=True)
    assert resp.status_code == 200, resp.text
    assert resp.json()["sid"] == first.sid
    phone.outbox.assert_none(msisdn, wait=0.2)
    resp = phone.request_token("FR", "+44 " + national[1:], secret, 2, v1=True)
    assert resp.json()["sid"] == first.sid
    resent = MsisdnSession(msisdn, secret, first.sid, phone.outbox.wait_for(msisdn))
    assert phone.submit(resent, v1=True).json() == {"success": True}


# --- refused countries -------------------------------------------------------------------------


def test_refused_countries(make_phone: Any) -> None:
    p = make_phone(sms={"refused_countries": ["US", "FR"]})
    refused = [
        ("US", "(202) 555-0143", "12025550143"),
        ("GB", "+1 202 555 0143", "12025550143"),  # the number's region counts, not the country given
        ("CA", "202 555 0143", "12025550143"),  # a US number dialled from Canada
        ("FR", "06 12 34 56 78", "33612345678"),
        ("DE", "+33 6 12 34 56 78", "33612345678"),
    ]
    for country, number, msisdn in refused:
        resp = p.request_token(country, number, new_secret(), v1=True)
        assert_error(resp, 400, "M_DESTINATION_REJECTED")
        p.outbox.assert_none(msisdn, wait=0.1)

    allowed = [
        ("US", "+1 416 979 1234", "14169791234"),  # Canada shares +1 with the US, but is not refused
        ("FR", "+49 151 23456789", "4915123456789"),  # asked "from" France, a German number
        ("US", "+44 7700 900001", "447700900001"),
    ]
    for country, number, msisdn in allowed:
        resp = p.request_token(country, number, new_secret(), v1=True)
        assert resp.status_code == 200, f"{country} {number}: {resp.text}"
        assert p.outbox.wait_for(msisdn).to == msisdn
    assert p.outbox.all_new() == []


def test_refused_country_covers_numbers_outside_the_metadata(make_phone: Any) -> None:
    # 07700 900xxx is possible but not "valid" for phonenumbers (no region of its own); refusing
    # GB must still refuse it, or the refusal could be side-stepped.
    p = make_phone(sms={"refused_countries": ["GB"]})
    national, msisdn = random_gb()
    assert_error(p.request_token("GB", national, new_secret(), v1=True), 400, "M_DESTINATION_REJECTED")
    assert_error(p.request_token("US", "+" + msisdn, new_secret(), v1=True), 400, "M_DESTINATION_REJECTED")
    p.outbox.assert_none(msisdn)
    fr_national, fr = random_fr()
    assert p.request_token("GB", "+33 " + fr_national[1:], new_secret(), v1=True).status_code == 200
    p.outbox.wait_for(fr)


# --- SMS providers: webhook, failures --------------------------------------------------------------


def test_webhook_provider_posts_the_sms(make_phone: Any, webhook: WebhookStandIn) -> None:
    p = make_phone(
        sms={
            "provider": "webhook",
            "webhook": {"url": webhook.url, "headers": {"X-Api-Key": "k3y-for-tests"}},
            "originators": {"44": "short:12345"},
        }
    )
    national, msisdn = random_gb()
    secret = new_secret()
    resp = p.request_token("GB", national, secret, v1=True)
    assert resp.status_code == 200, resp.text
    sid = resp.json()["sid"]
    assert len(webhook.requests) == 1, webhook.requests
    req = webhook.requests[0]
    assert req["path"] == "/sms"
    assert req["headers"].get("x-api-key") == "k3y-for-tests"
    assert req["headers"].get("content-type", "").startswith("application/json"), req["headers"]
    message = req["json"]
    assert isinstance(message, dict), req["body"]
    assert message["to"] == msisdn
    assert message["originator"] == {"type": "short", "text": "12345"}
    code = Sms("webhook", message).code
    assert message["text"] == f"Your code is {code}"
    resp = p.submit(MsisdnSession(msisdn, secret, sid), code, v1=True)
    assert resp.status_code == 200 and resp.json() == {"success": True}, resp.text


def test_provider_unreachable_is_send_error(make_phone: Any) -> None:
    closed = free_port()
    p = make_phone(sms={"provider": "webhook", "webhook": {"url": f"http://127.0.0.1:{closed}/sms"}})
    national, _ = random_gb()
    secret = new_secret()
    assert_error(p.request_token("GB", national, secret, v1=True), 400, "M_SEND_ERROR")
    # Nothing was stored: asking again is a new try (same failure), not "already sent".
    assert_error(p.request_token("GB", national, secret, v1=True), 400, "M_SEND_ERROR")
    time.sleep(0.3)
    assert not re.search(r"code is \d", p.server.output()), "the SMS text (with its code) was logged"


def test_provider_error_is_send_error_and_the_code_is_not_logged(make_phone: Any, webhook: WebhookStandIn) -> None:
    # 12 digits: no accidental match with timestamps or ports in the log.
    p = make_phone(sms={"provider": "webhook", "webhook": {"url": webhook.url}, "code_length": 12})
    webhook.status = 500
    national, msisdn = random_gb()
    secret = new_secret()
    assert_error(p.request_token("GB", national, secret, v1=True), 400, "M_SEND_ERROR")
    assert len(webhook.requests) == 1, webhook.requests
    failed_code = Sms("webhook", webhook.requests[0]["json"]).code
    assert len(failed_code) == 12
    time.sleep(0.3)
    assert failed_code not in p.server.output(), "the code of a failed SMS was logged"

    # Once the provider works again, the very same request sends the SMS, and that code validates.
    webhook.status = 200
    resp = p.request_token("GB", national, secret, v1=True)
    assert resp.status_code == 200, resp.text
    sid = resp.json()["sid"]
    assert len(webhook.requests) == 2, webhook.requests
    code = Sms("webhook", webhook.requests[1]["json"]).code
    resp = p.submit(MsisdnSession(msisdn, secret, sid), code, v1=True)
    assert resp.status_code == 200 and resp.json() == {"success": True}, resp.text


def test_provider_timeout_is_send_error(make_phone: Any, webhook: WebhookStandIn) -> None:
    p = make_phone(sms={"provider": "webhook", "webhook": {"url": webhook.url}, "timeout_seconds": 1})
    webhook.delay = 6.0
    national, _ = random_gb()
    started = time.monotonic()
    assert_error(p.request_token("GB", national, new_secret(), v1=True), 400, "M_SEND_ERROR")
    assert time.monotonic() - started < 5.0, "sms.timeout_seconds was not applied"


# --- submitToken, getValidated3pid ------------------------------------------------------------------


@pytest.mark.parametrize("form", [False, True], ids=["json", "form"])
def test_synapse_v1_flow(phone: Phone, form: bool) -> None:
    # What Synapse does as msisdn delegate: v1 requestToken, v1 submitToken, v1 getValidated3pid.
    national, msisdn = random_gb()
    session = phone.start("GB", national, msisdn, v1=True, form=form)
    assert_error(phone.get_validated(session, v1=True), 400, "M_SESSION_NOT_VALIDATED")
    before = now_ms()
    resp = phone.submit(session, v1=True, form=form)
    after = now_ms()
    assert resp.status_code == 200 and resp.json() == {"success": True}, resp.text
    resp = phone.get_validated(session, v1=True)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["medium"] == "msisdn"
    assert body["address"] == msisdn
    assert isinstance(body["validated_at"], int)
    assert before - 50 <= body["validated_at"] <= after + 50, (before, body, after)
    # The right code again is still a success.
    assert phone.submit(session, v1=True).json() == {"success": True}


def test_submit_token_v2(phone: Phone, phone_user: User) -> None:
    national, msisdn = random_gb()
    session = phone.start("GB", national, msisdn, user=phone_user)
    assert_error(phone.submit(session), 401, "M_UNAUTHORIZED")
    resp = phone.submit(session, user=phone_user)
    assert resp.status_code == 200 and resp.json() == {"success": True}, resp.text
    resp = phone.get_validated(session, user=phone_user)
    assert resp.status_code == 200, resp.text
    assert resp.json()["medium"] == "msisdn" and resp.json()["address"] == msisdn
    assert_error(phone.get_validated(session), 401, "M_UNAUTHORIZED")


def test_wrong_code_or_secret_is_token_incorrect(phone: Phone, phone_user: User) -> None:
    national, msisdn = random_gb()
    session = phone.start("GB", national, msisdn, user=phone_user)
    wrong_code = phone.submit(session, other_code(session.code), user=phone_user)
    wrong_secret = phone.submit(session, user=phone_user, client_secret=new_secret())
    for resp in (wrong_code, wrong_secret):
        assert_error(resp, 400, "M_TOKEN_INCORRECT")
    assert wrong_code.json() == wrong_secret.json()
    assert_error(phone.submit(session, other_code(session.code), v1=True), 400, "M_TOKEN_INCORRECT")
    assert_error(phone.submit(session, user=phone_user, sid="A" * 24), 404, "M_NO_VALID_SESSION")

    assert_error(phone.get_validated(session, user=phone_user), 400, "M_SESSION_NOT_VALIDATED")
    assert_error(phone.get_validated(session, user=phone_user, client_secret=new_secret()), 404, "M_NO_VALID_SESSION")
    assert_error(phone.bind(session, phone_user.user_id, user=phone_user), 400, "M_SESSION_NOT_VALIDATED")

    resp = phone.submit(session, user=phone_user)
    assert resp.status_code == 200 and resp.json() == {"success": True}, resp.text


@pytest.mark.parametrize("prefix", [V2, V1])
def test_get_submit_token(phone: Phone, prefix: str) -> None:
    # The GET form is for people (a browser): no bearer token, an HTML page or a redirect.
    next_link = "https://client.example.test/phone-done?step=2"
    path = f"{prefix}/validate/msisdn/submitToken"

    national, msisdn = random_gb()
    plain = phone.start("GB", national, msisdn, v1=True)
    params = {"sid": plain.sid, "client_secret": plain.client_secret}
    assert_html(phone.client.get(path, params={**params, "token": other_code(plain.code)}), 400)
    assert_html(phone.client.get(path, params={**params, "sid": "B" * 24, "token": plain.code}), 404)
    assert_error(phone.get_validated(plain, v1=True), 400, "M_SESSION_NOT_VALIDATED")
    assert_html(phone.client.get(path, params={**params, "token": plain.code}), 200)
    assert phone.get_validated(plain, v1=True).status_code == 200

    national, msisdn = random_gb()
    linked = phone.start("GB", national, msisdn, v1=True, next_link=next_link)
    resp = phone.client.get(
        path, params={"sid": linked.sid, "client_secret": linked.client_secret, "token": linked.code}
    )
    assert resp.status_code == 302, resp.text
    assert resp.headers["location"] == f"{next_link}&sid={linked.sid}"  # one rule for both media
    assert phone.get_validated(linked, v1=True).json()["address"] == msisdn
    # POST ignores next_link.
    resp = phone.submit(linked, v1=True)
    assert resp.status_code == 200 and resp.json() == {"success": True}, resp.text


def test_sessions_expire(make_phone: Any) -> None:
    p = make_phone(session_lifetime=3600)
    national, msisdn = random_gb()
    pending = p.start("GB", national, msisdn, v1=True)
    validated = p.validated("GB", national, msisdn, v1=True)
    assert isinstance(p.server, InProcessServer)
    p.server.clock.advance(3601)
    assert_error(p.submit(pending, v1=True), 400, "M_SESSION_EXPIRED")
    assert_error(p.get_validated(validated, v1=True), 400, "M_SESSION_EXPIRED")
    assert_error(p.bind(validated, "@late:example.test", v1=True), 400, "M_SESSION_EXPIRED")
    assert p.api.v1_lookup("msisdn", msisdn).json() == {}


# --- bind and lookups -----------------------------------------------------------------------------


def test_full_flow_bind_and_lookup(phone: Phone, phone_user: User) -> None:
    national, msisdn = random_gb()
    session = phone.validated("GB", national, msisdn, user=phone_user)

    resp = phone.bind(session, phone_user.user_id, user=phone_user)
    assert resp.status_code == 200, resp.text
    assoc = resp.json()
    assert_signed_association(
        assoc, phone.server, phone.client, address=msisdn, mxid=phone_user.user_id, medium="msisdn"
    )

    pepper = phone.api.hash_details(phone_user)["lookup_pepper"]
    bound = sha256_address(msisdn, "msisdn", pepper)
    plus = sha256_address("+" + msisdn, "msisdn", pepper)  # not the stored form
    as_email = sha256_address(msisdn, "email", pepper)  # another medium
    _, unbound_msisdn = random_gb()
    unbound = sha256_address(unbound_msisdn, "msisdn", pepper)
    resp = phone.api.lookup(phone_user, [bound, plus, as_email, unbound], "sha256", pepper)
    assert resp.status_code == 200, resp.text
    assert resp.json() == {"mappings": {bound: phone_user.user_id}}

    resp = phone.api.lookup(phone_user, [f"{msisdn} msisdn", f"+{msisdn} msisdn"], "none", pepper)
    assert resp.status_code == 200, resp.text
    assert resp.json() == {"mappings": {f"{msisdn} msisdn": phone_user.user_id}}

    # v1: the signed association unchanged, for the exact stored form only.
    assert phone.api.v1_lookup("msisdn", msisdn).json() == assoc
    assert phone.api.v1_lookup("msisdn", "+" + msisdn).json() == {}
    assert phone.api.v1_lookup("email", msisdn).json() == {}
    resp = phone.client.post(f"{V1}/bulk_lookup", json={"threepids": [["msisdn", msisdn], ["msisdn", unbound_msisdn]]})
    assert resp.status_code == 200, resp.text
    assert resp.json() == {"threepids": [["msisdn", msisdn, phone_user.user_id]]}


def test_v1_bind_and_rebind(phone: Phone) -> None:
    alice = phone.api.register()
    bob = phone.api.register()
    national, msisdn = random_gb()
    first = phone.validated("GB", national, msisdn, v1=True)
    resp = phone.bind(first, alice.user_id, v1=True)
    assert resp.status_code == 200, resp.text
    assert phone.lookup_sha256(alice, msisdn) == alice.user_id

    # The same number typed differently, validated again and bound to someone else: replaced.
    second = phone.validated("US", "+" + msisdn, msisdn, user=bob)
    resp = phone.bind(second, bob.user_id, user=bob)
    assert resp.status_code == 200, resp.text
    assert phone.lookup_sha256(alice, msisdn) == bob.user_id
    assert phone.api.v1_lookup("msisdn", msisdn).json() == resp.json()


def test_unbind_with_session(phone: Phone, phone_user: User) -> None:
    national, msisdn = random_gb()
    session = phone.validated("GB", national, msisdn, user=phone_user)
    assert phone.bind(session, phone_user.user_id, user=phone_user).status_code == 200
    threepid = {"medium": "msisdn", "address": "+" + msisdn}
    body = {
        "sid": session.sid,
        "client_secret": session.client_secret,
        "mxid": phone_user.user_id,
        "threepid": threepid,
    }
    # The session is for exactly this threepid: another spelling of the address is not it.
    assert_error(phone.client.post(f"{V2}/3pid/unbind", json=body), 403, "M_FORBIDDEN")
    assert phone.lookup_sha256(phone_user, msisdn) == phone_user.user_id

    threepid["address"] = msisdn
    resp = phone.client.post(f"{V2}/3pid/unbind", json=body)
    assert resp.status_code == 200 and resp.json() == {}, resp.text
    assert phone.lookup_sha256(phone_user, msisdn) is None
    assert phone.api.v1_lookup("msisdn", msisdn).json() == {}


# --- rate limits ---------------------------------------------------------------------------------


def test_request_token_is_rate_limited_per_number(make_phone: Any) -> None:
    p = make_phone(
        extra_config={
            "rate_limits": {
                "enabled": True,
                "request_token_per_address_burst": 2,
                "request_token_per_address_per_hour": 1.0,
                "request_token_per_ip_burst": 100,
            }
        }
    )
    national, msisdn = random_gb()
    # The same number, typed three ways, each with a new client secret (so each would send an SMS).
    ways = [("GB", national), ("US", "+" + msisdn), ("FR", "+44 " + national[1:])]
    responses = [p.request_token(country, number, new_secret(), v1=True) for country, number in ways]
    assert [r.status_code for r in responses] == [200, 200, 429], [r.text for r in responses]
    limited = assert_error(responses[2], 429, "M_LIMIT_EXCEEDED")
    assert isinstance(limited.get("retry_after_ms"), int) and limited["retry_after_ms"] > 0, limited
    p.outbox.wait_for(msisdn)
    p.outbox.wait_for(msisdn)
    p.outbox.assert_none(msisdn)

    # Another number is still fine.
    other_national, other = random_gb()
    resp = p.request_token("GB", other_national, new_secret(), v1=True)
    assert resp.status_code == 200, resp.text
    p.outbox.wait_for(other)
    # So is an email address.
    resp = p.client.post(
        f"{V1}/validate/email/requestToken",
        json={"client_secret": new_secret(), "email": unique_email("notlimited"), "send_attempt": 1},
    )
    assert resp.status_code == 200, resp.text


# --- guessing the code --------------------------------------------------------------------------------
# A 6-digit code is one in a million; unbounded guesses find it. Each unvalidated session takes
# sessions.max_token_attempts wrong codes (default 5) and is then dead; every address has a
# submitToken budget shared by all its sessions, taken before the code is compared; every
# client address one for all its submitToken calls. docs/api-behaviour.md, "Guessing codes".


def wrong_codes(code: str, n: int) -> list[str]:
    """`n` distinct codes of the same length as `code`, none of them `code`."""
    width = len(code)
    candidates = (f"{(int(code) + 1 + i) % 10**width:0{width}d}" for i in range(n))
    out = [c for c in candidates if c != code]
    assert len(out) == n
    return out


def msisdn_page(
    phone: Phone, session: MsisdnSession, code: str, prefix: str = V1, headers: dict[str, str] | None = None
) -> httpx.Response:
    """The GET form of submitToken (a person following a link)."""
    params = {"sid": session.sid, "client_secret": session.client_secret, "token": code}
    return phone.client.get(f"{prefix}/validate/msisdn/submitToken", params=params, headers=headers or {})


def failed_attempts(server: SydentServer, sid: str) -> int:
    """The session's wrong-code count, as the database holds it."""
    import asyncio

    from sqlalchemy import select

    from sydent_lite.storage.database import open_database
    from sydent_lite.storage.tables import validation_sessions as vs

    async def read() -> int:
        database = open_database(server.database_url)
        try:
            async with database.connect() as conn:
                return cast(
                    "int", (await conn.execute(select(vs.c.failed_attempts).where(vs.c.sid == sid))).scalar_one()
                )
        finally:
            await database.dispose()

    return asyncio.run(read())


def test_guessing_the_code_kills_the_session(make_phone: Any) -> None:
    p = make_phone()  # the defaults: 5 wrong codes per session (rate limits are off in tests)
    national, victim = random_gb()
    mallory = p.api.register()
    # Mallory asks for a code for the victim's number, with her own client secret. The SMS goes to
    # the victim: Mallory never sees it (the test reads it from the outbox to try it at the end).
    session = p.start("GB", national, victim, v1=True)
    for guess in wrong_codes(session.code, 5):
        assert_error(p.submit(session, guess, v1=True), 400, "M_TOKEN_INCORRECT")
    assert failed_attempts(p.server, session.sid) == 5

    # Dead: even the right code is refused, on every path.
    err = assert_error(p.submit(session, v1=True), 400, "M_SESSION_EXPIRED")
    assert "too many incorrect codes" in err["error"].lower(), err
    assert_error(p.submit(session, user=mallory), 400, "M_SESSION_EXPIRED")
    assert_error(p.submit(session, v1=True, form=True), 400, "M_SESSION_EXPIRED")
    for prefix in (V1, V2):
        assert "too many incorrect codes" in assert_html(msisdn_page(p, session, session.code, prefix), 400)
    assert_error(p.get_validated(session, v1=True), 400, "M_SESSION_NOT_VALIDATED")
    assert_error(p.bind(session, mallory.user_id, v1=True), 400, "M_SESSION_NOT_VALIDATED")
    assert_error(p.bind(session, mallory.user_id, user=mallory), 400, "M_SESSION_NOT_VALIDATED")
    assert p.api.v1_lookup("msisdn", victim).json() == {}
    assert p.lookup_sha256(mallory, victim) is None

    # requestToken with the same client secret never hands the dead session back (not even as a
    # retry of the same send_attempt): a new session, a new code, a fresh count.
    resp = p.request_token("GB", national, session.client_secret, 1, v1=True)
    assert resp.status_code == 200, resp.text
    fresh = MsisdnSession(victim, session.client_secret, resp.json()["sid"], p.outbox.wait_for(victim))
    assert fresh.sid != session.sid
    for guess in wrong_codes(fresh.code, 4):
        assert_error(p.submit(fresh, guess, v1=True), 400, "M_TOKEN_INCORRECT")
    assert p.submit(fresh, v1=True).json() == {"success": True}
    assert failed_attempts(p.server, fresh.sid) == 4  # the right code was no failure
    # The dead one stays dead.
    assert_error(p.submit(session, v1=True), 400, "M_SESSION_EXPIRED")


def test_max_token_attempts_setting(make_phone: Any) -> None:
    p = make_phone(extra_config={"sessions": {"max_token_attempts": 1}})
    national, msisdn = random_gb()
    session = p.start("GB", national, msisdn, v1=True)
    assert_error(p.submit(session, other_code(session.code), v1=True), 400, "M_TOKEN_INCORRECT")
    assert_error(p.submit(session, v1=True), 400, "M_SESSION_EXPIRED")


def test_wrong_client_secrets_cannot_kill_the_session(make_phone: Any) -> None:
    # Only the session's holder can use up its attempts: a stranger who learnt the sid cannot
    # lock the holder out.
    p = make_phone()
    national, msisdn = random_gb()
    session = p.start("GB", national, msisdn, v1=True)
    for guess in [session.code, *wrong_codes(session.code, 11)]:
        assert_error(p.submit(session, guess, v1=True, client_secret=new_secret()), 400, "M_TOKEN_INCORRECT")
    assert failed_attempts(p.server, session.sid) == 0
    assert p.submit(session, v1=True).json() == {"success": True}


def test_a_validated_session_never_dies(make_phone: Any) -> None:
    p = make_phone()
    user = p.api.register()
    national, msisdn = random_gb()
    session = p.validated("GB", national, msisdn, v1=True)
    for guess in wrong_codes(session.code, 8):
        assert_error(p.submit(session, guess, v1=True), 400, "M_TOKEN_INCORRECT")
    assert p.submit(session, v1=True).json() == {"success": True}
    assert p.get_validated(session, v1=True).status_code == 200
    assert p.bind(session, user.user_id, v1=True).status_code == 200
    assert p.lookup_sha256(user, msisdn) == user.user_id


def test_concurrent_guesses_never_exceed_the_limit(make_phone: Any) -> None:
    p = make_phone(extra_config={"sessions": {"max_token_attempts": 3}})
    national, msisdn = random_gb()
    session = p.start("GB", national, msisdn, v1=True)
    guesses = wrong_codes(session.code, 24)
    start = threading.Barrier(len(guesses))

    def guess(code: str) -> str:
        with p.server.new_client() as c:
            c.get(f"{V1}")  # connected before the barrier
            start.wait(timeout=30)
            body = {"sid": session.sid, "client_secret": session.client_secret, "token": code}
            resp = c.post(f"{V1}/validate/msisdn/submitToken", json=body)
            assert resp.status_code == 400, resp.text
            return cast("str", resp.json()["errcode"])

    from collections import Counter
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(len(guesses)) as pool:
        answers = Counter(pool.map(guess, guesses))
    # Exactly as many codes compared as the limit allows, however many arrive at once.
    assert answers == {"M_TOKEN_INCORRECT": 3, "M_SESSION_EXPIRED": 21}, answers
    assert failed_attempts(p.server, session.sid) == 3
    assert_error(p.submit(session, v1=True), 400, "M_SESSION_EXPIRED")


GUESSING_LIMITS = {
    "enabled": True,
    "request_token_per_address_burst": 50,
    "request_token_per_ip_burst": 50,
    "submit_token_per_ip_burst": 200,
}


def test_per_number_budget_stops_guessing_across_fresh_sessions(make_phone: Any) -> None:
    # Dead sessions are cheap to replace: the number's own budget is what bounds the guesses.
    p = make_phone(
        extra_config={
            "sessions": {"max_token_attempts": 3},
            "rate_limits": {
                **GUESSING_LIMITS,
                "submit_token_per_address_burst": 7,
                "submit_token_per_address_per_day": 1.0,
            },
        }
    )
    mallory = p.api.register()
    national, victim = random_gb()
    first = p.start("GB", national, victim, v1=True)
    for guess in wrong_codes(first.code, 3):
        assert_error(p.submit(first, guess, v1=True), 400, "M_TOKEN_INCORRECT")
    second = p.start("US", "+" + victim, victim, user=mallory)  # another session, typed another way, v2
    for guess in wrong_codes(second.code, 3):
        assert_error(p.submit(second, guess, user=mallory), 400, "M_TOKEN_INCORRECT")
    third = p.start("GB", national, victim, v1=True)
    assert_html(msisdn_page(p, third, other_code(third.code)), 400)  # the 7th try, through the GET form

    # The budget is spent: the right code is refused before it is compared, on every path.
    limited = assert_error(p.submit(third, v1=True), 429, "M_LIMIT_EXCEEDED")
    assert isinstance(limited.get("retry_after_ms"), int) and limited["retry_after_ms"] > 0, limited
    assert_error(p.submit(third, user=mallory), 429, "M_LIMIT_EXCEEDED")
    assert_html(msisdn_page(p, third, third.code, V2), 429)
    fourth = p.start("GB", national, victim, v1=True)
    assert_error(p.submit(fourth, v1=True), 429, "M_LIMIT_EXCEEDED")
    for s in (third, fourth):
        assert_error(p.get_validated(s, v1=True), 400, "M_SESSION_NOT_VALIDATED")
    assert p.api.v1_lookup("msisdn", victim).json() == {}
    # A dead session says so without spending anything.
    assert_error(p.submit(first, v1=True), 400, "M_SESSION_EXPIRED")

    # Other numbers are not affected.
    other_national, other = random_gb()
    assert p.submit(p.start("GB", other_national, other, v1=True), v1=True).json() == {"success": True}


def test_submit_token_is_limited_per_client_address(make_phone: Any) -> None:
    p = make_phone(
        extra_config={
            "listen": {"trusted_proxies": ["127.0.0.1"]},
            "rate_limits": {**GUESSING_LIMITS, "submit_token_per_ip_burst": 4, "submit_token_per_ip_per_minute": 1.0},
        }
    )
    national, msisdn = random_gb()
    session = p.start("GB", national, msisdn, v1=True)
    mallory = {"X-Forwarded-For": "203.0.113.7"}
    body = {"sid": session.sid, "client_secret": new_secret(), "token": session.code}
    path = f"{V1}/validate/msisdn/submitToken"
    # Every call counts, whatever it carries: wrong client secrets, unknown sids, the GET form.
    assert_error(p.client.post(path, json=body, headers=mallory), 400, "M_TOKEN_INCORRECT")
    assert_error(p.client.post(path, json=dict(body, sid="C" * 24), headers=mallory), 404, "M_NO_VALID_SESSION")
    assert_html(p.client.get(path, params=body, headers=mallory), 400)
    assert_error(
        p.client.post(f"{V2}/validate/msisdn/submitToken", json=body, headers={**mallory, **p.api.register().headers}),
        400,
        "M_TOKEN_INCORRECT",
    )
    limited = assert_error(p.client.post(path, json=body, headers=mallory), 429, "M_LIMIT_EXCEEDED")
    assert limited["retry_after_ms"] > 0, limited
    assert_html(p.client.get(path, params=body, headers=mallory), 429)
    # Another client is not affected; the session is intact.
    holder = {"X-Forwarded-For": "198.51.100.9"}
    resp = p.client.post(
        path, json={"sid": session.sid, "client_secret": session.client_secret, "token": session.code}, headers=holder
    )
    assert resp.status_code == 200 and resp.json() == {"success": True}, resp.text
