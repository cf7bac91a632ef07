"""OpenMarket's SMS API (v4), exactly as Sydent's sydent/sms/openmarket.py uses it.

POST {api_base_url}/sms/v4/mt with basic auth and a JSON mobileTerminate message; the source
(originator) goes with a type-of-number (TON). The docs promise 202 Accepted; as Sydent, any
2xx is taken as success. The X-Request-Id answer header is logged for support requests.
"""

from __future__ import annotations

import base64
import logging
from typing import Any

import httpx

from sydent_lite.config import OpenMarketConfig
from sydent_lite.delivery.sms.base import (
    HttpSmsProvider,
    Originator,
    json_or_none,
    masked,
    safe_code,
)

logger = logging.getLogger(__name__)

# Type of number, by originator type (Sydent's TONS).
TONS = {"long": 1, "short": 3, "alpha": 5}


def _request_id(response: httpx.Response) -> str | None:
    return safe_code(response.headers.get("X-Request-Id"))


class OpenMarketSmsProvider(HttpSmsProvider):
    name = "openmarket"

    def __init__(
        self, config: OpenMarketConfig, timeout_seconds: float, client: httpx.AsyncClient | None = None
    ) -> None:
        super().__init__(timeout_seconds, client)
        self._url = f"{config.api_base_url.rstrip('/')}/sms/v4/mt"
        creds = base64.b64encode(f"{config.username}:{config.password}".encode()).decode("ascii")
        self._authorization = "Basic " + creds

    async def send(self, msisdn: str, text: str, originator: Originator | None) -> None:
        body: dict[str, Any] = {
            "mobileTerminate": {
                "message": {"content": text, "type": "text"},
                "destination": {"address": msisdn},
            }
        }
        if originator is not None:
            body["mobileTerminate"]["source"] = {"ton": TONS[originator.type], "address": originator.text}
        headers = {"Authorization": self._authorization, "Content-Type": "application/json"}
        response = await self._post(self._url, msisdn, json=body, headers=headers)
        ttl = response.headers.get("ttl")
        logger.info(
            "openmarket accepted SMS for %s (ttl: %s, request ID: %s)",
            masked(msisdn),
            safe_code(ttl) or "?",
            _request_id(response) or "?",
        )

    def _error_detail(self, response: httpx.Response) -> str:
        # OpenMarket answers {"error": {"code": 1234, "description": "..."}}; keep the code.
        parts = []
        body = json_or_none(response)
        error = body.get("error") if isinstance(body, dict) else None
        code = safe_code(error.get("code")) if isinstance(error, dict) else None
        if code:
            parts.append(f"OpenMarket error {code}")
        request_id = _request_id(response)
        if request_id:
            parts.append(f"request ID {request_id}")
        return f" ({', '.join(parts)})" if parts else ""
