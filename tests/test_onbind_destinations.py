"""onbind callbacks are delivered per destination: one slow or failing homeserver cannot delay
another's invites.

The attack: callbacks aimed at a homeserver that accepts connections and never answers (a
tarpit). Delivered in batches that wait for the slowest, 100 of them delayed a legitimate
invite from 0.1 s to 29 s, growing with their number. Each destination now has a task of its
own, at most `invites.onbind_max_in_flight_per_destination` callbacks in flight, and a backoff
of its own after a failure.

Contract: docs/api-behaviour.md, "onbind callbacks". The backlogs are put straight into the
database (as many binds to the tarpit's users would have queued them); everything else goes
over real sockets to real server processes.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from support.clock import advance_until
from support.db import sql
from support.homeserver import ONBIND_PATH, HomeserverStandIn, TarpitHomeserver
from support.inprocess import InProcessServer
from support.server import EmailSession, IdentityApi, SydentServer, User, now_ms, unique_email, wait_until
from test_invites_onbind import invite_fields, store_invite

# The servers' federation.timeout_seconds here: each attempt on the tarpit gives up after it.
TIMEOUT = 3.0
PER_DESTINATION = 2


@pytest.fixture
def tarpit(homeserver: HomeserverStandIn, tmp_path: Path) -> Iterator[TarpitHomeserver]:
    pit = TarpitHomeserver(tmp_path / "tarpit", homeserver.ca).start()
    yield pit
    pit.stop()


def queue_callbacks_to(server: SydentServer, destination: str, count: int) -> None:
    """`count` due callbacks to `destination`, older than anything queued after (server stopped)."""
    now = now_ms()
    rows, args = [], []
    for i in range(count):
        body = {
            "medium": "email",
            "address": f"victim{i}@example.test",
            "mxid": f"@victim{i}:{destination}",
            "invites": [],
        }
        rows.append("(?, ?, 0, ?, 0, ?)")
        args += [destination, json.dumps(body), now - 60_000 + i, now]
    sql(
        server.database_url,
        "INSERT INTO onbind_callbacks (destination, body, attempts, next_attempt_ts,"
        " claimed_until, created_ts) VALUES " + ", ".join(rows),
        *args,
    )


def pending_bind(api: IdentityApi, homeserver: HomeserverStandIn) -> tuple[User, EmailSession, str]:
    """An invitation and its invitee with a validated session for the address, not bound yet:
    (invitee, session, invite token)."""
    address = unique_email("legit")
    token = store_invite(api, invite_fields(homeserver, address), v1=True)["token"]
    api.smtp.wait_for(address)  # the invite mail
    invitee = api.register()
    return invitee, api.validated_email_session(address, user=invitee), token


def test_a_tarpit_does_not_delay_another_homeservers_invites(
    make_server: Callable[..., SydentServer],
    api_for: Callable[[SydentServer], IdentityApi],
    homeserver: HomeserverStandIn,
    tarpit: TarpitHomeserver,
) -> None:
    server = make_server(
        extra_config={
            "federation": {"timeout_seconds": TIMEOUT},
            "invites": {"onbind_max_in_flight_per_destination": PER_DESTINATION},
        }
    )
    api = api_for(server)
    invitee, session, token = pending_bind(api, homeserver)
    server.stop()
    queue_callbacks_to(server, tarpit.server_name, 80)
    server.start()
    wait_until(lambda: bool(tarpit.requests_received()), what="the tarpit's first request")
    first = tarpit.requests_received()[0]

    resp = api.bind(session, invitee.user_id, user=invitee)
    assert resp.status_code == 200, resp.text
    req = homeserver.wait_for_onbind(invitee.user_id, timeout=20 * TIMEOUT)
    assert [inv["token"] for inv in req.json["invites"]] == [token]
    # It went out while the tarpit still held the request it had before the bind: nothing
    # waited for the tarpit (in batches, it came after at least one whole timeout).
    assert first.closed is None or first.closed > req.time, (first.opened, first.closed, req.time)
    # And the tarpit never held more than the cap of one destination.
    assert tarpit.max_open <= PER_DESTINATION, tarpit.max_open


def test_a_failing_destination_backs_off_before_any_of_its_callbacks_is_tried_again(
    make_inprocess_server: Callable[..., InProcessServer],
    homeserver: HomeserverStandIn,
    tmp_path: Path,
) -> None:
    # In this process, on a fake clock: the backoff (a minute) passes in the server's time.
    failing = HomeserverStandIn(tmp_path / "failing", ca=homeserver.ca).start()
    try:
        failing.set_handler("POST", ONBIND_PATH, lambda r: (503, {"errcode": "M_UNKNOWN", "error": "down"}))
        server = make_inprocess_server(
            extra_config={
                "invites": {
                    "onbind_retry_initial_seconds": 60,
                    "onbind_retry_max_seconds": 120,
                    "onbind_max_in_flight_per_destination": PER_DESTINATION,
                }
            }
        )
        clock = server.clock
        server.stop()
        queue_callbacks_to(server, failing.server_name, 8)
        server.start()

        def attempted() -> int:
            return len([r for r in failing.requests_to(ONBIND_PATH) if r.status is not None])

        def failures_recorded() -> bool:
            rows = sql(server.database_url, "SELECT count(*) AS n FROM onbind_callbacks WHERE attempts > 0")
            return bool(rows[0]["n"] == PER_DESTINATION)

        wait_until(failures_recorded, what="the first attempts (the cap) failed")
        assert attempted() == PER_DESTINATION
        failed_at = clock.time_ms()
        # The next callback, never tried before, still waits the destination's backoff instead of
        # going out with them.
        advance_until(clock, lambda: attempted() > PER_DESTINATION, step=5.0, what="the attempts after the backoff")
        assert clock.time_ms() - failed_at >= 60_000, (clock.time_ms() - failed_at, attempted())

        # The homeserver recovers: a success resets the backoff, and every callback goes out once.
        failing.set_handler("POST", ONBIND_PATH, None)
        advance_until(
            clock,
            lambda: sql(server.database_url, "SELECT count(*) AS n FROM onbind_callbacks")[0]["n"] == 0,
            step=10.0,
            timeout=30,
            what="every callback delivered",
        )
        delivered = [r.json["mxid"] for r in failing.requests_to(ONBIND_PATH) if r.status == 200]
        assert sorted(delivered) == sorted(f"@victim{i}:{failing.server_name}" for i in range(8))
        server.stop()  # first: its keep-alive connections would hold the stand-in's shutdown up (10 s)
    finally:
        failing.stop()


def test_destinations_served_at_once_are_capped_and_a_backing_off_one_frees_its_slot(
    make_server: Callable[..., SydentServer],
    api_for: Callable[[SydentServer], IdentityApi],
    homeserver: HomeserverStandIn,
    tarpit: TarpitHomeserver,
) -> None:
    server = make_server(
        extra_config={
            "federation": {"timeout_seconds": TIMEOUT},
            "invites": {"onbind_max_destinations": 1, "onbind_retry_initial_seconds": 60},
        }
    )
    api = api_for(server)
    invitee, session, token = pending_bind(api, homeserver)
    server.stop()
    queue_callbacks_to(server, tarpit.server_name, 10)
    server.start()
    wait_until(lambda: bool(tarpit.requests_received()), what="the tarpit's first request")
    first = tarpit.requests_received()[0]

    resp = api.bind(session, invitee.user_id, user=invitee)
    assert resp.status_code == 200, resp.text
    req = homeserver.wait_for_onbind(invitee.user_id, timeout=20 * TIMEOUT)
    assert [inv["token"] for inv in req.json["invites"]] == [token]
    # One destination at a time: the legitimate one waited for the tarpit's attempts to time out;
    # then the tarpit, backing off (60 s), gave its slot up rather than holding it.
    assert first.closed is not None and first.closed <= req.time, (first.opened, first.closed, req.time)
