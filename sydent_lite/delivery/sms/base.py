"""What every SMS provider shares: the interface, originators, and the HTTP plumbing.

A provider gets the number as E.164 digits without '+' (the stored msisdn form), the finished
text and the sender to use. It either hands the message over or raises SmsSendError. The text
holds the validation code, so neither the error messages nor the logs ever contain it, nor a
credential, nor more than the last two digits of the number.
"""

from __future__ import annotations

import asyncio
import logging
from abc import ABC, abstractmethod
from typing import Any

import httpx

# Originators are parsed (and malformed ones refused) by the config: providers get Originator
# values, re-exported here with the rest of what they share.
from sydent_lite.config import Originator as Originator
from sydent_lite.config import SmsConfig

logger = logging.getLogger(__name__)


class SmsSendError(Exception):
    """The SMS could not be handed over. The message never holds the text, a secret or the number."""


def originator_for(config: SmsConfig, country_calling_code: int, msisdn: str = "") -> Originator | None:
    """The sender for numbers of this country calling code, else the "default" one, else None.

    Of several, the one Sydent picks (msisdnvalidator.py): the sum of the number's digits,
    modulo how many there are. A number always gets the same sender, so the codes of repeated
    requests come from one sender, while numbers are spread over all of them.
    """
    originators = config.originators.get(str(country_calling_code)) or config.originators.get("default")
    if not originators:
        return None
    return originators[sum(int(d) for d in msisdn if d.isdigit()) % len(originators)]


def masked(msisdn: str) -> str:
    """A number as logs and errors may show it: its last two digits."""
    return "..." + msisdn[-2:] if len(msisdn) > 2 else "..."


class SmsProvider(ABC):
    #: Used in logs and error messages.
    name: str = "sms"

    @abstractmethod
    async def send(self, msisdn: str, text: str, originator: Originator | None) -> None:
        """Hand the SMS over for delivery to `msisdn` (E.164 digits, no '+'), or raise SmsSendError."""

    async def aclose(self) -> None:  # noqa: B027 - a default, for providers that hold nothing
        """Release connections and other resources."""


class HttpSmsProvider(SmsProvider):
    """A provider reached over HTTP: one shared client, and failures turned into SmsSendError."""

    def __init__(self, timeout_seconds: float, client: httpx.AsyncClient | None = None) -> None:
        self._timeout = timeout_seconds
        self._client = client or httpx.AsyncClient(timeout=timeout_seconds, follow_redirects=False, trust_env=False)

    async def aclose(self) -> None:
        await self._client.aclose()

    async def _post(self, url: str, msisdn: str, **kwargs: Any) -> httpx.Response:
        """POST and return a 2xx response; anything else raises SmsSendError.

        The messages name the provider, the host and what went wrong (status, or the kind of
        network failure), never the URL's path or query (which may hold an account ID or a
        key), the request, or what the provider echoed back.
        """
        where = f"{self.name} ({_host(url)})"
        try:
            # httpx's timeout applies to each step; this bounds the whole exchange too, so a
            # provider trickling its answer cannot hold the request open indefinitely.
            async with asyncio.timeout(self._timeout):
                response = await self._client.post(url, **kwargs)
        except (TimeoutError, httpx.TimeoutException) as e:
            raise SmsSendError(
                f"{where}: no answer within {self._timeout:g}s ({type(e).__name__}) sending to {masked(msisdn)}"
            ) from None
        except (httpx.HTTPError, httpx.InvalidURL, OSError) as e:
            # Connection refused/reset, DNS, TLS, protocol errors. Only the type: httpx's
            # messages can quote the URL.
            raise SmsSendError(f"{where}: request failed ({type(e).__name__}) sending to {masked(msisdn)}") from None
        if not 200 <= response.status_code < 300:
            detail = self._error_detail(response)
            raise SmsSendError(f"{where}: HTTP {response.status_code}{detail} sending to {masked(msisdn)}")
        return response

    def _error_detail(self, response: httpx.Response) -> str:
        """Extra, safe details of a failed answer (provider error codes, request IDs); "" if none."""
        return ""


def _host(url: str) -> str:
    try:
        u = httpx.URL(url)
    except (httpx.InvalidURL, TypeError, ValueError):
        return "?"
    host = u.host or "?"
    if ":" in host:
        host = f"[{host}]"
    return f"{host}:{u.port}" if u.port else host


def json_or_none(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


def safe_code(value: Any) -> str | None:
    """A provider's error code, if it is a plain number or identifier (never free text)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str) and 0 < len(value) <= 64 and all(c.isalnum() or c in "-_." for c in value):
        return value
    return None
