"""The relay inside the gateway: sink workers, back-pressure, and the status it reports.

`Relay` is built with the entered sinks (the gateway's exit stack owns them) and:

- `start()` copies the routes into the database, puts entries a crash left in flight back
  to pending and counts each sink's outbox, all before a device is served;
- `tasks()` gives the long-lived coroutines to run, named `relay[<sink>].worker` and
  `relay.status`;
- `on_commit` / `wake` are the store writer's listener and hook: they keep the per-sink
  depth counters and wake the workers as soon as something is committed;
- `admit(device, count)` is ingest's back-pressure check, done on the in-memory counters
  before a reading is stored: at `relay.max_outbox` entries of a sink the reading is
  refused (5.03 with Max-Age) or that sink's oldest entries are dropped, by policy;
- `status()` is the live view; `relay.status` writes it to the `relay_status` table every
  `relay.status_interval` seconds for `gateway relay status`, and resynchronises the
  counters from the database (the CLI may replay dead letters meanwhile).
"""

from __future__ import annotations

import asyncio
import random
import sqlite3
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import aiosqlite
import structlog

from gateway.config import GatewayConfig
from gateway.core.model import Device, StoredReading
from gateway.core.outbox import Random
from gateway.errors import GatewayError, OverloadedError
from gateway.relay import store
from gateway.relay.sinks.base import Sink
from gateway.relay.worker import SinkStats, SinkWorker
from gateway.store.writer import StoreWriter

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class SinkSnapshot:
    """The live state of one sink, as `Relay.status()` reports it."""

    sink: str
    connected: bool
    depth: int
    sent: int
    sent_per_s: float
    retries: int
    dead: int
    dropped: int
    last_error: str | None
    last_error_at: float | None


class Relay:
    def __init__(
        self,
        config: GatewayConfig,
        *,
        writer: StoreWriter,
        reader: aiosqlite.Connection,
        sinks: Mapping[str, Sink],
        clock: Callable[[], float] = time.time,
        rng: Random | None = None,
    ) -> None:
        self._config = config.relay
        self._routes = config.routes
        self._writer = writer
        self._reader = reader
        self._clock = clock
        self.sinks = dict(sinks)
        # Without sinks of its own (a worker process other than worker 0), the relay still
        # counts every configured sink's outbox, for back-pressure on what this process
        # stores; the depths are read again from the database every status interval.
        counted = list(self.sinks) or [sink.name for sink in config.sinks]
        self.stats = {name: SinkStats() for name in counted}
        rng = rng or random.Random()
        self.workers = {
            name: SinkWorker(
                sink,
                config=self._config,
                gateway=config.server.name,
                writer=writer,
                stats=self.stats[name],
                clock=clock,
                rng=rng,
            )
            for name, sink in self.sinks.items()
        }
        # (device name, device type) -> {sink: entries one measurement creates}
        self._fanout: dict[tuple[str, str], dict[str, int]] = {}
        self._last_rate: tuple[float, dict[str, int]] | None = None

    # ------------------------------------------------------------ start and tasks

    async def start(self) -> None:
        routes = self._routes

        async def prepare(conn: aiosqlite.Connection) -> int:
            await store.sync_routes(conn, routes)
            return await store.release_all(conn)

        released = await self._writer.transaction(prepare)
        depths = await self.resync()
        unrouted = {sink: n for sink, n in depths.items() if sink not in self.sinks}
        for sink, count in unrouted.items():
            # Kept, not dropped: they go out once a sink of that name is configured again.
            log.warning("relay.unrouted_entries", sink=sink, entries=count)
        log.info(
            "relay.started",
            sinks=sorted(self.sinks),
            routes=len(routes),
            released=released,
            pending={name: stats.depth for name, stats in self.stats.items()},
        )

    def tasks(self) -> list[tuple[str, Coroutine[Any, Any, None]]]:
        if not self.sinks:
            return [("relay.depths", self._status_loop())] if self.stats else []
        named = [(f"relay[{name}].worker", worker.run()) for name, worker in self.workers.items()]
        named.append(("relay.status", self._status_loop()))
        return named

    async def resync(self) -> dict[str, int]:
        """Set the depth counters from the database; returns every sink's depth found."""
        depths = await store.depths(self._reader)
        for name, stats in self.stats.items():
            stats.depth = depths.get(name, 0)
        return depths

    # ------------------------------------------------------------ commit listener and hook

    def _fanout_of(self, device: Device) -> dict[str, int]:
        key = (device.name, device.type)
        fanout = self._fanout.get(key)
        if fanout is None:
            fanout = {}
            for route in self._routes:
                if route.matches(kind="reading", device=device.name, device_type=device.type):
                    fanout[route.sink] = fanout.get(route.sink, 0) + 1
            self._fanout[key] = fanout
        return fanout

    def on_commit(self, readings: Sequence[StoredReading]) -> None:
        if not self.stats:
            return  # no sink counted, nothing to add to
        # A commit holds each request's readings one after another (a SenML pack's are
        # many): each run of one device's readings is counted with one fan-out lookup.
        device: Device | None = None
        run = 0
        for reading in readings:
            if reading.device is not device:
                if device is not None:
                    self._count_entries(device, run)
                device, run = reading.device, 0
            run += 1
        if device is not None:
            self._count_entries(device, run)

    def _count_entries(self, device: Device, readings: int) -> None:
        for sink, per_reading in self._fanout_of(device).items():
            stats = self.stats.get(sink)
            if stats is not None:
                stats.depth += per_reading * readings

    def wake(self) -> None:
        for worker in self.workers.values():
            worker.wake.set()

    # ------------------------------------------------------------ back-pressure

    async def admit(self, device: Device, count: int) -> None:
        """Make room for `count` readings of `device`, or refuse them (OverloadedError)."""
        bound = self._config.max_outbox
        for sink, per_reading in self._fanout_of(device).items():
            stats = self.stats.get(sink)
            if stats is None:
                continue
            if self._config.policy == "refuse":
                if stats.depth >= bound:
                    raise OverloadedError(
                        f"relay to {sink} is backed up, retry later",
                        max_age=self._config.retry_after,
                        device=device.name,
                    )
                continue
            excess = stats.depth + count * per_reading - bound
            if excess > 0:
                await self._drop(sink, excess)

    async def _drop(self, sink: str, count: int) -> None:
        dropped = await self._writer.transaction(lambda c: store.drop_oldest(c, sink, count))
        stats = self.stats[sink]
        stats.dropped += dropped
        stats.depth = max(0, stats.depth - dropped)
        log.warning(
            "relay.dropped",
            sink=sink,
            dropped=dropped,
            total_dropped=stats.dropped,
            max_outbox=self._config.max_outbox,
        )

    # ------------------------------------------------------------ status

    def status(self) -> list[SinkSnapshot]:
        return [
            SinkSnapshot(
                sink=name,
                connected=name in self.sinks and self.sinks[name].connected,
                depth=stats.depth,
                sent=stats.sent,
                sent_per_s=stats.sent_per_s,
                retries=stats.retries,
                dead=stats.dead,
                dropped=stats.dropped,
                last_error=stats.last_error,
                last_error_at=stats.last_error_at,
            )
            for name, stats in sorted(self.stats.items())
        ]

    def _update_rates(self, now: float) -> None:
        sent = {name: stats.sent for name, stats in self.stats.items()}
        if self._last_rate is not None:
            then, before = self._last_rate
            elapsed = now - then
            if elapsed > 0:
                for name, stats in self.stats.items():
                    stats.sent_per_s = round((sent[name] - before.get(name, 0)) / elapsed, 3)
        self._last_rate = (now, sent)

    async def flush_status(self, *, stopping: bool = False) -> None:
        """Write the live figures to `relay_status` (connected = false when stopping)."""
        now = self._clock()
        self._update_rates(now)
        figures = [
            store.LiveFigures(
                sink=s.sink,
                connected=s.connected and not stopping,
                sent=s.sent,
                retries=s.retries,
                dead=s.dead,
                dropped=s.dropped,
                sent_per_s=0.0 if stopping else s.sent_per_s,
                last_error=s.last_error,
                last_error_at=s.last_error_at,
                updated_at=now,
            )
            for s in self.status()
        ]
        names = list(self.sinks)
        await self._writer.transaction(lambda c: store.write_status(c, figures, keep=names))

    async def _status_loop(self) -> None:
        """The depths read again from the database, and with sinks of its own (worker 0)
        the live figures written, every status interval."""
        while True:
            try:
                await self.resync()
                if self.sinks:
                    await self.flush_status()
            except (GatewayError, sqlite3.Error) as exc:
                log.warning("relay.status_failed", error=str(exc))
            await asyncio.sleep(self._config.status_interval)
