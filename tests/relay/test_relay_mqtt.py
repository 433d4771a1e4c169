"""The MQTT sink against a real mosquitto, read back by a real subscriber."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from gateway.errors import PermanentSinkError, TransientSinkError
from gateway.relay.config import SinkConfig
from gateway.relay.envelope import Encoding, decode
from gateway.relay.sinks.base import publish_batch
from gateway.relay.sinks.mqtt import TCP_QUICKACK, MqttSink
from gateway.relay.sinks.mqtt_link import MqttLink
from tests.relay.messages import deliveries
from tests.support.brokers import Mosquitto, free_port
from tests.support.gateway import wait_until


def sink_config(url: str, **kw: object) -> SinkConfig:
    kw.setdefault("timeout", 2.0)
    return SinkConfig(name="mqtt", type="mqtt", url=url, **kw)  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def subscribed(mosquitto: Mosquitto, topic: str) -> AsyncIterator[aiomqtt.Client]:
    async with aiomqtt.Client(
        "127.0.0.1", mosquitto.port, protocol=aiomqtt.ProtocolVersion.V5
    ) as client:
        await client.subscribe(topic, qos=1)
        yield client


@pytest.fixture
async def subscriber(mosquitto: Mosquitto) -> AsyncIterator[aiomqtt.Client]:
    async with subscribed(mosquitto, "coap-gw/#") as client:
        yield client


async def receive(client: aiomqtt.Client, count: int) -> list[aiomqtt.Message]:
    received: list[aiomqtt.Message] = []
    async with asyncio.timeout(5):
        async for msg in client.messages:
            received.append(msg)
            if len(received) == count:
                break
    return received


@pytest.mark.parametrize("version", ["3.1.1", "5"])
async def test_batch_arrives_in_order_on_the_templated_topics(
    mosquitto: Mosquitto, subscriber: aiomqtt.Client, version: str
) -> None:
    batch = deliveries(4, devices=("fridge-1", "fridge/2"), encoding=Encoding.CBOR)
    async with MqttSink(sink_config(mosquitto.url, mqtt_version=version)) as sink:
        assert await publish_batch(sink, batch) == [None] * 4
        assert sink.connected
    got = await receive(subscriber, 4)
    assert [str(m.topic) for m in got] == [
        "coap-gw/gw1/fridge/fridge-1/readings",
        "coap-gw/gw1/fridge/fridge_2/readings",
    ] * 2
    messages = [decode(m.payload, Encoding.CBOR) for m in got]
    assert [m.message_id for m in messages] == ["r-1", "r-2", "r-3", "r-4"]
    assert messages[0] == batch[0].message
    if version == "5":
        properties: Any = got[0].properties
        assert properties is not None
        assert properties.ContentType == "application/cbor"
        assert ("message-id", "r-1") in properties.UserProperty


async def test_retain_and_custom_topic(mosquitto: Mosquitto) -> None:
    config = sink_config(mosquitto.url, retain=True, topic="plant/{device}/{kind}/{id}", qos=0)
    async with MqttSink(config) as sink:
        assert await publish_batch(sink, deliveries(1)) == [None]
    # A subscriber that comes later still gets the retained message.
    async with aiomqtt.Client("127.0.0.1", mosquitto.port) as late:
        await late.subscribe("plant/#")
        (msg,) = await receive(late, 1)
    assert str(msg.topic) == "plant/fridge-1/reading/r-1" and msg.retain


async def test_gateway_starts_without_broker_and_catches_up(tmp_path: Path) -> None:
    broker = Mosquitto(tmp_path)
    async with MqttSink(sink_config(broker.url)) as sink:  # nothing listens yet: no error
        started = time.monotonic()
        results = await publish_batch(sink, deliveries(2))
        assert all(isinstance(r, TransientSinkError) for r in results)
        assert time.monotonic() - started < 3
        assert not sink.connected and sink.last_error is not None
        broker.start()
        try:
            assert await publish_batch(sink, deliveries(2)) == [None, None]
            assert sink.connected and sink.last_error is None
        finally:
            broker.stop()


async def test_broker_going_away_is_transient_and_recovered(mosquitto: Mosquitto) -> None:
    async with MqttSink(sink_config(mosquitto.url, timeout=1.0)) as sink:
        assert await publish_batch(sink, deliveries(1)) == [None]
        mosquitto.stop()
        await wait_until(lambda: not sink.connected)  # noticed between batches
        started = time.monotonic()
        results = await publish_batch(sink, deliveries(3))
        assert all(isinstance(r, TransientSinkError) for r in results)
        assert time.monotonic() - started < 3  # bounded by the timeout, never a hang
        mosquitto.start()
        assert await publish_batch(sink, deliveries(3)) == [None] * 3


async def test_broker_that_stops_answering_is_transient_within_the_timeout(
    mosquitto: Mosquitto,
) -> None:
    # The connection stays open but no PUBACK comes (a stalled broker): the batch's one
    # deadline turns every unconfirmed delivery transient, and the next batch reconnects.
    async with MqttSink(sink_config(mosquitto.url, timeout=1.0)) as sink:
        assert await publish_batch(sink, deliveries(1)) == [None]
        assert mosquitto.process is not None
        mosquitto.process.send_signal(signal.SIGSTOP)
        try:
            started = time.monotonic()
            results = await publish_batch(sink, deliveries(5))
            waited = time.monotonic() - started
        finally:
            mosquitto.process.send_signal(signal.SIGCONT)
        assert all(isinstance(r, TransientSinkError) for r in results)
        assert "no PUBACK within 1.0 s" in str(results[0])
        assert waited < 3  # bounded by the timeout, never a hang
        assert not sink.connected
        assert await publish_batch(sink, deliveries(2)) == [None] * 2


#: Anonymous clients may read everything but publish only fridge-1's readings.
ONLY_FRIDGE_1 = "topic read #\ntopic write coap-gw/gw1/fridge/fridge-1/#\n"


@pytest.fixture
def mosquitto_acl(tmp_path: Path) -> Iterator[Mosquitto]:
    broker = Mosquitto(tmp_path)
    broker.acl = ONLY_FRIDGE_1
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


async def test_mqtt5_refusal_in_the_puback_is_permanent_for_that_message_alone(
    mosquitto_acl: Mosquitto,
) -> None:
    # The broker acknowledges every PUBLISH, but refuses fridge-2's with "Not authorized":
    # counted as delivered, that reading would be lost without a trace.
    batch = deliveries(4, devices=("fridge-1", "fridge-2"))
    async with subscribed(mosquitto_acl, "coap-gw/#") as subscriber:
        async with MqttSink(sink_config(mosquitto_acl.url, mqtt_version="5")) as sink:
            results = await publish_batch(sink, batch)
            assert [r is None for r in results] == [True, False, True, False]
            for refused in (results[1], results[3]):
                assert isinstance(refused, PermanentSinkError)
                assert "Not authorized" in str(refused) and "0x87" in str(refused)
            assert sink.connected  # a refusal is not a broken connection
            assert await publish_batch(sink, deliveries(1)) == [None]
        got = await receive(subscriber, 3)
    assert [decode(m.payload, Encoding.JSON).message_id for m in got] == ["r-1", "r-3", "r-1"]


async def test_broker_that_never_sends_connack_is_transient_and_its_socket_closed() -> None:
    # Something accepts the TCP connection and reads the CONNECT, but never answers.
    accepted: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Queue()

    async def on_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await accepted.put((reader, writer))

    server = await asyncio.start_server(on_connection, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with MqttSink(sink_config(f"mqtt://127.0.0.1:{port}", timeout=0.5)) as sink:
            started = time.monotonic()
            (result,) = await publish_batch(sink, deliveries(1))
            assert time.monotonic() - started < 2
            assert isinstance(result, TransientSinkError) and "cannot connect" in str(result)
            reader, writer = await accepted.get()
            async with asyncio.timeout(5):
                received = await reader.read()  # to EOF: the sink closed its end
            assert received[:1] == b"\x10"  # what came was a CONNECT, and nothing after it
            writer.close()
    finally:
        server.close()
        await server.wait_closed()


async def test_mqtt5_keeps_within_the_receive_maximum_the_broker_announces(
    tmp_path: Path,
) -> None:
    # MQTT 5 forbids more unacknowledged publishes than the broker's CONNACK allows; the
    # sink was configured for more, so it connects again within the broker's bound.
    broker = Mosquitto(tmp_path)
    broker.extra = "max_inflight_messages 5\n"
    broker.start()
    try:
        config = sink_config(broker.url, mqtt_version="5", max_in_flight=50)
        async with MqttSink(config) as sink:
            assert await publish_batch(sink, deliveries(30)) == [None] * 30
            assert sink._link is not None
            assert sink._link.receive_maximum == 5
            assert sink._link.client.max_inflight_messages == 5
    finally:
        broker.stop()


async def test_connection_lost_mid_batch_ends_the_wait_at_once(mosquitto: Mosquitto) -> None:
    # The broker dies with PUBACKs outstanding: the batch is transient as soon as the
    # connection drops, not when the sink's timeout runs out.
    async with MqttSink(sink_config(mosquitto.url, timeout=30.0)) as sink:
        assert await publish_batch(sink, deliveries(1)) == [None]
        assert mosquitto.process is not None
        mosquitto.process.send_signal(signal.SIGSTOP)  # takes the batch, answers nothing
        batch = asyncio.create_task(publish_batch(sink, deliveries(20)))
        await wait_until(lambda: sink._link is not None and sink._link._waiting)
        started = time.monotonic()
        mosquitto.stop()  # SIGKILL: the kernel closes its end of the connection
        results = await batch
    assert time.monotonic() - started < 5
    assert all(isinstance(r, TransientSinkError) for r in results)
    assert "connection lost" in str(results[0])


async def test_unreachable_port_is_transient() -> None:
    url = f"mqtt://127.0.0.1:{free_port()}"
    async with MqttSink(sink_config(url)) as sink:
        (result,) = await publish_batch(sink, deliveries(1))
    assert isinstance(result, TransientSinkError)
    assert "cannot connect" in str(result) and result.sink == "mqtt"


class RecordingSocket(socket.socket):
    """The sink's own TCP connection (a duplicate descriptor), noting the options set and
    counting the sends and receives made through it."""

    def __init__(self, real: socket.socket) -> None:
        super().__init__(real.family, real.type, fileno=os.dup(real.fileno()))
        self.setblocking(False)
        self.options: list[tuple[int, int, int]] = []
        self.sends = 0
        self.receives = 0

    def setsockopt(self, level: int, option: int, value: Any, *rest: Any) -> None:
        self.options.append((level, option, value))
        super().setsockopt(level, option, value, *rest)

    def send(self, data: Any, *rest: Any) -> int:
        self.sends += 1
        return super().send(data, *rest)

    def recv(self, size: int, *rest: Any) -> bytes:
        self.receives += 1
        return super().recv(size, *rest)


@contextlib.contextmanager
def recording_socket(sink: MqttSink) -> Iterator[RecordingSocket]:
    """The options the connected sink sets on its socket while the block runs."""
    paho = sink._link.client  # type: ignore[union-attr]
    recording = RecordingSocket(paho.socket())
    paho.socket = lambda: recording
    try:
        yield recording
    finally:
        recording.close()


@pytest.mark.skipif(TCP_QUICKACK is None, reason="TCP_QUICKACK is Linux only")
async def test_reads_from_the_broker_are_acknowledged_at_once(mosquitto: Mosquitto) -> None:
    # mosquitto Nagles its PUBACKs by default; a client that delays its ACKs then waits up
    # to 40 ms for each batch (docs/performance.md, figure 6).
    async with MqttSink(sink_config(mosquitto.url)) as sink:
        assert await publish_batch(sink, deliveries(1)) == [None]
        with recording_socket(sink) as recording:
            assert await publish_batch(sink, deliveries(100)) == [None] * 100
    quick = [o for o in recording.options if o == (socket.IPPROTO_TCP, TCP_QUICKACK, 1)]
    assert quick, "no TCP_QUICKACK after reading the PUBACKs"
    assert len(quick) == len(recording.options)


@contextlib.contextmanager
def counting_socket(sink: MqttSink) -> Iterator[RecordingSocket]:
    """The sends and receives paho makes on the connected sink's socket while the block
    runs (paho's own I/O goes through it, so not for TLS: see `recording_socket`)."""
    paho = sink._link.client  # type: ignore[union-attr]
    real = paho._sock
    counting = RecordingSocket(real)
    paho._sock = counting
    try:
        yield counting
    finally:
        paho._sock = real
        counting.close()


async def test_a_batch_is_one_write_and_its_pubacks_few_reads(
    mosquitto: Mosquitto, subscriber: aiomqtt.Client
) -> None:
    # paho by itself writes every PUBLISH alone (one TCP segment for the broker to wake up
    # for, per message) and reads every PUBACK in three receives (docs/performance.md,
    # change 21).
    async with MqttSink(sink_config(mosquitto.url)) as sink:
        assert await publish_batch(sink, deliveries(1)) == [None]
        with counting_socket(sink) as counted:
            assert await publish_batch(sink, deliveries(100)) == [None] * 100
    assert counted.sends <= 3, f"{counted.sends} writes for 100 messages"
    assert counted.receives < 50, f"{counted.receives} reads for 100 PUBACKs"
    got = await receive(subscriber, 101)
    assert [decode(m.payload, Encoding.JSON).message_id for m in got[1:]] == [
        f"r-{i}" for i in range(1, 101)
    ]


async def publish_through_a_small_send_buffer(
    config: SinkConfig, subscriber: aiomqtt.Client
) -> None:
    """2 MB through a 4 KB send buffer: the joined writes go out in pieces, and whatever
    paho already counts as written waits for the socket, ahead of the rest. Every message
    arrives whole and in order."""
    value = "0123456789" * 2_000
    async with MqttSink(config) as sink:
        assert await publish_batch(sink, deliveries(1)) == [None]
        sock = sink._link.client.socket()  # type: ignore[union-attr]
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        assert await publish_batch(sink, deliveries(100, value=value)) == [None] * 100
    got = await receive(subscriber, 101)
    messages = [decode(m.payload, Encoding.JSON) for m in got[1:]]
    assert [m.message_id for m in messages] == [f"r-{i}" for i in range(1, 101)]
    assert all(m.values[0].value == value for m in messages)


async def test_a_batch_larger_than_the_socket_takes_arrives_whole_and_in_order(
    mosquitto: Mosquitto, subscriber: aiomqtt.Client
) -> None:
    await publish_through_a_small_send_buffer(sink_config(mosquitto.url, timeout=10.0), subscriber)


def test_a_link_collected_after_its_event_loop_closed_is_quiet(
    mosquitto: Mosquitto, monkeypatch: pytest.MonkeyPatch
) -> None:
    # paho closes its socket again when the client is collected, which tells the link, on
    # whatever thread the collector runs: once failed an unrelated test that ran later.
    async def connect_and_abort() -> None:
        link = MqttLink("127.0.0.1", mosquitto.port)
        await link.connect(2.0)
        link.abort("done")

    asyncio.run(connect_and_abort())
    unraisable: list[Any] = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    collector = threading.Thread(target=gc.collect)
    collector.start()
    collector.join()
    assert not [u.exc_value for u in unraisable]


async def test_a_batch_beyond_the_in_flight_bound_arrives_whole_and_in_order(
    mosquitto: Mosquitto, subscriber: aiomqtt.Client
) -> None:
    # 250 messages, 100 in flight at most: paho holds back 150 and sends one per PUBACK.
    async with MqttSink(sink_config(mosquitto.url, max_in_flight=100)) as sink:
        assert await publish_batch(sink, deliveries(250)) == [None] * 250
    got = await receive(subscriber, 250)
    assert [decode(m.payload, Encoding.JSON).message_id for m in got] == [
        f"r-{i}" for i in range(1, 251)
    ]
