"""`gateway devices ...`."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import aiosqlite
import click
from rich.table import Table

from gateway.cli import main
from gateway.cli.common import (
    NotFound,
    config_option,
    db_option,
    format_time,
    json_option,
    make_console,
    print_json,
    resolve_db_path,
    run_async,
    with_reader,
)
from gateway.store import queries

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
    rows = run_async(with_reader(resolve_db_path(config_path, db_path), queries.list_devices))
    if as_json:
        print_json([row.as_dict() for row in rows])
        return
    table = Table(title=f"{len(rows)} devices")
    for column in ("name", "type", "online", "last seen (UTC)", "address", "registration"):
        table.add_column(column)
    for row in rows:
        table.add_row(
            row.name,
            row.type,
            "yes" if row.online else "no",
            format_time(row.last_seen),
            row.address or "-",
            row.registration_id or "-",
        )
    make_console().print(table)


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

    device, latest = run_async(with_reader(resolve_db_path(config_path, db_path), work))
    if device is None:
        raise NotFound(f"no device named {name!r}")
    if as_json:
        print_json({**device.as_dict(), "latest": [asdict(value) for value in latest]})
        return
    console = make_console()
    table = Table(show_header=False, title=f"device {name}")
    table.add_column("key", style="bold")
    table.add_column("value")
    for key, value in (
        ("type", device.type),
        ("online", "yes" if device.online else "no"),
        ("created (UTC)", format_time(device.created_at)),
        ("last seen (UTC)", format_time(device.last_seen)),
        ("address", device.address or "-"),
        ("registration", device.registration_id or "-"),
        ("lifetime", f"{device.lifetime} s" if device.lifetime else "-"),
        ("expires (UTC)", format_time(device.expires_at)),
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
            values.add_row(item.name, str(item.value), item.unit or "", format_time(item.time))
        console.print(values)
