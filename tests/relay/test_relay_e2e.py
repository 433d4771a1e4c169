"""End to end: devices post over real CoAP to a running gateway, and what they sent arrives
at real downstreams (mosquitto, nats-server with JetStream, an HTTP webhook, a CoAP
server) on the right topic or subject, with the right payload."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiocoap
import aiomqtt
import cbor2
import nats
import pytest
from aiocoap.numbers.codes import Code
from click.testing import CliRunner

from gateway.app import Gateway
from gateway.cli import main as cli
from gateway.relay.envelope import Encoding, decode, decode_batch
from gateway.relay.sinks.nats import MSG_ID_HEADER
from tests.relay.e2e import FAST_RETRY, MqttCollector, collecting, toml
from tests.support.brokers import Mosquitto, NatsServer
from tests.support.downstreams import CoapUpstream, WebhookServer
from tests.support.gateway import (
    GatewayProcess,
    base_url,
    gateway_config,
    post,
    register,
    wait_until,
)


@pytest.fixture
def make_gateway(tmp_path: Path) -> Any:
    @contextlib.asynccontextmanager
    async def make(
        sink: dict[str, Any], route: dict[str, Any] | None = None, **relay: Any
    ) -> AsyncIterator[tuple[Gateway, str]]:
        config = gateway_config(
            tmp_path,
            sinks=[{"name": "down", "timeout": 2.0, **sink}],
            routes=[{"sink": "down", **(route or {})}],
            relay={"retry": FAST_RETRY, "status_interval": 0.2, **relay},
        )
        async with Gateway(config) as gateway:
            yield gateway, base_url(config)

    return make


async def send_temp(client: aiocoap.Context, url: str, name: str, temp: float, seq: int) -> Any:
    return await post(client, url, f"r/{name}", cbor2.dumps({"temp": temp, "seq": seq}))


async def test_mqtt_subscriber_gets_the_reading(
    make_gateway: Any, mosquitto: Mosquitto, coap_client: aiocoap.Context
) -> None:
    async with aiomqtt.Client("127.0.0.1", mosquitto.port) as subscriber:
        await subscriber.subscribe("coap-gw/#", qos=1)
        async with make_gateway({"type": "mqtt", "url": mosquitto.url}) as (_, url):
            await register(coap_client, url, "fridge-1", "fridge")
            response = await send_temp(coap_client, url, "fridge-1", 4.5, 1)
            assert response.code == Code.CHANGED
            async with asyncio.timeout(5):
                message = await anext(aiter(subscriber.messages))
    assert str(message.topic) == "coap-gw/gw1/fridge/fridge-1/readings"
    assert isinstance(message.payload, bytes)
    got = decode(message.payload, Encoding.JSON)
    assert (got.message_id, got.kind, got.device, got.device_type) == (
        "r-1",
        "reading",
        "fridge-1",
        "fridge",
    )
    assert [(v.name, v.value, v.unit) for v in got.values] == [("temp", 4.5, "Cel")]
    assert got.extra == {"seq": 1}


async def test_jetstream_gets_the_reading_with_its_id(
    make_gateway: Any, nats_server: NatsServer, coap_client: aiocoap.Context
) -> None:
    sink = {"type": "nats", "url": nats_server.url, "stream": "RD", "create_stream": True}
    async with make_gateway(sink, {"encoding": "senml+cbor"}) as (gateway, url):
        await register(coap_client, url, "truck.7", "tracker")
        response = await post(coap_client, url, "r/truck.7", cbor2.dumps({"speed": 12.5}))
        assert response.code == Code.CHANGED
        await wait_until(lambda: gateway.relay.stats["down"].sent == 1)
    nc = await nats.connect(nats_server.url)
    try:
        consumer = await nc.jetstream().pull_subscribe("coapgw.>", durable="t", stream="RD")
        (msg,) = await consumer.fetch(1, timeout=5)
    finally:
        await nc.close()
    assert msg.subject == "coapgw.tracker.truck_7.readings"
    assert (msg.headers or {}).get(MSG_ID_HEADER) == "r-1"
    got = decode(msg.data, Encoding.SENML_CBOR)
    assert got.device == "truck.7" and got.values[0].value == 12.5


async def test_webhook_gets_a_batch_of_envelopes(
    make_gateway: Any, webhook: WebhookServer, coap_client: aiocoap.Context
) -> None:
    async with make_gateway({"type": "webhook", "url": webhook.url}) as (gateway, url):
        await register(coap_client, url, "lamp-1", "streetlight")
        payload = cbor2.dumps({"on": True, "dim": 40})
        assert (await post(coap_client, url, "r/lamp-1", payload)).code == Code.CHANGED
        await wait_until(lambda: gateway.relay.stats["down"].sent == 2)
    bodies = [decode_batch(r.body, Encoding.JSON) for r in webhook.requests]
    values = {m.values[0].name: m.values[0].value for body in bodies for m in body}
    assert values == {"on": True, "dim": 40}
    assert webhook.requests[0].headers["Content-Type"] == "application/json"


async def test_coap_upstream_gets_the_reading(
    make_gateway: Any, coap_upstream: CoapUpstream, coap_client: aiocoap.Context
) -> None:
    sink = {"type": "coap", "url": coap_upstream.url}
    async with make_gateway(sink, {"encoding": "cbor"}) as (_, url):
        await register(coap_client, url, "fridge-2", "fridge")
        assert (await send_temp(coap_client, url, "fridge-2", 3.0, 9)).code == Code.CHANGED
        (request,) = await coap_upstream.wait_for(1)
    assert request.content_format == 60
    got = decode(request.payload, Encoding.CBOR)
    assert got.device == "fridge-2" and got.values[0].value == 3.0 and got.extra == {"seq": 9}


async def test_webhook_500s_are_retried_and_a_400_is_a_dead_letter_until_replayed(
    make_gateway: Any, webhook: WebhookServer, coap_client: aiocoap.Context
) -> None:
    webhook.statuses = [500, 500, 200, 400]
    async with make_gateway({"type": "webhook", "url": webhook.url}) as (gateway, url):
        db = gateway.config.store.path
        await register(coap_client, url, "fridge-1", "fridge")
        assert (await send_temp(coap_client, url, "fridge-1", 1.0, 1)).code == Code.CHANGED
        await wait_until(lambda: gateway.relay.stats["down"].sent == 1)
        assert len(webhook.requests) == 3  # two 500s, then the 200
        assert gateway.relay.stats["down"].retries == 2
        assert (await send_temp(coap_client, url, "fridge-1", 2.0, 2)).code == Code.CHANGED
        await wait_until(lambda: gateway.relay.stats["down"].dead == 1)
        listed = await asyncio.to_thread(
            CliRunner().invoke, cli, ["relay", "dead-letters", "list", "--json", "--db", db]
        )
        (dead,) = json.loads(listed.output)
        assert (dead["message_id"], dead["reason"]) == ("r-2", "permanent")
        assert "400" in dead["last_error"]
        replay = await asyncio.to_thread(
            CliRunner().invoke, cli, ["relay", "dead-letters", "replay", "--all", "--db", db]
        )
        assert replay.exit_code == 0, replay.output
        await wait_until(lambda: gateway.relay.stats["down"].sent == 2)
    last = decode_batch(webhook.requests[-1].body, Encoding.JSON)
    assert [m.message_id for m in last] == ["r-2"]


async def test_mqtt5_broker_refusing_a_reading_makes_a_dead_letter_until_replayed(
    make_gateway: Any, tmp_path: Path, coap_client: aiocoap.Context
) -> None:
    # The broker's ACL lets the gateway publish fridge-1's readings only. Over MQTT 5 it
    # says so in the PUBACK; the refused reading must not count as delivered.
    broker = Mosquitto(tmp_path)
    broker.acl = "topic read #\ntopic write coap-gw/gw1/fridge/fridge-1/#\n"
    broker.start()
    sink = {"type": "mqtt", "url": broker.url, "mqtt_version": "5"}
    try:
        async with (
            collecting(MqttCollector(broker.port)) as collector,
            make_gateway(sink) as (gateway, url),
        ):
            db = gateway.config.store.path
            stats = gateway.relay.stats["down"]
            for name in ("fridge-1", "fridge-2"):
                await register(coap_client, url, name, "fridge")
                assert (await send_temp(coap_client, url, name, 5.0, 1)).code == Code.CHANGED
            # The gateway may have its PUBACK before the subscriber has the message, and the
            # other way round: wait for both.
            await wait_until(lambda: stats.sent == 1 and stats.dead == 1 and collector.ids())
            assert collector.ids() == {"r-1"}
            listed = await asyncio.to_thread(
                CliRunner().invoke, cli, ["relay", "dead-letters", "list", "--json", "--db", db]
            )
            (dead,) = json.loads(listed.output)
            assert (dead["message_id"], dead["reason"]) == ("r-2", "permanent")
            assert "Not authorized" in dead["last_error"]
            # The operator fixes the ACL and replays: the reading arrives after all.
            collector.subscribed.clear()
            broker.stop()
            broker.acl = "topic readwrite #\n"
            broker.start()
            async with asyncio.timeout(10):
                await collector.subscribed.wait()  # a broker without persistence forgot it
            replay = await asyncio.to_thread(
                CliRunner().invoke, cli, ["relay", "dead-letters", "replay", "--all", "--db", db]
            )
            assert replay.exit_code == 0, replay.output
            await wait_until(lambda: "r-2" in collector.ids() and stats.sent == 2)
    finally:
        broker.stop()


async def test_backpressure_refuses_with_5_03_until_the_sink_returns(
    make_gateway: Any, webhook: WebhookServer, coap_client: aiocoap.Context
) -> None:
    webhook.statuses = [503] * 10_000
    sink = {"type": "webhook", "url": webhook.url}
    async with make_gateway(sink, max_outbox=5, retry_after=3) as (gateway, url):
        await register(coap_client, url, "fridge-1", "fridge")
        for seq in range(1, 6):
            assert (await send_temp(coap_client, url, "fridge-1", 1.0, seq)).code == Code.CHANGED
        refused = await send_temp(coap_client, url, "fridge-1", 1.0, 6)
        assert refused.code == Code.SERVICE_UNAVAILABLE and refused.opt.max_age == 3
        await webhook.wait_for(2)  # it really is failing
        webhook.statuses.clear()  # the downstream is back

        async def accepted() -> bool:
            response = await send_temp(coap_client, url, "fridge-1", 1.0, 6)
            return bool(response.code == Code.CHANGED)

        await wait_until(accepted, within=10, interval=0.2)
        await wait_until(lambda: gateway.relay.stats["down"].sent == 6)
    seqs = [
        m.extra["seq"]
        for r in webhook.requests[-3:]
        for m in decode_batch(r.body, Encoding.JSON)
        if r.body
    ]
    assert seqs[-1] == 6


async def test_outbox_survives_sigkill_and_drains_after_restart(
    tmp_path: Path, mosquitto: Mosquitto, coap_client: aiocoap.Context
) -> None:
    config = gateway_config(tmp_path)
    settings = {
        "sinks": [{"name": "broker", "type": "mqtt", "url": mosquitto.url, "timeout": 2.0}],
        "routes": [{"sink": "broker"}],
        "relay": {"retry": FAST_RETRY},
    }
    process = GatewayProcess.with_settings(config, tmp_path, toml(settings))
    mosquitto.stop()
    try:
        process.start()
        await register(coap_client, process.url, "fridge-1", "fridge")
        for seq in range(1, 21):
            response = await send_temp(coap_client, process.url, "fridge-1", 1.0, seq)
            assert response.code == Code.CHANGED
        with sqlite3.connect(config.store.path) as conn:
            assert conn.execute("SELECT count(*) FROM relay_queue").fetchone() == (20,)
        process.kill()
        mosquitto.start()
        async with collecting(MqttCollector(mosquitto.port)) as collector:
            process.start()
            await wait_until(lambda: len(collector.ids()) == 20, within=10)
            seqs = [m.extra["seq"] for _, m in collector.messages]
            assert sorted(set(seqs)) == list(range(1, 21))
        with sqlite3.connect(config.store.path) as conn:
            await wait_until(
                lambda: conn.execute("SELECT count(*) FROM relay_queue").fetchone() == (0,)
            )
    finally:
        process.stop()
