"""Read-only queries, shared by the CoAP resources and the operator CLI."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiosqlite

from gateway.core.model import value_from_row
from gateway.core.readings import LatestValue, Value


@dataclass(frozen=True, slots=True)
class DeviceRow:
    name: str
    type: str
    online: bool
    created_at: float
    last_seen: float | None
    address: str | None
    registration_id: str | None
    lifetime: int | None
    expires_at: float | None
    queue_mode: bool
    links: str
    readings: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return {field: getattr(self, field) for field in self.__dataclass_fields__}


@dataclass(frozen=True, slots=True)
class ReadingRow:
    id: int
    device: str
    device_type: str
    measurement: str
    value: Value
    unit: str | None
    device_time: float | None
    received_at: float
    seq: int | None

    def as_dict(self) -> dict[str, Any]:
        return {field: getattr(self, field) for field in self.__dataclass_fields__}


DEVICE_COLUMNS = (
    "d.name, d.type, d.online, d.created_at, d.last_seen, d.address,"
    " r.id, r.lifetime, r.expires_at, coalesce(r.queue_mode, 0), coalesce(r.links, '')"
)
DEVICE_FROM = "FROM devices d LEFT JOIN registrations r ON r.device_id = d.id"


def _device(row: Any, readings: int | None = None) -> DeviceRow:
    return DeviceRow(
        name=row[0],
        type=row[1],
        online=bool(row[2]),
        created_at=row[3],
        last_seen=row[4],
        address=row[5],
        registration_id=row[6],
        lifetime=row[7],
        expires_at=row[8],
        queue_mode=bool(row[9]),
        links=row[10],
        readings=readings,
    )


async def list_devices(conn: aiosqlite.Connection) -> list[DeviceRow]:
    async with conn.execute(f"SELECT {DEVICE_COLUMNS} {DEVICE_FROM} ORDER BY d.name") as cursor:
        return [_device(row) for row in await cursor.fetchall()]


async def get_device(conn: aiosqlite.Connection, name: str) -> DeviceRow | None:
    async with conn.execute(
        f"SELECT {DEVICE_COLUMNS}, d.id {DEVICE_FROM} WHERE d.name = ?", (name,)
    ) as cursor:
        row = await cursor.fetchone()
    if row is None:
        return None
    async with conn.execute("SELECT count(*) FROM readings WHERE device_id = ?", (row[11],)) as c:
        count = await c.fetchone()
    return _device(row, readings=int(count[0]) if count else 0)


async def latest_values(conn: aiosqlite.Connection, device_id: int) -> list[LatestValue]:
    """The most recently received value of each measurement of a device."""
    async with conn.execute(
        "SELECT measurement, value, kind, unit, coalesce(device_time, received_at)"
        " FROM readings WHERE id IN"
        " (SELECT max(id) FROM readings WHERE device_id = ? GROUP BY measurement)"
        " ORDER BY measurement",
        (device_id,),
    ) as cursor:
        rows = await cursor.fetchall()
    return [LatestValue(row[0], value_from_row(row[1], row[2]), row[3], row[4]) for row in rows]


READING_SELECT = (
    "SELECT r.id, d.name, d.type, r.measurement, r.value, r.kind, r.unit, r.device_time,"
    " r.received_at, r.seq FROM readings r JOIN devices d ON d.id = r.device_id"
)


def _reading(row: Any) -> ReadingRow:
    return ReadingRow(
        id=row[0],
        device=row[1],
        device_type=row[2],
        measurement=row[3],
        value=value_from_row(row[4], row[5]),
        unit=row[6],
        device_time=row[7],
        received_at=row[8],
        seq=row[9],
    )


def _reading_filter(
    device: str | None, since: float | None, measurement: str | None
) -> tuple[str, list[Any]]:
    clauses: list[str] = []
    params: list[Any] = []
    if device is not None:
        clauses.append("d.name = ?")
        params.append(device)
    if since is not None:
        clauses.append("r.received_at >= ?")
        params.append(since)
    if measurement is not None:
        clauses.append("r.measurement = ?")
        params.append(measurement)
    return (" WHERE " + " AND ".join(clauses)) if clauses else "", params


async def list_readings(
    conn: aiosqlite.Connection,
    *,
    device: str | None = None,
    since: float | None = None,
    measurement: str | None = None,
    limit: int | None = 100,
) -> list[ReadingRow]:
    """The newest `limit` matching readings, returned oldest first."""
    where, params = _reading_filter(device, since, measurement)
    sql = f"SELECT * FROM ({READING_SELECT}{where} ORDER BY r.id DESC"
    if limit is not None:
        sql += " LIMIT ?"
        params.append(limit)
    sql += ") ORDER BY id"
    async with conn.execute(sql, params) as cursor:
        return [_reading(row) for row in await cursor.fetchall()]


async def count_readings(
    conn: aiosqlite.Connection, *, device: str | None = None, since: float | None = None
) -> int:
    where, params = _reading_filter(device, since, None)
    async with conn.execute(
        f"SELECT count(*) FROM readings r JOIN devices d ON d.id = r.device_id{where}", params
    ) as cursor:
        row = await cursor.fetchone()
    return int(row[0]) if row else 0


async def iter_readings(
    conn: aiosqlite.Connection,
    *,
    device: str | None = None,
    since: float | None = None,
    chunk: int = 5_000,
) -> AsyncIterator[list[ReadingRow]]:
    """Every matching reading, oldest first, in chunks (for exports of any size)."""
    where, params = _reading_filter(device, since, None)
    last_id = 0
    joiner = " AND " if where else " WHERE "
    while True:
        async with conn.execute(
            f"{READING_SELECT}{where}{joiner}r.id > ? ORDER BY r.id LIMIT ?",
            [*params, last_id, chunk],
        ) as cursor:
            rows = [_reading(row) for row in await cursor.fetchall()]
        if not rows:
            return
        yield rows
        last_id = rows[-1].id
