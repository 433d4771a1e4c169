"""The MQTT and JetStream sinks over TLS, against real brokers serving a private CA's
certificates: the broker is verified, a client certificate is presented when configured,
and a broker the sink cannot verify is a transient failure, never a plaintext fallback."""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from pathlib import Path

import aiomqtt
import nats
import pytest

from gateway.errors import TransientSinkError
from gateway.relay.config import SinkConfig
from gateway.relay.sinks.base import publish_batch
from gateway.relay.sinks.mqtt import TCP_QUICKACK, MqttSink
from gateway.relay.sinks.nats import NatsSink
from tests.relay.messages import deliveries
from tests.relay.test_relay_mqtt import (
    publish_through_a_small_send_buffer,
    receive,
    recording_socket,
)
from tests.support.brokers import Mosquitto, NatsServer
from tests.support.tls import Certificates


@pytest.fixture
def certificates(tmp_path: Path) -> Certificates:
    return Certificates.issue(tmp_path / "pki")


@pytest.fixture
def mosquitto_tls(tmp_path: Path, certificates: Certificates) -> Iterator[Mosquitto]:
    with Mosquitto.running_in(tmp_path, "mosquitto-tls", tls=certificates) as broker:
        yield broker


def mqtt_config(url: str, **kw: object) -> SinkConfig:
    kw.setdefault("timeout", 2.0)
    return SinkConfig(name="mqtt", type="mqtt", url=url, **kw)  # type: ignore[arg-type]


async def test_mqtt_over_tls_verifies_the_broker_and_delivers(
    mosquitto_tls: Mosquitto, certificates: Certificates
) -> None:
    assert mosquitto_tls.url.startswith("mqtts://")
    context = ssl.create_default_context(cafile=str(certificates.ca))
    async with aiomqtt.Client("127.0.0.1", mosquitto_tls.port, tls_context=context) as subscriber:
        await subscriber.subscribe("coap-gw/#", qos=1)
        config = mqtt_config(mosquitto_tls.url, **certificates.sink_options(client=False))
        async with MqttSink(config) as sink:
            assert await publish_batch(sink, deliveries(1)) == [None]
            assert isinstance(sink._link.client.socket(), ssl.SSLSocket)  # type: ignore[union-attr]
            with recording_socket(sink) as recording:
                assert await publish_batch(sink, deliveries(20)) == [None] * 20
        assert len(await receive(subscriber, 21)) == 21
    if TCP_QUICKACK is not None:  # the quick ACKs hold over TLS too
        assert recording.options


async def test_mqtt_over_tls_a_batch_larger_than_the_socket_takes_arrives_whole(
    mosquitto_tls: Mosquitto, certificates: Certificates
) -> None:
    # TLS asks for a write that would block to be tried again with the same bytes.
    context = ssl.create_default_context(cafile=str(certificates.ca))
    async with aiomqtt.Client("127.0.0.1", mosquitto_tls.port, tls_context=context) as subscriber:
        await subscriber.subscribe("coap-gw/#", qos=1)
        config = mqtt_config(
            mosquitto_tls.url, **certificates.sink_options(client=False), timeout=10.0
        )
        await publish_through_a_small_send_buffer(config, subscriber)


async def test_mqtt_broker_the_sink_cannot_verify_is_transient(mosquitto_tls: Mosquitto) -> None:
    # No ca_file: the system trust store does not know the private CA.
    async with MqttSink(mqtt_config(mosquitto_tls.url)) as sink:
        (result,) = await publish_batch(sink, deliveries(1))
    assert isinstance(result, TransientSinkError)
    assert "cannot connect" in str(result) and "CERTIFICATE_VERIFY_FAILED" in str(result)
    # paho leaves the socket of a failed handshake unclosed (the sink's ClosingSSLSocket
    # closes it); pytest reports an unclosed one when it is collected, at the latest at
    # the end of the session, and fails the run (warnings are errors here).


async def test_mqtt_client_certificate_when_the_broker_asks_for_one(
    tmp_path: Path, certificates: Certificates
) -> None:
    with Mosquitto.running_in(
        tmp_path, "mosquitto-mtls", tls=certificates, verify_clients=True
    ) as broker:
        without = mqtt_config(broker.url, **certificates.sink_options(client=False))
        async with MqttSink(without) as sink:
            (refused,) = await publish_batch(sink, deliveries(1))
        assert isinstance(refused, TransientSinkError)
        async with MqttSink(mqtt_config(broker.url, **certificates.sink_options())) as sink:
            assert await publish_batch(sink, deliveries(3)) == [None] * 3


def nats_config(url: str, **kw: object) -> SinkConfig:
    return SinkConfig(  # type: ignore[arg-type]
        name="js", type="nats", url=url, timeout=2.0, stream="READINGS", create_stream=True, **kw
    )


async def test_jetstream_over_tls_with_a_client_certificate(
    tmp_path: Path, certificates: Certificates
) -> None:
    with NatsServer.running_in(
        tmp_path, "nats-tls", tls=certificates, verify_clients=True
    ) as server:
        assert server.url.startswith("tls://")
        async with NatsSink(nats_config(server.url, **certificates.sink_options())) as sink:
            assert await publish_batch(sink, deliveries(3)) == [None] * 3
        observer = await nats.connect(server.url, tls=certificates.client_context())
        try:
            info = await observer.jetstream().stream_info("READINGS")
            assert info.state.messages == 3
        finally:
            await observer.close()
        async with NatsSink(nats_config(server.url)) as sink:  # the CA is not trusted
            (result,) = await publish_batch(sink, deliveries(1))
        assert isinstance(result, TransientSinkError)
