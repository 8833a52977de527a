"""Durable room snapshots in SQLite (WAL), with a schema version and migrations.

The store is synchronous; the room writer (roomwriter.py) calls it from one
worker thread so that writes stay off the event loop and in order, many rooms in
one transaction (``save_many``). A write is committed before the state it
records is broadcast, so whatever a client was told survives a kill:
WAL with ``synchronous=NORMAL`` is durable against a process crash (SIGKILL);
only a power loss can drop the last transactions.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DB_FILENAME = "rooms.sqlite3"
SCHEMA_VERSION = 1
BUSY_TIMEOUT_SECONDS = 1.0

# Each entry upgrades the schema from version N-1 to N.
MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: (
        """CREATE TABLE rooms (
            name TEXT PRIMARY KEY,
            version INTEGER NOT NULL,
            snapshot TEXT NOT NULL,
            updated_at REAL NOT NULL
        )""",
    ),
}


# One room to write: (name, version, snapshot).
SaveRow = tuple[str, int, dict[str, Any]]

UPSERT = """INSERT INTO rooms (name, version, snapshot, updated_at) VALUES (?, ?, ?, ?)
   ON CONFLICT(name) DO UPDATE SET
     version = excluded.version,
     snapshot = excluded.snapshot,
     updated_at = excluded.updated_at
   WHERE excluded.version >= rooms.version"""


def encode_snapshot(snapshot: dict[str, Any]) -> str:
    return json.dumps(snapshot, separators=(",", ":"))


class StoreError(Exception):
    """The database could not be opened or used."""


class RoomStore:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._db = self._open()
        self.closed = False

    @classmethod
    def open_or_reset(cls, data_dir: Path) -> RoomStore:
        """Open the store; a corrupt or unreadable file is moved aside, loudly."""
        data_dir.mkdir(parents=True, exist_ok=True)
        path = data_dir / DB_FILENAME
        try:
            return cls(path)
        except (sqlite3.DatabaseError, StoreError, ValueError) as exc:
            aside = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
            for suffix in ("", "-wal", "-shm"):
                part = Path(f"{path}{suffix}")
                if part.exists():
                    os.replace(part, Path(f"{aside}{suffix}"))
            log.error(
                "room database %s is unreadable (%s); moved it to %s and starting empty",
                path,
                exc,
                aside,
            )
            return cls(path)

    def _open(self) -> sqlite3.Connection:
        fresh = not self.path.exists()
        db = sqlite3.connect(
            self.path, timeout=BUSY_TIMEOUT_SECONDS, check_same_thread=False, isolation_level=None
        )
        if fresh:
            os.chmod(self.path, 0o600)  # holds resume tokens
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            check = db.execute("PRAGMA quick_check").fetchone()
            if check is None or check[0] != "ok":
                raise StoreError(f"integrity check failed: {check}")
            self._migrate(db)
            # Read every row once: a damaged page or bad JSON fails here, not later.
            for (snapshot,) in db.execute("SELECT snapshot FROM rooms"):
                json.loads(snapshot)
        except (sqlite3.DatabaseError, ValueError, StoreError):
            db.close()
            raise
        return db

    @staticmethod
    def _migrate(db: sqlite3.Connection) -> None:
        current = db.execute("PRAGMA user_version").fetchone()[0]
        if current > SCHEMA_VERSION:
            raise StoreError(f"schema version {current} is newer than this program's")
        for version in range(current + 1, SCHEMA_VERSION + 1):
            db.execute("BEGIN IMMEDIATE")
            try:
                for statement in MIGRATIONS[version]:
                    db.execute(statement)
                db.execute(f"PRAGMA user_version = {version}")
                db.execute("COMMIT")
            except sqlite3.DatabaseError:
                db.execute("ROLLBACK")
                raise
            log.info("room database migrated to schema version %d", version)

    def save(self, name: str, version: int, snapshot: dict[str, Any]) -> None:
        """Upsert a room; a snapshot older than the stored one is ignored."""
        self.save_many([(name, version, snapshot)])

    def save_many(self, rows: Sequence[SaveRow], deletes: Sequence[str] = ()) -> None:
        """Delete ``deletes``, then upsert ``rows``, in one transaction.

        The snapshots are encoded here (in the caller's worker thread). Each
        upsert ignores a snapshot older than the stored one.
        """
        if self.closed:
            raise StoreError("the room store is closed")
        now = time.time()
        encoded = [(name, version, encode_snapshot(snap), now) for name, version, snap in rows]
        if not encoded and not deletes:
            return
        self._db.execute("BEGIN IMMEDIATE")
        try:
            if deletes:
                self._db.executemany("DELETE FROM rooms WHERE name = ?", [(n,) for n in deletes])
            if encoded:
                self._db.executemany(UPSERT, encoded)
            self._db.execute("COMMIT")
        except sqlite3.Error:
            if self._db.in_transaction:  # some errors (SQLITE_FULL) roll back by themselves
                self._db.execute("ROLLBACK")
            raise

    def delete(self, name: str) -> None:
        if self.closed:
            raise StoreError("the room store is closed")
        self._db.execute("DELETE FROM rooms WHERE name = ?", (name,))

    def load_all(self) -> Iterator[tuple[str, dict[str, Any]]]:
        for name, snapshot in self._db.execute("SELECT name, snapshot FROM rooms ORDER BY name"):
            yield name, json.loads(snapshot)

    def close(self) -> None:
        """Only from the thread lane that runs the writes (see Hub.close_store)."""
        self.closed = True
        self._db.close()
