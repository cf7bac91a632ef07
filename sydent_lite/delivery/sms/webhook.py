"""A generic JSON webhook: POST url {"to": msisdn, "text": ..., "originator": {...} | null}.

For gateways of one's own (or an adapter in front of another provider). The configured headers
(an Authorization, say) go with every request. Any 2xx is success.
"""

from __future__ import annotations

import logging

import httpx

from sydent_lite.config import WebhookConfig
from sydent_lite.delivery.sms.base import HttpSmsProvider, Originator, masked

logger = logging.getLogger(__name__)


class WebhookSmsProvider(HttpSmsProvider):
    name = "webhook"

    def __init__(self, config: WebhookConfig, timeout_seconds: float, client: httpx.AsyncClient | None = None) -> None:
        super().__init__(timeout_seconds, client)
        self._url = config.url
        # The body is JSON whatever the configured headers say.
        self._headers = {k: v for k, v in config.headers.items() if k.lower() != "content-type"}
        self._headers["Content-Type"] = "application/json"

    async def send(self, msisdn: str, text: str, originator: Originator | None) -> None:
        body = {
            "to": msisdn,
            "text": text,
            "originator": {"type": originator.type, "text": originator.text} if originator else None,
        }
        await self._post(self._url, msisdn, json=body, headers=self._headers)
        logger.info("webhook accepted SMS for %s", masked(msisdn))
