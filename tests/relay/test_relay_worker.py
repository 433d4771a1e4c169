"""The sink worker against a real database and store writer, without a gateway: the states
one round writes (one trip settles a batch and claims the next), and what cancellation
puts back."""

from __future__ import annotations

import asyncio
import math
import random
import sqlite3
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiosqlite
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.core.model import Device
from gateway.core.outbox import BatchPlanner, DeliveryState, OutboxRow, RetryPolicy
from gateway.core.readings import Measurement
from gateway.relay import store
from gateway.relay.config import RelayConfig, RouteConfig
from gateway.relay.events import record_event
from gateway.relay.sinks.base import Delivery, Result
from gateway.relay.sinks.memory import MemorySink
from gateway.relay.worker import SinkStats, SinkWorker
from gateway.store.db import migrate, open_database
from gateway.store.writer import ReadingBatch, StoreWriter
from tests.support.gateway import wait_until

FRIDGE = Device(1, "fridge-1", "fridge")
TRUCK = Device(2, "truck-1", "tracker")
NOW = 200.0


@dataclass
class Setup:
    path: Path
    conn: aiosqlite.Connection
    writer: StoreWriter

    def rows(self, sql: str) -> list[Any]:
        with sqlite3.connect(self.path) as conn:
            return conn.execute(sql).fetchall()

    def outbox(self) -> list[Any]:
        return self.rows("SELECT ref_id, state, attempt, next_attempt_at FROM outbox ORDER BY id")

    def cursor(self) -> int:
        """The last reading the sink's stream has dealt with."""
        return int(self.rows("SELECT reading_id FROM relay_cursors WHERE sink = 'm'")[0][0])

    async def store(self, device: Device, count: int) -> None:
        measurements = [Measurement("temp", float(i), seq=i, key=f"s{i}") for i in range(count)]
        await self.writer.insert_readings(ReadingBatch(device, measurements, 100.0, None))

    async def event(self, device: Device, kind: str = "alert") -> None:
        async def record(conn: aiosqlite.Connection) -> None:
            await record_event(conn, kind=kind, device=device, at=100.0, body={})

        await self.writer.transaction(record)

    def worker(self, sink: MemorySink, **relay: Any) -> SinkWorker:
        retry = RetryPolicy(base_delay=10, jitter=0, max_attempts=5, max_age=0)
        config = RelayConfig(poll_interval=60, retry=retry, **relay)
        return SinkWorker(
            sink,
            config=config,
            gateway="gw",
            writer=self.writer,
            stats=SinkStats(),
            clock=lambda: NOW,
            rng=random.Random(1),
        )


@pytest.fixture
async def setup(tmp_path: Path) -> AsyncIterator[Setup]:
    path = tmp_path / "gw.db"
    conn = await open_database(path)
    await migrate(conn)
    for device in (FRIDGE, TRUCK):
        await conn.execute(
            "INSERT INTO devices (id, name, type, created_at) VALUES (?, ?, ?, 0)",
            (device.id, device.name, device.type),
        )
    await store.sync_routes(conn, [RouteConfig(sink="m", kinds=("reading", "alert"))])
    writer = StoreWriter(conn)
    task = asyncio.create_task(writer.run())
    try:
        yield Setup(path, conn, writer)
    finally:
        await writer.close()
        await task
        await conn.close()


async def test_a_round_settles_and_claims_in_one_trip_along_the_state_table(
    setup: Setup,
) -> None:
    await setup.store(FRIDGE, 2)  # readings 1, 2
    await setup.store(TRUCK, 2)  # readings 3, 4
    sink = MemorySink("m")
    sink.fail_message("r-1", "transient")  # holds back r-2 of the same device
    sink.fail_message("r-3", "permanent")
    worker = setup.worker(sink, batch_size=10)
    trips = setup.writer.stats.batches
    # Nothing due after the first batch: the wait is the retry's, within poll_interval.
    assert await worker.step() == 10.0
    # One trip claimed the batch, one settled it and found nothing more to claim.
    assert setup.writer.stats.batches - trips == 2
    # r-2 went out but counts as failed, so that it is sent again after r-1.
    assert sink.message_ids == ["r-2", "r-4"]
    assert setup.outbox() == [(1, "pending", 1, NOW + 10), (2, "pending", 1, NOW + 10)]
    assert setup.rows("SELECT ref_id, reason, attempt FROM dead_letters") == [(3, "permanent", 1)]
    stats = worker.stats
    assert (stats.sent, stats.retries, stats.dead) == (1, 2, 1)

    sink.clear_failures()
    worker._clock = lambda: NOW + 10
    assert await worker.step() == 60.0  # nothing waits: poll_interval
    assert sink.message_ids == ["r-2", "r-4", "r-1", "r-2"]
    assert setup.outbox() == []
    assert (stats.sent, stats.retries, stats.dead) == (3, 2, 1)


async def test_a_device_waiting_for_its_retry_does_not_hold_back_those_behind_its_window(
    setup: Setup,
) -> None:
    # The fridge's 1,200 entries fill the window a round reads (1,000 entries); its first
    # fails, so all of them wait 10 s for the retry. The truck's one reading comes after.
    await setup.store(FRIDGE, 1_200)
    await setup.store(TRUCK, 1)
    sink = MemorySink("m")
    sink.fail_message("r-1", "transient")
    worker = setup.worker(sink, batch_size=10)
    assert await worker.step() == 10.0  # then nothing is due until the fridge's retry
    # r-2 to r-10 went out but count as failed, to be sent again after r-1.
    assert sink.message_ids == [f"r-{i}" for i in range(2, 11)] + ["r-1201"]
    assert worker.stats.sent == 1
    fridge = setup.rows("SELECT count(*) FROM outbox WHERE device_id = 1 AND state = 'pending'")
    assert fridge == [(1_200,)]


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(1, 6),
            st.sampled_from([DeliveryState.PENDING, DeliveryState.IN_FLIGHT]),
            st.sampled_from([0.0, 5.0, 20.0]),
            st.integers(0, 8),
        ),
        max_size=60,
    ),
    st.integers(1, 8),
    st.integers(1, 12),
    st.one_of(st.none(), st.integers(0, 8)),
)
def test_reading_past_waiting_devices_plans_as_one_look_at_every_entry(
    specs: list[tuple[int, DeliveryState, float, int]],
    window: int,
    limit: int,
    due_to: int | None,
) -> None:
    # However small the window, a round that may read on past the devices that wait plans
    # exactly what the planner would with the whole outbox in view, in (pos, id) order, an
    # entry past the cursor (`due_to`) waiting as if not yet due.
    conn = sqlite3.connect(":memory:")
    conn.execute(
        "CREATE TABLE outbox (id INTEGER PRIMARY KEY, sink TEXT, kind TEXT, ref_id INTEGER,"
        " device_id INTEGER, encoding TEXT, attempt INTEGER, first_at REAL, state TEXT,"
        " next_attempt_at REAL, pos INTEGER)"
    )
    conn.executemany(
        "INSERT INTO outbox (id, sink, kind, ref_id, device_id, encoding, attempt, first_at,"
        " state, next_attempt_at, pos) VALUES (?, 'm', 'reading', 0, ?, 'json', 0, 0, ?, ?, ?)",
        [(i, d, state.value, at, pos) for i, (d, state, at, pos) in enumerate(specs, 1)],
    )
    after_now = math.nextafter(10.0, math.inf)
    ordered = sorted(enumerate(specs, 1), key=lambda item: (item[1][3], item[0]))
    rows = [
        OutboxRow(i, str(d), state, at if due_to is None or pos <= due_to else after_now)
        for i, (d, state, at, pos) in ordered
    ]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(store, "MAX_WINDOWS_PAST_BLOCKED", len(specs) + 1)
        planned, _ = store.plan_window(
            conn, "m", now=10.0, limit=limit, window=window, due_to=due_to
        )
    expected = BatchPlanner(now=10.0, limit=limit)
    for row in rows:
        if not expected.offer(row):
            break
    assert planned == expected.plan()


async def test_batches_keep_each_devices_order(setup: Setup) -> None:
    await setup.store(FRIDGE, 5)  # readings 1-5
    await setup.store(TRUCK, 5)  # readings 6-10
    sink = MemorySink("m")
    worker = setup.worker(sink, batch_size=3)
    await worker.step()
    # While a full batch is published the next is read ahead, in the order stored.
    assert [d.message_id for d in sink.delivered if d.device == "fridge-1"] == [
        f"r-{i}" for i in range(1, 6)
    ]
    assert [d.message_id for d in sink.delivered if d.device == "truck-1"] == [
        f"r-{i}" for i in range(6, 11)
    ]
    assert sink.message_ids[3:6] == ["r-4", "r-5", "r-6"]  # read ahead
    assert sink.calls == 4
    assert setup.outbox() == [] and setup.cursor() == 10


async def test_a_deep_backlog_goes_out_in_catch_up_batches(setup: Setup) -> None:
    await setup.store(FRIDGE, 10)
    await setup.store(TRUCK, 3)
    sink = MemorySink("m")
    worker = setup.worker(sink, batch_size=2, catch_up_batch_size=6)
    worker.stats.depth = 13  # the relay keeps it from commits; here it is set by hand
    sizes: list[int] = []
    publish = sink.publish

    async def counting(batch: Sequence[Delivery]) -> Sequence[Result]:
        sizes.append(len(batch))
        return await publish(batch)

    sink.publish = counting  # type: ignore[method-assign]
    await worker.step()
    # Up to 6 while the depth is at least 6 when a trip starts: 1-6, then 7-12 (read
    # while the first batch is out, the depth still 13), then the last one.
    assert sizes == [6, 6, 1]
    assert worker.stats.depth == 0 and setup.outbox() == [] and setup.cursor() == 13
    await setup.store(FRIDGE, 13)  # seq 0-9 are duplicates: 3 new readings
    worker.stats.depth = 3
    await worker.step()
    assert sizes[3:] == [2, 1]
    assert setup.outbox() == []


async def test_readings_committed_while_the_worker_lingers_go_in_one_round(
    setup: Setup,
) -> None:
    await setup.store(FRIDGE, 1)
    sink = MemorySink("m")
    worker = setup.worker(sink, batch_size=10, linger=1.0)
    stepping = asyncio.create_task(worker.step())
    for count in (1, 2, 3):  # three more commits while it waits, one new reading each
        await setup.store(TRUCK, count)
    assert not sink.calls  # still lingering
    await stepping
    assert sink.calls == 1 and sink.message_ids == ["r-1", "r-2", "r-3", "r-4"]
    assert setup.outbox() == []


async def test_cancelled_while_lingering_writes_what_the_last_batch_earned(
    setup: Setup,
) -> None:
    await setup.store(FRIDGE, 2)
    sink = MemorySink("m")
    worker = setup.worker(sink, batch_size=10, linger=0.2)
    stepping = asyncio.create_task(worker.step())
    # Once the batch is out, the worker lingers before the trip that would settle it.
    await wait_until(lambda: sink.message_ids == ["r-1", "r-2"])
    stepping.cancel()
    with pytest.raises(asyncio.CancelledError):
        await stepping
    assert setup.outbox() == []  # delivered, not left in flight for the next start
    assert worker.stats.sent == 2


class HoldingSink(MemorySink):
    """Publishing its first batch, it makes the store writer wait on `gate`: the worker's
    trip run ahead (and the trip settling that batch) cannot commit before the test lets
    it."""

    def __init__(self, writer: StoreWriter) -> None:
        super().__init__("m")
        self.gate = asyncio.Event()
        self.held = asyncio.Event()
        self._writer = writer
        self._holding: asyncio.Future[None] | None = None

    async def _hold(self, conn: aiosqlite.Connection) -> None:
        self.held.set()
        await self.gate.wait()

    async def publish(self, batch: Sequence[Delivery]) -> Sequence[Result]:
        results = await super().publish(batch)
        if self._holding is None:
            self._holding = asyncio.ensure_future(self._writer.transaction(self._hold))
            await self.held.wait()
        return results


async def test_cancelled_during_a_trip_counts_what_it_settled_and_releases_what_it_claimed(
    setup: Setup,
) -> None:
    await setup.store(FRIDGE, 4)
    sink = HoldingSink(setup.writer)
    worker = setup.worker(sink, batch_size=2)
    task = asyncio.create_task(worker.step())
    await wait_until(sink.held.is_set)  # the first batch is out, the trip ahead waits
    task.cancel()
    sink.gate.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    # The first batch is settled once the trip ahead is done; what that trip read (r-3,
    # r-4) stays after the cursor, to be read again.
    assert sink.message_ids == ["r-1", "r-2"]
    assert worker.stats.sent == 2
    assert setup.outbox() == [] and setup.cursor() == 2


async def test_cancelled_while_publishing_releases_the_batch_and_what_was_claimed_ahead(
    setup: Setup,
) -> None:
    await setup.event(FRIDGE)  # an outbox entry, ahead of the readings
    await setup.store(FRIDGE, 1)
    await setup.store(TRUCK, 2)
    sink = MemorySink("m")
    sink.hang()
    worker = setup.worker(sink, batch_size=2)
    trips = setup.writer.stats.batches
    task = asyncio.create_task(worker.step())
    await wait_until(lambda: sink.calls == 1)
    # The first batch (the event, and r-1 held back behind it) is out; the trip ahead
    # reads r-2 and r-3 meanwhile.
    await wait_until(lambda: setup.writer.stats.batches == trips + 2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # The event is pending again, and the cursor passed none of the readings.
    assert [row[1:3] for row in setup.outbox()] == [("pending", 0)]
    assert setup.cursor() == 0
    assert sink.message_ids == []


async def test_readings_and_events_of_a_device_go_out_in_the_order_they_were_stored(
    setup: Setup,
) -> None:
    await setup.store(FRIDGE, 1)  # r-1
    await setup.event(FRIDGE)  # e-1, after r-1
    await setup.store(FRIDGE, 2)  # r-2 (seq 0 is a duplicate), after e-1
    sink = MemorySink("m")
    worker = setup.worker(sink, batch_size=10)
    await worker.step()
    # e-1 waits for the cursor to pass r-1; r-2 is held back behind e-1 and queued.
    assert sink.message_ids == ["r-1", "e-1", "r-2"]
    assert setup.outbox() == [] and setup.cursor() == 2


async def test_a_reading_that_failed_is_retried_before_the_readings_stored_after_it(
    setup: Setup,
) -> None:
    await setup.store(FRIDGE, 2)  # r-1, r-2
    await setup.store(TRUCK, 1)  # r-3
    sink = MemorySink("m")
    sink.fail_message("r-1", "transient")
    worker = setup.worker(sink, batch_size=10)
    assert await worker.step() == 10.0
    # r-2 went out but counts as failed; both wait in the outbox; the truck is not held.
    assert sink.message_ids == ["r-2", "r-3"]
    assert setup.outbox() == [(1, "pending", 1, NOW + 10), (2, "pending", 1, NOW + 10)]
    assert setup.cursor() == 3
    await setup.store(FRIDGE, 3)  # r-4, stored while the fridge waits: queued behind
    assert await worker.step() == 10.0
    assert setup.outbox()[-1] == (4, "pending", 0, NOW)
    sink.clear_failures()
    worker._clock = lambda: NOW + 10
    await worker.step()
    assert sink.message_ids[2:] == ["r-1", "r-2", "r-4"]
    assert setup.outbox() == [] and setup.cursor() == 4
    assert (worker.stats.sent, worker.stats.retries) == (4, 2)


async def test_a_reading_refused_for_good_is_a_dead_letter_and_holds_nothing_back(
    setup: Setup,
) -> None:
    await setup.store(FRIDGE, 2)
    sink = MemorySink("m")
    sink.fail_message("r-1", "permanent")
    worker = setup.worker(sink, batch_size=10)
    await worker.step()
    assert sink.message_ids == ["r-2"]
    dead = setup.rows("SELECT outbox_id, sink, kind, ref_id, device_id, reason FROM dead_letters")
    assert dead == [(0, "m", "reading", 1, 1, "permanent")]
    assert setup.outbox() == [] and setup.cursor() == 2


async def test_readings_routed_elsewhere_move_the_cursor_without_a_batch(setup: Setup) -> None:
    async def only_trucks(conn: aiosqlite.Connection) -> None:
        await store.sync_routes(conn, [RouteConfig(sink="m", device_types=("tracker",))])

    await setup.writer.transaction(only_trucks)
    await setup.store(FRIDGE, 3)
    sink = MemorySink("m")
    worker = setup.worker(sink, batch_size=10)
    assert await worker.step() == 60.0
    assert sink.calls == 0 and setup.cursor() == 3


async def test_a_sink_no_longer_routed_keeps_what_it_was_owed_and_a_new_one_starts_now(
    setup: Setup,
) -> None:
    await setup.store(FRIDGE, 2)  # owed to "m", whose cursor is still at 0

    async def reroute(conn: aiosqlite.Connection) -> None:
        await store.sync_routes(conn, [RouteConfig(sink="n")])

    await setup.writer.transaction(reroute)
    assert setup.rows("SELECT sink, ref_id, pos FROM outbox ORDER BY id") == [
        ("m", 1, 2),
        ("m", 2, 4),
    ]
    assert setup.rows("SELECT sink, reading_id FROM relay_cursors") == [("n", 2)]
    # Retention is held back by no cursor that will never move again.
    assert setup.rows("SELECT min(reading_id) FROM relay_cursors") == [(2,)]


async def test_what_a_sink_still_owes_is_read_from_its_cursor_on_not_from_every_reading(
    setup: Setup,
) -> None:
    # `relay_queue` is counted every status interval in every worker process: over a
    # database of millions of readings it must read only those after each cursor.
    plan = setup.rows("EXPLAIN QUERY PLAN SELECT sink, count(*) FROM relay_queue GROUP BY sink")
    steps = [row[3] for row in plan]
    assert any(step.startswith("SEARCH x USING INTEGER PRIMARY KEY (rowid>") for step in steps)
    assert not any(step.startswith("SCAN x") for step in steps), steps
