"""Snapshot files of a lookup index: written once, mapped read-only by every worker.

Without them each worker process built and held its own copy of the lookup index (its slot
filters and, on PostgreSQL, the mxid table: ~150 bytes an association, 1.5 GB per worker at
10,000,000) and rebuilt it from the table at every start (~2 minutes at 10,000,000). A
snapshot is that index as flat buffers in one file: one process writes it (whoever holds the
directory's lock for that pepper), every worker maps it with mmap, read-only, and the kernel
keeps one copy of its pages in the page cache for all of them. What changed since the
snapshot's change-log id each worker holds itself, small (services.lookup_index).

A file is a cache, never trusted: it is used only if its header names this format, this
pepper (a SHA-256 fingerprint of pepper and hash slot: a snapshot of another database or of
another pepper does not match), a change-log id the log can still be replayed from, a size
that adds up, and a CRC-32 of its body that matches; anything else is deleted and rebuilt
from the database. The directory is private (0700, ours) and the files 0600: they hold every
lookup hash with its Matrix ID.

Layout (little-endian): the header (`_HEADER`), then the sections in `SECTIONS` order, each
padded to 8 bytes: the two slot filters, then the mxid table's keys, mxids, ends, ids, slots
(services.mxid_table) and its few odd entries as JSON, then the secret the hash filter is
keyed with (services.filter_keys: every process probing the filter keys as its writer did;
the file is private anyway).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import logging
import mmap
import os
import re
import struct
import tempfile
import zlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from sydent_lite.services.filter_keys import SECRET_SIZE
from sydent_lite.services.pacing import Pace

logger = logging.getLogger(__name__)

MAGIC = b"SLLIDX\0\0"
# 2: the flags word (which filters pack a bit a slot; services.lookup_index.SlotFilter); 3: a
# packed filter's bit is the key's top three bits (2 never left a development branch); 4: the
# hash filter's key secret (services.filter_keys), slots in keys' top bits, bits in their low.
VERSION = 4
SECTIONS = ("hash_filter", "threepid_filter", "keys", "mxids", "ends", "ids", "slots", "odd", "hash_key")
# magic, version, slot, fingerprint, last_id, written_ms, live, hash_count, threepid_count,
# the sections' lengths, the body's CRC-32, flags.
_HEADER = struct.Struct("<8sII32sQQQQQ" + "Q" * len(SECTIONS) + "II")
_HASH_FILTER_PACKED, _THREEPID_FILTER_PACKED = 1, 2
_NAME = re.compile(r"^index-([0-9a-f]{16})-([0-9]{20})\.snap$")
_CHUNK = 4 << 20
# Files of another fingerprint (a retired pepper; another database) are deleted by a writer
# once they are this old: nobody maps those.
FOREIGN_KEEP_SECONDS = 2 * 86_400


class SnapshotBuilder(Protocol):
    async def run(self, pace: Pace | None) -> bool:
        """Write a new snapshot (the caller holds the lock); True once one is written."""


def fingerprint(pepper: str, slot: int, database_id: str) -> bytes:
    """What a snapshot is of: a pepper's hashes (slot `slot`) in one database (`database_id`: a
    random value the database keeps; two databases imported from one Sydent share a pepper)."""
    parts = [b"sydent-lite lookup index snapshot", pepper.encode(), str(slot).encode(), database_id.encode()]
    return hashlib.sha256(b"\0".join(parts)).digest()


def _pad(n: int) -> int:
    return -n % 8


@dataclass
class Snapshot:
    """A mapped, verified snapshot: its header's figures and a read-only view of each section."""

    path: Path
    last_id: int
    written_ms: int
    live: int
    hash_count: int
    threepid_count: int
    hash_filter_packed: bool
    threepid_filter_packed: bool
    sections: dict[str, memoryview]


@dataclass
class SnapshotContents:
    """What a writer puts in a snapshot (buffers of an index no one changes meanwhile)."""

    last_id: int
    written_ms: int
    live: int
    hash_count: int
    threepid_count: int
    hash_filter_packed: bool
    threepid_filter_packed: bool
    sections: Sequence[Any]  # bytes-likes, in SECTIONS order


def default_directory() -> Path:
    """Where snapshots live when the config does not say: the temporary directory (writable on
    a read-only install; emptied at boot, which only costs one rebuild)."""
    return Path(tempfile.gettempdir()) / f"sydent-lite-{os.getuid()}" / "lookup-index"


class IndexSnapshots:
    """The snapshot files of one pepper's index in one directory."""

    def __init__(
        self, directory: Path, pepper: str, slot: int, database_id: str = "", builder: SnapshotBuilder | None = None
    ) -> None:
        """`builder`: writes a snapshot in another process (services.index_builder; None: the
        process that holds the lock builds and writes it itself)."""
        self.directory = directory
        self.slot = slot
        self.builder = builder
        self._fingerprint = fingerprint(pepper, slot, database_id)
        self._prefix = self._fingerprint[:8].hex()

    # --- reading --------------------------------------------------------------------------------

    def newest_id(self) -> int:
        """The change-log id of the newest file of ours (unverified; -1: none). One listing."""
        return max((last_id for last_id, _ in self._files()), default=-1)

    def _files(self) -> list[tuple[int, Path]]:
        try:
            names = os.listdir(self.directory)
        except OSError:
            return []
        found = []
        for name in names:
            m = _NAME.match(name)
            if m and m.group(1) == self._prefix:
                found.append((int(m.group(2)), self.directory / name))
        return sorted(found, reverse=True)

    async def newest(self, oldest_usable: int, newest_possible: int) -> Snapshot | None:
        """The newest valid snapshot whose change-log id is in [oldest_usable, newest_possible]
        (the log can be replayed from it, and it is not from a future this database never had).
        Invalid files are deleted on the way."""
        for last_id, path in self._files():
            if last_id > newest_possible:
                logger.warning("lookup index snapshot %s is ahead of the change log (another database?): deleted", path)
                _unlink(path)
                continue
            if last_id < oldest_usable:
                return None  # this and every older one: the log no longer reaches back to them
            snapshot = await asyncio.to_thread(self._open, path)
            if snapshot is not None and snapshot.last_id == last_id:
                return snapshot
            if snapshot is not None:
                _rejected(path, "named for another change-log id")
            _unlink(path)
        return None

    def _open(self, path: Path) -> Snapshot | None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            size = os.fstat(fd).st_size
            head = os.pread(fd, _HEADER.size, 0)
            if len(head) != _HEADER.size:
                return _rejected(path, "truncated header")
            magic, version, slot, fp, last_id, written_ms, live, hash_count, threepid_count, *rest = _HEADER.unpack(
                head
            )
            lengths, (crc, flags) = rest[: len(SECTIONS)], rest[len(SECTIONS) :]
            if magic != MAGIC or version != VERSION:
                return _rejected(path, "not a snapshot of this format")
            if fp != self._fingerprint or slot != self.slot:
                return _rejected(path, "of another pepper")
            if _HEADER.size + sum(n + _pad(n) for n in lengths) != size:
                return _rejected(path, "truncated or overlong")
            # The CRC is read with pread, not through the mapping: the pages land in the page
            # cache (shared) without counting in this process's RSS until a lookup touches them.
            body_crc, offset = 0, _HEADER.size
            while offset < size:
                chunk = os.pread(fd, min(_CHUNK, size - offset), offset)
                if not chunk:
                    return _rejected(path, "truncated")
                body_crc = zlib.crc32(chunk, body_crc)
                offset += len(chunk)
            if body_crc != crc:
                return _rejected(path, "checksum mismatch")
            mapped = mmap.mmap(fd, size, access=mmap.ACCESS_READ)
        except (OSError, ValueError, struct.error) as e:
            return _rejected(path, str(e))
        finally:
            os.close(fd)  # the mapping keeps the file
        view = memoryview(mapped)
        sections, offset = {}, _HEADER.size
        try:
            for name, n in zip(SECTIONS, lengths, strict=True):
                part = view[offset : offset + n]
                sections[name] = part.cast("I") if name in ("ends", "ids", "slots") else part
                offset += n + _pad(n)
        except TypeError:  # an array's length not a multiple of 4
            return _rejected(path, "sections of impossible sizes")
        snapshot = Snapshot(
            path,
            last_id,
            written_ms,
            live,
            hash_count,
            threepid_count,
            bool(flags & _HASH_FILTER_PACKED),
            bool(flags & _THREEPID_FILTER_PACKED),
            sections,
        )
        if not _shaped_right(snapshot):
            return _rejected(path, "sections of impossible sizes")
        return snapshot

    # --- writing --------------------------------------------------------------------------------

    def prepare_directory(self) -> bool:
        """Create the directory (0700) if need be; False (logged) if it is not usable: not ours,
        open to others, or not writable."""
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            st = os.stat(self.directory)
        except OSError as e:
            logger.warning("lookup index snapshots off: cannot create %s (%s)", self.directory, e)
            return False
        if st.st_uid != os.getuid() or st.st_mode & 0o077:
            logger.warning(
                "lookup index snapshots off: %s must be owned by this user and closed to others (chmod 700)",
                self.directory,
            )
            return False
        if not os.access(self.directory, os.W_OK | os.X_OK):
            logger.warning("lookup index snapshots off: %s is not writable", self.directory)
            return False
        return True

    @contextlib.asynccontextmanager
    async def lock(self, *, wait: bool) -> AsyncIterator[bool]:
        """The writer's lock for this pepper (an fcntl lock: released if the process dies).
        Yields whether it is held (`wait=False`: False at once if another process has it;
        False too if the lock file cannot be made)."""
        try:
            fd = os.open(self.directory / f"{self._prefix}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            logger.warning("lookup index snapshots: cannot open the lock in %s (%s)", self.directory, e)
            yield False
            return
        try:
            if wait:
                await asyncio.to_thread(fcntl.flock, fd, fcntl.LOCK_EX)
                held = True
            else:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    held = True
                except BlockingIOError:
                    held = False
            yield held
        finally:
            os.close(fd)  # releases the lock

    def write(self, contents: SnapshotContents) -> Path:
        """Write `contents` as a new file (beside, then renamed into place: a reader never sees
        half of one) and delete the older ones. Blocking: run it in a thread."""
        final = self.directory / f"index-{self._prefix}-{contents.last_id:020d}.snap"
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".writing-", suffix=".snap")
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(bytes(_HEADER.size))
                crc = 0
                lengths = []
                for section in contents.sections:
                    data = memoryview(section).cast("B")
                    out.write(data)
                    crc = zlib.crc32(data, crc)
                    padding = bytes(_pad(len(data)))
                    out.write(padding)
                    crc = zlib.crc32(padding, crc)
                    lengths.append(len(data))
                out.seek(0)
                out.write(
                    _HEADER.pack(
                        MAGIC,
                        VERSION,
                        self.slot,
                        self._fingerprint,
                        contents.last_id,
                        contents.written_ms,
                        contents.live,
                        contents.hash_count,
                        contents.threepid_count,
                        *lengths,
                        crc,
                        _HASH_FILTER_PACKED * contents.hash_filter_packed
                        | _THREEPID_FILTER_PACKED * contents.threepid_filter_packed,
                    )
                )
            os.replace(tmp, final)
        except BaseException:
            _unlink(Path(tmp))
            raise
        self._delete_older(final, contents.written_ms)
        return final

    def _delete_older(self, kept: Path, now_ms: int) -> None:
        for _, path in self._files():
            if path != kept:
                _unlink(path)  # a worker that maps it keeps its pages until it lets go
        with contextlib.suppress(OSError):
            for name in os.listdir(self.directory):
                path = self.directory / name
                m = _NAME.match(name)
                foreign = m is not None and m.group(1) != self._prefix
                lock = name.endswith(".lock") and name != f"{self._prefix}.lock"
                stray = name.startswith(".writing-") or lock
                if (foreign or stray) and now_ms / 1000 - path.stat().st_mtime > FOREIGN_KEEP_SECONDS:
                    _unlink(path)


def odd_section(odd: dict[str, tuple[str, int]]) -> bytes:
    return json.dumps(odd, separators=(",", ":")).encode()


def read_odd(section: memoryview) -> dict[str, tuple[str, int]]:
    raw = json.loads(bytes(section)) if len(section) else {}
    return {k: (v[0], v[1]) for k, v in raw.items()}


def _shaped_right(s: Snapshot) -> bool:
    """Sizes a writer of this format can have written (the CRC said the bytes are as written)."""
    sec = s.sections
    rows = len(sec["ends"])

    def power_of_two(n: int) -> bool:
        return n > 0 and n & (n - 1) == 0

    return (
        power_of_two(len(sec["hash_filter"]))
        and power_of_two(len(sec["threepid_filter"]))
        and power_of_two(len(sec["slots"]))
        and len(sec["ids"]) == rows
        and len(sec["keys"]) == 43 * rows
        and (rows == 0 or sec["ends"][rows - 1] == len(sec["mxids"]))
        and len(sec["hash_key"]) == SECRET_SIZE
    )


def _rejected(path: Path, why: str) -> Snapshot | None:
    """None, logged: the file is not used."""
    logger.warning("lookup index snapshot %s rejected (%s): it is rebuilt from the database", path, why)
    return None


def _unlink(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()
