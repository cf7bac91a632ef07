"""SMS providers against stand-ins of their HTTP APIs, served by uvicorn on a real socket.

Each stand-in checks nothing by itself: it records every request exactly as received and answers
what the test told it to, so the tests can assert the precise request each provider must send
(method, path, auth, content type, fields) and how each failure becomes an SmsSendError that is
safe to log.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import socket
import threading
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from support.smtp import free_port

from sydent_lite.config import (
    ConfigError,
    OpenMarketConfig,
    SmsConfig,
    SmsProviderName,
    TwilioConfig,
    WebhookConfig,
    config_from_dict,
)
from sydent_lite.delivery.sms import (
    FileSmsProvider,
    OpenMarketSmsProvider,
    Originator,
    SmsProvider,
    SmsSendError,
    TwilioSmsProvider,
    WebhookSmsProvider,
    make_sms_provider,
    originator_for,
)

# Distinctive values that must never show up in an error message or a log line.
CODE = "839274"
TEXT = f"Your code is {CODE}"
MSISDN = "447700900913"
ALPHA_SENDER = Originator("alpha", "Matrix")
ACCOUNT_SID = "AC0123456789abcdef0123456789abcdef"
AUTH_TOKEN = "tw-auth-token-s3cr3t-9f8e7d"
OM_USER = "om-user"
OM_PASSWORD = "om-pässword-s3cr3t-4b5c"
HOOK_SECRET = "Bearer hook-s3cr3t-1a2b3c"


# --- the stand-in API ---------------------------------------------------------------------------


@dataclass
class Recorded:
    method: str
    path: str
    query: str
    headers: dict[str, str]  # lower-case names
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def form(self) -> dict[str, list[str]]:
        return urllib.parse.parse_qs(self.body.decode("ascii"), keep_blank_values=True, strict_parsing=True)

    def basic_auth(self) -> tuple[str, str]:
        scheme, _, value = self.headers["authorization"].partition(" ")
        assert scheme == "Basic"
        user, sep, password = base64.b64decode(value, validate=True).decode("utf-8").partition(":")
        assert sep
        return user, password


@dataclass
class Answer:
    status: int = 200
    body: Any = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0


class ProviderStandIn:
    """Records every request; answers `self.answer` (one for all paths)."""

    def __init__(self) -> None:
        self.requests: list[Recorded] = []
        self.answer = Answer()
        self._release = threading.Event()
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self.port: int | None = None
        self._app = Starlette(routes=[Route("/{path:path}", self._endpoint, methods=["GET", "POST", "PUT"])])

    async def _endpoint(self, request: Request) -> Response:
        body = await request.body()
        self.requests.append(
            Recorded(
                request.method,
                request.url.path,
                request.url.query,
                {k.lower(): v for k, v in request.headers.items()},
                body,
            )
        )
        answer = self.answer
        if answer.delay:
            deadline = time.monotonic() + answer.delay
            while time.monotonic() < deadline and not self._release.is_set():
                await asyncio.sleep(0.02)
        content = answer.body if isinstance(answer.body, (bytes, str)) else json.dumps(answer.body)
        media = None if isinstance(answer.body, (bytes, str)) else "application/json"
        return Response(content, status_code=answer.status, headers=answer.headers, media_type=media)

    def start(self) -> ProviderStandIn:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(self._app, log_level="warning", access_log=False, lifespan="off")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, name="sms-provider-stand-in", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + 15
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the SMS provider stand-in did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self._release.set()
        if self._server is not None:
            self._server.should_exit = True
            assert self._thread is not None
            self._thread.join(timeout=10)

    def reset(self) -> None:
        self.requests.clear()
        self.answer = Answer()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture(scope="module")
def standin_server() -> Iterator[ProviderStandIn]:
    s = ProviderStandIn().start()
    yield s
    s.stop()


@pytest.fixture
def standin(standin_server: ProviderStandIn) -> Iterator[ProviderStandIn]:
    standin_server.reset()
    yield standin_server
    standin_server.reset()


@pytest.fixture
def closed_port() -> int:
    """A local port nothing listens on (bound, then released)."""
    return free_port()


# --- configs and helpers ------------------------------------------------------------------------


def sms_config(provider: SmsProviderName, base_url: str, timeout: float = 5.0, **kwargs: Any) -> SmsConfig:
    return SmsConfig(
        provider=provider,
        timeout_seconds=timeout,
        twilio=TwilioConfig(account_sid=ACCOUNT_SID, auth_token=AUTH_TOKEN, api_base_url=base_url),
        openmarket=OpenMarketConfig(username=OM_USER, password=OM_PASSWORD, api_base_url=base_url),
        webhook=WebhookConfig(
            url=f"{base_url}/hooks/sms?key=q-s3cr3t", headers={"Authorization": HOOK_SECRET, "X-Tenant": "matrix"}
        ),
        **kwargs,
    )


def assert_safe(message: str) -> None:
    """Neither the code, nor a credential, nor the full number (at most its last two digits)."""
    for secret in (CODE, AUTH_TOKEN, OM_PASSWORD, HOOK_SECRET, "hook-s3cr3t", "q-s3cr3t", MSISDN, MSISDN[-3:]):
        assert secret not in message, f"{secret!r} leaked into {message!r}"


def assert_logs_safe(caplog: pytest.LogCaptureFixture) -> None:
    # Our own log lines. (httpx's INFO line quotes the URL; observability.logs.setup_from_config
    # sets httpx and httpcore to WARNING.)
    ours = [r for r in caplog.records if r.name.startswith("sydent_lite")]
    for record in ours:
        assert_safe(record.getMessage())
        assert record.exc_info is None


async def send_failing(provider: SmsProvider, originator: Originator | None = ALPHA_SENDER) -> str:
    try:
        with pytest.raises(SmsSendError) as info:
            await provider.send(MSISDN, TEXT, originator)
    finally:
        await provider.aclose()
    message = str(info.value)
    assert_safe(message)
    assert_safe(repr(info.value))
    return message


HTTP_PROVIDERS = ["twilio", "openmarket", "webhook"]


# --- originators --------------------------------------------------------------------------------


def test_parse_originator() -> None:
    # The config parses originators (their one home); providers get Originator values.
    def parsed(spec: str) -> Originator:
        (originator,) = config_from_dict({"sms": {"originators": {"44": spec}}}).sms.originators["44"]
        return originator

    assert parsed("alpha:Matrix") == Originator("alpha", "Matrix")
    assert parsed("long:+447700900000") == Originator("long", "+447700900000")
    assert parsed("short:12345") == Originator("short", "12345")
    # Only the first colon separates.
    assert parsed("alpha:A:B") == Originator("alpha", "A:B")


@pytest.mark.parametrize("spec", ["Matrix", "beta:Matrix", "alpha:", ":x", ""])
def test_parse_originator_refuses_malformed(spec: str) -> None:
    with pytest.raises(ConfigError) as e:
        config_from_dict({"sms": {"originators": {"44": spec}}})
    assert "config key 'sms.originators.44' must look like alpha:NAME, long:NUMBER or short:CODE" in str(e.value)


def test_originator_per_country_then_default_then_none() -> None:
    both = SmsConfig.model_validate({"originators": {"44": "alpha:MatrixUK", "default": "short:12345"}})
    assert originator_for(both, 44) == Originator("alpha", "MatrixUK")
    assert originator_for(both, 1) == Originator("short", "12345")
    only_country = SmsConfig.model_validate({"originators": {"44": "long:+447700900000"}})
    assert originator_for(only_country, 44) == Originator("long", "+447700900000")
    assert originator_for(only_country, 33) is None
    assert originator_for(SmsConfig(), 44) is None


# --- Twilio -------------------------------------------------------------------------------------


async def test_twilio_sends_the_messages_resource_request(
    standin: ProviderStandIn, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    standin.answer = Answer(201, {"sid": "SM" + "0" * 32, "status": "queued"})
    config = sms_config("twilio", standin.base_url, originators={"44": "alpha:MatrixUK", "default": "short:12345"})
    provider = make_sms_provider(config)
    assert isinstance(provider, TwilioSmsProvider)
    try:
        await provider.send(MSISDN, TEXT, originator_for(config, 44))
    finally:
        await provider.aclose()

    (req,) = standin.requests
    assert req.method == "POST"
    assert req.path == f"/2010-04-01/Accounts/{ACCOUNT_SID}/Messages.json"
    assert req.query == ""
    assert req.basic_auth() == (ACCOUNT_SID, AUTH_TOKEN)
    assert req.headers["content-type"] == "application/x-www-form-urlencoded"
    assert req.form == {"To": ["+" + MSISDN], "Body": [TEXT], "From": ["MatrixUK"]}
    assert_logs_safe(caplog)


@pytest.mark.parametrize(
    ("spec", "expected_from"),
    [
        ("long:+447700900000", "+447700900000"),
        ("long:447700900000", "+447700900000"),  # a long number gets its '+'
        ("short:12345", "12345"),
        ("alpha:Matrix Org", "Matrix Org"),
    ],
)
async def test_twilio_from_per_originator_type(standin: ProviderStandIn, spec: str, expected_from: str) -> None:
    standin.answer = Answer(201, {"sid": "SM1"})
    config = sms_config("twilio", standin.base_url, originators={"default": spec})
    provider = make_sms_provider(config)
    try:
        await provider.send("15555550100", "Kód: 1234 ✓ & more=yes", originator_for(config, 1))
    finally:
        await provider.aclose()
    (req,) = standin.requests
    assert req.form == {"To": ["+15555550100"], "Body": ["Kód: 1234 ✓ & more=yes"], "From": [expected_from]}


async def test_twilio_without_an_originator_fails_at_send_time(standin: ProviderStandIn) -> None:
    config = sms_config("twilio", standin.base_url)
    provider = make_sms_provider(config)  # building it is fine
    message = await send_failing(provider, originator_for(config, 44))
    assert "twilio needs an originator" in message
    assert standin.requests == []


async def test_twilio_error_names_twilios_code_but_not_its_message(standin: ProviderStandIn) -> None:
    standin.answer = Answer(
        400,
        {
            "code": 21211,
            "status": 400,
            "message": f"The 'To' number +{MSISDN} is not a valid phone number.",
            "more_info": "https://www.twilio.com/docs/errors/21211",
        },
    )
    message = await send_failing(TwilioSmsProvider(sms_config("twilio", standin.base_url).twilio, 5.0))
    assert "twilio" in message and "400" in message and "21211" in message
    assert "valid phone number" not in message


# --- OpenMarket ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("calling_code", "expected_source"),
    [
        (44, {"ton": 5, "address": "MatrixUK"}),  # per-country alpha sender
        (1, {"ton": 3, "address": "12345"}),  # default short code
        (33, {"ton": 1, "address": "+33700000000"}),  # long number
    ],
)
async def test_openmarket_sends_sydents_request(
    standin: ProviderStandIn, caplog: pytest.LogCaptureFixture, calling_code: int, expected_source: dict[str, Any]
) -> None:
    caplog.set_level(logging.DEBUG)
    standin.answer = Answer(202, "", headers={"X-Request-Id": "om-req-42", "ttl": "259200"})
    originators = {"44": "alpha:MatrixUK", "1": "short:12345", "33": "long:+33700000000"}
    config = sms_config("openmarket", standin.base_url, originators=originators)
    provider = make_sms_provider(config)
    assert isinstance(provider, OpenMarketSmsProvider)
    try:
        await provider.send(MSISDN, TEXT, originator_for(config, calling_code))
    finally:
        await provider.aclose()

    (req,) = standin.requests
    assert req.method == "POST"
    assert req.path == "/sms/v4/mt"
    assert req.basic_auth() == (OM_USER, OM_PASSWORD)
    assert req.headers["content-type"] == "application/json"
    assert req.json == {
        "mobileTerminate": {
            "message": {"content": TEXT, "type": "text"},
            "destination": {"address": MSISDN},
            "source": expected_source,
        }
    }
    assert any("om-req-42" in r.getMessage() for r in caplog.records), "the request ID is logged"
    assert_logs_safe(caplog)


async def test_openmarket_without_originator_sends_no_source(standin: ProviderStandIn) -> None:
    standin.answer = Answer(202, "")
    config = sms_config("openmarket", standin.base_url.rstrip("/") + "/")  # a trailing slash is fine
    provider = make_sms_provider(config)
    try:
        await provider.send(MSISDN, TEXT, originator_for(config, 44))
    finally:
        await provider.aclose()
    (req,) = standin.requests
    assert req.path == "/sms/v4/mt"
    assert req.json == {
        "mobileTerminate": {"message": {"content": TEXT, "type": "text"}, "destination": {"address": MSISDN}}
    }


@pytest.mark.parametrize("status", [200, 201, 202, 204])
async def test_openmarket_any_2xx_is_success(standin: ProviderStandIn, status: int) -> None:
    standin.answer = Answer(status, "")
    provider = make_sms_provider(sms_config("openmarket", standin.base_url))
    try:
        await provider.send(MSISDN, TEXT, None)
    finally:
        await provider.aclose()


async def test_openmarket_error_names_code_and_request_id(standin: ProviderStandIn) -> None:
    standin.answer = Answer(
        400,
        {"error": {"code": 1203, "description": f"bad destination {MSISDN}: {TEXT}"}},
        headers={"X-Request-Id": "om-req-99"},
    )
    message = await send_failing(make_sms_provider(sms_config("openmarket", standin.base_url)))
    assert "openmarket" in message and "400" in message and "1203" in message and "om-req-99" in message
    assert "bad destination" not in message


# --- webhook ------------------------------------------------------------------------------------


async def test_webhook_posts_json_with_the_configured_headers(
    standin: ProviderStandIn, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    config = sms_config("webhook", standin.base_url, originators={"44": "long:+447700900000"})
    provider = make_sms_provider(config)
    assert isinstance(provider, WebhookSmsProvider)
    try:
        await provider.send(MSISDN, TEXT, originator_for(config, 44))
        await provider.send("15555550100", TEXT, originator_for(config, 1))
    finally:
        await provider.aclose()

    first, second = standin.requests
    for req in (first, second):
        assert req.method == "POST"
        assert req.path == "/hooks/sms"
        assert urllib.parse.parse_qs(req.query) == {"key": ["q-s3cr3t"]}
        assert req.headers["authorization"] == HOOK_SECRET
        assert req.headers["x-tenant"] == "matrix"
        assert req.headers["content-type"] == "application/json"
    assert first.json == {"to": MSISDN, "text": TEXT, "originator": {"type": "long", "text": "+447700900000"}}
    assert second.json == {"to": "15555550100", "text": TEXT, "originator": None}
    assert_logs_safe(caplog)


async def test_webhook_body_is_json_whatever_the_headers_say(standin: ProviderStandIn) -> None:
    config = sms_config("webhook", standin.base_url)
    config.webhook.headers["content-type"] = "text/plain"
    provider = make_sms_provider(config)
    try:
        await provider.send(MSISDN, TEXT, None)
    finally:
        await provider.aclose()
    (req,) = standin.requests
    assert req.headers["content-type"] == "application/json"
    assert req.json["text"] == TEXT


# --- failures, every HTTP provider --------------------------------------------------------------


@pytest.mark.parametrize("provider_name", HTTP_PROVIDERS)
@pytest.mark.parametrize("status", [400, 401, 403, 404, 429, 500, 502, 503])
async def test_error_status_is_a_safe_send_error(
    standin: ProviderStandIn, caplog: pytest.LogCaptureFixture, provider_name: SmsProviderName, status: int
) -> None:
    caplog.set_level(logging.DEBUG)
    # The provider echoes everything back, as some do: none of it may reach the message.
    echo = {
        "message": f"{TEXT} to +{MSISDN} ({AUTH_TOKEN} {OM_PASSWORD} {HOOK_SECRET})",
        "error": {"description": TEXT},
    }
    standin.answer = Answer(status, echo)
    message = await send_failing(make_sms_provider(sms_config(provider_name, standin.base_url)))
    assert provider_name in message
    assert f"HTTP {status}" in message
    assert len(standin.requests) == 1, "no retries"
    assert_logs_safe(caplog)


@pytest.mark.parametrize("provider_name", HTTP_PROVIDERS)
async def test_redirect_is_not_followed(standin: ProviderStandIn, provider_name: SmsProviderName) -> None:
    standin.answer = Answer(307, "", headers={"Location": f"{standin.base_url}/elsewhere"})
    message = await send_failing(make_sms_provider(sms_config(provider_name, standin.base_url)))
    assert "307" in message
    assert [r.path for r in standin.requests if r.path == "/elsewhere"] == []
    assert len(standin.requests) == 1


@pytest.mark.parametrize("provider_name", HTTP_PROVIDERS)
async def test_connection_refused(
    closed_port: int, caplog: pytest.LogCaptureFixture, provider_name: SmsProviderName
) -> None:
    caplog.set_level(logging.DEBUG)
    message = await send_failing(make_sms_provider(sms_config(provider_name, f"http://127.0.0.1:{closed_port}")))
    assert provider_name in message
    assert "ConnectError" in message
    assert_logs_safe(caplog)


@pytest.mark.parametrize("provider_name", HTTP_PROVIDERS)
async def test_timeout(
    standin: ProviderStandIn, caplog: pytest.LogCaptureFixture, provider_name: SmsProviderName
) -> None:
    caplog.set_level(logging.DEBUG)
    standin.answer = Answer(200, {}, delay=5.0)
    started = time.monotonic()
    message = await send_failing(make_sms_provider(sms_config(provider_name, standin.base_url, timeout=0.3)))
    assert time.monotonic() - started < 3
    assert provider_name in message
    assert "0.3s" in message
    assert_logs_safe(caplog)


@pytest.mark.parametrize("provider_name", HTTP_PROVIDERS)
async def test_proxy_environment_is_ignored(
    standin: ProviderStandIn, closed_port: int, monkeypatch: pytest.MonkeyPatch, provider_name: SmsProviderName
) -> None:
    for var in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(var, f"http://127.0.0.1:{closed_port}")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    standin.answer = Answer(202, {"sid": "SM1"})
    provider = make_sms_provider(sms_config(provider_name, standin.base_url, originators={"default": "short:1"}))
    try:
        await provider.send(MSISDN, TEXT, Originator("short", "1"))
    finally:
        await provider.aclose()
    assert len(standin.requests) == 1


# --- the file provider --------------------------------------------------------------------------


async def test_file_provider_writes_readable_json(tmp_path: Path) -> None:
    outbox = tmp_path / "data" / "sms_outbox"  # created, parents included
    provider = make_sms_provider(SmsConfig(provider="file", outbox=str(outbox)))
    assert isinstance(provider, FileSmsProvider)
    await provider.send(MSISDN, TEXT, Originator("alpha", "Matrix"))
    await provider.send("15555550100", "Kód 4321 ✓", None)
    await provider.aclose()

    files = sorted(outbox.iterdir())
    assert [f.suffix for f in files] == [".json", ".json"], "no temporary files left behind"
    first, second = (json.loads(f.read_text(encoding="utf-8")) for f in files)  # name order is time order
    assert first == {"to": MSISDN, "text": TEXT, "originator": {"type": "alpha", "text": "Matrix"}}
    assert second == {"to": "15555550100", "text": "Kód 4321 ✓", "originator": None}


async def test_file_provider_names_sort_by_time(tmp_path: Path) -> None:
    provider = FileSmsProvider(tmp_path)
    for i in range(20):
        await provider.send(MSISDN, f"Your code is {i:04d}", None)
    texts = [json.loads(f.read_text())["text"] for f in sorted(tmp_path.glob("*.json"))]
    assert texts == [f"Your code is {i:04d}" for i in range(20)]


async def test_file_provider_unwritable_outbox(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    message = await send_failing(FileSmsProvider(blocker / "outbox"), None)
    assert "outbox" in message


# --- the factory --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("provider_name", "cls"),
    [
        ("file", FileSmsProvider),
        ("twilio", TwilioSmsProvider),
        ("openmarket", OpenMarketSmsProvider),
        ("webhook", WebhookSmsProvider),
    ],
)
async def test_make_sms_provider_picks_the_class(provider_name: SmsProviderName, cls: type, tmp_path: Path) -> None:
    config = sms_config(provider_name, "https://sms.example.invalid", outbox=str(tmp_path / "outbox"))
    provider = make_sms_provider(config)
    assert type(provider) is cls
    assert isinstance(provider, SmsProvider)
    await provider.aclose()


async def test_http_client_settings() -> None:
    provider = make_sms_provider(sms_config("webhook", "https://sms.example.invalid", timeout=7.5))
    client = provider._client  # type: ignore[attr-defined]
    assert isinstance(client, httpx.AsyncClient)
    assert client.timeout == httpx.Timeout(7.5)
    assert client.follow_redirects is False
    assert client.trust_env is False
    await provider.aclose()


def test_unknown_provider_is_refused_by_the_config() -> None:
    # Refused where it is read (no SmsConfig holds another name, so make_sms_provider needs no check).
    with pytest.raises(ConfigError) as e:
        config_from_dict({"sms": {"provider": "carrier-pigeon"}})
    assert "config key 'sms.provider' must be one of file, twilio, openmarket, webhook (got 'carrier-pigeon')" in str(
        e.value
    )
    with pytest.raises(ValidationError):
        SmsConfig(provider="carrier-pigeon")  # type: ignore[arg-type]
