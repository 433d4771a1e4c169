"""The group-commit writer, migrations and retention, against a real SQLite file."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import aiosqlite
import pytest

from gateway.core.model import Device, StoredReading, value_from_row
from gateway.core.readings import Measurement
from gateway.errors import OverloadedError
from gateway.store.db import migrate, migrations, open_database, schema_version
from gateway.store.retention import RetentionPolicy, prune
from gateway.store.writer import ReadingBatch, StoreWriter


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[aiosqlite.Connection]:
    conn = await open_database(tmp_path / "gw.db")
    await migrate(conn)
    await conn.execute("INSERT INTO devices (id, name, type, created_at) VALUES (1, 'd', 'x', 0)")
    try:
        yield conn
    finally:
        await conn.close()


DEVICE = Device(1, "d", "x")


def batch(*values: tuple[str, float, int | None], at: float = 100.0) -> ReadingBatch:
    return ReadingBatch(
        DEVICE,
        [Measurement(n, v, seq=s, key=None if s is None else f"s{s}/{n}") for n, v, s in values],
        at,
        "127.0.0.1:1",
    )


async def running(writer: StoreWriter) -> asyncio.Task[None]:
    return asyncio.create_task(writer.run(), name="store.writer")


async def test_migrations_apply_once_and_record_the_version(db: aiosqlite.Connection) -> None:
    latest = migrations()[-1].version  # numbers may have gaps: parts reserve theirs
    assert await schema_version(db) == latest
    assert await migrate(db) == latest  # idempotent


async def test_writable_connections_keep_temporary_data_in_memory(tmp_path: Path) -> None:
    # Statement journals in memory make a stored reading about 6 us cheaper
    # (docs/performance.md, change 25); a read-only connection keeps SQLite's default.
    writable = await open_database(tmp_path / "gw.db")
    readonly = await open_database(tmp_path / "gw.db", readonly=True)
    try:
        async with writable.execute("PRAGMA temp_store") as cursor:
            assert await cursor.fetchone() == (2,)  # MEMORY
        async with readonly.execute("PRAGMA temp_store") as cursor:
            assert await cursor.fetchone() == (0,)  # DEFAULT
    finally:
        await readonly.close()
        await writable.close()


async def test_the_wal_is_checkpointed_after_the_configured_pages_only(tmp_path: Path) -> None:
    # Fewer, larger checkpoints: SQLite's default (1,000 pages) made a tenth of the time at
    # 80 % load slow commits (docs/performance.md, change 28).
    path = tmp_path / "gw.db"
    conn = await open_database(path, wal_autocheckpoint=300)
    try:
        await conn.execute("CREATE TABLE blobs (b BLOB)")

        async def wal_pages() -> int:
            return (path.parent / "gw.db-wal").stat().st_size // 4096

        for _ in range(200):  # about three pages a commit, 600 in all
            await conn.execute("INSERT INTO blobs VALUES (zeroblob(5000))")
        # Checkpointed once 300 pages had gathered, then written from its start again: the
        # file never grew much past 300 pages (with SQLite's default it reaches about 650).
        assert 250 <= await wal_pages() <= 330
        async with conn.execute("PRAGMA wal_autocheckpoint") as cursor:
            assert await cursor.fetchone() == (300,)
    finally:
        await conn.close()


async def test_concurrent_requests_share_transactions(db: aiosqlite.Connection) -> None:
    writer = StoreWriter(db, max_batch=100)
    task = await running(writer)
    await asyncio.gather(*(writer.insert_readings(batch(("t", i, i))) for i in range(300)))
    await writer.close()
    await task
    assert writer.stats.readings == 300
    assert writer.stats.batches < 300 / 10, writer.stats  # group commit, not one per request
    async with db.execute("SELECT count(*) FROM readings") as cursor:
        assert await cursor.fetchone() == (300,)


async def test_listeners_see_committed_rows_only_and_duplicates_are_ignored(
    db: aiosqlite.Connection, tmp_path: Path
) -> None:
    writer = StoreWriter(db)
    seen: list[StoredReading] = []
    other = sqlite3.connect(tmp_path / "gw.db")

    def listener(rows: Sequence[StoredReading]) -> None:
        # Called after COMMIT: another connection already sees every row.
        (count,) = other.execute("SELECT count(*) FROM readings").fetchone()
        assert count >= rows[-1].id
        seen.extend(rows)

    writer.add_commit_listener(listener)
    task = await running(writer)
    await writer.insert_readings(batch(("temp", 4.0, 1), ("door", True, 1)))  # type: ignore[arg-type]
    await writer.insert_readings(batch(("temp", 4.0, 1)))  # a retry: nothing new
    await writer.close()
    await task
    other.close()
    assert [(r.measurement, r.value) for r in seen] == [("temp", 4.0), ("door", True)]
    assert writer.stats.duplicates == 1


async def test_listeners_get_each_new_row_as_the_table_holds_it(db: aiosqlite.Connection) -> None:
    # Without duplicates the writer knows the new rows' ids without reading them back; with
    # some it reads them back. Both must hand listeners what the table holds, in id order.
    writer = StoreWriter(db)
    seen: list[StoredReading] = []
    writer.add_commit_listener(seen.extend)
    task = await running(writer)
    # 300 rows: more than one INSERT statement's worth, cut into several chunk sizes
    await writer.insert_readings(batch(*((f"m{i % 7}", i / 2, i) for i in range(300))))
    timed = [
        Measurement("door", True, time=1_700_000_000, key="t1700000000/door"),
        Measurement("note", "open", unit="txt"),
        Measurement("count", 3, seq=5000, key="s5000/count"),
    ]
    await writer.insert_readings(ReadingBatch(DEVICE, timed, 200, None))  # int times
    # duplicates of rows already stored, one twice within the batch, between new rows
    await writer.insert_readings(
        batch(
            ("m0", 0.0, 0), ("new", 1.5, 1000), ("m1", 0.5, 1), ("new", 1.5, 1000), ("n", 2, None)
        )
    )

    async def mark_seen(conn: aiosqlite.Connection) -> None:
        await conn.execute("UPDATE devices SET online = 1 WHERE id = 1")

    # an operation and readings sharing one transaction
    await asyncio.gather(writer.transaction(mark_seen), writer.insert_readings(batch(("x", 9, 9))))
    await writer.close()
    await task

    rows = await db.execute_fetchall(
        "SELECT id, measurement, value, kind, unit, device_time, received_at, seq"
        " FROM readings ORDER BY id"
    )
    table = [
        (row[0], row[1], value_from_row(row[2], row[3]), row[4], row[5], row[6], row[7])
        for row in rows
    ]
    told = [
        (r.id, r.measurement, r.value, r.unit, r.device_time, r.received_at, r.seq) for r in seen
    ]
    assert told == table
    assert len(told) == 300 + 3 + 2 + 1
    assert [type(r.value) for r in seen[300:303]] == [bool, str, int]
    assert all(type(r.received_at) is float for r in seen)
    assert type(seen[300].device_time) is float
    assert writer.stats.duplicates == 3


async def test_full_queue_is_refused_with_retry_advice(db: aiosqlite.Connection) -> None:
    writer = StoreWriter(db, max_pending=2)  # not running: nothing drains the queue
    waiting = [asyncio.create_task(writer.insert_readings(batch(("t", 1, None)))) for _ in range(2)]
    await asyncio.sleep(0)
    with pytest.raises(OverloadedError) as caught:
        await writer.insert_readings(batch(("t", 1, None)))
    assert caught.value.max_age > 0
    task = await running(writer)
    await asyncio.gather(*waiting)
    await writer.close()
    await task


async def test_close_commits_what_was_queued(db: aiosqlite.Connection) -> None:
    writer = StoreWriter(db)
    pending = [asyncio.create_task(writer.insert_readings(batch(("t", i, i)))) for i in range(50)]
    await asyncio.sleep(0)
    task = await running(writer)
    await writer.close()
    await task
    await asyncio.gather(*pending)
    with pytest.raises(OverloadedError):
        await writer.insert_readings(batch(("t", 1, 999)))
    async with db.execute("SELECT count(*) FROM readings") as cursor:
        assert await cursor.fetchone() == (50,)


async def test_retention_by_age_and_by_count(db: aiosqlite.Connection) -> None:
    writer = StoreWriter(db)
    task = await running(writer)
    for i in range(10):
        await writer.insert_readings(batch(("t", i, i), at=1000.0 + i))
    assert await prune(writer, RetentionPolicy(max_age_seconds=5), now=1010.0) == 5
    assert await prune(writer, RetentionPolicy(max_rows=3), now=1010.0) == 2
    async with db.execute("SELECT value FROM readings ORDER BY id") as cursor:
        assert [row[0] for row in await cursor.fetchall()] == [7, 8, 9]
    await writer.close()
    await task


async def test_retention_keeps_readings_still_to_be_relayed(db: aiosqlite.Connection) -> None:
    writer = StoreWriter(db)
    task = await running(writer)
    for i in range(6):
        await writer.insert_readings(batch(("t", i, i), at=1000.0 + i))
    # Reading 1 waits in an outbox; a sink's cursor has read up to reading 4 only.
    await db.execute(
        "INSERT INTO outbox (sink, kind, ref_id, device_id, encoding, first_at, next_attempt_at)"
        " VALUES ('mqtt', 'reading', 1, 1, 'json', 0, 0)"
    )
    await db.executemany(
        "INSERT INTO relay_cursors (sink, reading_id) VALUES (?, ?)", [("mqtt", 6), ("nats", 4)]
    )
    assert await prune(writer, RetentionPolicy(max_age_seconds=1), now=2000.0) == 3
    async with db.execute("SELECT id FROM readings") as cursor:
        assert [row[0] for row in await cursor.fetchall()] == [1, 5, 6]
    await writer.close()
    await task


def count_readings(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT count(*) FROM readings").fetchone()[0])


async def test_thread_ops_share_one_transaction_with_readings(db: aiosqlite.Connection) -> None:
    writer = StoreWriter(db)
    first = asyncio.create_task(writer.insert_readings(batch(("t", 1, 1))))
    # Thread ops run before the batch's readings, like async ones: this sees none yet.
    seen = asyncio.create_task(writer.run_in_transaction(count_readings))
    second = asyncio.create_task(writer.insert_readings(batch(("t", 2, 2))))
    await asyncio.sleep(0)  # all three queued before the writer takes its first batch
    task = await running(writer)
    await asyncio.gather(first, second)
    assert await seen == 0
    assert await writer.run_in_transaction(count_readings) == 2
    assert writer.stats.batches == 2 and writer.stats.readings == 2
    await writer.close()
    await task


async def test_a_failing_thread_op_fails_only_its_caller(db: aiosqlite.Connection) -> None:
    writer = StoreWriter(db)

    def broken(conn: sqlite3.Connection) -> None:
        conn.execute("UPDATE devices SET last_seen = 1")
        raise ValueError("bad op")

    async def as_op(conn: aiosqlite.Connection) -> int:
        async with conn.execute("SELECT count(*) FROM devices") as cursor:
            (count,) = await cursor.fetchone()  # type: ignore[misc]
        return int(count)

    stored = asyncio.create_task(writer.insert_readings(batch(("t", 1, 1))))
    failing = asyncio.create_task(writer.run_in_transaction(broken))
    # An async op in the same batch: the thread op then runs on the per-statement path.
    counted = asyncio.create_task(writer.transaction(as_op))
    await asyncio.sleep(0)
    task = await running(writer)
    await stored
    with pytest.raises(ValueError, match="bad op"):
        await failing
    assert await counted == 1
    await writer.close()
    await task
    async with db.execute("SELECT last_seen FROM devices") as cursor:
        assert await cursor.fetchone() == (100.0,)  # the reading's, not the rolled-back 1
    assert writer.stats.readings == 1


async def test_each_new_reading_is_owed_once_per_route_that_takes_it(
    db: aiosqlite.Connection,
) -> None:
    await db.execute("INSERT INTO devices (id, name, type, created_at) VALUES (2, 'f1', 'fr', 0)")
    # Route 0 takes every device through two globs (one entry all the same); route 1
    # takes type 'fr' only.
    await db.executemany(
        "INSERT INTO routes (route, sink, kind, device_type, device, encoding)"
        " VALUES (?, ?, 'reading', ?, ?, 'cbor')",
        [(0, "all", "*", "*"), (0, "all", "*", "f*"), (1, "fridges", "fr", "*")],
    )
    await db.executemany(
        "INSERT INTO relay_cursors (sink, reading_id) VALUES (?, 0)", [("all",), ("fridges",)]
    )
    fridge = Device(2, "f1", "fr")
    writer = StoreWriter(db)
    task = await running(writer)
    await writer.insert_readings(batch(("t", 1.0, 1), ("h", 2.0, 2), at=100.0))
    await asyncio.gather(
        writer.insert_readings(ReadingBatch(fridge, [Measurement("t", 4.0)], 101.0, None)),
        writer.insert_readings(batch(("t", 1.0, 1), at=102.0)),  # a duplicate: stores nothing
    )
    await writer.close()
    await task
    async with db.execute(
        "SELECT sink, kind, ref_id, device_id, state, attempt, first_at FROM relay_queue"
        " ORDER BY sink, ref_id"
    ) as cursor:
        rows = await cursor.fetchall()
    assert rows == [
        ("all", "reading", 1, 1, "pending", 0, 100.0),
        ("all", "reading", 2, 1, "pending", 0, 100.0),
        ("all", "reading", 3, 2, "pending", 0, 101.0),
        ("fridges", "reading", 3, 2, "pending", 0, 101.0),
    ]


async def test_reading_ids_never_go_back_behind_a_relay_cursor(db: aiosqlite.Connection) -> None:
    # The newest readings were deleted after a sink's cursor passed them: the next ones
    # must still come after the cursor, or the sink would never read them.
    writer = StoreWriter(db)
    task = await running(writer)
    await writer.insert_readings(batch(("t", 1.0, 1), ("t", 2.0, 2), ("t", 3.0, 3)))
    await db.execute("INSERT INTO relay_cursors (sink, reading_id) VALUES ('mqtt', 3)")
    await db.execute("DELETE FROM readings WHERE id > 1")
    await db.commit()
    await writer.insert_readings(batch(("t", 4.0, 4), ("t", 5.0, 5)))
    await writer.insert_readings(batch(("t", 6.0, 6)))
    await writer.close()
    await task
    async with db.execute("SELECT id, value FROM readings ORDER BY id") as cursor:
        assert await cursor.fetchall() == [(1, 1.0), (4, 4.0), (5, 5.0), (6, 6.0)]


async def test_requests_handled_in_the_same_pass_of_the_loop_share_a_commit(
    db: aiosqlite.Connection,
) -> None:
    writer = StoreWriter(db)
    task = await running(writer)
    await asyncio.sleep(0)  # the writer waits for its first request

    async def one_pass_later(seq: int) -> None:
        # Queued in the pass in which the writer wakes up for the first request.
        await asyncio.sleep(0)
        await writer.insert_readings(batch(("t", 1.0, seq)))

    await asyncio.gather(
        writer.insert_readings(batch(("t", 0.0, 0))), *(one_pass_later(i) for i in range(1, 11))
    )
    assert (writer.stats.batches, writer.stats.jobs) == (1, 11)
    await writer.close()
    await task
