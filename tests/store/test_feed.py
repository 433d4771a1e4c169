"""The store feed: what another process committed to the same database, and only that.

Two writers on two connections to one SQLite file stand for two worker processes; the feed
of the first must hand on exactly the second's readings, and registrations the second made
as registry events.
"""

from __future__ import annotations

import asyncio
import collections
import threading
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import aiosqlite
import pytest

from gateway.core.model import Device, StoredReading
from gateway.core.readings import Measurement
from gateway.core.registration import RegistrationRequest
from gateway.registry import Registry, RegistryEvent
from gateway.store.db import WriteLock, migrate, open_database
from gateway.store.feed import OwnIds, StoreFeed
from gateway.store.writer import ReadingBatch, StoreWriter


class Worker:
    """One 'process': its writer, a reader, its registry and its feed."""

    def __init__(self, writer: StoreWriter, reader: aiosqlite.Connection) -> None:
        self.writer = writer
        self.reader = reader
        writer.own_reading_ids = collections.deque()
        self.registry = Registry(writer)
        self.feed = StoreFeed(reader, self.registry, writer.own_reading_ids, interval=0.01)
        self.heard: list[StoredReading] = []
        self.events: list[RegistryEvent] = []
        self.feed.add_reading_listener(self.heard.extend)
        self.registry.add_listener(self.events.append)

    async def store(self, device: Device, *values: float) -> None:
        measurements: Sequence[Measurement] = [Measurement("temp", v) for v in values]
        await self.writer.insert_readings(ReadingBatch(device, measurements, 1.0, None))


@pytest.fixture
async def workers(tmp_path: Path) -> AsyncIterator[tuple[Worker, Worker]]:
    path = tmp_path / "gw.db"
    connections = [await open_database(path) for _ in range(4)]
    await migrate(connections[0])
    pair = (
        Worker(StoreWriter(connections[0]), connections[1]),
        Worker(StoreWriter(connections[2]), connections[3]),
    )
    locks = [WriteLock(path) for _ in pair]  # one each, as in two processes
    for worker, lock in zip(pair, locks, strict=True):
        worker.writer.write_lock = lock
    tasks = [asyncio.create_task(worker.writer.run()) for worker in pair]
    for worker in pair:
        await worker.registry.load(worker.reader)
        await worker.feed.start()
    try:
        yield pair
    finally:
        for worker in pair:
            await worker.writer.close()
        await asyncio.gather(*tasks)
        for conn in connections:
            await conn.close()
        for lock in locks:
            lock.close()


async def test_feed_hands_on_the_other_workers_readings_only(
    workers: tuple[Worker, Worker],
) -> None:
    first, second = workers
    device = await first.registry.ensure_device("fridge-1", "fridge")
    for round_ in range(3):  # interleaved commits: ids of both writers alternate
        await first.store(device, 1.0 + round_, 2.0 + round_)
        await second.store(device, 10.0 + round_)
    assert await first.feed.poll() is False
    assert [r.value for r in first.heard] == [10.0, 11.0, 12.0]
    assert all(r.device == device for r in first.heard)
    assert await second.feed.poll() is False
    assert [r.value for r in second.heard] == [1.0, 2.0, 2.0, 3.0, 3.0, 4.0]
    # Nothing new: nothing handed on twice.
    assert await first.feed.poll() is False and len(first.heard) == 3


async def test_feed_tells_registrations_of_the_other_worker_as_registry_events(
    workers: tuple[Worker, Worker],
) -> None:
    first, second = workers
    request = RegistrationRequest("light-1", "streetlight", 60, False, "", ())
    registration = await second.registry.register(request, address="127.0.0.1:5683")
    await first.feed.poll()
    assert [(e.kind, e.device.name) for e in first.events] == [("registered", "light-1")]
    assert first.registry.device("light-1") == registration.device
    await second.registry.update(registration.id, lifetime=120, address=None)
    await second.registry.remove(registration.id)
    await first.feed.poll()
    assert [e.kind for e in first.events] == ["registered", "removed"]
    # The second worker made these changes itself: its own feed tells it nothing.
    await second.feed.poll()
    assert [e.kind for e in second.events] == ["registered", "updated", "removed"]


def test_own_ids_are_known_until_the_feed_passed_them() -> None:
    own = OwnIds(collections.deque([(3, 5), (9, 9)]))
    assert [n for n in range(1, 12) if own.contains(n)] == [3, 4, 5, 9]
    own.forget_through(5)
    assert [n for n in range(1, 12) if own.contains(n)] == [9]


def test_write_lock_makes_the_other_writer_wait_until_it_is_let_go(tmp_path: Path) -> None:
    first, second = WriteLock(tmp_path / "gw.db"), WriteLock(tmp_path / "gw.db")
    try:
        first.acquire()
        acquired = threading.Event()

        def take() -> None:
            second.acquire()
            acquired.set()

        thread = threading.Thread(target=take)
        thread.start()
        assert not acquired.wait(0.2)  # held by the first
        first.release()
        assert acquired.wait(5)
        second.release()
        thread.join()
    finally:
        first.close()
        second.close()
