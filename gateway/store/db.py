"""Opening the SQLite database and bringing its schema up to date.

WAL mode lets the operator CLI read while the gateway writes. Migrations are the numbered
`migrations/NNNN_name.sql` files, applied in order, each in its own transaction, with
`PRAGMA user_version` recording the last one applied. Numbers may have gaps (parts of the
gateway reserve theirs); every migration numbered above `user_version` is applied.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import aiosqlite
import structlog

from gateway.errors import StoreError

log = structlog.get_logger(__name__)

BUSY_TIMEOUT_MS = 5_000


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str


class WriteLock:
    """Turns at writing for the writers of several worker processes sharing a database.

    SQLite's own busy handler polls: a writer that finds the database locked sleeps 1, 2,
    5, 10 ms and more before it tries again, so with two busy writers each waits whole
    milliseconds after the other has finished. An exclusive `flock` on a file beside the
    database is handed to the next writer the moment the last one lets go. Taken (blocking)
    on the writer's database thread before BEGIN IMMEDIATE, let go after COMMIT.
    """

    def __init__(self, db_path: str | Path) -> None:
        self.path = Path(f"{db_path}-writers.lock")
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)

    def acquire(self) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_EX)

    def release(self) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        os.close(self._fd)


def migrations() -> list[Migration]:
    found = []
    for entry in resources.files("gateway.store.migrations").iterdir():
        if not entry.name.endswith(".sql"):
            continue
        number, _, rest = entry.name.partition("_")
        found.append(Migration(int(number), rest.removesuffix(".sql"), entry.read_text()))
    found.sort(key=lambda migration: migration.version)
    versions = [migration.version for migration in found]
    if versions != list(range(1, len(found) + 1)):
        raise StoreError(f"migrations must be numbered 1..n without gaps, found {versions}")
    return found


async def open_database(
    path: str | Path,
    *,
    synchronous: str = "full",
    readonly: bool = False,
    wal_autocheckpoint: int | None = None,
) -> aiosqlite.Connection:
    """A connection in autocommit mode (transactions are explicit), WAL, foreign keys on;
    a writable one keeps its temporary data (statement journals) in memory, and checkpoints
    after `wal_autocheckpoint` WAL pages (None: SQLite's default, 1,000)."""
    try:
        if readonly:
            if not Path(path).exists():
                raise StoreError(f"database not found: {path} (has the gateway run yet?)")
            conn = await aiosqlite.connect(
                f"file:{Path(path).absolute()}?mode=ro", uri=True, isolation_level=None
            )
        else:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            conn = await aiosqlite.connect(str(path), isolation_level=None)
        await conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        await conn.execute("PRAGMA foreign_keys = ON")
        if not readonly:
            await conn.execute("PRAGMA journal_mode = WAL")
            await conn.execute(f"PRAGMA synchronous = {synchronous.upper()}")
            # With foreign keys checked, every multi-row write keeps a statement journal,
            # to undo just that statement on a violation. In SQLite's default temp store
            # (files) that cost about 6 us more per stored reading than in memory, even
            # though it never reached the disk; a writer's statements are small (retention
            # deletes in chunks), so memory it is. Not durability: that is the WAL's.
            await conn.execute("PRAGMA temp_store = MEMORY")
            if wal_autocheckpoint is not None:
                await conn.execute(f"PRAGMA wal_autocheckpoint = {int(wal_autocheckpoint)}")
    except sqlite3.Error as exc:
        raise StoreError(f"cannot open database {path}: {exc}") from exc
    return conn


async def schema_version(conn: aiosqlite.Connection) -> int:
    async with conn.execute("PRAGMA user_version") as cursor:
        row = await cursor.fetchone()
    return int(row[0]) if row else 0


async def migrate(conn: aiosqlite.Connection) -> int:
    """Apply every migration newer than the database; returns the resulting version."""
    current = await schema_version(conn)
    known = migrations()
    latest = known[-1].version if known else 0
    if current > latest:
        raise StoreError(f"database schema version {current} is newer than this gateway ({latest})")
    for migration in (m for m in known if m.version > current):
        try:
            await conn.execute("BEGIN IMMEDIATE")
            for statement in _statements(migration.sql):
                await conn.execute(statement)
            await conn.execute(f"PRAGMA user_version = {migration.version}")
            await conn.execute("COMMIT")
        except sqlite3.Error as exc:
            await conn.execute("ROLLBACK")
            raise StoreError(
                f"migration {migration.version} ({migration.name}) failed: {exc}"
            ) from exc
        log.info("store.migrated", version=migration.version, migration=migration.name)
    return latest


def _statements(script: str) -> list[str]:
    """Split a migration into statements (sqlite3.complete_statement knows about triggers)."""
    statements: list[str] = []
    pending = ""
    for line in script.splitlines(keepends=True):
        if not pending and line.strip().startswith("--"):
            continue
        pending += line
        if sqlite3.complete_statement(pending):
            statements.append(pending.strip())
            pending = ""
    if pending.strip():
        statements.append(pending.strip())
    return statements
