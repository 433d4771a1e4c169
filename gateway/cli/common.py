"""What every operator command shares: options, exit codes, database access, output.

Tables for people, `--json` for scripts. Exit codes: 0 done, 1 failed (the error is
printed), 2 usage error, 3 the named thing does not exist.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

import aiosqlite
import click
from rich.console import Console

from gateway.config import GatewayConfig, load_config
from gateway.errors import ConfigError, GatewayError
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


def load_config_or_fail(config_path: str | None) -> GatewayConfig:
    try:
        return load_config(config_path)
    except ConfigError as exc:
        raise Failure(str(exc)) from exc


def resolve_db_path(config_path: str | None, db_path: str | None) -> str:
    return db_path or load_config_or_fail(config_path).store.path


def run_async(coroutine: Awaitable[T]) -> T:
    try:
        return asyncio.run(coroutine)  # type: ignore[arg-type]
    except GatewayError as exc:
        raise Failure(str(exc)) from exc


async def with_reader(path: str, work: Callable[[aiosqlite.Connection], Awaitable[T]]) -> T:
    conn = await open_database(path, readonly=True)
    try:
        return await work(conn)
    finally:
        await conn.close()


def make_console() -> Console:
    return Console(highlight=False)


def format_time(epoch: float | None) -> str:
    if epoch is None:
        return "-"
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%d %H:%M:%S")


def print_json(document: Any) -> None:
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
