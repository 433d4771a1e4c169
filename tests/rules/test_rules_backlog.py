"""The commit listener never blocks: at its bound the oldest readings are dropped, counted."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

from structlog.testing import capture_logs

from gateway.core.model import Device, StoredReading
from gateway.core.rules import ThresholdRule
from gateway.registry import Registry
from gateway.rules_service import RulesService
from gateway.store.db import migrate, open_database
from gateway.store.writer import StoreWriter
from tests.support.gateway import wait_until


def reading(device: Device, at: float, temp: float) -> StoredReading:
    return StoredReading(
        id=int(at),
        device=device,
        measurement="temp",
        value=temp,
        unit="Cel",
        device_time=None,
        received_at=at,
        seq=None,
    )


async def test_full_backlog_drops_the_oldest_and_says_so(tmp_path: Path) -> None:
    conn = await open_database(tmp_path / "gw.db")
    await migrate(conn)
    writer = StoreWriter(conn)
    rule = ThresholdRule(name="warm", measurement="temp", above=8.0)
    service = RulesService([rule], writer=writer, registry=Registry(writer), max_backlog=2)
    fridges = [Device(n, f"f{n}", "fridge") for n in range(1, 6)]
    # One commit with five devices' readings, all cold: nothing to store.
    service.on_commit([reading(device, 100.0, 4.0) for device in fridges])
    assert service.stats.dropped == 3 and service.stats.backlog == 2
    with capture_logs() as logs:
        task = asyncio.create_task(service.run_evaluator())
        try:
            await wait_until(lambda: service.idle)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    dropped = [entry for entry in logs if entry["event"] == "rules.backlog_dropped"]
    assert dropped == [
        {
            "event": "rules.backlog_dropped",
            "log_level": "warning",
            "dropped": 3,
            "total_dropped": 3,
            "bound": 2,
        }
    ]
    # The newest groups were kept and judged.
    assert service.stats.evaluated == 2
    assert set(service.engine.state.devices) == {"f4", "f5"}
    await conn.close()
