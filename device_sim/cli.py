"""``device-sim``: run a fleet of simulated devices against a gateway.

Exit codes: 0 every reading acknowledged, 1 some reading failed or a device never came up,
2 usage error (bad flag, bad scenario file).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
import tomllib
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import click
import msgspec

from device_sim.coap import Addr, Impairment
from device_sim.fleet import Fleet, FleetConfig, GroupConfig, Summary
from device_sim.sink import Sink


class _Group(msgspec.Struct, forbid_unknown_fields=True):
    count: int | None = None
    interval: float | None = None
    fault_rate: float | None = None


class _Impairment(msgspec.Struct, forbid_unknown_fields=True):
    loss: float = 0.0
    duplicate: float = 0.0
    delay: float = 0.0
    jitter: float = 0.0


class Scenario(msgspec.Struct, forbid_unknown_fields=True):
    """The TOML scenario file; every key optional. See docs/examples/scenario.toml."""

    gateway: str | None = None
    duration: float | None = None
    seed: int | None = None
    payload_format: Literal["cbor", "senml"] | None = None
    lifetime: int | None = None
    prefix: str | None = None
    ramp: float | None = None
    start_time: float | None = None
    fridges: _Group = msgspec.field(default_factory=_Group)
    trackers: _Group = msgspec.field(default_factory=_Group)
    lights: _Group = msgspec.field(default_factory=_Group)
    impairment: _Impairment | None = None


def load_scenario(path: Path) -> Scenario:
    try:
        data = tomllib.loads(path.read_text())
        return msgspec.convert(data, Scenario)
    except (OSError, tomllib.TOMLDecodeError, msgspec.ValidationError) as exc:
        raise click.BadParameter(f"{path}: {exc}", param_hint="--scenario") from exc


def parse_gateway(uri: str) -> Addr:
    parts = urlsplit(uri if "://" in uri else f"coap://{uri}")
    if parts.scheme != "coap" or not parts.hostname:
        raise click.BadParameter(
            f"expected coap://HOST[:PORT], got {uri!r}", param_hint="--gateway"
        )
    try:
        port = parts.port or 5683
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--gateway") from exc
    return parts.hostname, port


def _group(
    base: GroupConfig, file: _Group, count: int | None, interval: float | None, fault: float | None
) -> GroupConfig:
    merged = replace(
        base,
        **{k: v for k, v in msgspec.structs.asdict(file).items() if v is not None},
    )
    flags: dict[str, Any] = {"count": count, "interval": interval, "fault_rate": fault}
    return replace(merged, **{k: v for k, v in flags.items() if v is not None})


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Simulated CoAP devices (fridges, trackers, street lights) for exercising a gateway."""


@main.command()
@click.option("--gateway", default=None, help="Gateway URI  [default: coap://127.0.0.1:5683]")
@click.option(
    "--scenario",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="TOML scenario file; flags given on the command line override it.",
)
@click.option("--fridges", type=click.IntRange(min=0), help="Number of fridges.")
@click.option("--trackers", type=click.IntRange(min=0), help="Number of trackers (sleepy).")
@click.option("--lights", type=click.IntRange(min=0), help="Number of street lights.")
@click.option(
    "--fridge-interval",
    type=click.FloatRange(min=0, min_open=True),
    help="Seconds between fridge readings  [default: 30]",
)
@click.option(
    "--tracker-interval",
    type=click.FloatRange(min=0, min_open=True),
    help="Tracker wake interval in seconds  [default: 60]",
)
@click.option(
    "--light-interval",
    type=click.FloatRange(min=0, min_open=True),
    help="Seconds between street light readings  [default: 60]",
)
@click.option(
    "--door-fault-rate",
    type=click.FloatRange(0, 1),
    help="Probability that a fridge door opening leaves it ajar.",
)
@click.option(
    "--lamp-failure-rate",
    type=click.FloatRange(0, 1),
    help="Probability per burning hour that a lamp fails.",
)
@click.option(
    "--format",
    "payload_format",
    type=click.Choice(["cbor", "senml"]),
    help="Reading payload format  [default: cbor]",
)
@click.option("--duration", type=click.FloatRange(min=0), help="Seconds to run  [default: 60]")
@click.option("--seed", type=int, help="Seed for every random choice  [default: 0]")
@click.option("--lifetime", type=click.IntRange(min=1), help="Registration lifetime, seconds.")
@click.option("--loss", type=click.FloatRange(0, 1), help="Datagram loss probability.")
@click.option("--duplicate", type=click.FloatRange(0, 1), help="Datagram duplication probability.")
@click.option("--delay", type=click.FloatRange(min=0), help="Added one-way delay, seconds.")
@click.option("--jitter", type=click.FloatRange(min=0), help="Uniform extra delay, seconds.")
@click.option(
    "--ramp",
    type=click.FloatRange(min=0),
    help="Spread first registrations over this many seconds.",
)
@click.option(
    "--drain",
    type=click.FloatRange(min=0),
    default=10.0,
    show_default=True,
    help="Seconds to let requests on the wire finish at the end.",
)
@click.option(
    "--credentials",
    type=click.Path(exists=True, file_okay=False),
    help="Directory of OSCORE credentials, NAME/credentials.json per device"
    " (from `gateway devices add NAME --credentials oscore --out DIR`).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option(
    "--progress/--no-progress",
    default=None,
    help="Live progress line on stderr  [default: when stderr is a TTY]",
)
def run(
    gateway: str | None,
    scenario: Path | None,
    fridges: int | None,
    trackers: int | None,
    lights: int | None,
    fridge_interval: float | None,
    tracker_interval: float | None,
    light_interval: float | None,
    door_fault_rate: float | None,
    lamp_failure_rate: float | None,
    payload_format: Literal["cbor", "senml"] | None,
    duration: float | None,
    seed: int | None,
    lifetime: int | None,
    loss: float | None,
    duplicate: float | None,
    delay: float | None,
    jitter: float | None,
    ramp: float | None,
    drain: float,
    credentials: str | None,
    as_json: bool,
    progress: bool | None,
) -> None:
    """Run a fleet against a gateway and print a summary.

    Example: device-sim run --gateway coap://127.0.0.1:5683 --fridges 50 --trackers 20
    --lights 200 --duration 60 --seed 42
    """
    sc = load_scenario(scenario) if scenario else Scenario()
    base = FleetConfig()
    imp_file = sc.impairment or _Impairment()
    imp_values = msgspec.structs.asdict(imp_file)
    for key, flag in (
        ("loss", loss),
        ("duplicate", duplicate),
        ("delay", delay),
        ("jitter", jitter),
    ):
        if flag is not None:
            imp_values[key] = flag
    try:
        config = FleetConfig(
            gateway=parse_gateway(gateway or sc.gateway or "coap://127.0.0.1:5683"),
            fridges=_group(base.fridges, sc.fridges, fridges, fridge_interval, door_fault_rate),
            trackers=_group(base.trackers, sc.trackers, trackers, tracker_interval, None),
            lights=_group(base.lights, sc.lights, lights, light_interval, lamp_failure_rate),
            payload_format=payload_format or sc.payload_format or base.payload_format,
            lifetime=lifetime or sc.lifetime or base.lifetime,
            seed=seed if seed is not None else (sc.seed or 0),
            impairment=Impairment(**imp_values),
            prefix=sc.prefix or base.prefix,
            ramp=ramp if ramp is not None else sc.ramp,
            start_time=sc.start_time,
            credentials=credentials,
        )
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    if config.total == 0:
        raise click.UsageError("no devices: give --fridges, --trackers or --lights")
    run_for = duration if duration is not None else (sc.duration or 60.0)
    show = sys.stderr.isatty() if progress is None else progress
    summary = asyncio.run(_run(config, run_for, drain, show))
    if as_json:
        click.echo(json.dumps(summary.as_dict(), indent=2, sort_keys=True))
    else:
        click.echo(summary.render())
    ok = summary.failed == 0 and summary.devices_up == summary.devices
    sys.exit(0 if ok else 1)


async def _run(config: FleetConfig, duration: float, drain: float, progress: bool) -> Summary:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        async with Fleet(config, progress=sys.stderr if progress else None, drain=drain) as fleet:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(duration):
                    await stop.wait()
            await fleet.stop()
            return fleet.summary()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


@main.command()
@click.option("--bind", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=5683, show_default=True)
def sink(bind: str, port: int) -> None:
    """Acknowledge every registration and reading (measure the simulator without a gateway)."""

    async def serve() -> dict[str, Any]:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        async with Sink(host=bind, port=port) as s:
            click.echo(f"listening on coap://{s.address[0]}:{s.address[1]}", err=True)
            await stop.wait()
            return dict(s.counts)

    counts = asyncio.run(serve())
    click.echo(json.dumps(counts, sort_keys=True))
