"""Several server processes on one PostgreSQL database behave as one server.

Every test here starts two `sydent-lite serve` processes (A and B, each on its own port) on one
fresh PostgreSQL database, with the same signing key and server name, as an operator runs them
behind a load balancer; or one `serve --workers 2`. Nothing that matters may live in only one
process's memory: a session started on A is finished on B, concurrent binds of one address
across both leave one consistent association, each onbind callback is delivered once (also
when a worker that claimed it died), and `--workers N` serves.

PostgreSQL only (SQLite is for one process): these tests use `DatabaseFactory("postgres")`
directly, so they do not show up as skipped sqlite variants.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
import signedjson.key
import signedjson.sign
from support.clock import FakeClock, advance_until
from support.db import DatabaseFactory, ScratchDatabase, run_sql
from support.homeserver import HomeserverStandIn
from support.inprocess import InProcessServer
from support.server import (
    V2,
    IdentityApi,
    SydentServer,
    User,
    unique_email,
    wait_until,
)
from support.smtp import SmtpSink
from unpaddedbase64 import decode_base64

pytestmark = pytest.mark.postgres

FAST_RETRY = {"invites": {"onbind_retry_initial_seconds": 0.5, "onbind_retry_max_seconds": 1}}


# --- fixtures and helpers ---------------------------------------------------------------------------


@pytest.fixture
def pg(tmp_path: Path) -> Iterator[DatabaseFactory]:
    factory = DatabaseFactory("postgres", tmp_path / "pg")
    yield factory
    factory.cleanup()


class Cluster:
    """Two servers (A, B) on one database, one signing key, one server name."""

    def __init__(
        self,
        db: ScratchDatabase,
        a: SydentServer,
        b: SydentServer,
        smtp: SmtpSink,
        hs: HomeserverStandIn,
        clock: FakeClock | None = None,
    ) -> None:
        self.db = db
        self.clock = clock  # the one both run on, when they run in this process
        self.a = a
        self.b = b
        self.servers = [a, b]
        self.api_a = IdentityApi(a, smtp, hs, a.new_client())
        self.api_b = IdentityApi(b, smtp, hs, b.new_client())
        self.apis = [self.api_a, self.api_b]

    def close(self) -> None:
        for api in self.apis:
            api.client.close()
        for server in self.servers:
            server.stop()


def start_all(servers: list[SydentServer]) -> None:
    """Start the servers at the same time (they race for the migrations)."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(servers)) as pool:
        for future in [pool.submit(s.start) for s in servers]:
            future.result()


@pytest.fixture
def cluster_factory(
    pg: DatabaseFactory,
    smtp_sink: SmtpSink,
    homeserver: HomeserverStandIn,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> Iterator[Callable[..., Cluster]]:
    from sydent_lite.signing import load_or_create_signing_key

    clusters: list[Cluster] = []
    request.node.extra_sydent_servers = []  # shown when a test fails

    def make(extra_config: dict[str, Any] | None = None, in_process: bool = False) -> Cluster:
        """`in_process`: both servers in this process, on one FakeClock (each with its own app,
        connections and delivery loop: what workers share is the database)."""
        n = len(clusters) + 1
        clock = FakeClock() if in_process else None
        db = pg.create()
        key_path = tmp_path / f"cluster{n}" / "signing.key"
        key_path.parent.mkdir(parents=True, exist_ok=True)
        load_or_create_signing_key(str(key_path))  # one key for both, as the deployment guide says
        servers: list[SydentServer] = []
        for label in ("A", "B"):
            options: dict[str, Any] = {
                "database_url": db.url,
                "smtp_port": smtp_sink.port,
                "ca_file": homeserver.ca_path,
                "extra_config": extra_config,
                "name": f"sydent_lite {label} (cluster {n})",
            }
            workdir = tmp_path / f"cluster{n}" / label
            server = (
                InProcessServer(workdir, clock=clock, **options) if in_process else SydentServer(workdir, **options)
            )
            servers.append(server)
        shared = {"server_name": servers[0].server_name, "signing_key_path": str(key_path)}
        for server in servers:
            server.extra_config = {**server.extra_config, **shared}
        request.node.extra_sydent_servers.extend(servers)
        start_all(servers)
        cluster = Cluster(db, servers[0], servers[1], smtp_sink, homeserver, clock)
        clusters.append(cluster)
        return cluster

    yield make
    for cluster in clusters:
        cluster.close()


def verify_signed(obj: dict[str, Any], server: SydentServer, client: httpx.Client) -> None:
    """Check the server's signature on `obj` with the key it publishes."""
    key_id = next(iter(obj["signatures"][server.config()["server_name"]]))
    resp = client.get(f"{V2}/pubkey/{key_id}")
    assert resp.status_code == 200, resp.text
    verify_key = signedjson.key.decode_verify_key_bytes(key_id, decode_base64(resp.json()["public_key"]))
    signedjson.sign.verify_signed_json(obj, server.config()["server_name"], verify_key)


def invite_body(hs: HomeserverStandIn, address: str, sender: str) -> dict[str, Any]:
    return {
        "medium": "email",
        "address": address,
        "room_id": f"!room{uuid.uuid4().hex[:10]}:{hs.server_name}",
        "sender": sender,
    }


def store_invite(api: IdentityApi, user: User, address: str) -> dict[str, Any]:
    # v2: the sender is the token's user.
    resp = api.client.post(f"{V2}/store-invite", json=invite_body(api.hs, address, user.user_id), headers=user.headers)
    assert resp.status_code == 200, resp.text
    api.smtp.wait_for(address)  # the invitation mail
    return cast("dict[str, Any]", resp.json())


# --- state shared through the database -------------------------------------------------------------


def test_session_started_on_one_process_is_finished_on_the_other(cluster_factory: Callable[..., Cluster]) -> None:
    c = cluster_factory()
    user = c.api_a.register()  # registered on A: the token works on B
    assert c.api_b.hash_details(user) == c.api_a.hash_details(user)  # one pepper

    email = unique_email("xproc")
    session = c.api_a.start_email_session(email, user=user)  # requestToken on A
    resp = c.api_b.submit_token(session, user=user)  # submitToken on B
    assert resp.status_code == 200 and resp.json() == {"success": True}, resp.text
    validated = c.api_a.get_validated(session, user=user)
    assert validated.status_code == 200 and validated.json()["address"] == email, validated.text
    # A retry of requestToken on B is the same session (nothing new sent).
    again = c.api_b.request_email_token(email, session.client_secret, 1, user=user)
    assert again.status_code == 200 and again.json()["sid"] == session.sid, again.text
    c.api_b.smtp.assert_no_mail(email)

    bound = c.api_a.bind(session, user.user_id, user=user)  # bind on A
    assert bound.status_code == 200, bound.text
    assert c.api_b.lookup_email(user, email) == user.user_id  # looked up on B
    v1 = c.api_b.v1_lookup("email", email)
    assert v1.status_code == 200 and v1.json() == bound.json(), v1.text
    verify_signed(v1.json(), c.b, c.api_b.client)
    verify_signed(bound.json(), c.a, c.api_a.client)

    # Unbind on B (the v2 way: token, sid and secret); gone on A.
    resp = c.api_b.client.post(
        f"{V2}/3pid/unbind",
        headers=user.headers,
        json={
            "sid": session.sid,
            "client_secret": session.client_secret,
            "mxid": user.user_id,
            "threepid": {"medium": "email", "address": email},
        },
    )
    assert resp.status_code == 200, resp.text
    assert c.api_a.lookup_email(user, email) is None


def test_concurrent_binds_of_one_address_leave_one_association(
    cluster_factory: Callable[..., Cluster], homeserver: HomeserverStandIn
) -> None:
    c = cluster_factory()
    email = unique_email("contested")
    # A pending invitation: whichever bind comes first queues its onbind, the others find it taken.
    invite_token = store_invite(c.api_b, c.api_b.register(), email)["token"]
    contenders = []
    for i in range(6):
        api = c.apis[i % 2]
        user = api.register()
        session = api.validated_email_session(email, user=user)
        contenders.append((api, user, session))

    barrier = threading.Barrier(len(contenders))
    results: dict[str, httpx.Response] = {}

    def bind(api: IdentityApi, user: User, session: Any) -> None:
        with api.server.new_client() as client:  # a connection per thread
            barrier.wait()
            results[user.user_id] = client.post(
                f"{V2}/3pid/bind",
                headers=user.headers,
                json={"sid": session.sid, "client_secret": session.client_secret, "mxid": user.user_id},
            )

    threads = [threading.Thread(target=bind, args=c_) for c_ in contenders]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(results) == len(contenders)
    assert all(r.status_code == 200 for r in results.values()), {u: r.text for u, r in results.items()}

    rows = run_sql(c.db, "SELECT mxid, signed_json FROM associations WHERE medium = 'email' AND address = $1", email)
    assert len(rows) == 1, rows
    winner = rows[0]["mxid"]
    assert winner in results
    # One consistent answer everywhere: the stored signed object is the winner's own bind answer.
    stored = json.loads(rows[0]["signed_json"])
    assert stored["mxid"] == winner and stored == results[winner].json()
    v1_a, v1_b = c.api_a.v1_lookup("email", email), c.api_b.v1_lookup("email", email)
    assert v1_a.status_code == v1_b.status_code == 200
    assert v1_a.json() == v1_b.json() == stored
    verify_signed(v1_a.json(), c.a, c.api_a.client)
    asker = contenders[0][1]
    assert c.api_a.lookup_email(asker, email) == c.api_b.lookup_email(asker, email) == winner

    # The invitation went out once, in one callback, to one of the contenders.
    wait_until(
        lambda: any(r.status is not None for r in homeserver.onbind_requests(address=email)), what="the onbind callback"
    )
    time.sleep(2.0)  # a second callback would be on its way by now
    calls = homeserver.onbind_requests(address=email)
    assert len(calls) == 1, [(r.json["mxid"], r.status) for r in calls]
    assert calls[0].json["mxid"] in results
    assert [inv["token"] for inv in calls[0].json["invites"]] == [invite_token]


async def test_concurrent_migrations_take_turns(pg: DatabaseFactory) -> None:
    """Processes starting together on a fresh database all migrate it (advisory lock), none fails."""
    from sydent_lite.storage.database import migrate, open_database

    db = pg.create()
    databases = [open_database(db.url) for _ in range(4)]
    try:
        await asyncio.gather(*(migrate(e) for e in databases))
        await migrate(databases[0])  # and again: nothing to do
    finally:
        for e in databases:
            await e.dispose()
    rows = run_sql(db, "SELECT version_num FROM alembic_version")
    assert len(rows) == 1, rows


# --- background work: onbind callbacks --------------------------------------------------------------


def test_each_onbind_callback_is_delivered_once(
    cluster_factory: Callable[..., Cluster], homeserver: HomeserverStandIn
) -> None:
    c = cluster_factory(FAST_RETRY)
    inviter = c.api_a.register()
    invitees = []
    for i in range(4):
        address = unique_email(f"onbind{i}")
        token = store_invite(c.apis[i % 2], inviter, address)["token"]
        user = c.apis[(i + 1) % 2].register()
        # The first attempt fails: the retry is up for grabs by either process.
        homeserver.fail_onbind(user.user_id, times=1, status=503)
        invitees.append((address, token, user))
    try:
        for i, (address, _, user) in enumerate(invitees):
            c.apis[i % 2].bind_email(address, user)
        for _, _, user in invitees:
            homeserver.wait_for_onbind(user.user_id, timeout=20.0)
        time.sleep(3.0)  # well past the retry delays: any duplicate would have arrived
        for address, token, user in invitees:
            calls = homeserver.onbind_requests(user.user_id)
            assert [r.status for r in calls] == [503, 200], [(r.status, r.time) for r in calls]
            body = calls[1].json
            assert body["address"] == address and body["mxid"] == user.user_id
            assert [inv["token"] for inv in body["invites"]] == [token]
        rows = run_sql(c.db, "SELECT count(*) AS n FROM onbind_callbacks")
        assert rows[0]["n"] == 0
    finally:
        for _, _, user in invitees:
            homeserver.reset_onbind(user.user_id)


def test_a_dead_workers_claim_is_taken_over(
    cluster_factory: Callable[..., Cluster], homeserver: HomeserverStandIn
) -> None:
    # Retries far apart: only the lapsed claim can bring the callback back. In this process, on
    # one fake clock: the lease and the servers' idle polls (30 s) pass in their time, not ours.
    c = cluster_factory(
        {"invites": {"onbind_retry_initial_seconds": 3600, "onbind_retry_max_seconds": 3600}}, in_process=True
    )
    clock = c.clock
    assert clock is not None
    inviter = c.api_a.register()
    address = unique_email("orphan")
    token = store_invite(c.api_a, inviter, address)["token"]
    invitee = c.api_b.register()
    homeserver.set_onbind_status(invitee.user_id, 503)

    def statuses() -> list[int | None]:
        return [r.status for r in homeserver.onbind_requests(invitee.user_id)]

    try:
        c.api_b.bind_email(address, invitee)
        homeserver.wait_for_onbind(invitee.user_id, successful=False)
        wait_until(
            lambda: run_sql(c.db, "SELECT attempts FROM onbind_callbacks")[0]["attempts"] == 1,
            what="first attempt recorded",
        )
        homeserver.set_onbind_status(invitee.user_id, None)
        # As if a worker had claimed the callback (due now) and died: its lease runs 5 minutes more.
        now = clock.time_ms()
        lease_until = now + 300_000
        run_sql(c.db, "UPDATE onbind_callbacks SET next_attempt_ts = $1, claimed_until = $2", now, lease_until)
        # Both servers look at the queue several times meanwhile (every 30 s): a live claim is left alone.
        advance_until(clock, lambda: len(statuses()) > 1 or clock.time_ms() >= lease_until - 10_000, step=5.0)
        assert statuses() == [503], "a live claim was ignored"
        advance_until(clock, lambda: 200 in statuses(), step=5.0, what="the lapsed claim taken over")
        assert clock.time_ms() >= lease_until, "taken before the lease lapsed"
        success = homeserver.wait_for_onbind(invitee.user_id)
        assert [inv["token"] for inv in success.json["invites"]] == [token]
        wait_until(lambda: run_sql(c.db, "SELECT count(*) AS n FROM onbind_callbacks")[0]["n"] == 0, what="done")
        for _ in range(10):  # well past any retry or poll: delivered once
            clock.advance(60)
            time.sleep(0.02)
        assert statuses() == [503, 200]
    finally:
        homeserver.reset_onbind(invitee.user_id)


def test_servers_starting_together_repair_a_crashed_bind_once(
    cluster_factory: Callable[..., Cluster], homeserver: HomeserverStandIn
) -> None:
    """Binds an older version left without their callback (a crash between its two transactions)
    are queued at start-up; two servers starting at once queue each one once."""
    c = cluster_factory(FAST_RETRY)
    inviter = c.api_a.register()
    crashed = []
    for i in range(4):
        address = unique_email(f"crashed{i}")
        token = store_invite(c.apis[i % 2], inviter, address)["token"]
        invitee = c.apis[(i + 1) % 2].register()
        homeserver.set_onbind_status(invitee.user_id, 503)  # the bind's own callback is not delivered
        crashed.append((address, token, invitee))
    try:
        for i, (address, _, invitee) in enumerate(crashed):
            c.apis[i % 2].bind_email(address, invitee)
            homeserver.wait_for_onbind(invitee.user_id, successful=False)
        for server in c.servers:
            server.stop()
        # What the crash left: the associations, their invites unqueued, no callbacks.
        run_sql(c.db, "DELETE FROM onbind_callbacks")
        run_sql(c.db, "UPDATE invites SET callback_id = NULL")
        for _, _, invitee in crashed:
            homeserver.set_onbind_status(invitee.user_id, None)
        restarted = time.time()
        start_all(c.servers)
        for _, _, invitee in crashed:
            homeserver.wait_for_onbind(invitee.user_id)
        time.sleep(2.0)  # a second callback would be on its way by now
        for address, token, invitee in crashed:
            calls = homeserver.onbind_requests(invitee.user_id, since=restarted)
            assert [r.status for r in calls] == [200], [(r.status, r.time) for r in calls]
            assert calls[0].json["address"] == address
            assert [inv["token"] for inv in calls[0].json["invites"]] == [token]
        assert run_sql(c.db, "SELECT count(*) AS n FROM onbind_callbacks")[0]["n"] == 0
    finally:
        for _, _, invitee in crashed:
            homeserver.reset_onbind(invitee.user_id)


# --- serve --workers N --------------------------------------------------------------------------------


class WorkersServer(SydentServer):
    """`sydent-lite serve --workers N` as a subprocess (the harness runs plain `serve`)."""

    workers = 2

    def serve_args(self) -> list[str]:
        return ["--workers", str(self.workers)]

    def start(self, timeout: float = 60.0) -> WorkersServer:
        super().start(timeout)  # N workers take longer to start than one
        return self


def child_pids(pid: int) -> list[int]:
    children: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        children.extend(int(x) for x in text)
    return children


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs /proc to count worker processes")
def test_serve_with_two_workers(
    pg: DatabaseFactory,
    smtp_sink: SmtpSink,
    homeserver: HomeserverStandIn,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    db = pg.create()
    server = WorkersServer(
        tmp_path / "workers",
        database_url=db.url,
        smtp_port=smtp_sink.port,
        ca_file=homeserver.ca_path,
        name="sydent_lite --workers 2",
        extra_config={
            "rate_limits": {"enabled": True, "lookup_per_token_burst": 3, "lookup_per_token_per_minute": 1.0}
        },
    )
    request.node.extra_sydent_servers = [server]
    server.start()
    try:
        assert server.proc is not None
        assert server.output().count("listening on") == 1, server.output()
        workers = child_pids(server.proc.pid)
        python_workers = [
            p for p in workers if "python" in Path(f"/proc/{p}/cmdline").read_bytes().decode(errors="replace")
        ]
        assert len(python_workers) >= 2, (workers, server.output())

        def fresh() -> IdentityApi:  # a new connection each time: requests spread over the workers
            return IdentityApi(server, smtp_sink, homeserver, server.new_client())

        user = fresh().register()
        email = unique_email("workers")
        session = fresh().start_email_session(email, user=user)
        assert fresh().submit_token(session, user=user).json() == {"success": True}
        assert fresh().bind(session, user.user_id, user=user).status_code == 200
        assert fresh().lookup_email(user, email) == user.user_id
        # The lookup limit (burst 3) is one budget for the token across both workers:
        # lookup_email above spent one; two more pass, then 429.
        pepper = fresh().hash_details(user)["lookup_pepper"]
        codes = []
        for _ in range(3):
            with server.new_client() as c:
                codes.append(
                    c.post(
                        f"{V2}/lookup",
                        headers=user.headers,
                        json={"algorithm": "none", "pepper": pepper, "addresses": [f"{email} email"]},
                    ).status_code
                )
        assert codes == [200, 200, 429], codes
    finally:
        pid = server.proc.pid if server.proc else None
        kids = child_pids(pid) if pid else []
        server.stop()
    # SIGTERM to the parent stops the workers too.
    for kid in kids:
        wait_until(functools.partial(_gone, kid), timeout=15, what=f"worker {kid} gone")


def _gone(pid: int) -> bool:
    return not Path(f"/proc/{pid}").exists() or _is_zombie(pid)


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True


def test_workers_refuse_a_database_they_cannot_reach(
    smtp_sink: SmtpSink, homeserver: HomeserverStandIn, tmp_path: Path
) -> None:
    server = WorkersServer(
        tmp_path / "nodb",
        database_url="postgresql://postgres@127.0.0.1:1/none",
        smtp_port=smtp_sink.port,
        ca_file=homeserver.ca_path,
        name="sydent_lite --workers 2 (no db)",
    )
    with pytest.raises(Exception, match="exited with status 1"):
        server.start(timeout=60)
    assert "cannot prepare the database" in server.output()
