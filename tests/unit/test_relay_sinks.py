"""The sink contract as the worker sees it, with the memory sink."""

from __future__ import annotations

import asyncio
import dataclasses
import math
from collections.abc import Sequence

import pytest
from structlog.testing import capture_logs

from gateway.errors import PermanentSinkError, TransientSinkError
from gateway.relay.envelope import Value
from gateway.relay.sinks.base import Delivery, Result, hold_back_after_failure, publish_batch
from gateway.relay.sinks.memory import MemorySink
from tests.relay.messages import deliveries, message


async def test_memory_sink_records_in_order() -> None:
    async with MemorySink() as sink:
        batch = deliveries(3, devices=("a", "b"))
        assert await publish_batch(sink, batch) == [None] * 3
        assert sink.message_ids == ["r-1", "r-2", "r-3"]
        assert await sink.wait_for(3) == batch


async def test_down_sink_fails_the_whole_batch() -> None:
    async with MemorySink() as sink:
        sink.set_down()
        results = await publish_batch(sink, deliveries(2))
        assert all(isinstance(r, TransientSinkError) for r in results)
        assert not sink.connected and sink.last_error is results[0]
        sink.set_down(False)
        assert await publish_batch(sink, deliveries(2)) == [None, None]
        assert sink.last_error is None


async def test_nth_call_fails() -> None:
    async with MemorySink() as sink:
        sink.fail_call(2, "permanent")
        assert await publish_batch(sink, deliveries(1)) == [None]
        (second,) = await publish_batch(sink, deliveries(1))
        assert isinstance(second, PermanentSinkError)
        assert await publish_batch(sink, deliveries(1)) == [None]


async def test_a_transient_failure_holds_back_later_messages_of_that_device() -> None:
    async with MemorySink() as sink:
        sink.fail_message("r-2", "transient")
        sink.fail_message("r-5", "permanent")
        batch = deliveries(6, devices=("a", "b"))  # a: r-1 r-3 r-5, b: r-2 r-4 r-6
        results = await publish_batch(sink, batch)
    kinds = [None if r is None else type(r).__name__ for r in results]
    assert kinds == [
        None,
        "TransientSinkError",
        None,
        "TransientSinkError",  # held back behind r-2
        "PermanentSinkError",  # a dead letter holds nothing back
        "TransientSinkError",
    ]
    assert "held back" in str(results[3])


def test_hold_back_is_per_device() -> None:
    batch = [Delivery(message(i, d)) for i, d in enumerate("abab", start=1)]
    failed = TransientSinkError("x", sink="s")
    assert hold_back_after_failure(batch, [failed, None, None, None])[2] is not None
    assert hold_back_after_failure(batch, [failed, None, None, None])[1] is None


async def test_unencodable_message_is_a_permanent_failure_of_that_message_only() -> None:
    bad = Delivery(dataclasses.replace(message(2), values=[Value("t", math.inf)]))
    async with MemorySink() as sink:
        results = await publish_batch(sink, [Delivery(message(1)), bad, Delivery(message(3))])
    assert results[0] is None and results[2] is None
    assert isinstance(results[1], PermanentSinkError)


class Broken:
    name = "broken"
    connected = True
    last_error = None

    async def publish(self, batch: Sequence[Delivery]) -> Sequence[Result]:
        raise KeyError("bug")


async def test_a_sink_bug_is_retried_not_lost() -> None:
    with capture_logs() as logs:
        results = await publish_batch(Broken(), deliveries(2))  # type: ignore[arg-type]
    assert all(isinstance(r, TransientSinkError) for r in results)
    assert isinstance(results[0].__cause__, KeyError)  # type: ignore[union-attr]
    assert logs[0]["event"] == "relay.sink_bug" and logs[0]["log_level"] == "error"


async def test_a_hanging_sink_can_be_cancelled() -> None:
    async with MemorySink() as sink:
        sink.hang()
        task = asyncio.create_task(publish_batch(sink, deliveries(1)))
        await asyncio.sleep(0)  # let the publish start and block
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert sink.delivered == []
        sink.release()
        assert await publish_batch(sink, deliveries(1)) == [None]
