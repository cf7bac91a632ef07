"""The process's open-file limit, and how many connections fit under it.

Every connection is a file descriptor. The common default soft limit is 1,024 (systemd's,
unless the unit sets `LimitNOFILE`), and past it `accept()` fails with "Too many open files":
the server stops answering everyone. The soft limit may be raised up to the hard one without
privileges, so we do that at start, and keep the connection cap far enough below it that the
database, mail, federation and log files always find a descriptor.
"""

from __future__ import annotations

import logging
import resource

logger = logging.getLogger(__name__)

# Descriptors kept for everything that is not a client connection: the listening socket, the
# event loop's own, database and Redis connections, SMTP, outbound HTTPS, log files (64), and
# the refused connections still being answered (protocol.MAX_LINGERING_REFUSALS, 64).
RESERVED_FDS = 128
# uvicorn's listen backlog. The event loop accepts what is queued in one go (asyncio: up to
# the backlog per wake-up), and a connection it accepted is refused and closed two or three
# turns of the loop later: under a flood up to ACCEPT_BURSTS backlogs are open at once.
DEFAULT_BACKLOG = 2048
ACCEPT_BURSTS = 3


def raise_file_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = max(soft, 1 << 20) if soft != resource.RLIM_INFINITY else soft
    if soft != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
            soft = hard
        except (ValueError, OSError):  # e.g. a kernel nr_open below the hard limit: keep what we have
            logger.debug("could not raise the open-file limit to %d", hard, exc_info=True)
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def backlog_for(file_limit: int) -> int:
    """The listen backlog: uvicorn's 2,048, or a sixteenth of a small file limit (at least 16)."""
    return max(16, min(DEFAULT_BACKLOG, file_limit // 16))


def connections_that_fit(wanted: int, file_limit: int) -> int:
    """`wanted`, or fewer if that many connections, the accept bursts and RESERVED_FDS would
    not fit under `file_limit`."""
    room = file_limit - RESERVED_FDS - ACCEPT_BURSTS * backlog_for(file_limit)
    return max(1, min(wanted, room if room > 0 else file_limit // 4))
