"""`gateway readings ...`."""

from __future__ import annotations

import csv
import json
import sys
import time
from pathlib import Path

import aiosqlite
import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Table

from gateway.cli import main
from gateway.cli.common import (
    NotFound,
    config_option,
    db_option,
    format_time,
    json_option,
    make_console,
    parse_since,
    print_json,
    resolve_db_path,
    run_async,
    with_reader,
)
from gateway.store import queries

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

    rows = run_async(with_reader(resolve_db_path(config_path, db_path), work))
    if as_json:
        print_json([row.as_dict() for row in rows])
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
            format_time(row.device_time),
            format_time(row.received_at),
        )
    make_console().print(table)


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
        written = run_async(with_reader(resolve_db_path(config_path, db_path), work))
    finally:
        if output:
            out.close()
    if output:
        click.echo(f"exported {written} readings to {Path(output)}", err=True)
