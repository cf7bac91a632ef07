"""Twilio's REST API: the Messages resource.

POST {api_base_url}/2010-04-01/Accounts/{AccountSid}/Messages.json, HTTP basic auth with the
account SID and auth token, form-encoded To, From and Body. Success is 201 Created.
"""

from __future__ import annotations

import logging
import urllib.parse

import httpx

from sydent_lite.config import TwilioConfig
from sydent_lite.delivery.sms.base import (
    HttpSmsProvider,
    Originator,
    SmsSendError,
    json_or_none,
    masked,
    safe_code,
)

logger = logging.getLogger(__name__)


def twilio_from(originator: Originator) -> str:
    """Twilio's From: a long number in E.164 (with '+'), a short code or sender ID as given."""
    if originator.type == "long" and not originator.text.startswith("+"):
        return "+" + originator.text
    return originator.text


class TwilioSmsProvider(HttpSmsProvider):
    name = "twilio"

    def __init__(self, config: TwilioConfig, timeout_seconds: float, client: httpx.AsyncClient | None = None) -> None:
        super().__init__(timeout_seconds, client)
        self._auth = httpx.BasicAuth(config.account_sid, config.auth_token)
        sid = urllib.parse.quote(config.account_sid, safe="")
        self._url = f"{config.api_base_url.rstrip('/')}/2010-04-01/Accounts/{sid}/Messages.json"

    async def send(self, msisdn: str, text: str, originator: Originator | None) -> None:
        if originator is None:
            raise SmsSendError("twilio needs an originator (set sms.originators.default or one per country)")
        form = {"To": "+" + msisdn, "From": twilio_from(originator), "Body": text}
        response = await self._post(
            self._url, msisdn, data=form, auth=self._auth, headers={"Accept": "application/json"}
        )
        body = json_or_none(response)
        sid = safe_code(body.get("sid")) if isinstance(body, dict) else None
        logger.info("twilio accepted SMS for %s (message %s)", masked(msisdn), sid or "?")

    def _error_detail(self, response: httpx.Response) -> str:
        # Twilio answers {"code": 21211, "message": "...", "more_info": ...}; the message can
        # quote the number, the numeric code says as much.
        body = json_or_none(response)
        code = safe_code(body.get("code")) if isinstance(body, dict) else None
        return f" (Twilio error {code})" if code else ""
