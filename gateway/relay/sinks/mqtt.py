"""MQTT sink (aiomqtt): one publish per message, confirmed by PUBACK at QoS 1.

The connection is opened lazily by `publish` and dropped on any failure, so the next batch
reconnects; nothing here sleeps or loops. A batch is pipelined on one connection: every
PUBLISH is handed to the client in batch order (TCP and the broker keep that order) and
then all PUBACKs are awaited, bounded by the sink's timeout.

QoS 0 confirms once the message is written to the socket: at-most-once beyond this point.
Each read from the broker is followed by TCP_QUICKACK (Linux), see `acknowledge_promptly`.

MQTT 5 adds the content type and a `message-id` user property to each PUBLISH. aiomqtt
does not surface MQTT 5 PUBACK reason codes, so a broker that acknowledges but refuses a
message (an ACL, a quota) is not detected; use broker-side logging for that.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import socket
import ssl
from collections.abc import Sequence
from urllib.parse import urlsplit

import aiomqtt
import paho.mqtt.client as mqtt
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from gateway.errors import SinkError, TransientSinkError
from gateway.relay.config import SinkConfig
from gateway.relay.envelope import AddressTemplate, mqtt_safe
from gateway.relay.sinks.base import Delivery, Result, SinkBase

#: QoS 1 publishes awaiting PUBACK at once over MQTT 3.1.1 (paho's own default is 20): a
#: relay batch (100) goes out without waiting for the first acknowledgements.
DEFAULT_IN_FLIGHT_V311 = 100


#: Linux only; elsewhere the kernel's delayed ACKs stay as they are.
TCP_QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)


def acknowledge_promptly(client: mqtt.Client) -> None:
    """Make the client's kernel acknowledge every read from the broker at once.

    Mosquitto leaves Nagle's algorithm on by default (`set_tcp_nodelay false`), so after
    the first PUBACK of a batch it holds the others back until that segment is ACKed, and
    a client that has nothing more to send (it is waiting for those PUBACKs) delays its
    ACK by up to 40 ms. A pipelined batch then spent most of its time waiting: aiomqtt
    alone published about 1,500 QoS 1 messages/s against a default mosquitto, about 4,000/s
    with quick ACKs, the same as against a broker with `set_tcp_nodelay true`
    (docs/performance.md, figure 6). Linux turns quick ACK mode off again by itself, hence
    once per read.
    """
    if TCP_QUICKACK is None:
        return
    read = client.loop_read

    def loop_read(max_packets: int = 1) -> MQTTErrorCode:
        outcome = read(max_packets)
        sock = client.socket()
        if isinstance(sock, socket.socket):  # ssl.SSLSocket is one too
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, TCP_QUICKACK, 1)
        return outcome

    client.loop_read = loop_read  # type: ignore[method-assign]


class ClosingSSLSocket(ssl.SSLSocket):
    """An SSL socket that closes itself when its handshake fails.

    paho wraps the TCP socket and calls `do_handshake`; when that raises (a broker the
    sink cannot verify, a refused client certificate) it drops the socket without closing
    it, so every retry left one for the garbage collector to close.
    """

    def do_handshake(self, block: bool = False) -> None:
        try:
            super().do_handshake(block)
        except BaseException:
            self.close()
            raise


def tls_context(config: SinkConfig) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=config.ca_file)
    if config.cert_file:
        context.load_cert_chain(config.cert_file, config.key_file)
    context.sslsocket_class = ClosingSSLSocket
    return context


class MqttSink(SinkBase):
    def __init__(self, config: SinkConfig) -> None:
        super().__init__(config.name)
        self._config = config
        self._topics = AddressTemplate(config.topic, mqtt_safe)
        url = urlsplit(config.url)
        self._tls = config.tls or url.scheme == "mqtts"
        self._host = url.hostname or "localhost"
        self._port = url.port or (8883 if self._tls else 1883)
        versions = aiomqtt.ProtocolVersion
        self._protocol = versions.V5 if config.mqtt_version == "5" else versions.V311
        self._in_flight = config.max_in_flight or (
            # MQTT 5 brokers announce how many they take (mosquitto: 20, paho's default) and
            # drop a client that sends more; MQTT 3.1.1 has no such bound.
            None if self._protocol is versions.V5 else DEFAULT_IN_FLIGHT_V311
        )
        self._client: aiomqtt.Client | None = None

    async def _close(self) -> None:
        await self._disconnect()

    def topic(self, delivery: Delivery) -> str:
        return self._topics.render(delivery.message)

    async def _connect(self) -> aiomqtt.Client:
        if self._client is not None:
            return self._client
        config = self._config
        client = aiomqtt.Client(
            self._host,
            self._port,
            username=config.username,
            password=config.password,
            identifier=config.client_id,
            protocol=self._protocol,
            timeout=config.timeout,
            tls_context=tls_context(config) if self._tls else None,
            max_inflight_messages=self._in_flight,
        )
        # aiomqtt reads through its paho client, which it keeps as `_client`.
        acknowledge_promptly(client._client)
        try:
            async with asyncio.timeout(config.timeout):
                await client.__aenter__()
        except (aiomqtt.MqttError, OSError, TimeoutError) as exc:
            where = f"{self._host}:{self._port}"
            raise self.down(self.transient(f"cannot connect to {where}: {exc!r}")) from exc
        self._client = client
        self._connected = True
        self._log.info("sink.connected", host=self._host, port=self._port)
        return client

    async def _disconnect(self) -> None:
        client, self._client = self._client, None
        self._connected = False
        if client is not None:
            # A dead connection cannot say goodbye; do not wait long for it.
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1.0):
                    await client.__aexit__(None, None, None)

    def _properties(self, delivery: Delivery) -> Properties | None:
        if self._protocol is not aiomqtt.ProtocolVersion.V5:
            return None
        properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        properties.ContentType = delivery.encoding.content_type
        properties.UserProperty = [("message-id", delivery.message_id)]
        return properties

    async def _publish_one(self, client: aiomqtt.Client, delivery: Delivery) -> None:
        # Encoding before any await keeps the PUBLISH calls in batch order.
        body = self.body(delivery)
        try:
            await client.publish(
                self.topic(delivery),
                body,
                qos=self._config.qos,
                retain=self._config.retain,
                properties=self._properties(delivery),
                # The batch has one deadline (`publish`); aiomqtt's own per-call timeout
                # costs a task and a timer for every message.
                timeout=math.inf,
            )
        except ValueError as exc:  # paho refuses the message itself (size, topic)
            raise self.permanent(f"broker cannot take {delivery.message_id}: {exc}") from exc
        except (aiomqtt.MqttError, OSError) as exc:
            raise self.transient(f"publish failed: {exc}", delivery) from exc

    async def publish(self, batch: Sequence[Delivery]) -> Sequence[Result]:
        client = await self._connect()
        # A batch is pipelined on purpose (its size is the relay's bound): without this,
        # aiomqtt logs a warning for every publish beyond 10 pending, one per message, and
        # rendering those cost more CPU than the publishing (measured with bench/).
        client.pending_calls_threshold = max(client.pending_calls_threshold, len(batch) + 1)
        outcomes: list[Result | BaseException | None] = [None] * len(batch)
        finished = [False] * len(batch)

        async def deliver(index: int, delivery: Delivery) -> None:
            try:
                await self._publish_one(client, delivery)
            except Exception as exc:  # kept per delivery, as gather(return_exceptions=True)
                outcomes[index] = exc
            finished[index] = True

        timeout = self._config.timeout
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await asyncio.gather(*(deliver(i, d) for i, d in enumerate(batch)))
        results: list[Result] = []
        for delivery, outcome, done in zip(batch, outcomes, finished, strict=True):
            if not done:
                results.append(self.transient(f"no PUBACK within {timeout} s", delivery))
            elif isinstance(outcome, SinkError) or outcome is None:
                results.append(outcome)
            else:
                raise outcome
        if any(isinstance(r, TransientSinkError) for r in results):
            # Lost PUBACKs mean a broken connection; start afresh next time.
            await self._disconnect()
        return self.record(results)
