"""Relaying what is not a reading: alerts, events, command results.

`record_event` is called by other features inside a store-writer transaction
(`await writer.transaction(op)`, with `op` calling it), so the event, and the outbox entry
of every route that takes it (written by the `events_outbox` trigger), commit together
with whatever caused them. Its relayed message has the id `e-<event id>`, no values, and
`body` as the envelope's `extra`. The event keeps the device's name and type, so it is
relayed even when the device is unknown or deleted (its `device.id` is not relied on).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

import aiosqlite

from gateway.core.model import Device
from gateway.relay.envelope import KINDS

EVENT_KINDS: frozenset[str] = KINDS - {"reading"}


async def record_event(
    conn: aiosqlite.Connection,
    *,
    kind: str,
    device: Device,
    at: float,
    body: Mapping[str, Any],
) -> int:
    """Store an event of `device` and queue it for every matching route; its id.

    `kind` is "alert", "event" or "command_result"; `body` must be JSON-serialisable
    (finite numbers only). Raises ValueError otherwise, before anything is written.
    """
    if kind not in EVENT_KINDS:
        raise ValueError(f"unknown event kind {kind!r} (one of {sorted(EVENT_KINDS)})")
    if not math.isfinite(at):
        raise ValueError("event time must be a finite number")
    try:
        text = json.dumps(dict(body), separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"event body is not JSON-serialisable: {exc}") from exc
    # By name: callers may hold a Device whose id is unknown (0) or no longer exists.
    async with conn.execute("SELECT id FROM devices WHERE name = ?", (device.name,)) as cursor:
        row = await cursor.fetchone()
    cursor = await conn.execute(
        "INSERT INTO events (kind, device_id, device, device_type, at, body)"
        " VALUES (?, ?, ?, ?, ?, ?)",
        (kind, None if row is None else row[0], device.name, device.type, at, text),
    )
    event_id = cursor.lastrowid
    assert event_id is not None
    return int(event_id)
