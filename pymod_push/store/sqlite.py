"""SQLite: the database file, private to its owner, in WAL mode, migrated."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Sequence

from pymod_push.store.checkpoints import Checkpointer

# The database holds secrets (pubsub secrets, Web Push auth secrets, Tigase AES keys): its
# files are its owner's alone. SQLite creates the -wal and -shm files with the database
# file's mode.
PRIVATE_MODE = 0o600


def _make_private(path: str) -> None:
    """The SQLite database at path created readable and writable by its owner only, if it
    is new; its files' modes narrowed to that if an earlier version left them wider."""
    os.close(os.open(path, os.O_RDWR | os.O_CREAT, PRIVATE_MODE))
    for name in (path, f"{path}-wal", f"{path}-shm"):
        try:
            if os.stat(name).st_mode & 0o077:
                os.chmod(name, PRIVATE_MODE)
        except FileNotFoundError:
            pass


def connect(path: str, migrations: Sequence[str], background_checkpoints: bool
            ) -> tuple[sqlite3.Connection, Checkpointer | None]:
    """The database at path (private, WAL, migrated); with background_checkpoints, SQLite's
    WAL checkpoints run in a thread of their own (checkpoints.py) rather than in the
    commits, for the process that serves."""
    if path not in ("", ":memory:"):
        _make_private(path)
    db = sqlite3.connect(path, isolation_level="DEFERRED", check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute("PRAGMA busy_timeout=5000")
    (version,) = db.execute("PRAGMA user_version").fetchone()
    for number, script in enumerate(migrations[version:], start=version + 1):
        with db:
            db.executescript(f"BEGIN; {script}; PRAGMA user_version={number}; COMMIT;")
    if background_checkpoints and path not in ("", ":memory:"):
        db.execute("PRAGMA wal_autocheckpoint=0")
        return db, Checkpointer(path)
    return db, None
