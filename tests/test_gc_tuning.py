"""The served gateway's garbage-collector policy: frozen survivors, a periodic full sweep."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Iterator

import pytest
from structlog.testing import capture_logs

from gateway.app import GC_YOUNG_THRESHOLD, gc_freezer, tune_gc
from tests.support.gateway import wait_until


@pytest.fixture
def restored_gc() -> Iterator[None]:
    thresholds = gc.get_threshold()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*thresholds)


def test_tune_gc_freezes_start_up_objects_and_raises_the_young_threshold(
    restored_gc: None,
) -> None:
    tune_gc()
    assert gc.get_freeze_count() > 0
    assert gc.get_threshold()[0] == GC_YOUNG_THRESHOLD


async def test_freezer_freezes_survivors_and_sweeps_everything_now_and_then(
    restored_gc: None,
) -> None:
    class Cycle:
        other: object

    with capture_logs() as logs:
        task = asyncio.create_task(gc_freezer(interval=0.01, full_interval=0.05))
        await wait_until(lambda: gc.get_freeze_count() > 0)
        garbage = Cycle()
        garbage.other = garbage  # only a full collection can free it once frozen
        del garbage
        await wait_until(lambda: any(e["event"] == "gc.collected" for e in logs))
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    swept = [entry for entry in logs if entry["event"] == "gc.collected"]
    assert swept and all(entry["unreachable"] >= 0 for entry in swept)
