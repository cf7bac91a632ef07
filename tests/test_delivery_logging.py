"""What the logs say about deliveries: onbind callbacks that keep failing are raised to WARNING
(with the destination and the count, never the invites' tokens), and each mail is logged as
what it is, an invite or a validation mail.

Contract: sydent_lite/services/onbind.py (WARN_AFTER_ATTEMPTS) and docs/deployment.md,
"Metrics and logs".
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest
from support.homeserver import ONBIND_PATH, HomeserverStandIn
from support.server import IdentityApi, SydentServer, unique_email, wait_until
from support.smtp import SmtpSink
from test_invites_onbind import invite_fields, store_invite

from sydent_lite.delivery.email import MaildirEmailSender, MailKind
from sydent_lite.services.onbind import WARN_AFTER_ATTEMPTS

FAILURE_LINE = re.compile(
    r" (?P<level>[A-Z]+) sydent_lite\.services\.onbind \[[^\]]*\] onbind callback \d+ to (?P<destination>\S+)"
    r" failed (?P<count>\d+) times? "
)


def test_failing_onbind_callbacks_are_warnings_once_they_keep_failing(
    make_server: Callable[..., SydentServer],
    api_for: Callable[[SydentServer], IdentityApi],
    homeserver: HomeserverStandIn,
    smtp: SmtpSink,
) -> None:
    server = make_server(
        extra_config={"invites": {"onbind_retry_initial_seconds": 0.2, "onbind_retry_max_seconds": 0.4}}
    )
    api = api_for(server)
    address = unique_email("invitee")
    invite_token = store_invite(api, invite_fields(homeserver, address), v1=True)["token"]
    smtp.wait_for(address)  # the invite mail
    invitee = api.register()
    session = api.validated_email_session(address, user=invitee)
    homeserver.set_onbind_status(invitee.user_id, 503)
    try:
        assert api.bind(session, invitee.user_id, user=invitee).status_code == 200
        wait_until(
            lambda: len(homeserver.onbind_requests(invitee.user_id)) > WARN_AFTER_ATTEMPTS,
            what=f"{WARN_AFTER_ATTEMPTS + 1} failed onbind attempts",
        )
        wait_until(
            lambda: len(FAILURE_LINE.findall(server.output())) > WARN_AFTER_ATTEMPTS,
            what="their log lines",
        )
    finally:
        homeserver.reset_onbind(invitee.user_id)
    homeserver.wait_for_onbind(invitee.user_id)

    failures = list(FAILURE_LINE.finditer(server.output()))
    counts = [int(m["count"]) for m in failures]
    assert counts[: WARN_AFTER_ATTEMPTS + 1] == list(range(1, WARN_AFTER_ATTEMPTS + 2)), counts
    assert {m["destination"] for m in failures} == {homeserver.server_name}
    levels = [m["level"] for m in failures]
    assert levels[: WARN_AFTER_ATTEMPTS - 1] == ["INFO"] * (WARN_AFTER_ATTEMPTS - 1), levels
    assert set(levels[WARN_AFTER_ATTEMPTS - 1 :]) == {"WARNING"}, levels
    assert "failed 1 time (HTTP 503)" in server.output()

    output = server.output()
    # The callback's body (signed invites with their tokens) never reaches the log.
    assert invite_token not in output
    # Each mail by its kind: the invite, then the invitee's validation mail.
    invite_line = output.index("sent invite mail to a recipient at example.test via SMTP")
    validation_line = output.index("sent validation mail to a recipient at example.test via SMTP")
    assert invite_line < validation_line
    assert len(homeserver.requests_to(ONBIND_PATH)) >= WARN_AFTER_ATTEMPTS + 2


@pytest.mark.parametrize("kind", ["invite", "validation"])
async def test_maildir_lines_name_the_kind_of_mail(
    kind: MailKind, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    sender = MaildirEmailSender(tmp_path / "outbox")
    with caplog.at_level("INFO", logger="sydent_lite.delivery.email"):
        await sender.send("alice@example.test", b"Subject: hi\r\n\r\nhello\r\n", kind=kind)
    assert [r.getMessage() for r in caplog.records] == [
        f"stored {kind} mail for a recipient at example.test in the maildir"
    ]
