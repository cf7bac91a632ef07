"""glibc malloc settings that keep a long-running server's resident memory down.

Elsewhere (musl, macOS) both functions do nothing.
"""

from __future__ import annotations

import ctypes


def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def limit_malloc_arenas(arenas: int = 2) -> None:
    """At most `arenas` malloc arenas, as MALLOC_ARENA_MAX=2 would.

    Every thread that allocates gets an arena of its own by default (up to 8 per core), and
    memory spread over many arenas is returned to the system late and badly. Two arenas
    measured ~10 MiB less resident memory under load, when each aiosqlite connection was a
    thread. SQLite now runs on the event loop (storage.inline_sqlite), so the threads left are
    asyncio's default executor (getaddrinfo, Maildir and SMS-file writes, multiprocess metrics
    rendering); the limit keeps each of them from growing an arena of its own, at no cost.
    """
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(-8, arenas)  # M_ARENA_MAX


def release_free_memory() -> None:
    """Give the pages malloc holds but no longer uses back to the system (malloc_trim).

    Start-up (loading the lookup index: batches of rows, read, keyed and dropped) leaves
    freed memory behind in malloc's heap; glibc keeps it resident unless asked.
    """
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)
