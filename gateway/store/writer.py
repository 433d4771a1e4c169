"""The single writer: every change to the database goes through here, in group commits.

Concurrent requests are gathered into one transaction, so durability costs one fsync per
batch rather than per request; each request's future is resolved only after COMMIT returns,
which is what lets the CoAP layer answer 2.04 for a reading that is on disk. Listeners are
told of the committed readings after the commit, never before.

The queue is bounded: when `max_pending` requests wait, `submit` refuses with
`OverloadedError` (5.03 with Max-Age) instead of growing without limit.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import sqlite3
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import aiosqlite
import structlog

from gateway.core.model import Device, StoredReading, value_from_row, value_kind
from gateway.core.readings import Measurement
from gateway.errors import OverloadedError, StoreError
from gateway.store.db import WriteLock

log = structlog.get_logger(__name__)

T = TypeVar("T")
TransactionOp = Callable[[aiosqlite.Connection], Awaitable[Any]]
#: Blocking sqlite3 code run on the database thread (see `StoreWriter.run_in_transaction`).
ThreadOp = Callable[[sqlite3.Connection], Any]
CommitListener = Callable[[Sequence[StoredReading]], None]
CommitHook = Callable[[], None]

#: Seconds a refused device is told to wait before retrying (Max-Age of the 5.03).
OVERLOAD_RETRY_AFTER = 5

INSERT_READINGS = (
    "INSERT OR IGNORE INTO readings"
    " (device_id, measurement, value, kind, unit, device_time, received_at, seq, dedup_key)"
    " VALUES "
)
READING_PLACEHOLDERS = "(?, ?, ?, ?, ?, ?, ?, ?, ?)"
VALUES_PER_ROW = READING_PLACEHOLDERS.count("?")
#: Rows per INSERT statement. One statement with many rows costs SQLite and the sqlite3
#: module about half as much per row as `executemany`, which steps, resets and rebinds its
#: statement (and lets go of the GIL) once per row. A batch is cut into chunks of these sizes,
#: largest first, so that only these few statements exist: each is prepared once and then
#: found in the connection's statement cache (preparing one costs more than inserting 50 rows).
#: 64 rows are 576 parameters, within the 999 that SQLite before 3.32 allows; larger chunks
#: were no faster.
INSERT_CHUNKS = (64, 32, 16, 8, 4, 2, 1)
UPDATE_LAST_SEEN = "UPDATE devices SET last_seen = ?, address = coalesce(?, address) WHERE id = ?"
# Taken inside the write transaction, so rows another process committed before are not
# mistaken for this batch's (several gateway processes may share one database). The relay's
# cursors come with it: see `_insert_and_collect`.
SELECT_LAST_READING_ID = (
    "SELECT coalesce(max(id), 0), (SELECT coalesce(max(reading_id), 0) FROM relay_cursors)"
    " FROM readings"
)
#: A row that makes SQLite number the next reading after `?` (see `_insert_and_collect`).
INSERT_ID_FLOOR = (
    "INSERT INTO readings (id, device_id, measurement, value, kind, received_at)"
    " VALUES (?, ?, '', 0, 'n', 0)"
)
READING_COLUMNS = "id, device_id, measurement, value, kind, unit, device_time, received_at, seq"
SELECT_NEW_READINGS = f"SELECT {READING_COLUMNS} FROM readings WHERE id > ? ORDER BY id"


@dataclass(frozen=True, slots=True)
class ReadingBatch:
    """Measurements of one request from one device."""

    device: Device
    measurements: Sequence[Measurement]
    received_at: float
    address: str | None


@dataclass(slots=True)
class _Job:
    future: asyncio.Future[Any]
    readings: ReadingBatch | None = None
    op: TransactionOp | None = None
    thread_op: ThreadOp | None = None


@dataclass(slots=True)
class WriterStats:
    batches: int = 0
    jobs: int = 0
    readings: int = 0
    duplicates: int = 0
    refused: int = 0
    largest_batch: int = 0
    pending: int = field(default=0)


class StoreWriter:
    def __init__(
        self,
        conn: aiosqlite.Connection,
        *,
        max_batch: int = 512,
        max_pending: int = 10_000,
    ) -> None:
        if max_batch < 1 or max_pending < 1:
            raise ValueError("max_batch and max_pending must be positive")
        self._conn = conn
        self._max_batch = max_batch
        self._queue: asyncio.Queue[_Job] = asyncio.Queue(maxsize=max_pending)
        self._listeners: list[CommitListener] = []
        self._hooks: list[CommitHook] = []
        self._closing = False
        #: Id ranges of the readings this writer inserted, recorded before their COMMIT so
        #: that a reader who sees the rows can tell them from other processes' (`StoreFeed`).
        self.own_reading_ids: collections.deque[tuple[int, int]] | None = None
        #: Shared with the other worker processes' writers (see `WriteLock`).
        self.write_lock: WriteLock | None = None
        self.stats = WriterStats()

    def add_commit_listener(self, listener: CommitListener) -> None:
        self._listeners.append(listener)

    def add_commit_hook(self, hook: CommitHook) -> None:
        """`hook()` runs after every commit, whatever it wrote (triggers write too)."""
        self._hooks.append(hook)

    @property
    def pending(self) -> int:
        return self._queue.qsize()

    async def insert_readings(self, batch: ReadingBatch) -> None:
        """Store the measurements; returns once they are committed (duplicates are no-ops)."""
        await self._submit(_Job(asyncio.get_running_loop().create_future(), readings=batch))

    async def transaction(self, op: Callable[[aiosqlite.Connection], Awaitable[T]]) -> T:
        """Run `op` inside a write transaction shared with other requests; its result."""
        result: T = await self._submit(_Job(asyncio.get_running_loop().create_future(), op=op))
        return result

    async def run_in_transaction(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run `fn(conn)` on the database thread inside a shared write transaction.

        `fn` is blocking sqlite3 code: all its statements cost one trip to the database
        thread, where `transaction` costs one per statement (each trip is a thread hand-off
        and a wake-up of the event loop). It must not commit or roll back; raising rolls
        back the shared transaction, and the writer then retries the other requests alone.
        """
        job = _Job(asyncio.get_running_loop().create_future(), thread_op=fn)
        result: T = await self._submit(job)
        return result

    async def _submit(self, job: _Job) -> Any:
        if self._closing:
            raise OverloadedError("gateway is shutting down", max_age=OVERLOAD_RETRY_AFTER)
        try:
            self._queue.put_nowait(job)
        except asyncio.QueueFull:
            self.stats.refused += 1
            log.warning("store.overloaded", pending=self._queue.qsize())
            raise OverloadedError(
                "store queue full, retry later", max_age=OVERLOAD_RETRY_AFTER
            ) from None
        return await job.future

    async def run(self) -> None:
        """Commit batches until closed and drained. Run it as one long-lived task."""
        while not (self._closing and self._queue.empty()):
            first = await self._queue.get()
            # Shielded: a cancelled gateway still finishes the transaction it started, so a
            # request is never left not knowing whether it was committed.
            await asyncio.shield(self._gather_and_commit(first))

    async def _gather_and_commit(self, first: _Job) -> None:
        """Commit `first` with whatever else is queued once the event loop has had one more
        pass: the requests being handled in the same pass as the first one (datagrams read
        together) join this transaction rather than wait for the next. At saturation that
        halves the commits, and with them the fsyncs and WAL pages per reading; the cost is
        one pass of the loop, a few microseconds, against a commit's milliseconds."""
        await asyncio.sleep(0)
        jobs = [first]
        while len(jobs) < self._max_batch and not self._queue.empty():
            jobs.append(self._queue.get_nowait())
        await self._commit_batch(jobs)

    async def close(self) -> None:
        """Refuse new work and return when everything already queued is committed."""
        self._closing = True
        marker = _Job(asyncio.get_running_loop().create_future())
        await self._queue.put(marker)  # FIFO: done once every earlier job is committed
        await marker.future

    async def _commit_batch(self, jobs: list[_Job]) -> None:
        live = [job for job in jobs if not job.future.done()]
        if not live:
            return
        self.stats.batches += 1
        self.stats.jobs += len(live)
        self.stats.largest_batch = max(self.stats.largest_batch, len(live))
        try:
            results, committed = await self._apply(live)
        except Exception as exc:
            # An operation's own error (say a ValueError) is its caller's, not the writer's:
            # the writer must keep running.
            log.error("store.batch_failed", jobs=len(live), error=str(exc))
            # Retry one by one, so one bad request cannot fail the others.
            for job in live if len(live) > 1 else []:
                await self._commit_batch([job])
            if len(live) == 1 and not live[0].future.done():
                if isinstance(exc, sqlite3.Error):
                    live[0].future.set_exception(StoreError(f"database write failed: {exc}"))
                else:
                    live[0].future.set_exception(exc)
            return
        for job, result in zip(live, results, strict=True):
            if not job.future.done():
                job.future.set_result(result)
        for hook in self._hooks:
            try:
                hook()
            except Exception:
                log.exception("store.listener_failed", listener=repr(hook))
        if committed:
            for listener in self._listeners:
                try:
                    listener(committed)
                except Exception:
                    log.exception("store.listener_failed", listener=repr(listener))

    async def _apply(self, jobs: list[_Job]) -> tuple[list[Any], list[StoredReading]]:
        batches = [job.readings for job in jobs if job.readings is not None]
        if all(job.op is None for job in jobs):
            if not batches and all(job.thread_op is None for job in jobs):
                return [None] * len(jobs), []
            # Nothing needs the event loop: the whole transaction in one trip to the
            # database thread instead of one per statement (each trip is a thread hand-off
            # and a wake-up of the event loop, which costs more than the statements).
            # `_execute` is aiosqlite's own way to run a function on its thread (0.17-0.22).
            results, committed = await self._conn._execute(  # type: ignore[no-untyped-call]
                self._commit_on_thread, jobs, batches
            )
            self._count(batches, committed)
            return results, committed
        conn = self._conn
        await conn._execute(self._begin_on_thread)  # type: ignore[no-untyped-call]
        try:
            results = []
            for job in jobs:
                if job.op is not None:
                    results.append(await job.op(conn))
                elif job.thread_op is not None:
                    results.append(await conn._execute(job.thread_op, conn._conn))  # type: ignore[no-untyped-call]
                else:
                    results.append(None)
            committed = await self._insert(batches) if batches else []
            await conn.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):  # no transaction left to roll back
                await conn.execute("ROLLBACK")
            raise
        finally:
            self._end()
        self._count(batches, committed)
        return results, committed

    def _count(self, batches: list[ReadingBatch], committed: list[StoredReading]) -> None:
        submitted = sum(len(batch.measurements) for batch in batches)
        self.stats.readings += len(committed)
        self.stats.duplicates += submitted - len(committed)

    def _commit_on_thread(
        self, jobs: list[_Job], batches: list[ReadingBatch]
    ) -> tuple[list[Any], list[StoredReading]]:
        """BEGIN, the thread ops, the readings, COMMIT on the database thread (blocking;
        see `_apply`). Operations run before the readings, as on the async path."""
        conn: sqlite3.Connection = self._conn._conn
        self._begin_on_thread()
        try:
            results = [None if job.thread_op is None else job.thread_op(conn) for job in jobs]
            stored: list[StoredReading] = []
            if batches:
                stored = self._insert_on_thread(batches)
            conn.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise
        finally:
            self._end()
        return results, stored

    def _begin_on_thread(self) -> None:
        if self.write_lock is not None:
            self.write_lock.acquire()
        try:
            self._conn._conn.execute("BEGIN IMMEDIATE")
        except BaseException:
            self._end()
            raise

    def _end(self) -> None:
        if self.write_lock is not None:
            self.write_lock.release()

    async def _insert(self, batches: list[ReadingBatch]) -> list[StoredReading]:
        """The readings of a transaction that also runs operations (see `_apply`)."""
        stored: list[StoredReading] = await self._conn._execute(  # type: ignore[no-untyped-call]
            self._insert_on_thread, batches
        )
        return stored

    def _insert_on_thread(self, batches: list[ReadingBatch]) -> list[StoredReading]:
        """Insert inside the open transaction; the new readings' ids are recorded as this
        writer's before COMMIT (they are contiguous: the transaction holds the write lock)."""
        stored = _insert_and_collect(self._conn._conn, batches)
        if self.own_reading_ids is not None and stored:
            self.own_reading_ids.append((stored[0].id, stored[-1].id))
        return stored


def _insert_and_collect(
    conn: sqlite3.Connection, batches: list[ReadingBatch]
) -> list[StoredReading]:
    """Insert the batches' readings and update their devices' last seen, inside the caller's
    transaction; the readings that were new (duplicates are ignored), in insertion order."""
    before, floor = conn.execute(SELECT_LAST_READING_ID).fetchone()
    params = _reading_params(batches)
    rows = len(params) // VALUES_PER_ROW
    placeholder = before < floor
    if placeholder:
        # The newest readings were deleted (their device was, say) after a relay cursor
        # had passed them: SQLite would hand their ids out again, and the cursor would pass
        # over the new readings. A placeholder at the cursor's id, gone again before COMMIT,
        # makes the new ids start after it.
        conn.execute(INSERT_ID_FLOOR, (floor, batches[0].device.id))
        before = floor
    inserted, last_id = _insert_rows(conn, params)
    if placeholder:
        conn.execute("DELETE FROM readings WHERE id = ?", (floor,))
    conn.executemany(UPDATE_LAST_SEEN, _last_seen_rows(batches))
    if inserted == rows and last_id == before + rows:
        # No row was a duplicate, so SQLite gave them the ids after `before`, one by one in
        # order (a new rowid is the largest plus one): no need to read them back.
        return _stored_in_order(batches, before + 1)
    return _stored(batches, conn.execute(SELECT_NEW_READINGS, (before,)).fetchall())


def _insert_rows(conn: sqlite3.Connection, params: list[Any]) -> tuple[int, int | None]:
    """INSERT OR IGNORE the rows flattened in `params`: how many were inserted, and the id
    of the last one inserted (None if none was)."""
    inserted = 0
    last_id: int | None = None
    start = 0
    while start < len(params):
        left = (len(params) - start) // VALUES_PER_ROW
        size = next(size for size in INSERT_CHUNKS if size <= left)
        end = start + size * VALUES_PER_ROW
        cursor = conn.execute(_insert_statement(size), params[start:end])
        # An ignored duplicate is not counted; `lastrowid` is the last reading inserted.
        if cursor.rowcount > 0:
            inserted += cursor.rowcount
            last_id = cursor.lastrowid
        start = end
    return inserted, last_id


@functools.cache
def _insert_statement(rows: int) -> str:
    return INSERT_READINGS + ", ".join([READING_PLACEHOLDERS] * rows)


def _reading_params(batches: list[ReadingBatch]) -> list[Any]:
    """Every reading's column values, one row after another in a flat list."""
    params: list[Any] = []
    for batch in batches:
        device_id = batch.device.id
        received_at = batch.received_at
        for m in batch.measurements:
            params += (
                device_id,
                m.name,
                m.value,
                value_kind(m.value),
                m.unit,
                m.time,
                received_at,
                m.seq,
                m.key,
            )
    return params


def _last_seen_rows(batches: list[ReadingBatch]) -> list[tuple[Any, ...]]:
    last_seen: dict[int, tuple[float, str | None]] = {}
    for batch in batches:
        last_seen[batch.device.id] = (batch.received_at, batch.address)
    return [(seen, address, device_id) for device_id, (seen, address) in last_seen.items()]


def _stored(batches: list[ReadingBatch], fetched: Iterable[Any]) -> list[StoredReading]:
    return stored_readings(fetched, {batch.device.id: batch.device for batch in batches})


def stored_readings(rows: Iterable[Any], devices: Mapping[int, Device]) -> list[StoredReading]:
    """Rows of `READING_COLUMNS` as readings; rows of a device not in `devices` are left out."""
    return [
        StoredReading(
            id=row[0],
            device=devices[row[1]],
            measurement=row[2],
            value=value_from_row(row[3], row[4]),
            unit=row[5],
            device_time=row[6],
            received_at=row[7],
            seq=row[8],
        )
        for row in rows
        if row[1] in devices
    ]


def _stored_in_order(batches: list[ReadingBatch], first_id: int) -> list[StoredReading]:
    """The batches' readings as `_stored` would read them back, ids counting from
    `first_id`. The REAL columns hand back floats, so the times are made floats here too."""
    stored: list[StoredReading] = []
    reading_id = first_id
    for batch in batches:
        device = batch.device
        received_at = float(batch.received_at)
        for m in batch.measurements:
            device_time = None if m.time is None else float(m.time)
            stored.append(
                StoredReading(
                    reading_id, device, m.name, m.value, m.unit, device_time, received_at, m.seq
                )
            )
            reading_id += 1
    return stored
