"""The sink worker against a real database and store writer, without a gateway: the states
one round writes (one trip settles a batch and claims the next), and what cancellation
puts back."""

from __future__ import annotations

import asyncio
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
from gateway.core.outbox import DeliveryState, OutboxRow, RetryPolicy, plan_batch
from gateway.core.readings import Measurement
from gateway.relay import store
from gateway.relay.config import RelayConfig, RouteConfig
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

    async def store(self, device: Device, count: int) -> None:
        measurements = [Measurement("temp", float(i), seq=i, key=f"s{i}") for i in range(count)]
        await self.writer.insert_readings(ReadingBatch(device, measurements, 100.0, None))

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
    await store.sync_routes(conn, [RouteConfig(sink="m")])
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
        ),
        max_size=60,
    ),
    st.integers(1, 8),
    st.integers(1, 12),
)
def test_reading_past_waiting_devices_plans_as_one_look_at_every_entry(
    specs: list[tuple[int, DeliveryState, float]], window: int, limit: int
) -> None:
    # However small the window, a round that may read on past the devices that wait plans
    # exactly what the planner would with the whole outbox in view.
    conn = sqlite3.connect(":memory:")
    conn.execute(
        "CREATE TABLE outbox (id INTEGER PRIMARY KEY, sink TEXT, kind TEXT, ref_id INTEGER,"
        " device_id INTEGER, encoding TEXT, attempt INTEGER, first_at REAL, state TEXT,"
        " next_attempt_at REAL)"
    )
    conn.executemany(
        "INSERT INTO outbox (id, sink, kind, ref_id, device_id, encoding, attempt, first_at,"
        " state, next_attempt_at) VALUES (?, 'm', 'reading', 0, ?, 'json', 0, 0, ?, ?)",
        [(i, device, state.value, at) for i, (device, state, at) in enumerate(specs, 1)],
    )
    rows = [OutboxRow(i, str(d), state, at) for i, (d, state, at) in enumerate(specs, 1)]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(store, "MAX_WINDOWS_PAST_BLOCKED", len(specs) + 1)
        planned, _ = store.plan_window(conn, "m", now=10.0, limit=limit, window=window)
    assert planned == plan_batch(rows, now=10.0, limit=limit)


async def test_batches_keep_each_devices_order(setup: Setup) -> None:
    await setup.store(FRIDGE, 5)  # readings 1-5
    await setup.store(TRUCK, 5)  # readings 6-10
    sink = MemorySink("m")
    worker = setup.worker(sink, batch_size=3)
    await worker.step()
    # While a full batch is published the next is claimed, from other devices only.
    assert [d.message_id for d in sink.delivered if d.device == "fridge-1"] == [
        f"r-{i}" for i in range(1, 6)
    ]
    assert [d.message_id for d in sink.delivered if d.device == "truck-1"] == [
        f"r-{i}" for i in range(6, 11)
    ]
    assert sink.message_ids[3:6] == ["r-6", "r-7", "r-8"]  # claimed ahead
    assert sink.calls == 4
    assert setup.outbox() == []


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
    # Up to 6 while the depth is at least 6 when a trip starts: fridge 1-6, then truck
    # (claimed while the fridge's batch is out), then the rest of the fridge.
    assert sizes == [6, 3, 4]
    assert worker.stats.depth == 0 and setup.outbox() == []
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
    # The first batch is settled once the trip ahead is done, and it claimed nothing that
    # stays claimed.
    assert sink.message_ids == ["r-1", "r-2"]
    assert worker.stats.sent == 2
    assert setup.outbox() == [(3, "pending", 0, 100.0), (4, "pending", 0, 100.0)]


async def test_cancelled_while_publishing_releases_the_batch_and_what_was_claimed_ahead(
    setup: Setup,
) -> None:
    await setup.store(FRIDGE, 2)
    await setup.store(TRUCK, 1)
    sink = MemorySink("m")
    sink.hang()
    worker = setup.worker(sink, batch_size=2)
    task = asyncio.create_task(worker.step())
    await wait_until(lambda: sink.calls == 1)
    # r-3 is another device's: claimed while the full first batch is out.
    await wait_until(lambda: [row[1] for row in setup.outbox()] == ["in_flight"] * 3)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert setup.outbox() == [(ref, "pending", 0, 100.0) for ref in (1, 2, 3)]
    assert sink.message_ids == []
