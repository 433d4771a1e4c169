"""`make bench`: the gateway's figures, each beside a baseline measured in the same run.

The load generator (and the MQTT subscriber) run in this process, pinned to one CPU; every
server under test (the gateway, a bare aiocoap server, a minimal asyncio responder, the raw
broker clients) runs in its own process pinned to another, one after the other. Brokers
(mosquitto, nats-server) are private instances on free ports. Absolute numbers move with
whatever else the machine does; the ratios against baselines taken in the same run are what
to compare.

At the end every gateway database is checked: every reading acknowledged with 2.04 must be
stored. The run exits 1 if one is missing.

Environment: BENCH_QUICK=1 for a short smoke run; BENCH_JSON=path to also write the figures
as JSON; BENCH_DURATION seconds per measurement; BENCH_BACKLOG outbox entries for the relay
catch-up figure (default 20,000; the issue's figure is 100,000); BENCH_ONLY=4,5 to run only
those figures (a ratio whose baseline belongs to a figure not run is left out).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import resource
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loadgen import (
    CborReadings,
    FanoutStats,
    Limited,
    LoadGenerator,
    Observations,
    Registrations,
    SenmlPacks,
    Stats,
    device_names,
    fanout,
)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

QUICK = os.environ.get("BENCH_QUICK", "") not in ("", "0")
DURATION = float(os.environ.get("BENCH_DURATION", 2.0 if QUICK else 8.0))
WARMUP = 0.5 if QUICK else 2.0
DEVICES = 200  # sockets, one per device, for the ingest figures
#: Figure 1 again with a wider fleet: at 6,000 readings/s each of 200 devices sends every
#: 33 ms, so any stall that long leaves every device waiting (CoAP's NSTART 1) and the
#: sustained probe counts skipped sends; 1,000 devices send every 170 ms.
WIDE_DEVICES = 1_000
WINDOW = 32  # requests in flight in closed-loop runs
SCALE_DEVICES = 1_000 if QUICK else 10_000  # figure 4: devices, each observed once
SCALE_TARGET_MB = 300.0  # figure 4's target: 10,000 devices under 300 MB RSS
FANOUT_OBSERVERS = 1_000  # figure 5: observers of one device, one socket each
# Seconds a fan-out round waits for a notification that may be lost: long enough for a
# confirmable one to be retransmitted (ACK_TIMEOUT 2 s x ACK_RANDOM_FACTOR 1.5, RFC 7252).
FANOUT_WAIT = 5.0
FANOUT_MIN_ROUNDS = 3  # measured rounds at least, however slow the server's rounds are
#: Figure 5 at a fixed posting rate: readings/s one device posts while observed 1,000 times
#: (the slower fits within the fan-out, the faster outruns it), and how long to wait after
#: the last post for notifications to stop arriving.
FANOUT_RATES = (5.0, 50.0, 200.0)
FANOUT_QUIET = 0.5
FANOUT_DRAIN = 15.0
BACKLOG = int(os.environ.get("BENCH_BACKLOG", 2_000 if QUICK else 20_000))
DRAIN_TIMEOUT = 30.0 if QUICK else 90.0
ONLY = frozenset(
    item.strip() for item in os.environ.get("BENCH_ONLY", "").split(",") if item.strip()
)
MOSQUITTO = "/usr/sbin/mosquitto"
NATS_SERVER = "/usr/sbin/nats-server"


def wanted(*figures: str) -> bool:
    """Whether any of `figures` is to run (all are unless BENCH_ONLY names some)."""
    return not ONLY or not ONLY.isdisjoint(figures)


def cpus() -> tuple[int | None, int | None]:
    """(server CPU, load generator CPU), or Nones where affinity is not available."""
    if not hasattr(os, "sched_getaffinity"):
        return None, None
    available = sorted(os.sched_getaffinity(0))
    if len(available) < 2:
        return None, None
    return available[0], available[1]


SERVER_CPU, LOADGEN_CPU = cpus()


def free_port(kind: int = socket.SOCK_DGRAM) -> int:
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def udp_buffer_drops() -> int:
    """Datagrams the kernel dropped because a socket's receive buffer was full, counted
    over the whole machine since boot (Linux: /proc/net/snmp RcvbufErrors); -1 if unknown."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        with open("/proc/net/snmp") as fh:
            rows = [line.split() for line in fh if line.startswith("Udp:")]
        return int(rows[1][rows[0].index("RcvbufErrors")])
    return -1


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_per_answer(pid: int, cpu_before: float, gen: LoadGenerator) -> float:
    """Seconds of the server's CPU (all its threads) since `cpu_before` per request it
    answered 2.04: on a server pinned to one CPU, how many it could answer per second of
    that CPU. The machine's other load moves this far less than it moves a rate, which also
    counts the time the server was waiting for the CPU."""
    return (cpu_seconds(pid) - cpu_before) / max(1, len(gen.acknowledged))


def machine() -> dict[str, Any]:
    model = platform.processor() or "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "server_cpu": SERVER_CPU,
        "loadgen_cpu": LOADGEN_CPU,
    }


async def ping(port: int, *, within: float = 15.0) -> None:
    """Wait until something answers a CoAP ping (empty CON) on the port."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)
        sock.connect(("127.0.0.1", port))
        while loop.time() < deadline:
            with contextlib.suppress(OSError):
                sock.send(b"\x40\x00\x12\x34")
            try:
                await asyncio.wait_for(loop.sock_recv(sock, 64), 0.2)
                return
            except (TimeoutError, OSError):
                await asyncio.sleep(0.05)
    raise RuntimeError(f"nothing answers on port {port}")


@dataclass
class Server:
    name: str
    port: int
    process: subprocess.Popen[bytes]
    db: Path | None = None

    @property
    def pid(self) -> int:
        return self.process.pid


def _pinned() -> None:
    if SERVER_CPU is not None:
        os.sched_setaffinity(0, {SERVER_CPU})


def _on_loadgen_cpu() -> None:
    if LOADGEN_CPU is not None:
        os.sched_setaffinity(0, {LOADGEN_CPU})


def spawn(argv: Sequence[str], log: Path, *, pinned: bool = True) -> subprocess.Popen[bytes]:
    """Start a process (on the server CPU when `pinned`), its output going to `log`."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with open(log, "ab") as logfile:
        return subprocess.Popen(
            list(argv),
            cwd=REPO,
            env=env,
            stdout=logfile,
            stderr=logfile,
            preexec_fn=_pinned if pinned else None,
        )


def stop(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@contextlib.asynccontextmanager
async def running(
    name: str, argv: Sequence[str], port: int, log: Path, db: Path | None = None
) -> AsyncIterator[Server]:
    process = spawn(argv, log)
    try:
        await ping(port)
        yield Server(name, port, process, db)
    finally:
        stop(process)


def baseline(kind: str, workdir: Path) -> Any:
    port = free_port()
    argv = [sys.executable, str(REPO / "bench" / "baselines.py"), kind, str(port)]
    return running(kind, argv, port, workdir / f"{kind}.log")


@dataclass
class Broker:
    kind: str  # "mqtt" or "nats"
    port: int
    workdir: Path
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        if self.kind == "mqtt":
            conf = self.workdir / f"mosquitto-{self.port}.conf"
            conf.write_text(
                f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                "max_queued_messages 1000000\n"
            )
            argv = [MOSQUITTO, "-c", str(conf)]
        else:
            store = self.workdir / f"jetstream-{self.port}"
            argv = [NATS_SERVER, "-js", "-a", "127.0.0.1", "-p", str(self.port), "-sd", str(store)]
        self.process = spawn(argv, self.workdir / f"{self.kind}-{self.port}.log", pinned=False)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5),
            ):
                return
            time.sleep(0.02)
        raise RuntimeError(f"{argv[0]} does not listen on {self.port}")

    def stop(self) -> None:
        if self.process is not None:
            stop(self.process)
            self.process = None

    @property
    def url(self) -> str:
        return f"{self.kind}://127.0.0.1:{self.port}"


@contextlib.contextmanager
def broker(kind: str, workdir: Path, *, start: bool = True) -> Iterator[Broker]:
    instance = Broker(kind, free_port(socket.SOCK_STREAM), workdir)
    if start:
        instance.start()
    try:
        yield instance
    finally:
        instance.stop()


def sink_toml(sink: Broker) -> list[str]:
    lines = ["[[sinks]]", f'name = "{sink.kind}"', f'type = "{sink.kind}"', f'url = "{sink.url}"']
    if sink.kind == "mqtt":
        lines += ["qos = 1"]
    else:
        lines += ['stream = "BENCH"', "create_stream = true"]
    lines += ["[[routes]]", f'sink = "{sink.kind}"', 'encoding = "cbor"']
    return lines


def gateway_argv(
    workdir: Path,
    tag: str,
    *,
    sink: Broker | None = None,
    level: str = "warning",
    observers: int | None = None,
) -> tuple[list[str], int, Path]:
    """Command line, port and database of a gateway with its own config file."""
    port = free_port()
    db = workdir / f"{tag}.db"
    lines = ["[server]", 'bind = "127.0.0.1"', f"port = {port}"]
    lines += ["[store]", f"path = {json.dumps(str(db))}"]
    lines += ["[logging]", f'level = "{level}"', 'format = "json"']
    # A benchmark device sends far more often than a real one: raise the per-source and
    # per-device rate limits above the load (they are still checked on every request).
    lines += ["[security]", "source_rate = 1000.0", "source_burst = 2000.0"]
    lines += ["device_rate = 1000.0", "device_burst = 2000.0"]
    if observers is not None:
        # Figures 4 and 5 hold more observations than the default bound (1,000 in all);
        # each observer is its own socket, so the per-peer bound (16) stays.
        lines += [f"max_observers = {observers}"]
    if sink is not None:
        # Fast retries, no give-up: the catch-up figure starts its broker after filling the
        # outbox and wants the drain to start when the broker does.
        lines += ["[relay]", f"max_outbox = {max(100_000, 4 * BACKLOG)}"]
        lines += ["[relay.retry]", "base_delay = 0.05", "max_delay = 0.5"]
        lines += ["max_attempts = 0", "max_age = 0"]
        lines += sink_toml(sink)
    config = workdir / f"{tag}.toml"
    config.write_text("\n".join(lines) + "\n")
    return [sys.executable, "-m", "gateway", "serve", "--config", str(config)], port, db


def gateway(
    workdir: Path,
    tag: str,
    *,
    sink: Broker | None = None,
    level: str = "warning",
    observers: int | None = None,
) -> Any:
    argv, port, db = gateway_argv(workdir, tag, sink=sink, level=level, observers=observers)
    return running("gateway", argv, port, workdir / f"{tag}.log", db)


async def wait_for_line(log: Path, text: str, count: int, within: float = 15.0) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if log.exists() and log.read_text(errors="replace").count(text) >= count:
            return
        await asyncio.sleep(0.05)
    raise RuntimeError(f"{log}: {text!r} did not appear {count} times")


def outbox_depth(db: Path) -> int:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        return int(conn.execute("SELECT count(*) FROM relay_queue").fetchone()[0])
    finally:
        conn.close()


async def wait_drained(db: Path, within: float) -> float | None:
    """Seconds until the outbox is empty, or None if it is not within `within` seconds."""
    started = time.monotonic()
    while time.monotonic() - started < within:
        if outbox_depth(db) == 0:
            return time.monotonic() - started
        await asyncio.sleep(0.05)
    return None


async def sustained_rate(
    server: Any, names: list[str], estimate: float, acked: Any
) -> tuple[float, list[str]]:
    """The highest open-loop rate at which the relay keeps up with ingest.

    A closed loop measures how fast readings are acknowledged, but with the relay on the
    same core the outbox grows meanwhile: that rate cannot be sustained (the outbox bound
    would turn it into 5.03s). Here each probe offers `rate` for the measurement time and
    counts as kept up when every request was answered 2.04 (none lost), at least 95 % of the
    offered rate was answered, at most 1 % of the sends were skipped (every device waiting
    for its answer), and the backlog at its end is under half a second of readings; the
    first probe is the estimate, each further one 15 % lower. Returns the rate and notes.
    """
    rate, notes = estimate, []
    for probe in range(4):
        seq0 = 10**7 * (probe + 1)
        workload = CborReadings(names, start_seq=seq0)
        stats, gen = await opened(server.port, workload, rate, sockets=len(names))
        acked(server.db, "cbor", gen)
        behind = outbox_depth(server.db)
        await wait_drained(server.db, DRAIN_TIMEOUT)
        # Each device has one request in flight at most (CoAP's NSTART 1): a latency blip
        # can leave every device waiting, and a send is skipped. Up to 1 % of the sends may
        # be; the rate answered must still be 95 % of the offered.
        offered = rate * stats.duration
        answered = (
            set(stats.codes) == {"2.04"} and not stats.lost and stats.skipped <= 0.01 * offered
        )
        if answered and stats.rate >= 0.95 * rate and behind <= max(50, 0.5 * rate):
            return stats.rate, notes
        notes.append(
            f"offered {rate:.0f}/s: answered {stats.rate:.0f}/s, codes {dict(stats.codes)},"
            f" lost {stats.lost}, {stats.skipped} not sent (every device waiting), p99.9"
            f" {stats.percentile(99.9):.0f} ms, {behind} entries behind at the end; lower"
        )
        rate *= 0.85
    notes.append(f"no probe kept up; reporting the last one ({rate / 0.85:.0f}/s)")
    return rate / 0.85, notes


async def sustained_wide(
    server: Any, closed_rate: float, bare_rate: float, report: Report, acked: Any
) -> None:
    """Figure 1's sustained rate with `WIDE_DEVICES` devices, after figure 3."""
    wide = device_names(WIDE_DEVICES, "w")
    enough_files(WIDE_DEVICES)
    async with LoadGenerator(("127.0.0.1", server.port), sockets=len(wide)) as gen:
        await gen.run(Registrations(wide), window=WINDOW)
    rate, notes = await sustained_rate(server, wide, closed_rate, acked)
    for text in notes:
        report.note(f"sustained rate, {WIDE_DEVICES:,} devices: {text}")
    report.add(
        "1",
        f"the same, sustained, {WIDE_DEVICES:,} devices",
        rate,
        "readings/s",
        "bare aiocoap Site",
        bare_rate,
    )


@dataclass
class Report:
    rows: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(
        self,
        figure: str,
        what: str,
        value: float,
        unit: str,
        base: str,
        base_value: float,
        **extra: Any,
    ) -> None:
        ratio = value / base_value if base_value else float("nan")
        row = {
            "figure": figure,
            "what": what,
            "value": value,
            "unit": unit,
            "baseline": base,
            "baseline_value": base_value,
            "ratio": ratio,
            **extra,
        }
        self.rows.append(row)
        print(
            f"  {figure:<3} {what:<46} {value:>10.1f} {unit:<11}"
            f" vs {base:<30} {base_value:>10.1f}  = {ratio:5.2f}x",
            flush=True,
        )

    def note(self, text: str) -> None:
        self.notes.append(text)
        print(f"  note: {text}", flush=True)


def show(label: str, stats: Stats) -> None:
    print(f"    {label:<30} {stats.summary()}", flush=True)


async def closed(
    port: int, workload: Any, names: list[str], *, register: bool = False
) -> tuple[Stats, LoadGenerator]:
    async with LoadGenerator(("127.0.0.1", port), sockets=len(names)) as gen:
        if register:
            await gen.run(Registrations(names), window=WINDOW)
        stats = await gen.run(workload, duration=DURATION, window=WINDOW, warmup=WARMUP)
    return stats, gen


async def opened(
    port: int, workload: Any, rate: float, *, sockets: int = DEVICES
) -> tuple[Stats, LoadGenerator]:
    async with LoadGenerator(("127.0.0.1", port), sockets=sockets) as gen:
        gen.sent_at = {}
        stats = await gen.run(workload, duration=DURATION, rate=rate, window=1024, warmup=WARMUP)
    return stats, gen


async def loaded_at(
    port: int, names: list[str], share: float, sustained: float
) -> tuple[Stats, LoadGenerator]:
    """Figure 3: an open loop at `share` of the sustained rate, its readings numbered apart
    from every other run's on the same gateway."""
    first_seq = 10**6 * int(share * 10)
    return await opened(port, CborReadings(names, start_seq=first_seq), share * sustained)


class Subscriber:
    """An MQTT subscriber noting when each relayed (device, seq) first arrives."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.arrived: dict[tuple[str, int], float] = {}
        self.messages = 0
        self.ready = asyncio.Event()

    async def run(self) -> None:
        import logging

        import aiomqtt

        from gateway.relay.envelope import Encoding, decode

        logging.getLogger("mqtt").setLevel(logging.ERROR)
        async with aiomqtt.Client("127.0.0.1", self.port) as client:
            await client.subscribe("coap-gw/#", qos=1)
            self.ready.set()
            async for message in client.messages:
                now = time.perf_counter()
                self.messages += 1
                relayed = decode(bytes(message.payload), Encoding.CBOR)  # type: ignore[arg-type]
                seq = relayed.extra.get("seq")
                if seq is not None:
                    self.arrived.setdefault((relayed.device, int(seq)), now)

    def latencies(self, sent_at: dict[Any, float]) -> list[float]:
        return [self.arrived[key] - sent for key, sent in sent_at.items() if key in self.arrived]


def percentile_ms(values: list[float], p: float) -> float:
    return Stats(latencies=values).percentile(p)


def enough_files(sockets: int) -> None:
    """Raise the open-files limit to what `sockets` load generator sockets need."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = sockets + 1_000
    if soft != resource.RLIM_INFINITY and soft < need:
        limit = need if hard == resource.RLIM_INFINITY else min(need, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))


@dataclass
class Scale:
    """Figure 4 on one server: RSS (MB) idle, with the devices, with their observations."""

    idle: float
    registered: float
    observed: float
    registrations: Stats
    observations: Stats

    def per_device_kb(self, rss: float) -> float:
        return (rss - self.idle) * 1024 / SCALE_DEVICES


async def scale(server: Server, prefix: str) -> Scale:
    """Register SCALE_DEVICES devices, each from its own socket, then observe each one's
    `/r/NAME` from that socket; the server's RSS before, between and after."""
    names = device_names(SCALE_DEVICES, prefix=prefix)
    idle = rss_mb(server.pid)
    async with LoadGenerator(("127.0.0.1", server.port), sockets=SCALE_DEVICES) as gen:
        registrations = await gen.run(Registrations(names), window=WINDOW)
        registered = rss_mb(server.pid)
        observations = await gen.run(Observations(names), window=WINDOW)
        observed = rss_mb(server.pid)  # while every observation is live
    return Scale(idle, registered, observed, registrations, observations)


@contextlib.asynccontextmanager
async def observed_device(
    server: Server, name: str
) -> AsyncIterator[tuple[LoadGenerator, LoadGenerator]]:
    """A registered device (one socket) and FANOUT_OBSERVERS sockets observing its
    `/r/NAME`, every observation started; figure 5's set-up."""
    target = ("127.0.0.1", server.port)
    async with (
        LoadGenerator(target, sockets=1) as device,
        LoadGenerator(target, sockets=FANOUT_OBSERVERS) as observers,
    ):
        registered = await device.run(Registrations([name]), window=1)
        if registered.codes.get("2.01") != 1:
            raise RuntimeError(f"{server.name}: fan-out device not registered: {registered.codes}")
        started = await observers.run(Observations([name] * FANOUT_OBSERVERS), window=WINDOW)
        if started.observations != FANOUT_OBSERVERS:
            raise RuntimeError(
                f"{server.name}: {started.observations} of {FANOUT_OBSERVERS} observations"
                f" started: {started.codes}"
            )
        yield device, observers


async def fan_out(server: Server) -> tuple[FanoutStats, LoadGenerator, int]:
    """FANOUT_OBSERVERS sockets observe one device's `/r/NAME`; the device posts readings
    one after another (figure 5). Returns the figures, the device's generator and the
    datagrams dropped meanwhile for full receive buffers (machine-wide)."""
    name = "fan-00000"
    async with observed_device(server, name) as (device, observers):
        drops = udp_buffer_drops()
        stats = await fanout(
            device,
            observers,
            CborReadings([name]),
            duration=DURATION,
            warmup=WARMUP,
            wait=FANOUT_WAIT,
            min_rounds=FANOUT_MIN_ROUNDS,
        )
        drops = udp_buffer_drops() - drops if drops >= 0 else -1
    return stats, device, drops


@dataclass
class RateFanout:
    """One device posting at a fixed rate while FANOUT_OBSERVERS observe it."""

    offered: float  # readings/s the device posts
    posts: Stats  # its requests, answered or not
    observers: int  # observations live when it started
    notifications: int  # distinct notifications received by all observers together
    seconds: float  # from the first post to the last notification

    @property
    def share(self) -> float:
        """Of the readings answered 2.04, the share each observer was notified of (1.0: all;
        less: notified of the latest only, some in between skipped)."""
        readings = self.posts.codes["2.04"]
        return self.notifications / (readings * self.observers) if readings else 0.0

    @property
    def notification_rate(self) -> float:
        return self.notifications / self.seconds if self.seconds else 0.0


async def fan_out_at(server: Server, rate: float) -> tuple[RateFanout, LoadGenerator]:
    """FANOUT_OBSERVERS sockets observe one device's `/r/NAME` while it posts `rate`
    readings/s, open loop, for the measurement time; then wait until no notification has
    come for FANOUT_QUIET seconds (at most FANOUT_DRAIN)."""
    name = f"fanrate-{rate:.0f}"
    async with observed_device(server, name) as (device, observers):
        watching = observers.notifications.observing
        before = observers.notifications.received
        begin = time.perf_counter()
        posts = await device.run(CborReadings([name]), duration=DURATION, rate=rate, window=64)
        seen, last = observers.notifications.received, time.perf_counter()
        give_up = last + FANOUT_DRAIN
        while time.perf_counter() - last < FANOUT_QUIET and time.perf_counter() < give_up:
            await asyncio.sleep(0.05)  # polling a counter; a benchmark, not a test
            if observers.notifications.received != seen:
                seen, last = observers.notifications.received, time.perf_counter()
    return RateFanout(rate, posts, watching, seen - before, last - begin), device


def show_fanout(label: str, stats: FanoutStats, drops: int) -> None:
    rounds = ", ".join(f"{seconds * 1000:.0f}" for seconds in stats.latencies)
    print(f"    {label:<30} {stats.summary()}", flush=True)
    print(f"    {'':<30} receive-buffer drops {drops}; rounds (ms): {rounds}", flush=True)


async def main() -> int:
    if LOADGEN_CPU is not None:
        os.sched_setaffinity(0, {LOADGEN_CPU})
    info = machine()
    print(
        f"machine: {info['cpus']} CPUs, {info['cpu_model']}, Python {info['python']};"
        f" servers on CPU {SERVER_CPU}, load generator on CPU {LOADGEN_CPU}"
    )
    print(
        f"each measurement: {WARMUP} s warm-up + {DURATION} s; {DEVICES} devices (sockets),"
        f" window {WINDOW}; other processes on this machine make absolute numbers noisy:"
        " compare the ratios"
    )
    report = Report()
    acknowledged: list[tuple[Path, str, Any]] = []  # (db, "cbor" | "senml", key)
    names = device_names(DEVICES)
    started = time.monotonic()
    stored: Stats | None = None  # figure 1, store only: a baseline for figures 4 and 7

    def acked(db: Path | None, kind: str, gen: LoadGenerator, size: int = 1) -> None:
        assert db is not None
        acknowledged.extend(
            (db, kind, (key, size)) for key in gen.acknowledged if isinstance(key, tuple)
        )

    with tempfile.TemporaryDirectory(prefix="gateway-bench-") as tmp:
        workdir = Path(tmp)

        # --- 0. which load generator ------------------------------------------------------
        if wanted("0"):
            print("0. load generators: the device simulator against the raw generator", flush=True)
            await compare_generators(workdir, report)

        # --- baselines -------------------------------------------------------------------
        if wanted("1", "2", "3"):
            print("baselines: minimal UDP responder, bare aiocoap Site server", flush=True)
            async with baseline("minimal", workdir) as server:
                minimal, _ = await closed(server.port, CborReadings(names), names)
            show("minimal responder", minimal)
            async with baseline("aiocoap", workdir) as server:
                cpu_before = cpu_seconds(server.pid)
                bare, gen = await closed(server.port, CborReadings(names), names)
                bare_cpu = cpu_per_answer(server.pid, cpu_before, gen)
                show("bare aiocoap", bare)
                bare_packs = {}
                for size in (10, 50):
                    bare_packs[size], _ = await closed(server.port, SenmlPacks(names, size), names)
                    show(f"bare aiocoap, packs of {size}", bare_packs[size])
                bare_load = {}
                for share in (0.5, 0.8):
                    bare_load[share], _ = await opened(
                        server.port, CborReadings(names, start_seq=10**9), share * bare.rate
                    )
                    show(f"bare aiocoap at {share:.0%}", bare_load[share])
                report.note(
                    f"bare aiocoap's RSS after its runs: {rss_mb(server.pid):.1f} MB"
                    " (its answer cache for deduplication; figure 4 compares idle servers)"
                )
            async with baseline("aiocoap-uvloop", workdir) as server:
                bare_uvloop, _ = await closed(server.port, CborReadings(names), names)
                show("bare aiocoap on uvloop", bare_uvloop)

        # --- 1 + 2: ingest, store only -----------------------------------------------------
        if wanted("1", "2"):
            print("1. ingest (store only) and 2. SenML packs", flush=True)
            async with gateway(workdir, "store") as server:
                cpu_before = cpu_seconds(server.pid)
                stored, gen = await closed(server.port, CborReadings(names), names, register=True)
                cpu_per_request = cpu_per_answer(server.pid, cpu_before, gen)
                acked(server.db, "cbor", gen)
                show("gateway, store only", stored)
                report.add(
                    "1",
                    "readings/s, stored (2.04), no relay",
                    stored.rate,
                    "readings/s",
                    "bare aiocoap Site",
                    bare.rate,
                )
                report.add(
                    "1",
                    "readings/s, stored (2.04), no relay",
                    stored.rate,
                    "readings/s",
                    "minimal UDP responder",
                    minimal.rate,
                )
                report.add(
                    "1",
                    "readings/s, stored (2.04), no relay",
                    stored.rate,
                    "readings/s",
                    "bare aiocoap Site on uvloop",
                    bare_uvloop.rate,
                )
                report.add(
                    "1",
                    "server CPU per request",
                    cpu_per_request * 1e6,
                    "us",
                    "bare aiocoap Site",
                    bare_cpu * 1e6,
                )
                report.add(
                    "1",
                    "readings per CPU-second, no relay",
                    1 / cpu_per_request,
                    "readings/s",
                    "bare aiocoap Site",
                    1 / bare_cpu,
                )
                for size in (10, 50):
                    packs, gen = await closed(
                        server.port,
                        SenmlPacks(names, size, base_time=1_700_000_000 + size * 10**7),
                        names,
                    )
                    acked(server.db, "senml", gen, size)
                    show(f"gateway, packs of {size}", packs)
                    report.add(
                        "2",
                        f"SenML packs of {size}: readings/s",
                        packs.readings_rate,
                        "readings/s",
                        "bare aiocoap Site",
                        bare_packs[size].readings_rate,
                    )
                    report.add(
                        "2",
                        f"SenML packs of {size}: piggybacked",
                        packs.piggyback_share * 100,
                        "%",
                        "bare aiocoap Site",
                        bare_packs[size].piggyback_share * 100,
                    )

        # --- 1 + 3: full pipeline with the relay to MQTT -----------------------------------
        if wanted("1", "3"):
            print("1. ingest with relay to MQTT (QoS 1) and 3. latency at 50 % / 80 %", flush=True)
            with broker("mqtt", workdir) as mqtt:
                subscriber = Subscriber(mqtt.port)
                listening = asyncio.create_task(subscriber.run(), name="bench.subscriber")
                await asyncio.wait_for(subscriber.ready.wait(), 10)
                async with gateway(workdir, "relay", sink=mqtt) as server:
                    assert server.db is not None
                    cpu_before = cpu_seconds(server.pid)
                    full, gen = await closed(server.port, CborReadings(names), names, register=True)
                    acked(server.db, "cbor", gen)
                    show("gateway, store + relay", full)
                    backlog = outbox_depth(server.db)
                    report.add(
                        "1",
                        "readings/s acknowledged, closed loop, relay",
                        full.rate,
                        "readings/s",
                        "bare aiocoap Site",
                        bare.rate,
                    )
                    report.add(
                        "1",
                        "readings/s acknowledged, closed loop, relay",
                        full.rate,
                        "readings/s",
                        "minimal UDP responder",
                        minimal.rate,
                    )
                    report.add(
                        "1",
                        "piggybacked share of answers",
                        full.piggyback_share * 100,
                        "%",
                        "bare aiocoap Site",
                        bare.piggyback_share * 100,
                    )
                    report.add(
                        "1",
                        "p50 device->ack at saturation",
                        full.percentile(50),
                        "ms",
                        "bare aiocoap Site",
                        bare.percentile(50),
                    )
                    report.add(
                        "1",
                        "p99 device->ack at saturation",
                        full.percentile(99),
                        "ms",
                        "bare aiocoap Site",
                        bare.percentile(99),
                    )
                    drained = await wait_drained(server.db, DRAIN_TIMEOUT)
                    relayed = subscriber.messages
                    if drained is not None:
                        # Until the relay caught up, so every reading's relaying is counted.
                        cpu_relayed = cpu_per_answer(server.pid, cpu_before, gen)
                        report.add(
                            "1",
                            "readings per CPU-second, stored + relayed",
                            1 / cpu_relayed,
                            "readings/s",
                            "bare aiocoap Site",
                            1 / bare_cpu,
                        )
                    report.note(
                        f"relay backlog after the saturation run: {backlog} entries; "
                        + (
                            f"drained in {drained:.1f} s"
                            if drained is not None
                            else f"not drained within {DRAIN_TIMEOUT:.0f} s"
                        )
                        + f"; {relayed} messages reached the subscriber so far"
                    )
                    # Ingest and relay share one core: the sustained rate costs a reading's
                    # ingest (store-only figure) plus its relaying (the drain just measured).
                    # A relay that kept up with the closed loop sustained that loop's rate.
                    drain_rate = backlog / drained if drained and backlog else None
                    ingest_rate = stored.rate if stored is not None else full.rate
                    if backlog <= max(50, 0.5 * full.rate):
                        estimate = full.rate
                    elif drain_rate:
                        estimate = min(full.rate, 1 / (1 / ingest_rate + 1 / drain_rate))
                    else:
                        estimate = 0.5 * full.rate
                    sustained, notes = await sustained_rate(server, names, estimate, acked)
                    relayed_at: dict[float, Stats] = {}
                    for text in notes:
                        report.note(f"sustained rate: {text}")
                    report.add(
                        "1",
                        "readings/s, stored + relayed, sustained",
                        sustained,
                        "readings/s",
                        "bare aiocoap Site",
                        bare.rate,
                    )
                    report.add(
                        "1",
                        "readings/s, stored + relayed, sustained",
                        sustained,
                        "readings/s",
                        "bare aiocoap Site on uvloop",
                        bare_uvloop.rate,
                    )
                    for share in (0.5, 0.8):
                        stats, gen = await loaded_at(server.port, names, share, sustained)
                        relayed_at[share] = stats
                        acked(server.db, "cbor", gen)
                        await wait_drained(server.db, DRAIN_TIMEOUT)
                        await asyncio.sleep(0.5)  # the last PUBLISHes reach the subscriber
                        assert gen.sent_at is not None
                        to_mqtt = subscriber.latencies(gen.sent_at)
                        show(f"gateway at {share:.0%}", stats)
                        for p in (50, 99):
                            report.add(
                                "3",
                                f"p{p} device->ack at {share:.0%} load",
                                stats.percentile(p),
                                "ms",
                                f"bare aiocoap at {share:.0%}",
                                bare_load[share].percentile(p),
                            )
                        for p in (50, 99):
                            report.add(
                                "3",
                                f"p{p} device->MQTT subscriber at {share:.0%}",
                                percentile_ms(to_mqtt, p),
                                "ms",
                                f"device->ack p{p}",
                                stats.percentile(p),
                            )
                        missing = len(gen.sent_at) - len(to_mqtt)
                        if missing:
                            report.note(
                                f"at {share:.0%}: {missing} sent readings not seen on MQTT"
                                " (includes ones never acknowledged)"
                            )
                        if stats.skipped:
                            report.note(
                                f"at {share:.0%}: {stats.skipped} sends found no idle device"
                            )
                    await wait_drained(server.db, DRAIN_TIMEOUT)
                    await sustained_wide(server, full.rate, bare.rate, report, acked)
                listening.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await listening
            await store_only_at(workdir, names, sustained, relayed_at, report, acked)

        # --- 4. scale ----------------------------------------------------------------------
        if wanted("4"):
            n = SCALE_DEVICES
            print(f"4. scale: {n} devices, each registered and observed once", flush=True)
            enough_files(n)
            async with gateway(workdir, "scale", observers=2 * n) as server:
                ours = await scale(server, "scale")
            show("gateway: registrations", ours.registrations)
            show("gateway: observations", ours.observations)
            async with baseline("aiocoap-observe", workdir) as server:
                bare_scale = await scale(server, "scale")
            show("bare aiocoap: registrations", bare_scale.registrations)
            show("bare aiocoap: observations", bare_scale.observations)
            for label, run in (("gateway", ours), ("bare aiocoap", bare_scale)):
                if run.registrations.codes.get("2.01", 0) != n:
                    report.note(f"4, {label}: {dict(run.registrations.codes)} of {n} registered")
                if run.observations.observations != n:
                    report.note(
                        f"4, {label}: {run.observations.observations} of {n} observations"
                        f" started ({dict(run.observations.codes)})"
                    )
            bare_label = "bare aiocoap, same devices+obs"
            report.add(
                "4",
                f"RSS, {n} devices + {n} observations",
                ours.observed,
                "MB",
                bare_label,
                bare_scale.observed,
            )
            report.add(
                "4",
                f"RSS, {n} devices + {n} observations",
                ours.observed,
                "MB",
                f"target: under {SCALE_TARGET_MB:.0f} MB",
                SCALE_TARGET_MB,
            )
            report.add(
                "4",
                "RSS per device incl. its observation",
                ours.per_device_kb(ours.observed),
                "KB",
                "bare aiocoap, the same",
                bare_scale.per_device_kb(bare_scale.observed),
            )
            report.add(
                "4",
                "RSS per registered device (no observation)",
                ours.per_device_kb(ours.registered),
                "KB",
                "bare aiocoap, the same",
                bare_scale.per_device_kb(bare_scale.registered),
            )
            report.add(
                "4",
                "RSS before registering",
                ours.idle,
                "MB",
                "bare aiocoap, before",
                bare_scale.idle,
            )
            report.add(
                "4",
                "registrations/s (each one committed)",
                ours.registrations.rate,
                "req/s",
                "bare aiocoap (adds a resource)",
                bare_scale.registrations.rate,
            )
            if stored is not None:
                report.add(
                    "4",
                    "registrations/s (each one committed)",
                    ours.registrations.rate,
                    "req/s",
                    "readings/s (store only)",
                    stored.rate,
                )
            report.add(
                "4",
                "observations started/s",
                ours.observations.observation_rate,
                "obs/s",
                "bare aiocoap, stock Observe",
                bare_scale.observations.observation_rate,
            )

        # --- 5. Observe fan-out ------------------------------------------------------------
        if wanted("5"):
            print(
                f"5. Observe fan-out: {FANOUT_OBSERVERS} observers of one device's /r/NAME,"
                " readings posted one after another",
                flush=True,
            )
            enough_files(FANOUT_OBSERVERS)
            async with gateway(workdir, "fanout", observers=2 * FANOUT_OBSERVERS) as server:
                fanned, device, drops = await fan_out(server)
                acked(server.db, "cbor", device)
            show_fanout("gateway", fanned, drops)
            runs = [("gateway", fanned, drops)]
            bare_fanout = {}
            for kind in ("aiocoap-observe", "aiocoap-observe-non"):
                async with baseline(kind, workdir) as server:
                    bare_fanout[kind], _, drops = await fan_out(server)
                show_fanout(kind, bare_fanout[kind], drops)
                runs.append((kind, bare_fanout[kind], drops))
            bare_con, bare_non = bare_fanout["aiocoap-observe"], bare_fanout["aiocoap-observe-non"]
            what = f"notifications/s, {FANOUT_OBSERVERS} observers"
            con, non = "bare aiocoap (CON, default)", "bare aiocoap (NON notif.)"
            report.add("5", what, fanned.rate, "notif./s", con, bare_con.rate)
            report.add("5", what, fanned.rate, "notif./s", non, bare_non.rate)
            what = "notifications/s in the median round"
            report.add(
                "5", what, fanned.median_round_rate, "notif./s", con, bare_con.median_round_rate
            )
            report.add(
                "5", what, fanned.median_round_rate, "notif./s", non, bare_non.median_round_rate
            )
            for p in (50, 99):
                report.add(
                    "5",
                    f"p{p} post -> all {FANOUT_OBSERVERS} observers notified",
                    percentile_ms(fanned.latencies, p),
                    "ms",
                    non,
                    percentile_ms(bare_non.latencies, p),
                )
            await fan_out_at_rates(workdir, report, acked)
            for label, run, drops in runs:
                slow = sum(seconds > 1.0 for seconds in run.latencies)
                if run.missing or run.lost or run.ended or run.failed or slow:
                    report.note(
                        f"5, {label}: {slow} of {run.readings} rounds over 1 s"
                        f" ({run.retransmitted} readings sent twice by the device);"
                        f" {run.missing} notifications missing after {FANOUT_WAIT:.0f} s"
                        f" in {run.incomplete} rounds, {run.lost} lost (Observe-number gaps),"
                        f" {run.duplicates} duplicates (retransmitted CONs), {run.ended}"
                        f" observations ended, {run.failed} readings not answered 2.04;"
                        f" {drops} datagrams dropped for full receive buffers (machine-wide)"
                    )

        # --- 6. relay catch-up -------------------------------------------------------------
        if wanted("6"):
            print(f"6. relay catch-up: a backlog of {BACKLOG} outbox entries", flush=True)
            for kind in ("mqtt", "nats"):
                label = "MQTT (QoS 1)" if kind == "mqtt" else "JetStream"
                with broker(kind, workdir, start=False) as sink:
                    async with gateway(workdir, f"backlog-{kind}", sink=sink) as server:
                        assert server.db is not None
                        packs = BACKLOG // 50
                        async with LoadGenerator(
                            ("127.0.0.1", server.port), sockets=DEVICES
                        ) as gen:
                            await gen.run(Registrations(names), window=WINDOW)
                            await gen.run(
                                Limited(SenmlPacks(names, 50, base_time=1_600_000_000), packs),
                                window=WINDOW,
                            )
                        acked(server.db, "senml", gen, 50)
                        depth = outbox_depth(server.db)
                        sink.start()
                        took = await wait_drained(server.db, max(DRAIN_TIMEOUT, BACKLOG / 500))
                    if took is None:
                        report.note(f"{label}: backlog of {depth} not drained in time")
                        continue
                    baselines = (
                        {
                            "stock aiomqtt publishing alone": "mqtt-publish",
                            "the sink's connection publishing alone": "mqtt-link-publish",
                        }
                        if kind == "mqtt"
                        else {"nats-py publishing alone": "jetstream-publish"}
                    )
                    for what, mode in baselines.items():
                        raw = await asyncio.to_thread(raw_publish_rate, mode, sink.port)
                        report.add(
                            "6",
                            f"backlog of {depth} drained to {label}",
                            depth / took,
                            "entries/s",
                            what,
                            raw,
                        )

        # --- 7. cores -----------------------------------------------------------------------
        if wanted("7"):
            print("7. worker processes on one port (gateway serve --workers N), one database")
            by_workers: dict[int, Stats] = {}
            for count in (1, 2):
                argv, port, db = gateway_argv(workdir, f"workers-{count}", level="info")
                log = workdir / f"workers-{count}.log"
                process = spawn([*argv, "--workers", str(count)], log, pinned=False)
                try:
                    await wait_for_line(log, "gateway.started", count)
                    devices = device_names(DEVICES, prefix=f"w{count}-")
                    by_workers[count], gen = await closed(
                        port, CborReadings(devices), devices, register=True
                    )
                    acked(db, "cbor", gen)
                    show(f"{count} worker{'s' if count > 1 else ''}", by_workers[count])
                finally:
                    stop(process)
            report.add(
                "7",
                "readings/s, 2 workers (unpinned)",
                by_workers[2].rate,
                "readings/s",
                "1 worker, unpinned, same run",
                by_workers[1].rate,
            )
            report.note(
                "7: this machine has 2 CPUs and the load generator needs most of one, so the"
                " workers share what is left; the steering program spreads the 200 device"
                " sockets over the workers by address and port"
            )

        print(f"({time.monotonic() - started:.0f} s)")
        missing = verify(acknowledged)
    if path := os.environ.get("BENCH_JSON"):
        Path(path).write_text(
            json.dumps(
                {
                    "machine": info,
                    "quick": QUICK,
                    "duration": DURATION,
                    "backlog": BACKLOG,
                    "rows": report.rows,
                    "notes": report.notes,
                    "missing": missing,
                },
                indent=2,
                default=str,
            )
        )
    if missing:
        print(f"FAIL: {missing} acknowledged readings are not in the database")
        return 1
    print("ok: every reading acknowledged with 2.04 is stored")
    return 0


async def fan_out_at_rates(workdir: Path, report: Report, acked: Any) -> None:
    """Figure 5 with the device posting at fixed rates: the gateway against bare aiocoap with
    NON notifications, each rate on a fresh server."""
    for rate in FANOUT_RATES:
        runs: dict[str, RateFanout] = {}
        async with gateway(workdir, f"fanrate-{rate:.0f}", observers=2 * FANOUT_OBSERVERS) as srv:
            runs["gateway"], device = await fan_out_at(srv, rate)
            acked(srv.db, "cbor", device)
        async with baseline("aiocoap-observe-non", workdir) as srv:
            runs["bare"], _ = await fan_out_at(srv, rate)
        for label, run in runs.items():
            print(
                f"    {label:<30} posting {rate:.0f}/s: {run.posts.rate:.1f} readings/s answered"
                f" 2.04 (codes {dict(run.posts.codes)}, lost {run.posts.lost}),"
                f" {run.notifications} notifications to {run.observers} observers in"
                f" {run.seconds:.1f} s, share {run.share:.3f}",
                flush=True,
            )
        ours, bare = runs["gateway"], runs["bare"]
        non = "bare aiocoap (NON notif.)"
        at = f"posting {rate:.0f} readings/s"
        report.add(
            "5", f"readings/s answered 2.04, {at}", ours.posts.rate, "/s", non, bare.posts.rate
        )
        report.add(
            "5",
            f"notifications/s, {at}",
            ours.notification_rate,
            "notif./s",
            non,
            bare.notification_rate,
        )
        report.add(
            "5",
            f"share of readings each observer saw, {at}",
            100 * ours.share,
            "%",
            non,
            100 * bare.share,
        )
        report.add(
            "5",
            f"p99 device->ack, {at}",
            ours.posts.percentile(99),
            "ms",
            non,
            bare.posts.percentile(99),
        )


async def store_only_at(
    workdir: Path,
    names: list[str],
    sustained: float,
    relayed_at: dict[float, Stats],
    report: Report,
    acked: Any,
) -> None:
    """Figure 3's loads on a gateway without the relay: which part of the latency is the
    relay's and which the store's. Like the relaying gateway, it first runs a closed-loop
    burst, so both keep as many answers for deduplication and hold as large a database."""
    async with gateway(workdir, "store-at-load") as server:
        _, gen = await closed(server.port, CborReadings(names), names, register=True)
        acked(server.db, "cbor", gen)
        for share, relayed in relayed_at.items():
            stats, gen = await loaded_at(server.port, names, share, sustained)
            acked(server.db, "cbor", gen)
            show(f"gateway at {share:.0%}, store only", stats)
            for p in (50, 99):
                report.add(
                    "3",
                    f"p{p} device->ack at {share:.0%} load",
                    relayed.percentile(p),
                    "ms",
                    "the same, gateway storing only",
                    stats.percentile(p),
                )


async def compare_generators(workdir: Path, report: Report) -> None:
    """Figure 0: can the device simulator load the gateway, or does it take the raw generator?

    Both drive `device-sim sink` (a server that answers registrations and readings and
    stores nothing), on the server CPU, from 200 devices on the load generator's CPU: the
    simulator as `device-sim run` with street lights reporting every millisecond (each
    device then posts its next reading as soon as the last is answered), the raw generator
    in its closed loop. What matters is each one's CPU per request: one core's worth of it
    is the most load it can offer.
    """
    port = free_port()
    argv = [sys.executable, "-m", "device_sim", "sink", "--port", str(port)]
    async with running("device-sim sink", argv, port, workdir / "sim-sink.log"):
        devices = device_names(DEVICES, prefix="gen-")
        async with LoadGenerator(("127.0.0.1", port), sockets=DEVICES) as gen:
            await gen.run(Registrations(devices), window=WINDOW)
            cpu = time.process_time()
            raw = await gen.run(CborReadings(devices), duration=DURATION, window=WINDOW)
            raw_cpu = (time.process_time() - cpu) / max(1, raw.sent)
        show("raw load generator", raw)
        simulate = [sys.executable, "-m", "device_sim", "run"]
        simulate += ["--gateway", f"coap://127.0.0.1:{port}", "--lights", str(DEVICES)]
        simulate += ["--fridges", "0", "--trackers", "0", "--light-interval", "0.001"]
        simulate += ["--duration", str(DURATION), "--drain", "2", "--json", "--no-progress"]
        done = await asyncio.to_thread(
            subprocess.run,
            simulate,
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=120 + DURATION,
            preexec_fn=_on_loadgen_cpu,
        )
    if done.returncode != 0:
        report.note(f"0: device-sim run failed ({done.returncode}): {done.stderr[-300:]}")
        return
    summary = json.loads(done.stdout)
    sim_cpu = summary["cpu_s"] / max(1, summary["acknowledged"])
    print(
        f"    device simulator           {summary['readings_per_s']:>8.0f} readings/s"
        f"  p50 {summary['latency_p50_ms']:6.2f} ms  p99 {summary['latency_p99_ms']:6.2f} ms"
        f"  CPU {summary['cpu_s']:.1f} s over {summary['elapsed_s']:.1f} s",
        flush=True,
    )
    report.add(
        "0", "readings/s, device simulator", summary["readings_per_s"], "readings/s",
        "raw load generator", raw.rate,
    )  # fmt: skip
    report.add(
        "0", "generator CPU per request, simulator", sim_cpu * 1e6, "us",
        "raw load generator", raw_cpu * 1e6,
    )  # fmt: skip
    report.add(
        "0", "requests/s one core can offer, simulator", 1 / sim_cpu, "req/s",
        "raw load generator", 1 / raw_cpu,
    )  # fmt: skip


def raw_publish_rate(mode: str, port: int) -> float:
    """Messages/s of the plain client library publishing BACKLOG messages, on the server CPU.

    `mode` is one of bench/baselines.py's publishers (mqtt-publish, mqtt-link-publish,
    jetstream-publish).
    """
    argv = [sys.executable, str(REPO / "bench" / "baselines.py"), mode, str(port), str(BACKLOG)]
    if SERVER_CPU is not None:
        argv.append(str(SERVER_CPU))
    done = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, timeout=900)
    return float(done.stdout.split()[-1]) if done.returncode == 0 else float("nan")


def verify(acknowledged: list[tuple[Path, str, Any]]) -> int:
    """Count acknowledged readings missing from their database (0 is the only good answer)."""
    missing = 0
    checked = 0
    for db in sorted({db for db, _, _ in acknowledged}):
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            rows = conn.execute(
                "SELECT d.name, r.seq, r.device_time FROM readings r JOIN devices d"
                " ON d.id = r.device_id WHERE r.measurement = 'temp'"
            ).fetchall()
        finally:
            conn.close()
        by_seq = {(name, seq) for name, seq, _ in rows if seq is not None}
        by_time = {(name, t) for name, _, t in rows if t is not None}
        for entry_db, kind, ((name, mark), size) in acknowledged:
            if entry_db != db:
                continue
            if kind == "cbor":
                checked += 1
                missing += (name, mark) not in by_seq
            else:
                checked += size
                missing += sum((name, float(mark + t)) not in by_time for t in range(size))
    print(f"verified {checked} acknowledged readings against the databases: {missing} missing")
    return missing


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
