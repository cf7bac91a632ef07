"""A lookup index snapshot written by a process of its own, not by a worker.

Writing a snapshot (services.index_snapshot) means building the whole index from the table:
at 10,000,000 associations ~1 GB of filters and mxid table held until the file is written.
A worker that did it held that beside the snapshot it answers from (whose pages its lookups
keep touching, ~0.9 GB at that size): ~2 GB at the build's peak in one worker, where every
other worker stays under 1 GiB. So the worker holding the writer's lock starts this module
as a child process, which builds and writes the file and exits; the worker waits (lookups go
on), then maps the file as the others do. The host holds the build's memory only while it
runs, once, whichever worker asked.

The child is paced as the build in the worker would have been (services.pacing: the same
share and deadline, pausing between batches of the table). If the child fails (it logs why
on the shared output) the worker builds and writes in process, as before.

The child's stdin is its line to the worker: the job first, one line of JSON (it holds the
config, with the database password, and the pepper: never on the command line), then
"hurry" when the worker's pace is hurried (lookups now wait for the index). A signal would
kill a child that had not yet set its handler. End of file means the worker is gone: the
child stops (its lock died with the worker; another writes the snapshot).
`python -m sydent_lite.services.index_builder`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sydent_lite.clock import SYSTEM_CLOCK
from sydent_lite.services.pacing import Pace

if TYPE_CHECKING:
    from sydent_lite.config import Config

logger = logging.getLogger(__name__)

MODULE = "sydent_lite.services.index_builder"
# How often the waiting worker looks whether its pace was hurried.
HURRY_CHECK_SECONDS = 0.5


@dataclass
class ProcessBuilder:
    """Writes the snapshot of one pepper's index (`pepper`, hash slot `slot`) in a child process
    that opens the database of `config_json` itself."""

    config_json: str  # Config.model_dump_json(by_alias=True)
    pepper: str
    slot: int
    directory: str
    database_id: str

    async def run(self, pace: Pace | None) -> bool:
        """Build and write a snapshot in a child process; True once it has. `pace`: how the
        child shares the machine (None: flat out)."""
        job: dict[str, Any] = {
            "config": self.config_json,
            "pepper": self.pepper,
            "slot": self.slot,
            "directory": self.directory,
            "database_id": self.database_id,
            "share": pace.share if pace is not None else None,
            "deadline_in": pace.seconds_to_deadline() if pace is not None else None,
        }
        try:
            proc = await asyncio.create_subprocess_exec(sys.executable, "-m", MODULE, stdin=asyncio.subprocess.PIPE)
        except OSError as e:
            logger.warning("lookup index: cannot start the snapshot builder (%s); building here", e)
            return False
        try:
            assert proc.stdin is not None
            proc.stdin.write(json.dumps(job).encode() + b"\n")
            await proc.stdin.drain()
            hurried = False
            while True:
                try:
                    code = await asyncio.wait_for(proc.wait(), HURRY_CHECK_SECONDS)
                    break
                except TimeoutError:
                    if pace is not None and pace.share >= 1 and not hurried:
                        proc.stdin.write(b"hurry\n")
                        with contextlib.suppress(ConnectionError):  # it has just finished
                            await proc.stdin.drain()
                        hurried = True
            proc.stdin.close()
        except BaseException:  # cancelled (the worker stopping), a pipe broken: no orphan left
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            with contextlib.suppress(Exception):
                await asyncio.shield(proc.wait())
            raise
        if code != 0:
            logger.warning("lookup index: the snapshot builder (pid %d) failed (%d); building here", proc.pid, code)
            return False
        logger.info("lookup index: the builder process (pid %d) wrote the snapshot", proc.pid)
        return True


async def _build(job: dict[str, Any], config: Config, pending: bytes) -> bool:
    from pathlib import Path

    from sydent_lite.services.index_snapshot import IndexSnapshots
    from sydent_lite.services.lookup_confirmers import MemoryConfirmer
    from sydent_lite.services.lookup_index import LookupIndex
    from sydent_lite.storage.association_changes import AssociationChangeStore
    from sydent_lite.storage.associations import AssociationStore
    from sydent_lite.storage.database import open_database

    database = open_database(config.database.url)
    try:
        store = AssociationStore(database)
        snapshots = IndexSnapshots(Path(job["directory"]), job["pepper"], job["slot"], job["database_id"])
        confirmer = MemoryConfirmer(store, job["pepper"], slot=job["slot"], snapshots=snapshots)
        index = LookupIndex(AssociationChangeStore(database), store, confirmer)
        pace = None
        if job["share"] is not None:
            deadline = None if job["deadline_in"] is None else SYSTEM_CLOCK.monotonic() + job["deadline_in"]
            pace = Pace(SYSTEM_CLOCK, job["share"], deadline)
        build = asyncio.ensure_future(index.write_snapshot(pace))
        loop = asyncio.get_running_loop()
        threading.Thread(target=_follow_the_worker, args=(loop, pace, build, pending), daemon=True).start()
        return await build
    finally:
        await database.dispose()


def _follow_the_worker(
    loop: asyncio.AbstractEventLoop, pace: Pace | None, build: asyncio.Future[bool], pending: bytes
) -> None:
    """The rest of stdin, in a daemon thread, unbuffered (a read blocked in sys.stdin's buffer
    would hold its lock at the exit): "hurry" lines, then end of file (the worker gone: stop)."""
    while True:
        if b"hurry" in pending and pace is not None:
            loop.call_soon_threadsafe(pace.hurry)
            pending = b""
        chunk = os.read(0, 4096)
        if not chunk:
            break
        pending = pending[-8:] + chunk
    loop.call_soon_threadsafe(_worker_gone, build)


def _read_job() -> tuple[dict[str, Any], bytes]:
    """The first line of stdin, as JSON, and whatever came after it."""
    data = b""
    while b"\n" not in data:
        chunk = os.read(0, 65536)
        if not chunk:
            break
        data += chunk
    line, _, rest = data.partition(b"\n")
    return json.loads(line), rest


def _worker_gone(build: asyncio.Future[bool]) -> None:
    if not build.done():
        logger.warning("lookup index snapshot builder: its worker is gone; stopping")
        build.cancel()


def main() -> int:
    from sydent_lite.config import config_from_dict
    from sydent_lite.observability.logs import setup_from_config

    job, pending = _read_job()
    config = config_from_dict(json.loads(job["config"]))
    setup_from_config(config)  # the same log format and destination as the workers'
    try:
        return 0 if asyncio.run(_build(job, config, pending)) else 1
    except asyncio.CancelledError:
        return 1
    except Exception:
        logger.exception("lookup index snapshot builder failed")
        return 1


if __name__ == "__main__":
    sys.exit(main())
