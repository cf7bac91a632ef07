"""Delivering validation SMS: one module per provider behind one base class (as Sygnal does).

- `file`: writes each SMS as a JSON file into a folder (embedded defaults, trying things out);
- `twilio`: Twilio's REST API (Messages resource);
- `openmarket`: OpenMarket's SMS API v4, as Sydent uses it;
- `webhook`: a JSON POST to a URL of one's own.

`make_sms_provider(config.sms)` picks one; `originator_for(config.sms, calling_code, msisdn)` the sender.
A provider failure is an `SmsSendError`, whose message is safe to log (no code, no secret, no
full number); the caller answers 400 M_SEND_ERROR.
"""

from __future__ import annotations

from typing import assert_never

from sydent_lite.config import SmsConfig
from sydent_lite.delivery.sms.base import (
    HttpSmsProvider,
    Originator,
    SmsProvider,
    SmsSendError,
    originator_for,
)
from sydent_lite.delivery.sms.file import FileSmsProvider
from sydent_lite.delivery.sms.openmarket import OpenMarketSmsProvider
from sydent_lite.delivery.sms.twilio import TwilioSmsProvider
from sydent_lite.delivery.sms.webhook import WebhookSmsProvider

__all__ = [
    "FileSmsProvider",
    "HttpSmsProvider",
    "OpenMarketSmsProvider",
    "Originator",
    "SmsProvider",
    "SmsSendError",
    "TwilioSmsProvider",
    "WebhookSmsProvider",
    "make_sms_provider",
    "originator_for",
]


def make_sms_provider(config: SmsConfig) -> SmsProvider:
    # The config admits only these names (sms.provider); mypy checks that each has its class.
    match config.provider:
        case "file":
            return FileSmsProvider(config.outbox)
        case "twilio":
            return TwilioSmsProvider(config.twilio, config.timeout_seconds)
        case "openmarket":
            return OpenMarketSmsProvider(config.openmarket, config.timeout_seconds)
        case "webhook":
            return WebhookSmsProvider(config.webhook, config.timeout_seconds)
        case _:
            assert_never(config.provider)
