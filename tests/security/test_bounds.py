"""Bounds: each hit is a clear answer, and the gateway keeps serving."""

from __future__ import annotations

from pathlib import Path

import aiocoap
import pytest
from aiocoap.numbers.codes import Code

from gateway.app import Gateway
from gateway.config import GatewayConfig
from tests.support.gateway import gateway_config as make_config
from tests.support.gateway import register


@pytest.fixture
def gateway_config(tmp_path: Path) -> GatewayConfig:
    return make_config(tmp_path, security={"max_devices": 2, "max_option_length": 32})


async def test_device_table_bound_answers_503(
    gateway: Gateway, gateway_url: str, coap_client: aiocoap.Context
) -> None:
    await register(coap_client, gateway_url, "fr1")
    await register(coap_client, gateway_url, "fr2")
    request = aiocoap.Message(code=Code.POST, uri=f"{gateway_url}/rd?ep=fr3&et=fridge&lt=60")
    response = await coap_client.request(request).response
    assert response.code == Code.SERVICE_UNAVAILABLE
    assert response.opt.max_age == 60
    # Known devices may still re-register.
    await register(coap_client, gateway_url, "fr1")
    assert gateway.security.guard is not None
    assert gateway.security.guard.events.counts["security.devices_full"] == 1


async def test_long_path_segment_answers_400(
    gateway: Gateway, gateway_url: str, coap_client: aiocoap.Context
) -> None:
    request = aiocoap.Message(code=Code.POST, uri=f"{gateway_url}/r/{'x' * 40}", payload=b"\xa0")
    response = await coap_client.request(request).response
    assert response.code == Code.BAD_REQUEST


@pytest.fixture
def observer_config(tmp_path: Path) -> GatewayConfig:
    return make_config(tmp_path, security={"max_observers_per_peer": 1})


async def test_observers_past_the_bound_get_a_plain_answer(
    observer_config: GatewayConfig, coap_client: aiocoap.Context
) -> None:
    async with Gateway(observer_config) as gateway:
        uri = f"coap://127.0.0.1:{observer_config.server.port}/alerts"
        first = coap_client.request(aiocoap.Message(code=Code.GET, uri=uri, observe=0))
        assert (await first.response).opt.observe is not None
        second = coap_client.request(aiocoap.Message(code=Code.GET, uri=uri, observe=0))
        response = await second.response
        assert response.code == Code.CONTENT
        assert response.opt.observe is None
        assert gateway.security.guard is not None
        assert gateway.security.guard.observers == 1
        first.observation.cancel()
