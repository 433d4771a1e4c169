"""The gateway observes devices' resources and stores each notification as a reading."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from aiocoap.numbers.codes import Code

from gateway.app import Gateway
from gateway.store.queries import list_readings
from tests.support.devices import FakeDevice
from tests.support.gateway import base_url, wait_until


@pytest.fixture
async def light() -> AsyncIterator[FakeDevice]:
    device = FakeDevice("light-1", "streetlight", {"on": True, "dim": 80, "power": 120.0})
    await device.start()
    try:
        yield device
    finally:
        await device.stop()


async def values_of(gateway: Gateway, device: str, measurement: str) -> list[object]:
    rows = await list_readings(gateway.reader, device=device, measurement=measurement)
    return [row.value for row in rows]


async def test_gateway_observes_state_and_stores_each_change(
    gateway: Gateway, light: FakeDevice
) -> None:
    url = base_url(gateway.config)
    await light.register(url)
    await wait_until(lambda: light.observers == 1)
    await wait_until(lambda: values_of(gateway, "light-1", "dim"))
    assert await values_of(gateway, "light-1", "dim") == [80]

    for dim in (60, 40, 20):
        light.set(dim=dim)
        await wait_until(lambda dim=dim: _last_is(gateway, "dim", dim))
    assert await values_of(gateway, "light-1", "dim") == [80, 60, 40, 20]
    assert await values_of(gateway, "light-1", "on") == [True] * 4


async def _last_is(gateway: Gateway, measurement: str, value: object) -> bool:
    values = await values_of(gateway, "light-1", measurement)
    return bool(values) and values[-1] == value


async def test_reregistration_from_new_port_reestablishes_observation(
    gateway: Gateway, light: FakeDevice
) -> None:
    url = base_url(gateway.config)
    await light.register(url)
    await wait_until(lambda: light.observers == 1)
    old_port = light.port

    await light.restart_on_new_port()
    assert light.port != old_port
    light.state["dim"] = 10
    await light.register(url)
    await wait_until(lambda: light.observers == 1)
    assert gateway.observer.observing("light-1") == {"/state": f"127.0.0.1:{light.port}"}
    await wait_until(lambda: _last_is(gateway, "dim", 10))
    light.set(dim=5)
    await wait_until(lambda: _last_is(gateway, "dim", 5))


async def test_reading_from_new_port_retargets_observation(
    gateway: Gateway, light: FakeDevice
) -> None:
    url = base_url(gateway.config)
    await light.register(url)
    await wait_until(lambda: light.observers == 1)
    # NAT rebinding: the device's packets now come from another port; it says so by posting.
    await light.restart_on_new_port()
    response = await light.post_reading(url, {"power": 99.5})
    assert response.code.is_successful()
    await wait_until(lambda: light.observers == 1)
    assert gateway.observer.observing("light-1") == {"/state": f"127.0.0.1:{light.port}"}
    light.set(dim=33)
    await wait_until(lambda: _last_is(gateway, "dim", 33))


async def test_deregistration_cancels_observation(gateway: Gateway, light: FakeDevice) -> None:
    url = base_url(gateway.config)
    await light.register(url)
    await wait_until(lambda: light.observers == 1)
    assert light.registration is not None
    response = await light.request(Code.DELETE, f"{url}/{light.registration}")
    assert response.code == Code.DELETED
    await wait_until(lambda: gateway.observer.observing("light-1") == {})
    # aiocoap stops a cancelled observation's token at its next notification, so the one
    # after that is refused with RST and the device drops the gateway as observer.
    for dim in (1, 2, 3):
        light.set(dim=dim)
        if light.observers == 0:
            break
        await wait_until(lambda: light.gets > 0 and True, within=1)
        await asyncio.sleep(0.2)
    await wait_until(lambda: light.observers == 0)
    assert not {1, 2, 3} & set(await values_of(gateway, "light-1", "dim"))
