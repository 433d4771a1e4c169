"""Broker outage: both brokers go away mid-stream while devices keep posting, and come
back 10 s later on the same ports. Every reading the gateway acknowledged arrives: on MQTT
at least once with each device's order kept, on JetStream exactly once per message id.

nats-server is killed; mosquitto is stopped with SIGTERM, because it acknowledges a message
before it saves it (see `PersistentMosquitto.stop`). To the gateway both look the same: the
connection drops and later connections are refused until the broker is back."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import aiocoap
import nats
import pytest

from gateway.app import Gateway
from gateway.relay.envelope import Encoding, decode
from gateway.relay.sinks.nats import MSG_ID_HEADER
from tests.relay.e2e import FAST_RETRY, Device, MqttCollector, PersistentMosquitto, collecting
from tests.support.brokers import NatsServer
from tests.support.gateway import base_url, gateway_config, register, wait_until

OUTAGE = 10.0  # seconds the brokers stay away: the scenario asked for


@pytest.fixture
def durable_mosquitto(tmp_path: Path) -> Iterator[PersistentMosquitto]:
    with PersistentMosquitto.running_in(tmp_path, "durable-mosquitto") as broker:
        yield broker


def last_copies_in_order(seqs: list[int]) -> bool:
    """Duplicates are allowed; the last copy of each message must come in order."""
    last = {seq: index for index, seq in enumerate(seqs)}
    ordered = sorted(last, key=lambda seq: last[seq])
    return ordered == sorted(ordered)


@pytest.mark.slow
async def test_every_acknowledged_reading_arrives_after_a_broker_outage(
    tmp_path: Path,
    durable_mosquitto: PersistentMosquitto,
    nats_server: NatsServer,
    coap_client: aiocoap.Context,
) -> None:
    config = gateway_config(
        tmp_path,
        sinks=[
            {"name": "mqtt", "type": "mqtt", "url": durable_mosquitto.url, "timeout": 2.0},
            {
                "name": "js",
                "type": "nats",
                "url": nats_server.url,
                "timeout": 2.0,
                "stream": "READINGS",
                "create_stream": True,
            },
        ],
        routes=[{"sink": "mqtt"}, {"sink": "js"}],
        relay={"retry": FAST_RETRY},
    )
    url = base_url(config)
    devices = [Device(f"fridge-{n}") for n in range(3)]
    async with (
        Gateway(config) as gateway,
        collecting(MqttCollector(durable_mosquitto.port)) as collector,
    ):
        await wait_until(lambda: durable_mosquitto.saved)  # the subscription survives a kill
        for device in devices:
            await register(coap_client, url, device.name, "fridge")
        posting = [
            asyncio.create_task(d.keep_posting(coap_client, url, 0.1), name=f"device {d.name}")
            for d in devices
        ]
        try:
            await wait_until(lambda: all(len(d.acked) >= 5 for d in devices))
            durable_mosquitto.stop()
            nats_server.stop()
            before = [len(d.acked) for d in devices]
            await asyncio.sleep(OUTAGE)  # the outage itself, while devices keep posting
            # The gateway kept serving devices with both sinks gone.
            assert all(len(d.acked) > n + 20 for d, n in zip(devices, before, strict=True))
            durable_mosquitto.start()
            nats_server.start()
            restarted = [len(d.acked) for d in devices]
            await wait_until(
                lambda: all(len(d.acked) >= n + 5 for d, n in zip(devices, restarted, strict=True))
            )
        finally:
            for task in posting:
                task.cancel()
            await asyncio.gather(*posting, return_exceptions=True)
        acked = {(d.name, seq) for d in devices for seq in d.acked}
        # Readings the devices sent: a request cancelled with the posting tasks (or given up
        # on) may still have been stored, and is then relayed like any other.
        sent = {(d.name, seq) for d in devices for seq in range(1, d.seq + 1)}
        assert all(d.refused == 0 for d in devices)

        def mqtt_seen() -> set[tuple[str, int]]:
            return {(m.device, m.extra["seq"]) for _, m in collector.messages}

        try:
            await wait_until(lambda: acked <= mqtt_seen(), within=20)
        except AssertionError:
            missing = sorted(acked - mqtt_seen())
            raise AssertionError(f"acknowledged, never seen on MQTT: {missing[:20]}") from None
        for device in devices:
            seqs = [m.extra["seq"] for _, m in collector.messages if m.device == device.name]
            assert last_copies_in_order(seqs), device.name
        await wait_until(lambda: gateway.relay.stats["js"].depth == 0, within=20)
        assert gateway.relay.stats["js"].dead == 0 and gateway.relay.stats["mqtt"].dead == 0

    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        info = await js.stream_info("READINGS")
        consumer = await js.pull_subscribe("coapgw.>", durable="check", stream="READINGS")
        messages = []
        while len(messages) < info.state.messages:
            messages += await consumer.fetch(min(200, info.state.messages - len(messages)))
    finally:
        await nc.close()
    ids = [(m.headers or {}).get(MSG_ID_HEADER) for m in messages]
    assert len(ids) == len(set(ids)), "JetStream stored a message twice"
    stored = {(d.device, d.extra["seq"]) for d in (decode(m.data, Encoding.JSON) for m in messages)}
    assert acked <= stored <= sent
