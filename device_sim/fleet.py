"""Many simulated devices in one process, on one event loop, each on its own UDP port.

`Fleet` is an async context manager: entering it binds every node's socket and starts the
nodes (their first registrations spread over ``ramp`` seconds); leaving it stops them,
letting requests already on the wire finish for up to ``drain`` seconds. `Fleet.summary`
totals the nodes' statistics at any time.

A seed fixes every device's model trajectory, its schedule phase and its network fate
(each node draws from its own generators, derived from the seed and its name).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import resource
import statistics
import time
from collections import Counter
from collections.abc import Callable
from contextlib import AsyncExitStack
from dataclasses import asdict, dataclass, field
from typing import Any, TextIO

from device_sim.coap import Addr, Impairment, Transmission
from device_sim.codec import PayloadFormat
from device_sim.models import Fridge, StreetLight, Tracker
from device_sim.models.base import DeviceModel
from device_sim.node import Node, NodeConfig

KINDS = ("fridge", "tracker", "streetlight")


@dataclass(frozen=True)
class GroupConfig:
    """One kind of device in the fleet."""

    count: int = 0
    #: Seconds between readings (trackers: the wake interval).
    interval: float = 30.0
    #: fridge: probability an opening leaves the door ajar; streetlight: lamp failure
    #: probability per burning hour; tracker: unused.
    fault_rate: float = 0.0

    def __post_init__(self) -> None:
        if self.count < 0:
            raise ValueError("count must not be negative")
        if self.interval <= 0:
            raise ValueError("interval must be positive")
        if not 0.0 <= self.fault_rate <= 1.0:
            raise ValueError("fault_rate must be within [0, 1]")


@dataclass(frozen=True)
class FleetConfig:
    gateway: Addr = ("127.0.0.1", 5683)
    fridges: GroupConfig = GroupConfig(interval=30.0)
    trackers: GroupConfig = GroupConfig(interval=60.0)
    lights: GroupConfig = GroupConfig(interval=60.0)
    payload_format: PayloadFormat = "cbor"
    #: Registration lifetime; trackers get at least three wake intervals.
    lifetime: int = 300
    seed: int = 0
    impairment: Impairment = field(default_factory=Impairment)
    transmission: Transmission = field(default_factory=Transmission)
    #: Device names are ``{prefix}-{kind}-{n}``.
    prefix: str = "sim"
    bind_host: str = "127.0.0.1"
    #: Model time (epoch seconds) at start; None for the wall clock. Pin it for repeatable runs.
    start_time: float | None = None
    #: First registrations are spread over this many seconds (None: the shortest interval).
    ramp: float | None = None
    #: How long a sleepy tracker listens after each report.
    listen_window: float = 2.0
    #: Directory of OSCORE credentials, one NAME/credentials.json per device (None: plain).
    credentials: str | None = None

    @property
    def total(self) -> int:
        return self.fridges.count + self.trackers.count + self.lights.count


@dataclass(frozen=True)
class Summary:
    devices: int
    devices_up: int
    sent: int
    acknowledged: int
    retransmitted: int
    failed: int
    timeouts: int
    codes: dict[str, int]
    latency_p50_ms: float | None
    latency_p99_ms: float | None
    elapsed_s: float
    readings_per_s: float
    cpu_s: float
    registrations: int
    reregistrations: int
    commands: int
    separate_responses: int
    duplicates_received: int
    in_flight: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def render(self) -> str:
        def ms(v: float | None) -> str:
            return "-" if v is None else f"{v:.1f} ms"

        codes = ", ".join(f"{k}: {v}" for k, v in sorted(self.codes.items())) or "-"
        return "\n".join(
            [
                f"devices up        {self.devices_up}/{self.devices}",
                f"readings sent     {self.sent} ({self.readings_per_s:.1f}/s over "
                f"{self.elapsed_s:.1f} s)",
                f"acknowledged      {self.acknowledged}",
                f"retransmitted     {self.retransmitted}",
                f"failed            {self.failed} ({self.timeouts} timed out, "
                f"{self.in_flight} unfinished)",
                f"codes             {codes}",
                f"latency p50/p99   {ms(self.latency_p50_ms)} / {ms(self.latency_p99_ms)}",
                f"registrations     {self.registrations} ({self.reregistrations} again after 4.04)",
                f"cpu               {self.cpu_s:.1f} s",
            ]
        )

    def progress_line(self) -> str:
        return (
            f"up {self.devices_up}/{self.devices}  sent {self.sent}  ack {self.acknowledged}  "
            f"retx {self.retransmitted}  failed {self.failed}  "
            f"{self.readings_per_s:.0f}/s"
        )


def raise_fd_limit(wanted: int) -> None:
    """Raise the soft open-files limit towards ``wanted`` (one socket per device)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    if target < wanted:
        raise OSError(f"open-files limit {hard} is below the {wanted} sockets this fleet needs")


def _percentile(sorted_values: list[float], q: float) -> float:
    if len(sorted_values) == 1:
        return sorted_values[0]
    return statistics.quantiles(sorted_values, n=100, method="inclusive")[int(q) - 1]


class Fleet:
    """Run the devices ``config`` describes until the ``async with`` block ends."""

    def __init__(
        self,
        config: FleetConfig,
        *,
        progress: TextIO | None = None,
        drain: float = 10.0,
        on_event: Callable[[Node, str, Any], None] | None = None,
    ) -> None:
        if config.total == 0:
            raise ValueError("a fleet needs at least one device")
        self.config = config
        self.nodes: list[Node] = []
        self._progress = progress
        self._drain = drain
        self._on_event = on_event
        self._tasks: dict[Node, asyncio.Task[None]] = {}
        self._stack = AsyncExitStack()
        self._started = 0.0
        self._stopped: float | None = None
        self._cpu0 = 0.0
        self._progress_task: asyncio.Task[None] | None = None

    def _build(self) -> list[Node]:
        cfg = self.config
        epoch0 = time.time() if cfg.start_time is None else cfg.start_time
        ramp = cfg.ramp
        if ramp is None:
            ramp = min(g.interval for g in (cfg.fridges, cfg.trackers, cfg.lights) if g.count)
        phase_rng = random.Random(f"phase:{cfg.seed}")
        nodes = []
        for kind, group in zip(KINDS, (cfg.fridges, cfg.trackers, cfg.lights), strict=True):
            for i in range(group.count):
                name = f"{cfg.prefix}-{kind}-{i + 1}"
                model: DeviceModel[Any]
                lifetime = cfg.lifetime
                if kind == "fridge":
                    model = Fridge(door_fault_rate=group.fault_rate)
                elif kind == "tracker":
                    model = Tracker(wake_interval=group.interval)
                    lifetime = max(lifetime, int(3 * group.interval) + 1)
                else:
                    model = StreetLight(failure_rate=group.fault_rate)
                node_cfg = NodeConfig(
                    name=name,
                    gateway=cfg.gateway,
                    interval=group.interval,
                    lifetime=lifetime,
                    payload_format=cfg.payload_format,
                    sleepy=kind == "tracker",
                    listen_window=cfg.listen_window,
                    phase=phase_rng.uniform(0.0, ramp),
                    bind_host=cfg.bind_host,
                    credentials=cfg.credentials,
                )
                node = Node(
                    node_cfg,
                    model,
                    seed=f"{cfg.seed}:{name}",
                    epoch0=epoch0,
                    impairment=cfg.impairment,
                    transmission=cfg.transmission,
                )
                if self._on_event is not None:
                    node.on_event = _bind(self._on_event, node)
                nodes.append(node)
        return nodes

    async def __aenter__(self) -> Fleet:
        raise_fd_limit(self.config.total + 256)
        try:
            self.nodes = self._build()
            for node in self.nodes:
                await self._stack.enter_async_context(node)
            self._started = asyncio.get_running_loop().time()
            self._cpu0 = time.process_time()
            for node in self.nodes:
                self._tasks[node] = asyncio.create_task(
                    node.run(), name=f"node[{node.config.name}]"
                )
            if self._progress is not None:
                self._progress_task = asyncio.create_task(
                    self._show_progress(self._progress), name="fleet.progress"
                )
        except BaseException:
            await self._stack.aclose()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        try:
            await self.stop()
        finally:
            await self._stack.aclose()

    async def wait_registered(self, within: float) -> int:
        """Wait until every device is registered or ``within`` seconds pass; the count up."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within):
                for node in self.nodes:
                    await node.registered.wait()
        return self.devices_up

    async def wait_acknowledged(self, count: int, within: float) -> int:
        """Wait until ``count`` readings were acknowledged in total; the total reached."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while (acked := sum(n.stats.acknowledged for n in self.nodes)) < count:
            if loop.time() >= deadline:
                break
            await asyncio.sleep(0.05)
        return acked

    @property
    def devices_up(self) -> int:
        return sum(node.registered.is_set() for node in self.nodes)

    async def stop(self) -> None:
        """Stop reporting; requests on the wire get ``drain`` seconds to finish."""
        if self._stopped is not None:
            return
        self._stopped = asyncio.get_running_loop().time()
        for node, task in self._tasks.items():
            if node.stop():
                task.cancel()
        pending = [t for t in self._tasks.values() if not t.done()]
        if pending:
            _, still = await asyncio.wait(pending, timeout=self._drain)
            for task in still:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        for task in self._tasks.values():
            if not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]
        if self._progress_task is not None:
            self._progress_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._progress_task
            if self._progress is not None:
                self._progress.write("\n")

    def summary(self, *, latencies: bool = True) -> Summary:
        """Totals so far; ``latencies=False`` skips the percentiles (cheap, for progress)."""
        loop_now = asyncio.get_running_loop().time()
        elapsed = (self._stopped or loop_now) - self._started
        codes: Counter[str] = Counter()
        samples: list[float] = []
        totals = Counter[str]()
        for node in self.nodes:
            s = node.stats
            codes.update(s.codes)
            if latencies:
                samples.extend(s.latencies)
            totals.update(
                sent=s.sent,
                acknowledged=s.acknowledged,
                retransmitted=s.retransmissions,
                failed=s.failed,
                timeouts=s.timeouts,
                registrations=s.registrations,
                reregistrations=s.reregistrations,
                commands=s.commands,
                separate=s.separate_responses,
            )
            if node.endpoint is not None:
                totals["duplicates"] += node.endpoint.stats.duplicates
        samples.sort()
        p50 = _percentile(samples, 50) * 1000 if samples else None
        p99 = _percentile(samples, 99) * 1000 if samples else None
        in_flight = totals["sent"] - totals["acknowledged"] - totals["failed"]
        return Summary(
            devices=len(self.nodes),
            devices_up=self.devices_up,
            sent=totals["sent"],
            acknowledged=totals["acknowledged"],
            retransmitted=totals["retransmitted"],
            failed=totals["failed"],
            timeouts=totals["timeouts"],
            codes=dict(codes),
            latency_p50_ms=p50,
            latency_p99_ms=p99,
            elapsed_s=elapsed,
            readings_per_s=totals["sent"] / elapsed if elapsed > 0 else 0.0,
            cpu_s=time.process_time() - self._cpu0,
            registrations=totals["registrations"],
            reregistrations=totals["reregistrations"],
            commands=totals["commands"],
            separate_responses=totals["separate"],
            duplicates_received=totals["duplicates"],
            in_flight=in_flight,
        )

    async def _show_progress(self, stream: TextIO) -> None:
        while True:
            await asyncio.sleep(1.0)
            stream.write("\r\x1b[K" + self.summary(latencies=False).progress_line())
            stream.flush()


def _bind(callback: Callable[[Node, str, Any], None], node: Node) -> Callable[[str, Any], None]:
    return lambda kind, detail: callback(node, kind, detail)
