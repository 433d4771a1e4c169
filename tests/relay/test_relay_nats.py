"""The NATS JetStream sink against a real nats-server."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import nats
import pytest
from nats.aio.client import Client as NatsClient

from gateway.errors import TransientSinkError
from gateway.relay.config import SinkConfig
from gateway.relay.envelope import Encoding, decode
from gateway.relay.sinks.base import publish_batch
from gateway.relay.sinks.nats import MSG_ID_HEADER, NatsSink, stream_subjects
from tests.relay.brokers import NatsServer, free_port
from tests.relay.messages import deliveries


def sink_config(url: str, **kw: object) -> SinkConfig:
    kw.setdefault("timeout", 2.0)
    kw.setdefault("stream", "READINGS")
    kw.setdefault("create_stream", True)
    return SinkConfig(name="js", type="nats", url=url, **kw)  # type: ignore[arg-type]


@pytest.fixture
async def observer(nats_server: NatsServer) -> AsyncIterator[NatsClient]:
    nc = await nats.connect(nats_server.url)
    try:
        yield nc
    finally:
        await nc.close()


async def stored(nc: NatsClient, stream: str = "READINGS") -> int:
    info = await nc.jetstream().stream_info(stream)
    return int(info.state.messages)


async def test_stream_gets_the_batch_with_ids(
    nats_server: NatsServer, observer: NatsClient
) -> None:
    batch = deliveries(3, devices=("fridge-1", "fr.2"), encoding=Encoding.SENML_JSON)
    async with NatsSink(sink_config(nats_server.url)) as sink:
        assert await publish_batch(sink, batch) == [None] * 3
        assert sink.connected
    js = observer.jetstream()
    info = await js.stream_info("READINGS")
    assert info.config.subjects == ["coapgw.*.*.readings"]
    assert info.config.duplicate_window == 120
    consumer = await js.pull_subscribe("coapgw.>", durable="check", stream="READINGS")
    msgs = await consumer.fetch(3, timeout=5)
    assert [m.subject for m in msgs] == [
        "coapgw.fridge.fridge-1.readings",
        "coapgw.fridge.fr_2.readings",
        "coapgw.fridge.fridge-1.readings",
    ]
    assert [(m.headers or {}).get(MSG_ID_HEADER) for m in msgs] == ["r-1", "r-2", "r-3"]
    assert decode(msgs[1].data, Encoding.SENML_JSON) == batch[1].message


async def test_duplicate_ids_are_dropped_by_the_stream(
    nats_server: NatsServer, observer: NatsClient
) -> None:
    async with NatsSink(sink_config(nats_server.url)) as sink:
        assert await publish_batch(sink, deliveries(2)) == [None, None]
        # a retry of both (their acks were "lost") plus one new message
        assert await publish_batch(sink, deliveries(3)) == [None] * 3
    assert await stored(observer) == 3


async def test_existing_stream_is_left_alone(nats_server: NatsServer, observer: NatsClient) -> None:
    js = observer.jetstream()
    await js.add_stream(name="READINGS", subjects=["coapgw.>"], duplicate_window=30)
    async with NatsSink(sink_config(nats_server.url)) as sink:
        assert await publish_batch(sink, deliveries(1)) == [None]
    info = await js.stream_info("READINGS")
    assert info.config.subjects == ["coapgw.>"] and info.config.duplicate_window == 30


async def test_no_stream_is_transient(nats_server: NatsServer) -> None:
    config = sink_config(nats_server.url, create_stream=False, stream=None)
    async with NatsSink(config) as sink:
        (result,) = await publish_batch(sink, deliveries(1))
    assert isinstance(result, TransientSinkError) and "no stream" in str(result)


async def test_server_going_away_and_coming_back(
    nats_server: NatsServer,
) -> None:
    async with NatsSink(sink_config(nats_server.url, timeout=1.0)) as sink:
        assert await publish_batch(sink, deliveries(1)) == [None]
        nats_server.stop()
        started = time.monotonic()
        results = await publish_batch(sink, deliveries(3))
        assert all(isinstance(r, TransientSinkError) for r in results)
        assert time.monotonic() - started < 3
        assert not sink.connected
        nats_server.start()
        assert await publish_batch(sink, deliveries(3)) == [None] * 3
        assert sink.connected
    nc = await nats.connect(nats_server.url)
    try:
        assert await stored(nc) == 3  # r-1 once: the stream kept it across the restart
    finally:
        await nc.close()


async def test_unreachable_server_is_transient() -> None:
    url = f"nats://127.0.0.1:{free_port()}"
    async with NatsSink(sink_config(url)) as sink:
        started = time.monotonic()
        (result,) = await publish_batch(sink, deliveries(1))
        assert time.monotonic() - started < 3
    assert isinstance(result, TransientSinkError) and "cannot connect" in str(result)


def test_stream_subjects_follow_the_template() -> None:
    config = SinkConfig(name="x", type="nats", url="nats://h", subject="a.{gateway}.b{device}")
    assert stream_subjects(config) == ["a.*.*"]
    explicit = SinkConfig(name="x", type="nats", url="nats://h", stream_subjects=("a.>",))
    assert stream_subjects(explicit) == ["a.>"]
