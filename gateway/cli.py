"""Operator commands: parse flags, call the app or the store, print.

Tables for people, `--json` for scripts. Exit codes: 0 done, 1 failed (the error is
printed), 2 usage error, 3 the named thing does not exist.
"""

from __future__ import annotations

import asyncio
import csv
import json
import re
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite
import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Table

from gateway.config import GatewayConfig, load_config
from gateway.errors import ConfigError, GatewayError
from gateway.logsetup import configure_logging
from gateway.store import queries
from gateway.store.db import open_database

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3

T = TypeVar("T")

config_option = click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    envvar="GATEWAY_CONFIG",
    help="TOML configuration file (env GATEWAY_CONFIG).",
)
db_option = click.option(
    "--db",
    "db_path",
    type=click.Path(dir_okay=False),
    help="SQLite database (default: store.path from the config, else var/gateway.db).",
)
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")


class Failure(click.ClickException):
    exit_code = EXIT_FAILED


class NotFound(click.ClickException):
    exit_code = EXIT_NOT_FOUND


def _load(config_path: str | None) -> GatewayConfig:
    try:
        return load_config(config_path)
    except ConfigError as exc:
        raise Failure(str(exc)) from exc


def _db_path(config_path: str | None, db_path: str | None) -> str:
    return db_path or _load(config_path).store.path


def _run(coroutine: Awaitable[T]) -> T:
    try:
        return asyncio.run(coroutine)  # type: ignore[arg-type]
    except GatewayError as exc:
        raise Failure(str(exc)) from exc


async def _with_reader(path: str, work: Callable[[aiosqlite.Connection], Awaitable[T]]) -> T:
    conn = await open_database(path, readonly=True)
    try:
        return await work(conn)
    finally:
        await conn.close()


def _console() -> Console:
    return Console(highlight=False)


def _when(epoch: float | None) -> str:
    if epoch is None:
        return "-"
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _print_json(document: Any) -> None:
    click.echo(json.dumps(document, indent=2, default=str))


RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86_400}


def parse_since(text: str | None, *, now: float) -> float | None:
    """Epoch seconds, an ISO 8601 time (UTC unless it says), or an age like 10m, 2h, 7d."""
    if text is None:
        return None
    match = RELATIVE.match(text)
    if match:
        return now - float(match.group(1)) * UNITS[match.group(2)]
    try:
        return float(text)
    except ValueError:
        pass
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError as exc:
        raise click.BadParameter(
            "use epoch seconds, ISO 8601 (2026-11-25T10:00) or an age (10m, 2h, 7d)"
        ) from exc
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """CoAP gateway for constrained devices: serve, and inspect what it stored."""


# --- serve --------------------------------------------------------------------------------


@main.command()
@click.option("--bind", help="Address to listen on; '::' is every IPv6 and IPv4 address.")
@click.option("--port", type=int, help="UDP port (default 5683).")
@db_option
@config_option
@click.option(
    "--log-level", type=click.Choice(["debug", "info", "warning", "error"]), help="Log level."
)
@click.option("--log-format", type=click.Choice(["auto", "json", "console"]), help="Log rendering.")
def serve(
    bind: str | None,
    port: int | None,
    db_path: str | None,
    config_path: str | None,
    log_level: str | None,
    log_format: str | None,
) -> None:
    """Run the gateway until SIGINT or SIGTERM (then finish in-flight commits, exit 0)."""
    from gateway.app import serve as serve_gateway

    config = _load(config_path)
    server = {k: v for k, v in {"bind": bind, "port": port}.items() if v is not None}
    if server:
        config = config.replace("server", **server)
    if db_path:
        config = config.replace("store", path=db_path)
    logging_changes = {
        k: v for k, v in {"level": log_level, "format": log_format}.items() if v is not None
    }
    if logging_changes:
        config = config.replace("logging", **logging_changes)
    configure_logging(config.logging.level, config.logging.format)
    try:
        asyncio.run(serve_gateway(config))
    except GatewayError as exc:
        raise Failure(str(exc)) from exc
    except OSError as exc:
        raise Failure(
            f"cannot listen on [{config.server.bind}]:{config.server.port}: {exc}"
        ) from exc


# --- config -------------------------------------------------------------------------------


@main.group()
def config() -> None:
    """Check configuration files."""


@config.command("check")
@click.argument("file", type=click.Path(dir_okay=False))
@json_option
def config_check(file: str, as_json: bool) -> None:
    """Validate FILE (with environment overrides); print the effective configuration."""
    try:
        loaded = load_config(file)
    except ConfigError as exc:
        if as_json:
            _print_json({"valid": False, "error": str(exc), "key": exc.key})
            sys.exit(EXIT_FAILED)
        raise Failure(str(exc)) from exc
    if as_json:
        _print_json({"valid": True, "config": asdict(loaded)})
        return
    click.echo(f"{file}: valid")
    for section, values in asdict(loaded).items():
        click.echo(f"[{section}]")
        if isinstance(values, dict):
            for key, value in values.items():
                click.echo(f"  {key} = {value!r}")
        else:
            click.echo(f"  {values!r}")


# --- devices ------------------------------------------------------------------------------


@main.group()
def devices() -> None:
    """List and inspect devices."""


@devices.command("list")
@db_option
@config_option
@json_option
def devices_list(db_path: str | None, config_path: str | None, as_json: bool) -> None:
    """Every known device, with its registration."""
    rows = _run(_with_reader(_db_path(config_path, db_path), queries.list_devices))
    if as_json:
        _print_json([row.as_dict() for row in rows])
        return
    table = Table(title=f"{len(rows)} devices")
    for column in ("name", "type", "online", "last seen (UTC)", "address", "registration"):
        table.add_column(column)
    for row in rows:
        table.add_row(
            row.name,
            row.type,
            "yes" if row.online else "no",
            _when(row.last_seen),
            row.address or "-",
            row.registration_id or "-",
        )
    _console().print(table)


@devices.command("show")
@click.argument("name")
@db_option
@config_option
@json_option
def devices_show(name: str, db_path: str | None, config_path: str | None, as_json: bool) -> None:
    """One device: registration, hosted resources and latest values."""

    async def work(conn: aiosqlite.Connection) -> tuple[Any, list[Any]]:
        device = await queries.get_device(conn, name)
        if device is None:
            return None, []
        async with conn.execute("SELECT id FROM devices WHERE name = ?", (name,)) as cursor:
            row = await cursor.fetchone()
        assert row is not None
        return device, await queries.latest_values(conn, row[0])

    device, latest = _run(_with_reader(_db_path(config_path, db_path), work))
    if device is None:
        raise NotFound(f"no device named {name!r}")
    if as_json:
        _print_json({**device.as_dict(), "latest": [asdict(value) for value in latest]})
        return
    console = _console()
    table = Table(show_header=False, title=f"device {name}")
    table.add_column("key", style="bold")
    table.add_column("value")
    for key, value in (
        ("type", device.type),
        ("online", "yes" if device.online else "no"),
        ("created (UTC)", _when(device.created_at)),
        ("last seen (UTC)", _when(device.last_seen)),
        ("address", device.address or "-"),
        ("registration", device.registration_id or "-"),
        ("lifetime", f"{device.lifetime} s" if device.lifetime else "-"),
        ("expires (UTC)", _when(device.expires_at)),
        ("queue mode", "yes" if device.queue_mode else "no"),
        ("resources", device.links or "-"),
        ("readings", str(device.readings)),
    ):
        table.add_row(key, value)
    console.print(table)
    if latest:
        values = Table(title="latest values")
        for column in ("measurement", "value", "unit", "time (UTC)"):
            values.add_column(column)
        for item in latest:
            values.add_row(item.name, str(item.value), item.unit or "", _when(item.time))
        console.print(values)


# --- readings -----------------------------------------------------------------------------


@main.group()
def readings() -> None:
    """List and export stored readings."""


@readings.command("list")
@click.option("--device", help="Only this device.")
@click.option("--since", help="Received at or after: epoch, ISO 8601, or an age (10m, 2h).")
@click.option("--measurement", help="Only this measurement.")
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True)
@db_option
@config_option
@json_option
def readings_list(
    device: str | None,
    since: str | None,
    measurement: str | None,
    limit: int,
    db_path: str | None,
    config_path: str | None,
    as_json: bool,
) -> None:
    """The newest readings, oldest first."""
    since_at = parse_since(since, now=time.time())

    async def work(conn: aiosqlite.Connection) -> list[queries.ReadingRow]:
        if device is not None and await queries.get_device(conn, device) is None:
            raise NotFound(f"no device named {device!r}")
        return await queries.list_readings(
            conn, device=device, since=since_at, measurement=measurement, limit=limit
        )

    rows = _run(_with_reader(_db_path(config_path, db_path), work))
    if as_json:
        _print_json([row.as_dict() for row in rows])
        return
    table = Table(title=f"{len(rows)} readings")
    for column in ("id", "device", "measurement", "value", "unit", "device time", "received (UTC)"):
        table.add_column(column)
    for row in rows:
        table.add_row(
            str(row.id),
            row.device,
            row.measurement,
            str(row.value),
            row.unit or "",
            _when(row.device_time),
            _when(row.received_at),
        )
    _console().print(table)


EXPORT_FIELDS = (
    "id",
    "device",
    "device_type",
    "measurement",
    "value",
    "unit",
    "device_time",
    "received_at",
    "seq",
)


@readings.command("export")
@click.option(
    "--format", "fmt", type=click.Choice(["csv", "json"]), default="csv", show_default=True
)
@click.option("--device", help="Only this device.")
@click.option("--since", help="Received at or after: epoch, ISO 8601, or an age (10m, 2h).")
@click.option("--output", "-o", type=click.Path(dir_okay=False), help="File (default stdout).")
@db_option
@config_option
def readings_export(
    fmt: str,
    device: str | None,
    since: str | None,
    output: str | None,
    db_path: str | None,
    config_path: str | None,
) -> None:
    """Every matching reading, as CSV or JSON lines, with progress on a terminal."""
    since_at = parse_since(since, now=time.time())
    out = open(output, "w", newline="") if output else sys.stdout  # noqa: SIM115
    show_progress = sys.stderr.isatty()

    async def work(conn: aiosqlite.Connection) -> int:
        total = await queries.count_readings(conn, device=device, since=since_at)
        writer = csv.DictWriter(out, fieldnames=EXPORT_FIELDS) if fmt == "csv" else None
        if writer is not None:
            writer.writeheader()
        written = 0
        with Progress(
            TextColumn("exporting"),
            BarColumn(),
            MofNCompleteColumn(),
            console=Console(stderr=True),
            disable=not show_progress,
        ) as progress:
            task = progress.add_task("export", total=total)
            async for chunk in queries.iter_readings(conn, device=device, since=since_at):
                for row in chunk:
                    record = row.as_dict()
                    if writer is not None:
                        writer.writerow(record)
                    else:
                        out.write(json.dumps(record) + "\n")
                written += len(chunk)
                progress.update(task, completed=written)
        return written

    try:
        written = _run(_with_reader(_db_path(config_path, db_path), work))
    finally:
        if output:
            out.close()
    if output:
        click.echo(f"exported {written} readings to {Path(output)}", err=True)
