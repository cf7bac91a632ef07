"""The file "provider": every SMS becomes a JSON file in a folder (embedded defaults, testing)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
import uuid
from pathlib import Path
from typing import Any

from sydent_lite.delivery.sms.base import Originator, SmsProvider, SmsSendError, masked

logger = logging.getLogger(__name__)


class FileSmsProvider(SmsProvider):
    """Writes {"to", "text", "originator"} per SMS into `outbox_dir`; names sort by time."""

    name = "file"

    def __init__(self, outbox_dir: str | Path) -> None:
        self._dir = Path(outbox_dir)

    def _write(self, record: dict[str, Any]) -> Path:
        self._dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        # Nanosecond timestamp (fixed width, so lexical order is time order), then a random
        # part so two messages of the same instant never collide.
        stem = f"{time.time_ns():020d}-{uuid.uuid4().hex[:12]}"
        final = self._dir / f"{stem}.json"
        tmp = self._dir / f".{stem}.tmp"
        data = json.dumps(record, ensure_ascii=False, indent=2).encode("utf-8") + b"\n"
        # Written under a hidden name, then renamed: a reader never sees half a file.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return final

    async def send(self, msisdn: str, text: str, originator: Originator | None) -> None:
        record = {
            "to": msisdn,
            "text": text,
            "originator": {"type": originator.type, "text": originator.text} if originator else None,
        }
        try:
            path = await asyncio.to_thread(self._write, record)
        except OSError as e:
            raise SmsSendError(f"file: cannot write to SMS outbox {self._dir}: {e.strerror}") from None
        logger.info("stored SMS for %s as %s", masked(msisdn), path.name)
