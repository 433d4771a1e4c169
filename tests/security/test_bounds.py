"""Bounds: each hit is a clear answer, and the gateway keeps serving."""

from __future__ import annotations

from pathlib import Path

import aiocoap
import pytest
from aiocoap.numbers.codes import Code

from gateway.app import Gateway
from gateway.config import GatewayConfig
from tests.support.gateway import register
from tests.support.gateway import gateway_config as make_config


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
