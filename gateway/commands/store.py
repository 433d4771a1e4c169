"""The command queue in SQLite. Write functions run inside a writer transaction (or the CLI's
own); every state change is checked against `gateway.core.commands.TRANSITIONS`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiosqlite

from gateway.core.commands import (
    CommandRequest,
    CommandState,
    describe_payload,
    transition,
)
from gateway.core.model import Device
from gateway.relay.events import record_event

COMMAND_COLUMNS = (
    "c.id, d.name, c.method, c.path, c.payload, c.content_format, c.state, c.created_at,"
    " c.expires_at, c.attempts, c.sent_at, c.settled_at, c.response_code, c.response_payload,"
    " c.response_format, c.error, c.origin"
)
COMMAND_FROM = "FROM commands c JOIN devices d ON d.id = c.device_id"


@dataclass(frozen=True, slots=True)
class CommandRow:
    id: int
    device: str
    method: str
    path: str
    payload: bytes | None
    content_format: int | None
    state: str
    created_at: float
    expires_at: float | None
    attempts: int
    sent_at: float | None
    settled_at: float | None
    response_code: str | None
    response_payload: bytes | None
    response_format: int | None
    error: str | None
    origin: str

    def as_dict(self) -> dict[str, Any]:
        """A plain document for `--json`, `GET /cmd/NAME/<id>` and relayed results."""
        return {
            "id": self.id,
            "device": self.device,
            "method": self.method,
            "path": self.path,
            "payload": describe_payload(self.payload, self.content_format),
            "state": self.state,
            "created_at": self.created_at,
            "expires_at": self.expires_at,
            "attempts": self.attempts,
            "sent_at": self.sent_at,
            "settled_at": self.settled_at,
            "response": None
            if self.response_code is None
            else {
                "code": self.response_code,
                "payload": describe_payload(self.response_payload, self.response_format),
            },
            "error": self.error,
            "origin": self.origin,
        }


def _command(row: Any) -> CommandRow:
    return CommandRow(*row)


@dataclass(frozen=True, slots=True)
class Pending:
    """A queued command with what the dispatcher needs to know about its device."""

    command: CommandRow
    device_type: str
    address: str | None
    online: bool
    queue_mode: bool


@dataclass(frozen=True, slots=True)
class QueueFull:
    """The device's queue is at its bound: `unsettled` commands are queued or sent."""

    unsettled: int


async def unsettled_count(conn: aiosqlite.Connection, device_id: int) -> int:
    async with conn.execute(
        "SELECT count(*) FROM commands WHERE device_id = ? AND state IN ('queued', 'sent')",
        (device_id,),
    ) as cursor:
        row = await cursor.fetchone()
    return int(row[0]) if row else 0


async def enqueue(
    conn: aiosqlite.Connection,
    device: str,
    request: CommandRequest,
    *,
    now: float,
    origin: str,
    max_queued: int | None = None,
) -> int | QueueFull | None:
    """The new command's id; None if there is no such device; `QueueFull` if the device
    already has `max_queued` unsettled commands. Never raises inside the writer's
    transaction, where an exception would fail the other requests of the batch; counting
    and inserting in one transaction keeps the bound exact with concurrent senders."""
    async with conn.execute("SELECT id FROM devices WHERE name = ?", (device,)) as cursor:
        row = await cursor.fetchone()
    if row is None:
        return None
    if max_queued is not None:
        unsettled = await unsettled_count(conn, row[0])
        if unsettled >= max_queued:
            return QueueFull(unsettled)
    cursor = await conn.execute(
        "INSERT INTO commands (device_id, method, path, payload, content_format, state,"
        " created_at, expires_at, origin) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            row[0],
            request.method,
            request.path,
            request.payload or None,
            request.content_format,
            CommandState.QUEUED.value,
            now,
            request.expires_at(now),
            origin,
        ),
    )
    command_id = cursor.lastrowid
    assert command_id is not None
    return command_id


async def get_command(conn: aiosqlite.Connection, command_id: int) -> CommandRow | None:
    async with conn.execute(
        f"SELECT {COMMAND_COLUMNS} {COMMAND_FROM} WHERE c.id = ?", (command_id,)
    ) as cursor:
        row = await cursor.fetchone()
    return None if row is None else _command(row)


async def list_commands(
    conn: aiosqlite.Connection, *, device: str | None = None, limit: int | None = 100
) -> list[CommandRow]:
    """The newest `limit` commands (of one device), oldest first."""
    where, params = ("WHERE d.name = ?", [device]) if device is not None else ("", [])
    sql = f"SELECT {COMMAND_COLUMNS} {COMMAND_FROM} {where} ORDER BY c.id DESC"
    if limit is not None:
        sql += f" LIMIT {int(limit)}"
    async with conn.execute(sql, params) as cursor:
        rows = [_command(row) for row in await cursor.fetchall()]
    rows.reverse()
    return rows


async def pending(conn: aiosqlite.Connection, *, device: str | None = None) -> list[Pending]:
    """Queued commands in the order they must be sent, with their device's reachability."""
    where = "WHERE c.state = 'queued'" + (" AND d.name = ?" if device is not None else "")
    async with conn.execute(
        f"SELECT {COMMAND_COLUMNS}, d.type, d.address, d.online, coalesce(r.queue_mode, 0)"
        f" {COMMAND_FROM} LEFT JOIN registrations r ON r.device_id = d.id {where}"
        " ORDER BY c.id",
        () if device is None else (device,),
    ) as cursor:
        rows = await cursor.fetchall()
    return [
        Pending(_command(row[:17]), row[17], row[18], bool(row[19]), bool(row[20])) for row in rows
    ]


async def last_id(conn: aiosqlite.Connection) -> int:
    async with conn.execute("SELECT coalesce(max(id), 0) FROM commands") as cursor:
        row = await cursor.fetchone()
    return int(row[0]) if row else 0


async def any_expired(conn: aiosqlite.Connection, now: float) -> bool:
    async with conn.execute(
        "SELECT 1 FROM commands WHERE state = 'queued' AND expires_at <= ? LIMIT 1", (now,)
    ) as cursor:
        return await cursor.fetchone() is not None


async def _move(
    conn: aiosqlite.Connection, command: CommandRow, target: CommandState, **changes: Any
) -> None:
    transition(command.state, target)
    assignments = ", ".join(f"{column} = ?" for column in ("state", *changes))
    await conn.execute(
        f"UPDATE commands SET {assignments} WHERE id = ? AND state = ?",
        (target.value, *changes.values(), command.id, command.state),
    )


async def _record_result(conn: aiosqlite.Connection, command_id: int, now: float) -> None:
    settled = await get_command(conn, command_id)
    assert settled is not None
    async with conn.execute(
        "SELECT d.id, d.type FROM commands c JOIN devices d ON d.id = c.device_id WHERE c.id = ?",
        (command_id,),
    ) as cursor:
        row = await cursor.fetchone()
    assert row is not None
    device = Device(row[0], settled.device, row[1])
    await record_event(conn, kind="command_result", device=device, at=now, body=settled.as_dict())


async def expire_due(conn: aiosqlite.Connection, now: float) -> list[CommandRow]:
    """Queued commands whose TTL has passed become expired; they are never sent."""
    async with conn.execute(
        f"SELECT {COMMAND_COLUMNS} {COMMAND_FROM} WHERE c.state = 'queued' AND c.expires_at <= ?",
        (now,),
    ) as cursor:
        due = [_command(row) for row in await cursor.fetchall()]
    for command in due:
        await _move(conn, command, CommandState.EXPIRED, settled_at=now, error="ttl passed")
        await _record_result(conn, command.id, now)
    return due


async def claim(conn: aiosqlite.Connection, command_id: int, now: float) -> CommandRow | None:
    """Mark a queued command sent (attempts + 1), or expire it if its TTL has passed.

    Returns the command to send, or None if it is no longer queued or has just expired.
    Committing "sent" before the datagram leaves means a crash can cause a resend (after a
    restart, sent commands are queued again), never a silent loss.
    """
    command = await get_command(conn, command_id)
    if command is None or command.state != CommandState.QUEUED:
        return None
    if command.expires_at is not None and command.expires_at <= now:
        await _move(conn, command, CommandState.EXPIRED, settled_at=now, error="ttl passed")
        await _record_result(conn, command.id, now)
        return None
    await _move(conn, command, CommandState.SENT, sent_at=now, attempts=command.attempts + 1)
    return await get_command(conn, command_id)


async def settle(
    conn: aiosqlite.Connection,
    command_id: int,
    target: CommandState,
    *,
    now: float,
    code: str | None = None,
    payload: bytes | None = None,
    content_format: int | None = None,
    error: str | None = None,
) -> None:
    """Record the device's answer (or its absence) and relay the result."""
    command = await get_command(conn, command_id)
    if command is None:
        return
    if target is CommandState.QUEUED:
        await _move(conn, command, target, error=error)
        return
    await _move(
        conn,
        command,
        target,
        settled_at=now,
        response_code=code,
        response_payload=payload or None,
        response_format=content_format,
        error=error,
    )
    await _record_result(conn, command_id, now)


async def requeue_sent(
    conn: aiosqlite.Connection, *, reaches: Callable[[str | None], bool] | None = None
) -> int:
    """After a restart, commands that were sent but never answered are queued again;
    with `reaches`, only those to devices at an address it accepts (this worker's)."""
    async with conn.execute(
        f"SELECT {COMMAND_COLUMNS}, d.address {COMMAND_FROM} WHERE c.state = 'sent'"
    ) as cursor:
        stuck = [
            _command(row[:-1])
            for row in await cursor.fetchall()
            if reaches is None or reaches(row[-1])
        ]
    for command in stuck:
        await _move(conn, command, CommandState.QUEUED, error="gateway restarted before answer")
    return len(stuck)
