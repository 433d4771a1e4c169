"""`gateway command send|list`.

`send` writes the command into the database directly (its own short write transaction; WAL
lets it do so while the gateway runs in another process). A running gateway notices it
within `commands.poll_interval` seconds and sends it when the device can be reached.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiosqlite
import click
from rich.table import Table

from gateway.cli import main
from gateway.cli.common import (
    Failure,
    NotFound,
    config_option,
    db_option,
    format_time,
    json_option,
    load_config_or_fail,
    make_console,
    print_json,
    resolve_db_path,
    run_async,
    with_reader,
)
from gateway.commands import store
from gateway.commands.dispatcher import queue_full_message
from gateway.core.commands import METHODS, CommandRequest, check_command, payload_from_json
from gateway.errors import (
    DeviceError,
    GatewayError,
    QueueFullError,
    StoreError,
    UnknownDeviceError,
)
from gateway.store.db import open_database


@main.group("command")
def command() -> None:
    """Queue commands for devices and follow their state."""


async def _enqueue(path: str, device: str, request: CommandRequest, max_queued: int) -> int:
    if not Path(path).exists():
        raise StoreError(f"database not found: {path} (has the gateway run yet?)")
    conn = await open_database(path)
    try:
        async with conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'commands'"
        ) as cursor:
            if await cursor.fetchone() is None:
                raise StoreError("the database has no command queue; run this gateway once")
        await conn.execute("BEGIN IMMEDIATE")
        try:
            command_id = await store.enqueue(
                conn, device, request, now=time.time(), origin="cli", max_queued=max_queued
            )
            await conn.execute("COMMIT")
        except BaseException:
            await conn.execute("ROLLBACK")
            raise
        if command_id is None:
            raise UnknownDeviceError(f"unknown device {device!r:.70}", device=device)
        if isinstance(command_id, store.QueueFull):
            message = queue_full_message(device, command_id.unsettled, max_queued)
            raise QueueFullError(message, max_age=0, device=device)
        return command_id
    finally:
        await conn.close()


@command.command("send")
@click.argument("name")
@click.argument("path")
@click.option(
    "--method", type=click.Choice(METHODS, case_sensitive=False), default="PUT", show_default=True
)
@click.option("--payload-json", help="JSON value, sent to the device as CBOR (60).")
@click.option(
    "--payload-file",
    type=click.Path(exists=True, dir_okay=False),
    help="File whose bytes are sent as they are.",
)
@click.option(
    "--content-format", type=int, help="Content-Format of --payload-file (default: none)."
)
@click.option("--ttl", type=float, help="Seconds after which an unsent command expires.")
@db_option
@config_option
@json_option
def command_send(
    name: str,
    path: str,
    method: str,
    payload_json: str | None,
    payload_file: str | None,
    content_format: int | None,
    ttl: float | None,
    db_path: str | None,
    config_path: str | None,
    as_json: bool,
) -> None:
    """Queue METHOD PATH for device NAME (e.g. `gateway command send light-1 /light
    --payload-json '{"dim": 30}'`)."""
    if payload_json is not None and payload_file is not None:
        raise click.UsageError("give --payload-json or --payload-file, not both")
    payload, cf = b"", None
    try:
        if payload_json is not None:
            payload, cf = payload_from_json(payload_json)
        elif payload_file is not None:
            payload, cf = Path(payload_file).read_bytes(), content_format
        request = check_command(method, path, payload, cf, ttl)
    except DeviceError as exc:
        raise click.UsageError(exc.diagnostic) from exc
    config = load_config_or_fail(config_path)
    database = db_path or config.store.path
    limit = config.commands.max_queued_per_device
    try:
        command_id = asyncio.run(_enqueue(database, name, request, limit))
    except UnknownDeviceError as exc:
        raise NotFound(exc.diagnostic) from exc
    except QueueFullError as exc:
        raise Failure(f"{exc.diagnostic} (commands.max_queued_per_device)") from exc
    except GatewayError as exc:
        raise Failure(str(exc)) from exc
    if as_json:
        print_json({"id": command_id, "device": name, "state": "queued"})
    else:
        click.echo(f"command {command_id} queued for {name}")


@command.command("list")
@click.option("--device", help="Only this device's commands.")
@click.option("--limit", type=int, default=100, show_default=True)
@db_option
@config_option
@json_option
def command_list(
    device: str | None, limit: int, db_path: str | None, config_path: str | None, as_json: bool
) -> None:
    """Commands, newest last, with their state and the device's response."""

    async def work(conn: aiosqlite.Connection) -> list[store.CommandRow]:
        return await store.list_commands(conn, device=device, limit=limit)

    rows = run_async(with_reader(resolve_db_path(config_path, db_path), work))
    if as_json:
        print_json([row.as_dict() for row in rows])
        return
    table = Table(title=f"{len(rows)} commands")
    for column in ("id", "device", "method", "path", "state", "tries", "created (UTC)", "response"):
        table.add_column(column)
    for row in rows:
        response = row.as_dict()["response"]
        table.add_row(
            str(row.id),
            row.device,
            row.method,
            row.path,
            row.state,
            str(row.attempts),
            format_time(row.created_at),
            "-" if response is None else f"{response['code']} {response['payload'] or ''}",
        )
    make_console().print(table)
