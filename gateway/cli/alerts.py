"""`gateway rules list`, `gateway alerts list|ack`, `gateway shopping-list show`."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import aiosqlite
import click
import msgspec
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
from gateway.core.rules import RuleConfig, StockRule
from gateway.errors import StoreError
from gateway.store import alerts as store
from gateway.store.db import open_database

# --- rules ---------------------------------------------------------------------------------


@main.group()
def rules() -> None:
    """The configured rules."""


def _rule_dict(rule: RuleConfig) -> dict[str, Any]:
    document: dict[str, Any] = msgspec.to_builtins(rule)
    document["kind"] = rule.kind
    return document


def _rule_summary(rule: RuleConfig) -> str:
    skip = {"kind", "name", "device_types", "devices", "message", "clear_message", "severity"}
    parts = [f"{k}={v}" for k, v in _rule_dict(rule).items() if k not in skip and v not in ((), {})]
    return " ".join(parts)


@rules.command("list")
@config_option
@json_option
def rules_list(config_path: str | None, as_json: bool) -> None:
    """Every rule of the configuration, in order."""
    config = load_config_or_fail(config_path)
    if as_json:
        print_json([_rule_dict(rule) for rule in config.rules])
        return
    table = Table(title=f"{len(config.rules)} rules")
    for column in ("name", "kind", "device types", "devices", "severity", "settings"):
        table.add_column(column)
    for rule in config.rules:
        table.add_row(
            rule.name,
            rule.kind,
            ", ".join(rule.device_types),
            rule.devices,
            "-" if isinstance(rule, StockRule) else rule.severity,
            _rule_summary(rule),
        )
    make_console().print(table)


# --- alerts --------------------------------------------------------------------------------


@main.group()
def alerts() -> None:
    """Alerts raised by rules."""


@alerts.command("list")
@click.option("--open", "open_only", is_flag=True, help="Only alerts not cleared yet.")
@click.option("--device", help="Only this device's alerts.")
@click.option("--limit", type=int, default=100, show_default=True, help="At most this many.")
@db_option
@config_option
@json_option
def alerts_list(
    open_only: bool,
    device: str | None,
    limit: int,
    db_path: str | None,
    config_path: str | None,
    as_json: bool,
) -> None:
    """Alerts, newest first."""

    async def work(conn: aiosqlite.Connection) -> list[store.AlertRow]:
        return await store.list_alerts(conn, open_only=open_only, device=device, limit=limit)

    rows = run_async(with_reader(resolve_db_path(config_path, db_path), work))
    if as_json:
        print_json([row.as_dict() for row in rows])
        return
    table = Table(title=f"{len(rows)} alerts")
    for column in ("id", "state", "severity", "rule", "device", "raised (UTC)", "cleared (UTC)"):
        table.add_column(column)
    table.add_column("ack")
    table.add_column("message")
    for row in rows:
        table.add_row(
            str(row.id),
            row.state,
            row.severity,
            row.rule,
            row.device,
            format_time(row.raised_at),
            format_time(row.cleared_at),
            "yes" if row.acknowledged_at is not None else "",
            row.message,
        )
    make_console().print(table)


@alerts.command("ack")
@click.argument("alert_id", metavar="ID", type=int)
@db_option
@config_option
def alerts_ack(alert_id: int, db_path: str | None, config_path: str | None) -> None:
    """Acknowledge an alert (recorded with it; the alert stays open until it clears)."""
    path = resolve_db_path(config_path, db_path)

    async def work() -> bool:
        if not Path(path).exists():  # opening for writing would create an empty one
            raise StoreError(f"database not found: {path} (has the gateway run yet?)")
        conn = await open_database(path)
        try:
            await conn.execute("BEGIN IMMEDIATE")
            found = await store.acknowledge_alert(conn, alert_id, time.time())
            await conn.execute("COMMIT")
            return found
        finally:
            await conn.close()

    if not run_async(work()):
        raise NotFound(f"no alert with id {alert_id}")
    click.echo(f"alert {alert_id} acknowledged")


# --- shopping lists ------------------------------------------------------------------------


@main.group("shopping-list")
def shopping_list() -> None:
    """Shopping lists kept from stock levels."""


@shopping_list.command("show")
@click.argument("name")
@db_option
@config_option
@json_option
def shopping_list_show(
    name: str, db_path: str | None, config_path: str | None, as_json: bool
) -> None:
    """The items on one list (an unknown or empty list is shown empty)."""

    async def work(conn: aiosqlite.Connection) -> list[Any]:
        return await store.list_items(conn, name)

    items = run_async(with_reader(resolve_db_path(config_path, db_path), work))
    if as_json:
        print_json({"list": name, "items": [store.item_dict(item) for item in items]})
        return
    table = Table(title=f"shopping list {name}: {len(items)} items")
    for column in ("item", "level", "minimum", "reported by", "added (UTC)"):
        table.add_column(column)
    for item in items:
        table.add_row(
            item.item,
            str(item.level),
            str(item.minimum),
            ", ".join(f"{device} ({level})" for device, level in sorted(item.levels.items())),
            format_time(item.added_at),
        )
    make_console().print(table)
