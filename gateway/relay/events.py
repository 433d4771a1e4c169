"""Events for the relay outbox, recorded inside the transaction that caused them.

Placeholder with the final signature: it records nothing yet and returns 0. The relay's
outbox integration replaces it; callers already call it inside their write transaction.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import aiosqlite


async def record_event(
    conn: aiosqlite.Connection,
    *,
    kind: str,
    device: str,
    at: float,
    body: Mapping[str, Any],
) -> int:
    """Queue a `kind` message about `device` for the routes that ask for it; rows queued."""
    del conn, kind, device, at, body
    return 0
