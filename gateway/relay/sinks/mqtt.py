"""MQTT sink: one PUBLISH per message, each confirmed by its own PUBACK at QoS 1.

The connection (`MqttLink`, paho on the event loop) is opened lazily by `publish` and
dropped on any failure, so the next batch reconnects; nothing here sleeps or loops. A batch
is pipelined on one connection: every PUBLISH is handed over in batch order (TCP and the
broker keep that order), then the PUBACKs are awaited, all within the sink's timeout.

Over MQTT 5 a broker may acknowledge a message and refuse it in the same PUBACK (an ACL, a
quota): the reason code decides. A refusal no retry can change (not authorized, an invalid
topic or payload) is permanent and the message goes to the dead letters; any other failure
code is transient. MQTT 3.1.1 has no way to say so: a broker that drops a message it may
not take (mosquitto's ACLs) still acknowledges it, so watch the broker's log for that.

QoS 0 confirms once the message is handed to the batch's socket write: at-most-once beyond
this point.
MQTT 5 adds the content type and a `message-id` user property to each PUBLISH.
"""

from __future__ import annotations

import asyncio
import functools
import ssl
from collections.abc import Callable, Sequence
from urllib.parse import urlsplit

from paho.mqtt.enums import MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from gateway.errors import SinkError
from gateway.relay.config import SinkConfig
from gateway.relay.envelope import AddressTemplate, mqtt_safe
from gateway.relay.sinks.base import Delivery, Result, SinkBase
from gateway.relay.sinks.mqtt_link import TCP_QUICKACK, LinkError, MqttLink

__all__ = ["TCP_QUICKACK", "MqttSink"]

#: QoS 1 publishes awaiting PUBACK at once over MQTT 3.1.1 (paho's own default is 20): a
#: relay batch (100) goes out without waiting for the first acknowledgements.
DEFAULT_IN_FLIGHT_V311 = 100

#: PUBACK reason codes (MQTT 5, section 3.4.2.1) that sending again cannot change: not
#: authorized, topic name invalid, payload format invalid.
REFUSED_FOR_GOOD = frozenset({0x87, 0x90, 0x99})


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
        self._v5 = config.mqtt_version == "5"
        self._in_flight = config.max_in_flight or (
            # MQTT 5 brokers announce how many they take (mosquitto: 20, paho's default) and
            # may drop a client that sends more (see `_connect`); MQTT 3.1.1 has no such bound.
            None if self._v5 else DEFAULT_IN_FLIGHT_V311
        )
        self._link: MqttLink | None = None

    async def _close(self) -> None:
        await self._disconnect()

    def topic(self, delivery: Delivery) -> str:
        return self._topics.render(delivery.message)

    async def _connect(self) -> MqttLink:
        if self._link is not None and self._link.alive:
            return self._link
        await self._disconnect()
        link = await self._open_link()
        in_flight = link.client.max_inflight_messages
        announced = link.receive_maximum
        if announced is not None and not 0 < in_flight <= announced:
            # MQTT 5 forbids more unacknowledged publishes than the broker's Receive Maximum
            # (some brokers disconnect a client that sends more); paho cannot lower its bound
            # on an open connection, so open it again within the broker's.
            self._log.warning("sink.in_flight_lowered", configured=in_flight, broker=announced)
            self._in_flight = announced
            await link.aclose()
            link = await self._open_link()
        self._link = link
        self._log.info("sink.connected", host=self._host, port=self._port)
        link.closed.add_done_callback(functools.partial(self._link_closed, link))
        return link

    async def _open_link(self) -> MqttLink:
        config = self._config
        link = MqttLink(
            self._host,
            self._port,
            protocol=MQTTProtocolVersion.MQTTv5 if self._v5 else MQTTProtocolVersion.MQTTv311,
            client_id=config.client_id,
            username=config.username,
            password=config.password,
            tls_context=tls_context(config) if self._tls else None,
            max_in_flight=self._in_flight,
            connect_timeout=config.timeout,
        )
        try:
            await link.connect(config.timeout)
        except (LinkError, OSError, TimeoutError) as exc:
            where = f"{self._host}:{self._port}"
            raise self.down(self.transient(f"cannot connect to {where}: {exc!r}")) from exc
        return link

    @property
    def connected(self) -> bool:
        return self._link is not None and self._link.alive

    def _link_closed(self, link: MqttLink, closed: asyncio.Future[str]) -> None:
        # The broker went away between batches: say so now, not at the next batch.
        if link is self._link:
            self._log.warning("sink.disconnected", reason=closed.result())

    async def _disconnect(self) -> None:
        link, self._link = self._link, None
        if link is not None:
            # A dead connection cannot say goodbye; do not wait long for it.
            await link.aclose(wait=1.0)

    def _properties(self, delivery: Delivery) -> Properties | None:
        if not self._v5:
            return None
        properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        properties.ContentType = delivery.encoding.content_type
        properties.UserProperty = [("message-id", delivery.message_id)]
        return properties

    def _answer(self, reason: ReasonCode, delivery: Delivery) -> Result:
        """What a PUBACK (or, at QoS 0, the write) says of one delivery."""
        if not reason.is_failure:
            return None
        refusal = f"broker refused {delivery.message_id}: {reason} (0x{reason.value:02x})"
        if reason.value in REFUSED_FOR_GOOD:
            return self.permanent(refusal, delivery)
        return self.transient(refusal, delivery)

    async def publish(self, batch: Sequence[Delivery]) -> Sequence[Result]:
        link = await self._connect()
        config = self._config
        results: list[Result] = [None] * len(batch)
        answered = [False] * len(batch)
        waiting = 0
        all_answered = asyncio.get_running_loop().create_future()
        lost: str | None = None

        def acknowledger(index: int, delivery: Delivery) -> Callable[[ReasonCode], None]:
            def acknowledged(reason: ReasonCode) -> None:
                nonlocal waiting
                results[index] = self._answer(reason, delivery)
                answered[index] = True
                waiting -= 1
                if not waiting and not all_answered.done():
                    all_answered.set_result(None)

            return acknowledged

        for index, delivery in enumerate(batch):
            try:
                link.publish(
                    self.topic(delivery),
                    self.body(delivery),
                    qos=config.qos,
                    retain=config.retain,
                    properties=self._properties(delivery),
                    acknowledged=acknowledger(index, delivery),
                )
            except SinkError as exc:  # the message cannot be encoded
                results[index], answered[index] = exc, True
                continue
            except ValueError as exc:  # paho refuses the message itself (size, topic)
                refusal = f"broker cannot take {delivery.message_id}: {exc}"
                results[index], answered[index] = self.permanent(refusal, delivery), True
                continue
            except LinkError as exc:
                lost = str(exc)
                break
            waiting += 1
        if waiting and lost is None:
            await asyncio.wait(
                [all_answered, link.closed],
                timeout=config.timeout,
                return_when=asyncio.FIRST_COMPLETED,
            )
        if not all(answered):
            if lost is None:
                lost = (
                    f"connection lost: {link.closed.result()}"
                    if link.closed.done()
                    else f"no PUBACK within {config.timeout} s"
                )
            for index, delivery in enumerate(batch):
                if not answered[index]:
                    results[index] = self.transient(lost, delivery)
            # Unanswered publishes mean a broken connection; start afresh next time. Closed
            # at once: a stalled broker would keep a polite DISCONNECT waiting.
            link.abort(lost)
            await self._disconnect()
        return self.record(results)
