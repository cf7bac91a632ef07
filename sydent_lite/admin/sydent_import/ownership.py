"""Files the import writes, owned by whoever owns the folder they go in.

An import run as root (sudo) would otherwise leave `signing.key` (mode 0600), the config it
wrote or the SQLite database owned by root, and the service user's server could not read
them. Run as root, we hand each new file to the owner of its folder (the data folder the
service user owns) when that is not root; otherwise we say how to fix it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)


def give_to_folder_owner(path: Path) -> None:
    """chown `path` to its folder's owner and group, if we are root and the folder is not root's."""
    if os.geteuid() != 0:
        return
    folder = path.resolve().parent.stat()
    if folder.st_uid == 0:
        logger.warning(
            "%s is owned by root, in a folder root owns: the server's user cannot read it unless you "
            "`chown <service user>: %s` (or run the import as the service user: sudo -u <service user> ...)",
            path,
            path,
        )
        return
    os.chown(path, folder.st_uid, folder.st_gid)


def give_database_to_folder_owner(url: str) -> None:
    """A SQLite database the import created (and its companions), as `give_to_folder_owner`."""
    from sydent_lite.storage.serving_lock import sqlite_lock_path

    lock = sqlite_lock_path(url)
    if lock is None or os.geteuid() != 0:
        return
    database = Path(str(lock)[: -len(".serving-lock")])
    for path in (database, *(Path(f"{database}{s}") for s in ("-wal", "-shm", ".serving-lock"))):
        if path.exists():
            give_to_folder_owner(path)
