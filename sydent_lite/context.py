"""Wiring: build every service from the config once, at start-up."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from sydent_lite.clock import SYSTEM_CLOCK, Clock
from sydent_lite.config import Config
from sydent_lite.delivery.email import EmailSender, make_email_sender
from sydent_lite.delivery.sms import make_sms_provider
from sydent_lite.federation.client import FederationClient
from sydent_lite.federation.xmatrix import ServerKeyStore
from sydent_lite.secrets_util import random_string
from sydent_lite.services.access import HomeserverAllowList
from sydent_lite.services.accounts import AccountService
from sydent_lite.services.associations import AssociationService
from sydent_lite.services.hashing import load_pepper
from sydent_lite.services.index_builder import ProcessBuilder
from sydent_lite.services.index_snapshot import IndexSnapshots
from sydent_lite.services.index_snapshot import default_directory as default_snapshot_directory
from sydent_lite.services.invites import (
    InviteService,
    check_subject_format,
    check_web_client_locations,
)
from sydent_lite.services.lookup_confirmers import (
    CandidateConfirmer,
    DatabaseConfirmer,
    MemoryConfirmer,
)
from sydent_lite.services.onbind import OnbindDelivery
from sydent_lite.services.onbind_queue import OnbindQueue
from sydent_lite.services.peppers import LookupPeppers, RotationSettings
from sydent_lite.services.ratelimit import RateLimiter
from sydent_lite.services.sessions import SessionService
from sydent_lite.services.terms import Terms, TermsService
from sydent_lite.signing import ServerSigner, load_or_create_signing_key
from sydent_lite.storage.accounts import AccountStore
from sydent_lite.storage.association_changes import AssociationChangeStore
from sydent_lite.storage.associations import AssociationStore
from sydent_lite.storage.database import (
    Database,
    analyze_if_never_analyzed,
    check_driver,
    migrate,
    open_database,
)
from sydent_lite.storage.invites import InviteStore
from sydent_lite.storage.people import PeopleStore
from sydent_lite.storage.peppers import PepperStore
from sydent_lite.storage.serving_lock import ServingLock, take_serving_lock
from sydent_lite.storage.sessions import SessionStore
from sydent_lite.storage.state import ServerStateStore
from sydent_lite.templating import TemplateStore


@dataclass
class AppContext:
    config: Config
    database: Database
    signer: ServerSigner
    templates: TemplateStore
    federation: FederationClient
    email: EmailSender  # shared by sessions and invites; holds open SMTP connections
    server_keys: ServerKeyStore
    accounts: AccountService
    terms: TermsService
    sessions: SessionService
    associations: AssociationService
    invites: InviteService
    onbind: OnbindDelivery
    onbind_queue: OnbindQueue
    rate_limiter: RateLimiter
    peppers: LookupPeppers
    access: HomeserverAllowList
    clock: Clock  # what every service above reads the time from
    serving_lock: ServingLock | None = None

    async def aclose(self) -> None:
        await self.peppers.aclose()
        if self.serving_lock is not None:
            await self.serving_lock.release()
        await self.sessions.aclose()
        await self.federation.aclose()
        await self.email.aclose()
        await self.rate_limiter.aclose()
        await self.database.dispose()


def load_signer(config: Config) -> ServerSigner:
    """Our signing key, as `server_name` (the key file is created if there is none)."""
    return ServerSigner(config.effective_server_name, load_or_create_signing_key(config.signing_key_path))


def load_static_parts(config: Config) -> tuple[ServerSigner, Terms, TemplateStore]:
    """Everything that can fail on a bad file (or an unsupported database driver), checked
    before the server binds its port."""
    check_driver(config.database.url)
    signer = load_signer(config)
    terms = Terms.load(config.terms_path)
    check_subject_format(config.email.invite_subject, "email.invite_subject")
    check_subject_format(config.email.invite_subject_space, "email.invite_subject_space")
    check_web_client_locations(config.email.allowed_web_client_locations, "email.allowed_web_client_locations")
    templates_dir = Path(config.email.templates_dir) if config.email.templates_dir else None
    templates = TemplateStore(templates_dir, config.email.default_brand)
    return signer, terms, templates


async def build_context(config: Config, clock: Clock = SYSTEM_CLOCK) -> AppContext:
    """Every service reads the time from `clock` (tests pass a fake one)."""
    signer, terms, templates = load_static_parts(config)
    database = open_database(config.database.url)
    await migrate(database)
    # Held while serving: an import-sydent refuses to run meanwhile (storage.serving_lock).
    serving_lock = await take_serving_lock(database, config.database.url, exclusive=False)
    await analyze_if_never_analyzed(database)
    association_store = AssociationStore(database)
    account_store = AccountStore(database)
    await load_pepper(ServerStateStore(database), association_store)

    # Which database the lookup index's snapshot files are of (services.index_snapshot).
    snapshot_database_id = ""
    if database.dialect == "postgresql":
        snapshot_database_id = await ServerStateStore(database).get_or_create(SNAPSHOT_DATABASE_ID, random_string(16))

    # Every mxid held in memory (the default): confirming a lookup's candidates in the database
    # cost PostgreSQL, which all workers share, more than the lookup cost a worker, and on
    # SQLite ~40% of the lookup (page reads of a table far larger than its cache). Shared
    # between the processes through snapshot files on PostgreSQL only: SQLite is for one
    # process, whose index builds in about a second at the sizes SQLite is for.
    def make_confirmer(pepper: str, slot: int) -> CandidateConfirmer:
        if config.lookup.mxids_in_memory:
            snapshots = snapshots_for(config, pepper, slot, snapshot_database_id) if snapshot_database_id else None
            return MemoryConfirmer(association_store, pepper, slot=slot, snapshots=snapshots)
        return DatabaseConfirmer(association_store, slot)

    peppers = LookupPeppers(
        PepperStore(database),
        association_store,
        AssociationChangeStore(database),
        make_confirmer,
        rotation_settings(config),
        clock,
    )
    await peppers.start()
    federation = FederationClient(config.federation)
    email_sender = make_email_sender(config.email, config.email_from, config.effective_server_name, clock)
    sms_provider = make_sms_provider(config.sms)
    invite_store = InviteStore(database)
    invites = InviteService(config, invite_store, association_store, signer, templates, email_sender, clock)
    onbind = OnbindDelivery(config.invites, invite_store, federation, config.federation.timeout_seconds, clock)
    onbind_queue = OnbindQueue(signer, config.invites, invite_store, on_queued=onbind.notify, clock=clock)
    rate_limiter = RateLimiter.from_config(config.rate_limits, database, clock)
    access = HomeserverAllowList(config.access)

    return AppContext(
        config=config,
        database=database,
        signer=signer,
        templates=templates,
        federation=federation,
        email=email_sender,
        server_keys=ServerKeyStore(federation, clock=clock.time_ms),
        accounts=AccountService(account_store, federation, rate_limiter, config.rate_limits, access, clock),
        terms=TermsService(terms, account_store),
        sessions=SessionService(
            config, SessionStore(database), templates, email_sender, sms_provider, rate_limiter, clock
        ),
        associations=AssociationService(
            association_store, signer, peppers, onbind_queue, config.lookup.max_addresses, clock
        ),
        invites=invites,
        onbind=onbind,
        onbind_queue=onbind_queue,
        rate_limiter=rate_limiter,
        peppers=peppers,
        access=access,
        serving_lock=serving_lock,
        clock=clock,
    )


SNAPSHOT_DATABASE_ID = "lookup_index_snapshot_database_id"  # server_state


def snapshots_for(config: Config, pepper: str, slot: int, database_id: str) -> IndexSnapshots | None:
    """Where the index of `pepper` is shared between processes (lookup.index_snapshot_dir)."""
    where = config.lookup.index_snapshot_dir
    if where == "":
        return None
    directory = Path(where) if where is not None else default_snapshot_directory()
    # Written by a child process (services.index_builder): the build's memory is never a worker's.
    builder = ProcessBuilder(config.model_dump_json(by_alias=True), pepper, slot, str(directory), database_id)
    return IndexSnapshots(directory, pepper, slot, database_id, builder)


def rotation_settings(config: Config) -> RotationSettings:
    lookup = config.lookup
    return RotationSettings(
        rotation_seconds=lookup.pepper_rotation_seconds,
        grace_seconds=lookup.previous_pepper_grace_seconds,
        activation_delay_seconds=lookup.pepper_activation_delay_seconds,
    )


@dataclass
class OperatorContext:
    """What the operator commands (`sydent-lite associations`, `bind`, `import-sydent`) work
    with, on the database the running server uses: no HTTP, no delivery, nothing held in
    memory. The running server sees their changes in the change log (its lookup index) and
    in the onbind queue (its delivery loop)."""

    config: Config
    database: Database
    people: PeopleStore

    async def associations(self) -> AssociationService:
        """The service /bind goes through (our signing key is created if there is none, as
        `serve` does): a bind queues the address's pending invites in its own transaction."""
        signer = load_signer(self.config)
        store = AssociationStore(self.database)
        await load_pepper(ServerStateStore(self.database), store)
        onbind_queue = OnbindQueue(signer, self.config.invites, InviteStore(self.database))
        # The schedule only, no index: a bind looks nothing up, but hashes for every live pepper.
        peppers = self.peppers()
        await peppers.refresh_schedule()
        return AssociationService(store, signer, peppers, onbind_queue, self.config.lookup.max_addresses)

    def peppers(self) -> LookupPeppers:
        store = AssociationStore(self.database)
        return LookupPeppers(
            PepperStore(self.database),
            store,
            AssociationChangeStore(self.database),
            lambda _pepper, slot: DatabaseConfirmer(store, slot),
            rotation_settings(self.config),
        )


@asynccontextmanager
async def operator_context(config: Config) -> AsyncIterator[OperatorContext]:
    """The operator commands' context, on the migrated database; closed on leaving."""
    database = open_database(config.database.url)
    try:
        await migrate(database)
        yield OperatorContext(config=config, database=database, people=PeopleStore(database))
    finally:
        await database.dispose()
