"""Retention: prune readings by age and by row count, in small transactions.

A reading that a relay sink has still to read (after its cursor), that waits in the relay's
outbox, or that lies in its dead letters, is kept whatever its age: pruning must never turn
an acknowledged reading into a lost one.

Deletes go through the store writer in chunks so a large prune never holds the write lock
long enough to delay acknowledgements to devices.
"""

from __future__ import annotations

from dataclasses import dataclass

import aiosqlite

from gateway.store.writer import StoreWriter

CHUNK = 2_000

UNDELIVERED_EXCLUDED = (
    # not yet passed by every sink's cursor (no cursor: no sink to wait for)
    "readings.id <= (SELECT coalesce(min(reading_id), 9223372036854775807) FROM relay_cursors)"
    " AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.kind = 'reading' AND o.ref_id = readings.id)"
    " AND NOT EXISTS"
    " (SELECT 1 FROM dead_letters d WHERE d.kind = 'reading' AND d.ref_id = readings.id)"
)


@dataclass(frozen=True, slots=True)
class RetentionPolicy:
    max_age_seconds: float = 0
    max_rows: int = 0

    @property
    def enabled(self) -> bool:
        return self.max_age_seconds > 0 or self.max_rows > 0


async def prune(writer: StoreWriter, policy: RetentionPolicy, *, now: float) -> int:
    """Delete readings the policy no longer keeps; returns how many were deleted."""
    deleted = 0
    if policy.max_age_seconds > 0:
        cutoff = now - policy.max_age_seconds
        while True:

            async def by_age(conn: aiosqlite.Connection) -> int:
                cursor = await conn.execute(
                    "DELETE FROM readings WHERE id IN (SELECT id FROM readings"
                    f" WHERE received_at < ? AND {UNDELIVERED_EXCLUDED} ORDER BY id LIMIT ?)",
                    (cutoff, CHUNK),
                )
                return cursor.rowcount

            count = await writer.transaction(by_age)
            deleted += count
            if count < CHUNK:
                break
    if policy.max_rows > 0:
        while True:

            async def by_count(conn: aiosqlite.Connection) -> int:
                # Everything below the id of the max_rows-th newest row goes.
                cursor = await conn.execute(
                    "DELETE FROM readings WHERE id IN (SELECT id FROM readings WHERE id <"
                    " (SELECT id FROM readings ORDER BY id DESC LIMIT 1 OFFSET ?)"
                    f" AND {UNDELIVERED_EXCLUDED} ORDER BY id LIMIT ?)",
                    (policy.max_rows - 1, CHUNK),
                )
                return cursor.rowcount

            count = await writer.transaction(by_count)
            deleted += count
            if count < CHUNK:
                break
    return deleted
