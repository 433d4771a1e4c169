"""A lamp failure reaches a real MQTT subscriber through the relay, as an `alert` message."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path
from typing import Any

import aiocoap
import pytest

from device_sim.models import StreetLight
from gateway.app import Gateway
from tests.rules.conftest import T0, Clock, Devices, example_rules
from tests.support.brokers import Mosquitto
from tests.support.gateway import gateway_config

# Needs the relay's outbox worker; without it alerts are only handed to `record_event`.
pytest.importorskip("gateway.relay.service")
aiomqtt = pytest.importorskip("aiomqtt")
from gateway.relay.envelope import Encoding, decode  # noqa: E402


async def test_lamp_failure_alert_reaches_an_mqtt_subscriber(
    tmp_path: Path, mosquitto: Mosquitto, coap_client: aiocoap.Context, clock: Clock
) -> None:
    config = gateway_config(
        tmp_path,
        rules=example_rules(),  # type: ignore[arg-type]
        sinks=[  # type: ignore[arg-type]
            {
                "name": "phone",
                "type": "mqtt",
                "url": mosquitto.url,
                "timeout": 2.0,
                "topic": "coap-gw/{gateway}/{type}/{device}/{kind}",
            }
        ],
        routes=[{"sink": "phone", "kinds": ["alert"], "encoding": "json"}],  # type: ignore[arg-type]
    )
    rng = random.Random(5)
    healthy, failing = StreetLight(), StreetLight(failure_rate=1.0)
    state = healthy.initial(T0, rng)
    async with aiomqtt.Client("127.0.0.1", mosquitto.port) as subscriber:
        await subscriber.subscribe("coap-gw/#", qos=1)
        async with Gateway(config, clock=clock) as gateway:
            devices = Devices(gateway, coap_client, clock)
            await devices.register("lamp-12", "streetlight")
            state, _ = healthy.step(state, T0 + 60, rng)
            await devices.send("lamp-12", healthy.measurements(state), at=T0 + 60)
            state, _ = failing.step(state, T0 + 120, rng)
            await devices.send("lamp-12", failing.measurements(state), at=T0 + 120)
            async with asyncio.timeout(10):
                message = await anext(aiter(subscriber.messages))
    assert str(message.topic) == "coap-gw/gw1/streetlight/lamp-12/alert"
    assert isinstance(message.payload, bytes)
    got = decode(message.payload, Encoding.JSON)
    assert (got.kind, got.device, got.device_type) == ("alert", "lamp-12", "streetlight")
    body: dict[str, Any] = dict(got.extra)
    assert body["event"] == "raised"
    assert body["rule"] == "streetlight-lamp-failure"
    assert body["severity"] == "critical"
    assert body["message"] == "lamp-12: lamp failure"
