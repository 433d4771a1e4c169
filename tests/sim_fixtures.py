"""Pytest fixtures that run a simulated fleet against a gateway under test.

Use from any test package's conftest.py::

    from tests.sim_fixtures import sim_fleet  # noqa: F401

then in a test::

    async def test_x(sim_fleet):
        fleet = await sim_fleet(("127.0.0.1", port), fridges=5, lights=5, interval=0.2)
        assert await fleet.wait_registered(within=5) == 10

Every fleet started through the fixture is stopped (and its sockets closed) at teardown.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from typing import Any

import pytest

from device_sim.coap import Addr, Impairment, Transmission
from device_sim.fleet import Fleet, FleetConfig, GroupConfig

#: Retransmission timing scaled down so lossy tests finish in seconds, not minutes.
FAST_TRANSMISSION = Transmission(ack_timeout=0.2, separate_timeout=10.0)

StartFleet = Callable[..., Awaitable[Fleet]]


def fleet_config(
    gateway: Addr,
    *,
    fridges: int = 0,
    trackers: int = 0,
    lights: int = 0,
    interval: float = 0.5,
    loss: float = 0.0,
    duplicate: float = 0.0,
    jitter: float = 0.0,
    **overrides: Any,
) -> FleetConfig:
    """A fleet config for tests: short intervals, fast retransmission, a pinned start time."""
    base: dict[str, Any] = {
        "gateway": gateway,
        "fridges": GroupConfig(fridges, interval),
        "trackers": GroupConfig(trackers, interval),
        "lights": GroupConfig(lights, interval),
        "impairment": Impairment(loss=loss, duplicate=duplicate, jitter=jitter),
        "transmission": FAST_TRANSMISSION,
        "start_time": 1_700_000_000.0,
        "ramp": interval,
        "listen_window": 0.05,
        "lifetime": 60,
    }
    base.update(overrides)
    return FleetConfig(**base)


@pytest.fixture
async def sim_fleet() -> AsyncIterator[StartFleet]:
    """A function that starts a `Fleet` (arguments as `fleet_config`), stopped at teardown."""
    async with AsyncExitStack() as stack:

        async def start(gateway: Addr, *, drain: float = 5.0, **kwargs: Any) -> Fleet:
            fleet = Fleet(fleet_config(gateway, **kwargs), drain=drain)
            return await stack.enter_async_context(fleet)

        yield start
