"""Alerts and shopping-list items in the store: the SQL, kept in one place.

Writers take the connection of a writer transaction (`StoreWriter.transaction`); readers
take any connection. Values and thresholds are stored as JSON text so a boolean stays a
boolean and a string a string.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import aiosqlite

from gateway.core.alerts import AlertEvent, AlertRenotified, OpenAlert, Value
from gateway.core.shopping import ListItem

ALERT_COLUMNS = (
    "id, rule, device, device_type, kind, severity, state, raised_at, cleared_at,"
    " last_notified_at, notify_count, value, threshold, message, clear_message, acknowledged_at"
)


@dataclass(frozen=True, slots=True)
class AlertRow:
    id: int
    rule: str
    device: str
    device_type: str
    kind: str
    severity: str
    #: "open" or "cleared".
    state: str
    raised_at: float
    cleared_at: float | None
    last_notified_at: float
    notify_count: int
    value: Value | None
    threshold: Value | None
    message: str
    clear_message: str | None
    acknowledged_at: float | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def open_alert(self) -> OpenAlert:
        return OpenAlert(
            rule=self.rule,
            device=self.device,
            device_type=self.device_type,
            raised_at=self.raised_at,
            last_notified_at=self.last_notified_at,
            notify_count=self.notify_count,
            value=self.value,
            threshold=self.threshold,
            message=self.message,
        )


def _dump(value: Value | None) -> str | None:
    return None if value is None else json.dumps(value)


def _load(text: str | None) -> Value | None:
    if text is None:
        return None
    loaded = json.loads(text)
    return loaded if isinstance(loaded, bool | int | float | str) else None


def _alert(row: Sequence[Any]) -> AlertRow:
    return AlertRow(
        id=row[0],
        rule=row[1],
        device=row[2],
        device_type=row[3],
        kind=row[4],
        severity=row[5],
        state=row[6],
        raised_at=row[7],
        cleared_at=row[8],
        last_notified_at=row[9],
        notify_count=row[10],
        value=_load(row[11]),
        threshold=_load(row[12]),
        message=row[13],
        clear_message=row[14],
        acknowledged_at=row[15],
    )


# --------------------------------------------------------------------------- alerts: writes


async def insert_alert(
    conn: aiosqlite.Connection, alert: AlertEvent, *, device_id: int | None
) -> int:
    """Store a raised alert as open; its id."""
    count = alert.count if isinstance(alert, AlertRenotified) else 1
    async with conn.execute(
        "INSERT INTO alerts (rule, device_id, device, device_type, kind, severity, state,"
        " raised_at, last_notified_at, notify_count, value, threshold, message)"
        " VALUES (?, ?, ?, ?, ?, ?, 'open', ?, ?, ?, ?, ?, ?) RETURNING id",
        (
            alert.rule,
            device_id,
            alert.device,
            alert.device_type,
            alert.kind,
            alert.severity,
            alert.raised_at,
            alert.at,
            count,
            _dump(alert.value),
            _dump(alert.threshold),
            alert.message,
        ),
    ) as cursor:
        row = await cursor.fetchone()
    assert row is not None
    return int(row[0])


async def renotify_alert(conn: aiosqlite.Connection, alert: AlertRenotified) -> int | None:
    """Record a re-notification on the open alert; its id, None if none is open."""
    async with conn.execute(
        "UPDATE alerts SET last_notified_at = ?, notify_count = ?, value = ?, message = ?"
        " WHERE rule = ? AND device = ? AND state = 'open' RETURNING id",
        (alert.at, alert.count, _dump(alert.value), alert.message, alert.rule, alert.device),
    ) as cursor:
        row = await cursor.fetchone()
    return None if row is None else int(row[0])


async def clear_alert(
    conn: aiosqlite.Connection, *, rule: str, device: str, at: float, message: str
) -> int | None:
    """Close the open alert of a rule and device; its id, None if none was open."""
    async with conn.execute(
        "UPDATE alerts SET state = 'cleared', cleared_at = ?, clear_message = ?"
        " WHERE rule = ? AND device = ? AND state = 'open' RETURNING id",
        (at, message, rule, device),
    ) as cursor:
        row = await cursor.fetchone()
    return None if row is None else int(row[0])


async def acknowledge_alert(conn: aiosqlite.Connection, alert_id: int, at: float) -> bool:
    """Mark an alert acknowledged (the first acknowledgement counts); False if no such alert."""
    async with conn.execute(
        "UPDATE alerts SET acknowledged_at = coalesce(acknowledged_at, ?) WHERE id = ?"
        " RETURNING id",
        (at, alert_id),
    ) as cursor:
        row = await cursor.fetchone()
    return row is not None


# --------------------------------------------------------------------------- alerts: reads


async def open_alerts(conn: aiosqlite.Connection, *, device: str | None = None) -> list[AlertRow]:
    return await list_alerts(conn, open_only=True, device=device)


async def list_alerts(
    conn: aiosqlite.Connection,
    *,
    open_only: bool = False,
    device: str | None = None,
    limit: int | None = None,
) -> list[AlertRow]:
    """Alerts, newest first."""
    where: list[str] = []
    params: list[Any] = []
    if open_only:
        where.append("state = 'open'")
    if device is not None:
        where.append("device = ?")
        params.append(device)
    sql = f"SELECT {ALERT_COLUMNS} FROM alerts"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY raised_at DESC, id DESC"
    if limit is not None:
        sql += " LIMIT ?"
        params.append(limit)
    async with conn.execute(sql, params) as cursor:
        rows = await cursor.fetchall()
    return [_alert(row) for row in rows]


async def get_alert(conn: aiosqlite.Connection, alert_id: int) -> AlertRow | None:
    async with conn.execute(
        f"SELECT {ALERT_COLUMNS} FROM alerts WHERE id = ?", (alert_id,)
    ) as cursor:
        row = await cursor.fetchone()
    return None if row is None else _alert(row)


# --------------------------------------------------------------------------- shopping lists


def _item(row: Sequence[Any]) -> ListItem:
    levels = json.loads(row[4])
    return ListItem(
        list_name=row[0],
        item=row[1],
        level=row[2],
        minimum=row[3],
        levels={str(k): int(v) for k, v in levels.items()},
        added_at=row[5],
        updated_at=row[6],
    )


async def replace_list(
    conn: aiosqlite.Connection, list_name: str, items: Iterable[ListItem]
) -> None:
    """Make the stored list exactly `items` (an empty list leaves no rows)."""
    await conn.execute("DELETE FROM shopping_list_items WHERE list_name = ?", (list_name,))
    await conn.executemany(
        "INSERT INTO shopping_list_items"
        " (list_name, item, level, minimum, levels, added_at, updated_at)"
        " VALUES (?, ?, ?, ?, ?, ?, ?)",
        [
            (
                list_name,
                item.item,
                item.level,
                item.minimum,
                json.dumps(item.levels, sort_keys=True),
                item.added_at,
                item.updated_at,
            )
            for item in items
        ],
    )


async def list_items(conn: aiosqlite.Connection, list_name: str | None = None) -> list[ListItem]:
    """Items of one list (or of every list), by list and item name."""
    sql = (
        "SELECT list_name, item, level, minimum, levels, added_at, updated_at"
        " FROM shopping_list_items"
    )
    params: tuple[Any, ...] = ()
    if list_name is not None:
        sql += " WHERE list_name = ?"
        params = (list_name,)
    async with conn.execute(sql + " ORDER BY list_name, item", params) as cursor:
        rows = await cursor.fetchall()
    return [_item(row) for row in rows]


async def list_names(conn: aiosqlite.Connection) -> list[str]:
    async with conn.execute(
        "SELECT DISTINCT list_name FROM shopping_list_items ORDER BY list_name"
    ) as cursor:
        rows = await cursor.fetchall()
    return [str(row[0]) for row in rows]


def item_dict(item: ListItem) -> dict[str, Any]:
    """An item as served and printed: without the list name, which the caller already has."""
    return {
        "item": item.item,
        "level": item.level,
        "minimum": item.minimum,
        "levels": dict(item.levels),
        "added_at": item.added_at,
        "updated_at": item.updated_at,
    }
