"""What other worker processes committed to the shared database, told like our own commits.

Each worker's store writer tells its listeners of the readings it committed. With several
workers (`server.workers`) a worker must also learn of the others' commits: observers it
serves watch devices that post to another worker, and worker 0 runs the rules and the
relay for everyone. The feed looks every `interval` seconds at `PRAGMA data_version`, which
changes when another connection committed; then it reads the readings past the last id it
saw, leaves out those this process's writer inserted (their id ranges are recorded before
their COMMIT, so a row the feed can see is never mistaken for a foreign one), and hands the
rest to its listeners. Registrations, alerts and shopping lists are followed through the
`change_versions` counters their triggers bump.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable, Sequence
from typing import Any

import aiosqlite
import structlog

from gateway.registry import Registry
from gateway.store.writer import (
    SELECT_LAST_READING_ID,
    SELECT_NEW_READINGS,
    CommitListener,
    stored_readings,
)

log = structlog.get_logger(__name__)

#: Most readings handed on per look; the rest are read at the next one, at once.
FEED_BATCH = 5_000

SELECT_FOREIGN_READINGS = f"{SELECT_NEW_READINGS} LIMIT ?"


class OwnIds:
    """Id ranges this process inserted, oldest first, forgotten once the feed passed them."""

    def __init__(self, ranges: collections.deque[tuple[int, int]]) -> None:
        self._ranges = ranges

    def contains(self, reading_id: int) -> bool:
        for low, high in self._ranges:
            if reading_id < low:
                return False
            if reading_id <= high:
                return True
        return False

    def forget_through(self, reading_id: int) -> None:
        while self._ranges and self._ranges[0][1] <= reading_id:
            self._ranges.popleft()


class StoreFeed:
    def __init__(
        self,
        reader: aiosqlite.Connection,
        registry: Registry,
        own: collections.deque[tuple[int, int]],
        *,
        interval: float,
    ) -> None:
        self._reader = reader
        self._registry = registry
        self._own = OwnIds(own)
        self._interval = interval
        self._readings: list[tuple[CommitListener, Callable[[], bool]]] = []
        self._changes: dict[str, list[Callable[[], None]]] = {}
        self._data_version: int | None = None
        self._last_id = 0
        self._versions: dict[str, int] = {}
        #: Readings handed on since start (for status and tests).
        self.readings = 0

    def add_reading_listener(
        self, listener: CommitListener, *, wanted: Callable[[], bool] = lambda: True
    ) -> None:
        """`listener(readings)` with the other workers' readings, whenever `wanted()`: with
        no listener wanting them, the feed skips them without reading them."""
        self._readings.append((listener, wanted))

    def add_change_listener(self, topic: str, listener: Callable[[], None]) -> None:
        """`listener()` after another process changed `topic` (`alerts`, `lists`)."""
        self._changes.setdefault(topic, []).append(listener)

    async def start(self) -> None:
        """Begin at the present: what is already stored is not news."""
        self._data_version = await self._scalar("PRAGMA data_version")
        self._last_id = await self._scalar(SELECT_LAST_READING_ID)
        self._own.forget_through(self._last_id)
        self._versions = await self._change_versions()

    async def run(self) -> None:
        while True:
            try:
                more = await self.poll()
            except Exception:
                log.exception("feed.failed")
                more = False
            if not more:
                await asyncio.sleep(self._interval)

    async def poll(self) -> bool:
        """One look; True if there may be more to read at once."""
        version = await self._scalar("PRAGMA data_version")
        if version == self._data_version:
            return False
        more = await self._read_readings()
        if not more:
            # Only now: rows committed while we read are seen at the next look.
            self._data_version = version
        versions = await self._change_versions()
        for topic, value in versions.items():
            if self._versions.get(topic) == value:
                continue
            self._versions[topic] = value
            if topic == "registrations":
                await self._registry.sync(self._reader)
            for listener in self._changes.get(topic, ()):
                _call(listener)
        return more

    async def _read_readings(self) -> bool:
        listeners = [listener for listener, wanted in self._readings if wanted()]
        if not listeners:
            self._last_id = await self._scalar(SELECT_LAST_READING_ID)
            self._own.forget_through(self._last_id)
            return False
        async with self._reader.execute(
            SELECT_FOREIGN_READINGS, (self._last_id, FEED_BATCH)
        ) as cursor:
            rows = list(await cursor.fetchall())
        if not rows:
            return False
        self._last_id = rows[-1][0]
        foreign = [row for row in rows if not self._own.contains(row[0])]
        self._own.forget_through(self._last_id)
        if foreign:
            devices = await self._registry.by_ids({row[1] for row in foreign}, self._reader)
            readings = stored_readings(foreign, devices)
            self.readings += len(readings)
            for listener in listeners:
                _call(listener, readings)
        return len(rows) == FEED_BATCH

    async def _change_versions(self) -> dict[str, int]:
        async with self._reader.execute("SELECT topic, version FROM change_versions") as cursor:
            return {str(row[0]): int(row[1]) for row in await cursor.fetchall()}

    async def _scalar(self, sql: str) -> int:
        async with self._reader.execute(sql) as cursor:
            row = await cursor.fetchone()
        return int(row[0]) if row is not None else 0


def _call(listener: Callable[..., None], *args: Sequence[Any]) -> None:
    try:
        listener(*args)
    except Exception:
        log.exception("feed.listener_failed", listener=repr(listener))
