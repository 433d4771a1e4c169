"""`LogContext`, the request path's cheaper `bound_contextvars`, binds and restores the same."""

from __future__ import annotations

import asyncio

import pytest
from structlog.contextvars import bind_contextvars, clear_contextvars, get_contextvars

from gateway.coap.base import LogContext


def test_binds_for_the_block_and_restores_what_was_there() -> None:
    clear_contextvars()
    bind_contextvars(peer="outer")
    with LogContext(peer="inner", device="d"):
        assert get_contextvars() == {"peer": "inner", "device": "d"}
        with LogContext(device="e"):
            assert get_contextvars() == {"peer": "inner", "device": "e"}
        assert get_contextvars() == {"peer": "inner", "device": "d"}
    assert get_contextvars() == {"peer": "outer"}
    with pytest.raises(KeyError), LogContext(peer="failing"):
        raise KeyError
    assert get_contextvars() == {"peer": "outer"}
    clear_contextvars()


async def test_each_task_sees_its_own_values_across_awaits() -> None:
    clear_contextvars()

    async def request(device: str) -> dict[str, object]:
        with LogContext(device=device):
            await asyncio.sleep(0.01)
            seen = get_contextvars()
        assert get_contextvars() == {}
        return seen

    assert await asyncio.gather(request("a"), request("b")) == [{"device": "a"}, {"device": "b"}]
