"""Gateway events (alerts, shopping-list changes) handed to the relay.

Placeholder with the agreed signature: it records nothing yet. The relay's outbox
integration replaces it with the real implementation, which writes the event and its
outbox rows on `conn` inside the caller's transaction.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import aiosqlite

from gateway.core.model import Device


async def record_event(
    conn: aiosqlite.Connection,
    *,
    kind: Literal["alert", "event"],
    device: Device,
    at: float,
    body: Mapping[str, Any],
) -> int:
    """Record one event for relay inside the caller's transaction; the number of rows queued."""
    return 0
