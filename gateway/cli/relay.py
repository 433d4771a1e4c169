"""`gateway relay ...`: the relay's status and its dead letters.

`status` combines what the database knows (outbox depth, oldest entry, dead letters) with
the live figures the running gateway writes to `relay_status` every
`relay.status_interval` seconds (connected, sent/s, retries, last error). Figures older
than three intervals are shown as unknown: no gateway is running.

`dead-letters replay` moves dead letters back into the outbox (attempt 0, due now). It
writes to the database directly, so it works while the gateway runs: the workers pick the
entries up within `relay.poll_interval`.
"""

from __future__ import annotations

import time

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
    load_config_or_fail,
    make_console,
    print_json,
    resolve_db_path,
    run_async,
    with_reader,
)
from gateway.relay import store
from gateway.store.db import open_database


@main.group()
def relay() -> None:
    """Relay status and dead letters."""


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _yes_no(value: bool | None) -> str:
    return "?" if value is None else ("yes" if value else "no")


@relay.command("status")
@db_option
@config_option
@json_option
def relay_status(db_path: str | None, config_path: str | None, as_json: bool) -> None:
    """Per sink: connected, outbox depth, oldest entry, sent/s, retries, dead letters."""
    config = load_config_or_fail(config_path)
    path = db_path or config.store.path
    stale_after = 3 * config.relay.status_interval
    now = time.time()

    async def work(conn: aiosqlite.Connection) -> list[store.SinkStatus]:
        return await store.read_status(conn, now=now, stale_after=stale_after)

    rows = run_async(with_reader(path, work))
    if as_json:
        print_json([row.as_dict() for row in rows])
        return
    running = any(row.connected is not None for row in rows)
    title = f"relay: {len(rows)} sinks" + ("" if running or not rows else " (gateway not running)")
    table = Table(title=title)
    for column in (
        "sink",
        "connected",
        "outbox",
        "in flight",
        "oldest",
        "sent/s",
        "retries",
        "dead letters",
        "dropped",
        "last error",
    ):
        table.add_column(column)
    for row in rows:
        error = "-"
        if row.last_error:
            error = f"{row.last_error} ({format_time(row.last_error_at)})"
        table.add_row(
            row.sink,
            _yes_no(row.connected),
            str(row.depth),
            str(row.in_flight),
            _age(row.oldest_age),
            "-" if row.sent_per_s is None else f"{row.sent_per_s:g}",
            "-" if row.retries is None else str(row.retries),
            str(row.dead_letters),
            "-" if row.dropped is None else str(row.dropped),
            error,
        )
    make_console().print(table)


@relay.group("dead-letters")
def dead_letters() -> None:
    """Messages the relay gave up on: list them, replay them."""


@dead_letters.command("list")
@click.option("--sink", help="Only this sink's dead letters.")
@click.option("--limit", type=int, default=None, help="At most this many (oldest first).")
@db_option
@config_option
@json_option
def dead_letters_list(
    sink: str | None,
    limit: int | None,
    db_path: str | None,
    config_path: str | None,
    as_json: bool,
) -> None:
    """Dead letters, oldest first."""

    async def work(conn: aiosqlite.Connection) -> list[store.DeadLetter]:
        return await store.list_dead_letters(conn, sink=sink, limit=limit)

    rows = run_async(with_reader(resolve_db_path(config_path, db_path), work))
    if as_json:
        print_json([row.as_dict() for row in rows])
        return
    table = Table(title=f"{len(rows)} dead letters")
    for column in ("id", "sink", "message", "device", "attempts", "dead since (UTC)", "reason"):
        table.add_column(column)
    table.add_column("last error")
    for row in rows:
        table.add_row(
            str(row.id),
            row.sink,
            row.message_id,
            row.device or "-",
            str(row.attempt),
            format_time(row.dead_at),
            row.reason,
            row.last_error or "-",
        )
    make_console().print(table)


@dead_letters.command("replay")
@click.option("--sink", help="Only this sink's dead letters (all of them without --id).")
@click.option("--id", "ids", type=int, multiple=True, help="A dead letter's id; repeatable.")
@click.option("--all", "replay_all", is_flag=True, help="Every dead letter (of --sink).")
@db_option
@config_option
@json_option
def dead_letters_replay(
    sink: str | None,
    ids: tuple[int, ...],
    replay_all: bool,
    db_path: str | None,
    config_path: str | None,
    as_json: bool,
) -> None:
    """Put dead letters back into the outbox (attempt 0, due now)."""
    if not (ids or replay_all or sink):
        raise click.UsageError("say which: --id N (repeatable), --sink NAME or --all")
    if ids and replay_all:
        raise click.UsageError("--id and --all exclude each other")
    path = resolve_db_path(config_path, db_path)

    async def work() -> int:
        conn = await open_database(path)
        try:
            await conn.execute("BEGIN IMMEDIATE")
            try:
                count = await store.replay_dead_letters(conn, now=time.time(), sink=sink, ids=ids)
                await conn.execute("COMMIT")
            except BaseException:
                await conn.execute("ROLLBACK")
                raise
            return count
        finally:
            await conn.close()

    count = run_async(work())
    if as_json:
        print_json({"replayed": count})
    else:
        click.echo(f"{count} dead letters back in the outbox")
    if ids and count == 0:
        raise NotFound("no dead letter with the given id(s)")
