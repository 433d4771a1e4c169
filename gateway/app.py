"""The Gateway: one async context manager that owns every long-lived part.

Entering opens the store (migrating it), starts the writer and the background loops in one
TaskGroup, and finally opens the CoAP socket. Leaving happens in the reverse order with a
deadline: the socket closes first (no new requests), the writer commits what is in flight,
the loops are cancelled and awaited, the database is closed. It never hangs: whatever is
still pending at the deadline is logged.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import gc
import signal
import time
from collections.abc import Callable, Coroutine, Mapping
from contextlib import AsyncExitStack
from types import TracebackType
from typing import Any

import aiosqlite
import structlog

from gateway import eventloop
from gateway.coap.alerts import AlertsResource, ListNamesResource, ListsResource
from gateway.coap.commands import CommandsResource
from gateway.coap.fastlane import ReadingsFastLane
from gateway.coap.observe import DevicesResource, ObservableReadingsResource
from gateway.coap.registration import RegistrationCollection, RegistrationEntries
from gateway.coap.server import (
    CORE_LINKS,
    RULES_LINKS,
    CoapServer,
    GatewaySite,
    PublishedResource,
)
from gateway.coap.steering import SINGLE, WorkerSeat
from gateway.commands.dispatcher import CommandDispatcher
from gateway.config import GatewayConfig
from gateway.ingest import Ingest
from gateway.observe.client import DeviceObserver
from gateway.registry import Registry
from gateway.relay.config import sink_from_config
from gateway.relay.service import Relay
from gateway.relay.sinks.base import Sink
from gateway.rules_service import RulesService
from gateway.security import SecurityLayer
from gateway.store.db import WriteLock, migrate, open_database
from gateway.store.feed import StoreFeed
from gateway.store.retention import RetentionPolicy, prune
from gateway.store.writer import StoreWriter

log = structlog.get_logger(__name__)

SHUTDOWN_DEADLINE = 10.0


class Gateway:
    def __init__(
        self,
        config: GatewayConfig,
        *,
        clock: Callable[[], float] = time.time,
        sinks: Mapping[str, Sink] | None = None,
        seat: WorkerSeat = SINGLE,
    ) -> None:
        self.config = config
        self._clock = clock
        #: Which of `server.workers` processes this is; worker 0 also runs the relay, the
        #: rules, registration expiry and pruning, which must run once per database.
        self.seat = seat
        #: Sinks to use instead of building them from `config.sinks`, by name (tests).
        self._sink_overrides = dict(sinks or {})
        self._relay_tasks: list[asyncio.Task[None]] = []
        self._stack = AsyncExitStack()
        self._loops: list[asyncio.Task[None]] = []
        self._writer_task: asyncio.Task[None] | None = None
        self._tasks: asyncio.TaskGroup | None = None

    # The parts, available once entered.
    db: aiosqlite.Connection
    reader: aiosqlite.Connection
    writer: StoreWriter
    registry: Registry
    relay: Relay
    ingest: Ingest
    rules: RulesService
    site: GatewaySite
    security: SecurityLayer
    coap: CoapServer
    #: None when `server.fast_lane` is off.
    fast_lane: ReadingsFastLane | None
    readings: ObservableReadingsResource
    devices: DevicesResource
    commands: CommandDispatcher
    observer: DeviceObserver
    #: Other workers' commits; None with a single worker.
    feed: StoreFeed | None

    async def __aenter__(self) -> Gateway:
        try:
            await self._start()
        except BaseException:
            await self._stack.aclose()
            raise
        return self

    async def _start(self) -> None:
        config = self.config
        stack = self._stack
        store = functools.partial(
            open_database,
            config.store.path,
            synchronous=config.store.synchronous,
            wal_autocheckpoint=config.store.wal_autocheckpoint,
        )
        self.db = await store()
        stack.push_async_callback(self.db.close)
        await migrate(self.db)
        self.reader = await store()
        stack.push_async_callback(self.reader.close)

        self.writer = StoreWriter(
            self.db, max_batch=config.store.max_batch, max_pending=config.store.max_pending
        )
        if self.seat.shared:
            self.writer.own_reading_ids = collections.deque()
            self.writer.write_lock = WriteLock(config.store.path)
            stack.callback(self.writer.write_lock.close)
        self.registry = Registry(self.writer, clock=self._clock)
        await self.registry.load(self.db)
        # Entered before the TaskGroup, so they are closed only after every worker ended.
        sinks: dict[str, Sink] = {}
        for sink_config in config.sinks if self.seat.primary else ():
            sink = self._sink_overrides.get(sink_config.name) or sink_from_config(sink_config)
            sinks[sink_config.name] = await stack.enter_async_context(sink)
        self.relay = Relay(
            config, writer=self.writer, reader=self.reader, sinks=sinks, clock=self._clock
        )
        self.writer.add_commit_listener(self.relay.on_commit)
        self.writer.add_commit_hook(self.relay.wake)
        self.ingest = Ingest(
            config.ingest,
            registry=self.registry,
            writer=self.writer,
            clock=self._clock,
            admit=self.relay.admit if config.sinks else None,
            # Another worker may have registered the device a moment ago.
            lookup=self.reader if self.seat.shared else None,
        )

        self._tasks = await stack.enter_async_context(asyncio.TaskGroup())
        stack.push_async_callback(self._stop_tasks)
        self._writer_task = self._tasks.create_task(self.writer.run(), name="store.writer")
        retention = RetentionPolicy(
            max_age_seconds=config.store.retention_days * 86_400,
            max_rows=config.store.retention_max_rows,
        )
        if self.seat.primary:
            self._spawn(self._expiry_loop(), "registry.expiry")
            if retention.enabled:
                self._spawn(self._retention_loop(retention), "store.retention")
        await self._start_rules()

        if self.seat.primary:
            await self.relay.start()
        else:
            await self.relay.resync()  # counts only: worker 0 sends
        for name, coroutine in self.relay.tasks():
            self._relay_tasks.append(self._tasks.create_task(coroutine, name=name))
        # Runs before the writer closes: cancelled workers release their entries through it.
        stack.push_async_callback(self._stop_relay)

        self._build_observe_and_commands()
        self.site = self._build_site()
        self.security = await stack.enter_async_context(
            SecurityLayer(
                config.security,
                reader=self.reader,
                registry=self.registry,
                store_path=config.store.path,
            )
        )
        root = self.security.wrap(self.site.site)
        guard = self.security.guard
        assert guard is not None  # wrap() made it
        self.fast_lane = (
            ReadingsFastLane(guard.render_plain, self.readings) if config.server.fast_lane else None
        )
        self.coap = await stack.enter_async_context(
            CoapServer(
                self.site,
                bind=config.server.bind,
                port=config.server.port,
                transport=config.server.transport,
                root=root,
                fast_lane=self.fast_lane,
                sock=self.seat.sock,
                **self.security.server_options(),
            )
        )
        self._start_observe_and_commands()
        await self._start_feed()

    async def _start_feed(self) -> None:
        """With several workers: take in what the others commit (see gateway/store/feed.py)."""
        self.feed = None
        if not self.seat.shared:
            return
        assert self.writer.own_reading_ids is not None
        feed = self.feed = StoreFeed(
            self.reader,
            self.registry,
            self.writer.own_reading_ids,
            interval=self.config.server.feed_interval,
        )
        feed.add_reading_listener(self.readings.on_commit, wanted=self.readings.observed)
        if self.config.sinks:
            # Every worker counts the outbox all of them fill, for back-pressure.
            feed.add_reading_listener(self.relay.on_commit)
        if self.seat.primary:
            if self.config.sinks:
                feed.add_reading_listener(lambda readings: self.relay.wake())
            if self.config.rules:
                feed.add_reading_listener(self.rules.on_commit)
        else:
            # Worker 0 decides alerts and lists; the others notify their observers.
            feed.add_change_listener("alerts", self._alerts.updated_state)
            feed.add_change_listener("lists", self._list_names.updated_state)
            feed.add_change_listener("lists", self._lists.trigger_all)
        await feed.start()
        self._spawn(feed.run(), "store.feed")

    def _build_observe_and_commands(self) -> None:
        def context() -> Any:
            return self.coap.context

        self.readings = ObservableReadingsResource(self.ingest, self.reader, self.config.observe)
        self.devices = DevicesResource(self.reader, self.config.observe)
        self.commands = CommandDispatcher(
            self.config.commands,
            writer=self.writer,
            reader=self.reader,
            context=context,
            clock=self._clock,
            reaches=self.seat.owns,
        )
        self.observer = DeviceObserver(
            self.config.observe,
            ingest=self.ingest,
            reader=self.reader,
            context=context,
            reaches=self.seat.owns,
        )
        self.writer.add_commit_listener(self.readings.on_commit)
        self.writer.add_commit_listener(self.commands.on_commit)
        for listener in (
            self.devices.on_registry_event,
            self.readings.on_registry_event,
            self.commands.on_registry_event,
            self.observer.on_registry_event,
        ):
            self.registry.add_listener(listener)
        self.readings.address_listeners += [self.observer.on_address, self.commands.on_address]

    def _start_observe_and_commands(self) -> None:
        """Started once the CoAP endpoint is up (they send from it); stopped before it closes."""
        assert self._tasks is not None
        clients = [
            self._tasks.create_task(self.readings.fanout.run(), name="observe.readings"),
            self._tasks.create_task(self.devices.fanout.run(), name="observe.devices"),
            self._tasks.create_task(self.commands.run(), name="commands.dispatcher"),
            self._tasks.create_task(self.observer.run(), name="observe.client"),
        ]

        async def stop() -> None:
            for task in clients:
                task.cancel()
            await asyncio.wait(clients, timeout=SHUTDOWN_DEADLINE)

        self._stack.push_async_callback(stop)

    def _spawn(self, coroutine: Coroutine[Any, Any, None], name: str) -> None:
        assert self._tasks is not None
        self._loops.append(self._tasks.create_task(coroutine, name=name))

    def _build_site(self) -> GatewaySite:
        site = GatewaySite()
        rd, readings = CORE_LINKS
        site.add(("rd",), RegistrationCollection(self.registry, self.config.registry), rd)
        site.add(("rd",), RegistrationEntries(self.registry, self.config.registry))
        site.add(("r",), self.readings, readings)
        site.add(
            ("devices",),
            self.devices,
            PublishedResource(("devices",), {"rt": "coapgw.devices", "ct": "60 50", "obs": None}),
        )
        site.add(("cmd",), CommandsResource(self.commands, self.reader))
        alerts, lists = RULES_LINKS
        self._alerts = AlertsResource(self.reader)
        self._list_names = ListNamesResource(self.reader)
        self._lists = ListsResource(self.reader)
        for listener in (self._alerts, self._list_names, self._lists):
            self.rules.add_listener(listener.on_decisions)
        site.add(("alerts",), self._alerts, alerts)
        site.add(("lists",), self._list_names, lists)
        site.add(("lists",), self._lists)
        return site

    async def _start_rules(self) -> None:
        self.rules = RulesService(
            self.config.rules, writer=self.writer, registry=self.registry, clock=self._clock
        )
        if not self.seat.primary:
            return  # worker 0 restores and runs the rules
        await self.rules.start()
        if self.config.rules:
            self.writer.add_commit_listener(self.rules.on_commit)
            self._spawn(self.rules.run_evaluator(), "rules.evaluator")
            self._spawn(self.rules.run_ticker(), "rules.ticker")

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._stack.aclose()

    async def _stop_relay(self) -> None:
        for task in self._relay_tasks:
            task.cancel()
        if self._relay_tasks:
            _, pending = await asyncio.wait(self._relay_tasks, timeout=SHUTDOWN_DEADLINE)
            if pending:
                log.error("gateway.shutdown_timeout", relay_tasks=[t.get_name() for t in pending])
        if not self.seat.primary:
            return  # worker 0 reports the relay's status
        try:
            async with asyncio.timeout(SHUTDOWN_DEADLINE):
                await self.relay.flush_status(stopping=True)
        except Exception as exc:
            log.warning("relay.status_failed", error=str(exc))

    async def _stop_tasks(self) -> None:
        try:
            async with asyncio.timeout(SHUTDOWN_DEADLINE):
                await self.writer.close()
        except TimeoutError:
            log.error("gateway.shutdown_timeout", pending_writes=self.writer.pending)
            if self._writer_task is not None:
                self._writer_task.cancel()
        for task in self._loops:
            task.cancel()

    async def _expiry_loop(self) -> None:
        interval = self.config.registry.expiry_interval
        while True:
            await asyncio.sleep(interval)
            try:
                await self.registry.expire()
            except Exception:
                log.exception("registry.expiry_failed")

    async def _retention_loop(self, policy: RetentionPolicy) -> None:
        while True:
            try:
                deleted = await prune(self.writer, policy, now=self._clock())
                if deleted:
                    log.info("store.pruned", readings=deleted)
            except Exception:
                log.exception("store.prune_failed")
            await asyncio.sleep(self.config.store.prune_interval)


#: Allocations between young-generation collections (CPython's default is 700). A young
#: collection walks what survived since the last one, so its pause grows with this: at
#: 5,400 readings/s with the relay, 50,000 gave pauses of 6-16 ms about three times a
#: second, which stacked with slow commits into 40-90 ms stalls; 20,000 keeps them under
#: 5 ms for the same throughput (bench/, alternated runs).
GC_YOUNG_THRESHOLD = 20_000
#: Seconds between freezes of what survived so far (see `gc_freezer`).
GC_FREEZE_INTERVAL = 1.0
#: Seconds between full collections of everything, frozen objects included.
GC_FULL_INTERVAL = 600.0


def tune_gc() -> None:
    """Make the cyclic garbage collector cheap for a server that allocates per packet.

    Every request allocates a few dozen short-lived objects and aiocoap keeps each answer
    for its deduplication window (EXCHANGE_LIFETIME, about 4 minutes), so at the default
    thresholds the collector runs hundreds of times a second and its full collections walk
    every cached answer: measured with bench/, that cost a quarter of the throughput and put
    100-300 ms pauses into the p99 latency. Objects made at start-up are frozen (never
    scanned again) and young collections happen every `GC_YOUNG_THRESHOLD` allocations
    instead of 700; reference counting still frees everything that is not in a cycle at
    once.
    """
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, old)


async def gc_freezer(
    *, interval: float = GC_FREEZE_INTERVAL, full_interval: float = GC_FULL_INTERVAL
) -> None:
    """Keep full collections short: freeze the survivors every second.

    What survives a second is mostly aiocoap's cache of recent answers, freed by reference
    counting when it expires; frozen, a full collection no longer walks it, so each pause
    covers about a second's survivors (p99 at 80 % load: 94 -> 15 ms in bench/). Cyclic
    garbage that got frozen is found by a full collection of everything every
    `full_interval` seconds, one longer pause that is logged.
    """
    loop = asyncio.get_running_loop()
    last_full = loop.time()
    while True:
        await asyncio.sleep(interval)
        if loop.time() - last_full >= full_interval:
            started = loop.time()
            gc.unfreeze()
            found = gc.collect()
            last_full = loop.time()
            log.info("gc.collected", unreachable=found, seconds=round(last_full - started, 3))
        gc.freeze()


async def serve(
    config: GatewayConfig,
    *,
    ready: Callable[[Gateway], None] | None = None,
    seat: WorkerSeat = SINGLE,
) -> None:
    """Run the gateway until SIGINT or SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    if seat.shared:
        structlog.contextvars.bind_contextvars(worker=seat.index)
    try:
        async with Gateway(config, seat=seat) as gateway:
            log.info(
                "gateway.started",
                bind=config.server.bind,
                port=seat.sock.getsockname()[1] if seat.sock else config.server.port,
                db=config.store.path,
                devices=len(gateway.registry),
                event_loop=eventloop.running(),
            )
            tune_gc()
            freezer = asyncio.create_task(gc_freezer(), name="gc.freezer")
            if ready is not None:
                ready(gateway)
            await stop.wait()
            freezer.cancel()
            log.info("gateway.stopping")
        log.info("gateway.stopped", readings=gateway.writer.stats.readings)
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
