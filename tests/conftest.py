"""Fixtures for the end-to-end tests: mail sink, homeserver stand-in, databases, servers.

Every API test runs once per database backend (`backend`: sqlite, postgres). One identity
server per backend (`idserver`, with terms of service) is shared by the whole session; tests
keep out of each other's way by using unique email addresses, client secrets and users.
Tests that need a differently configured server use `make_server` (a subprocess) or, where no
real process is needed, `make_inprocess_server` (the app in this process, on a fake clock that
the test advances: support.inprocess).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
from support.db import DatabaseFactory, postgres_disabled
from support.homeserver import HomeserverStandIn
from support.inprocess import InProcessServer
from support.server import DEFAULT_TERMS, IdentityApi, SydentServer, User, write_terms
from support.smtp import SmtpSink


def _backend_params() -> list[Any]:
    pg_marks = [pytest.mark.postgres]
    if postgres_disabled():
        pg_marks.append(pytest.mark.skip(reason="PostgreSQL tests switched off (SYDENT_LITE_TEST_POSTGRES=off)"))
    return [pytest.param("sqlite", id="sqlite"), pytest.param("postgres", id="postgres", marks=pg_marks)]


@pytest.hookimpl(tryfirst=True)
def pytest_xdist_auto_num_workers(config: pytest.Config) -> int | None:
    """`-n auto` (pyproject's addopts): two workers a core. A test mostly waits (a server
    starting, a client waiting on one), so one worker a core left the cores idle about half
    the time. At most 8: each worker's servers hold PostgreSQL connections (the server's
    default max_connections is 100). PYTEST_XDIST_AUTO_NUM_WORKERS still overrides it."""
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return None
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return min(2 * cores, 8)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "postgres: runs against PostgreSQL")
    if not hasattr(config, "workerinput"):  # once, in the controller, before any worker starts
        _compile_the_package()


def _compile_the_package() -> None:
    """Byte-compile sydent_lite once: the tests start a few hundred server and CLI processes,
    and under PYTHONDONTWRITEBYTECODE (or in a fresh clone) each compiled every module from
    source again, a sixth of its start-up CPU. Only missing or stale files are written
    (__pycache__ is ignored by git)."""
    import compileall

    compileall.compile_dir(Path(__file__).resolve().parents[1] / "sydent_lite", quiet=2)


@pytest.fixture(autouse=True)
def _root_logging_put_back() -> Iterator[None]:
    """What a test does to the root logger (cli.main() run in this process installs our
    handler on the stderr pytest captures, and closes after the test) ends with the test: under
    xdist any module's tests can come next on the same worker."""
    from sydent_lite.observability import logs

    root = logging.getLogger()
    saved = root.handlers[:], root.level, logs._active_handler
    yield
    root.handlers[:], level, logs._active_handler = saved
    root.setLevel(level)


# --- shared infrastructure (session) ----------------------------------------------------------


@pytest.fixture(scope="session")
def smtp_sink() -> Iterator[SmtpSink]:
    sink = SmtpSink().start()
    yield sink
    sink.stop()


@pytest.fixture
def smtp(smtp_sink: SmtpSink) -> Iterator[SmtpSink]:
    """The mail sink, put back into normal (accepting) mode after the test."""
    smtp_sink.accept()
    yield smtp_sink
    smtp_sink.accept()


@pytest.fixture(scope="session")
def homeserver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HomeserverStandIn]:
    hs = HomeserverStandIn(tmp_path_factory.mktemp("homeserver")).start()
    yield hs
    hs.stop()


@pytest.fixture(scope="session")
def terms_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_terms(tmp_path_factory.mktemp("terms") / "terms.yaml", DEFAULT_TERMS)


@pytest.fixture(scope="session", params=_backend_params())
def backend(request: pytest.FixtureRequest) -> str:
    return cast("str", request.param)


@pytest.fixture(scope="session")
def db_factory(backend: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DatabaseFactory]:
    """Creates databases of the current backend; drops them at the end of the session."""
    factory = DatabaseFactory(backend, tmp_path_factory.mktemp(f"db-{backend}"))
    yield factory
    factory.cleanup()


# --- servers ------------------------------------------------------------------------------------


ServerFactory = Callable[..., SydentServer]


def _new_server(
    db_factory: DatabaseFactory,
    smtp_sink: SmtpSink,
    homeserver: HomeserverStandIn,
    workdir: Path,
    server_class: type[SydentServer] = SydentServer,
    migrated: bool = True,
    **kwargs: Any,
) -> SydentServer:
    # Migrated already (a copy of a template) unless `migrated=False`: the shared server, so
    # that a server migrating an empty database at its start is still what every session runs.
    db = db_factory.create(migrated=migrated)
    return server_class(
        workdir,
        database_url=db.url,
        smtp_port=smtp_sink.port,
        ca_file=homeserver.ca_path,
        **kwargs,
    )


@pytest.fixture(scope="session")
def idserver(
    db_factory: DatabaseFactory,
    smtp_sink: SmtpSink,
    homeserver: HomeserverStandIn,
    terms_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
    backend: str,
) -> Iterator[SydentServer]:
    """The shared identity server of this backend, with terms of service, default templates."""
    server = _new_server(
        db_factory,
        smtp_sink,
        homeserver,
        tmp_path_factory.mktemp(f"idserver-{backend}"),
        migrated=False,
        terms_path=terms_path,
        name=f"sydent_lite ({backend})",
    )
    server.start()
    yield server
    server.stop()


def _server_factory(
    server_class: type[SydentServer],
    db_factory: DatabaseFactory,
    smtp_sink: SmtpSink,
    homeserver: HomeserverStandIn,
    tmp_path: Path,
    backend: str,
    request: pytest.FixtureRequest,
) -> Iterator[Callable[..., Any]]:
    servers: list[SydentServer] = []
    request.node.extra_sydent_servers = servers  # for the failure report

    def make(start: bool = True, **kwargs: Any) -> SydentServer:
        kwargs.setdefault("name", f"sydent_lite #{len(servers) + 1} ({backend})")
        workdir = tmp_path / f"server{len(servers) + 1}"
        server = _new_server(db_factory, smtp_sink, homeserver, workdir, server_class, **kwargs)
        servers.append(server)
        if start:
            server.start()
        return server

    yield make
    for server in servers:
        server.stop()


@pytest.fixture
def make_server(
    db_factory: DatabaseFactory,
    smtp_sink: SmtpSink,
    homeserver: HomeserverStandIn,
    tmp_path: Path,
    backend: str,
    request: pytest.FixtureRequest,
) -> Iterator[ServerFactory]:
    """Start a dedicated server (fresh database of the current backend); stopped after the test.

    Keyword arguments go to `SydentServer` (terms_path, templates_dir, session_lifetime,
    extra_config, ...). The server is started unless `start=False`.
    """
    yield from _server_factory(SydentServer, db_factory, smtp_sink, homeserver, tmp_path, backend, request)


InProcessServerFactory = Callable[..., InProcessServer]


@pytest.fixture
def make_inprocess_server(
    db_factory: DatabaseFactory,
    smtp_sink: SmtpSink,
    homeserver: HomeserverStandIn,
    tmp_path: Path,
    backend: str,
    request: pytest.FixtureRequest,
) -> Iterator[InProcessServerFactory]:
    """As `make_server`, but the server runs in this process on a fake clock (`server.clock`,
    or `clock=` a FakeClock to share one): for contracts that need no process of their own."""
    yield from _server_factory(InProcessServer, db_factory, smtp_sink, homeserver, tmp_path, backend, request)


# --- clients ------------------------------------------------------------------------------------


@pytest.fixture
def client(idserver: SydentServer) -> Iterator[httpx.Client]:
    """A fresh httpx client for the shared server (base_url set, no redirects followed)."""
    with idserver.new_client() as c:
        yield c


@pytest.fixture
def api(idserver: SydentServer, smtp: SmtpSink, homeserver: HomeserverStandIn, client: httpx.Client) -> IdentityApi:
    return IdentityApi(idserver, smtp, homeserver, client)


@pytest.fixture
def api_for(smtp: SmtpSink, homeserver: HomeserverStandIn) -> Iterator[Callable[[SydentServer], IdentityApi]]:
    """`api_for(server)`: an IdentityApi for a server from `make_server`."""
    clients: list[httpx.Client] = []

    def make(server: SydentServer) -> IdentityApi:
        c = server.new_client()
        clients.append(c)
        return IdentityApi(server, smtp, homeserver, c)

    yield make
    for c in clients:
        c.close()


@pytest.fixture
def user(api: IdentityApi) -> User:
    """A user registered on the shared server who has accepted every policy."""
    return api.register()


@pytest.fixture
def register(api: IdentityApi) -> Callable[..., User]:
    """`register(localpart=None, accept_terms=True)` on the shared server."""
    return api.register


# --- reporting ----------------------------------------------------------------------------------


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    outcome = yield
    report = outcome.get_result()
    if report.failed and call.when in ("setup", "call"):
        funcargs = getattr(item, "funcargs", {})
        seen = set()
        for value in [*funcargs.values(), *getattr(item, "extra_sydent_servers", [])]:
            if isinstance(value, SydentServer) and id(value) not in seen:
                seen.add(id(value))
                report.sections.append((f"{value.name} output (last 60 lines)", value.output(60)))
        if os.environ.get("SYDENT_LITE_TEST_VERBOSE_LOGS") and "homeserver" in funcargs:
            hs = funcargs["homeserver"]
            report.sections.append(
                ("homeserver requests", "\n".join(f"{r.method} {r.path}" for r in hs.requests[-20:]))
            )
