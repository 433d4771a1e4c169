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
    _console,
    _db_path,
    _print_json,
    _run,
    _when,
    _with_reader,
    config_option,
    db_option,
    json_option,
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
