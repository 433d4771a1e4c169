"""One MQTT connection: a paho client driven by the event loop, each PUBLISH answered alone.

paho does the protocol. This module drives its socket the way paho's own asyncio example
does: a reader on the socket, a writer while paho has bytes queued, and `loop_misc` once a
second for keep-alives. It exists instead of aiomqtt (the usual wrapper) for two things the
relay needs and aiomqtt does not give:

- the reason code of every PUBACK. An MQTT 5 broker that refuses a message (an ACL, a
  quota) still acknowledges it, with a failure code; counting that as delivered would lose
  the message;
- publishing a batch without a future, an event and a timer per message: a batch is one
  callback per PUBACK and one wait (docs/performance.md, change 18);
- a batch's socket I/O in bulk, and no objects for a PUBACK that says nothing
  (`BatchingClient`, change 21).

paho calls back on the event loop's thread, except while `connect` runs in a worker thread
(DNS, TCP and TLS handshakes block); what it asks for from there is handed over with
`call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import threading
from collections.abc import Callable
from typing import Any, Literal

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

#: Linux only; elsewhere the kernel's delayed ACKs stay as they are.
TCP_QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)
KEEPALIVE = 60

Acknowledged = Callable[[ReasonCode], None]

#: A write is sent once this much has gathered, even with more packets queued.
SEND_AT = 64 * 1024
#: What one read asks of the socket.
RECEIVE_UP_TO = 64 * 1024
PUBLISH_PACKET = 0x30
#: What every MQTT 3.1.1 PUBACK says; never changed, so shared.
PUBACK_SUCCESS = ReasonCode(PacketTypes.PUBACK)
NO_PROPERTIES = Properties(PacketTypes.PUBACK)  # type: ignore[no-untyped-call]


class LinkError(Exception):
    """The connection cannot take or finish a PUBLISH (not connected, refused, lost)."""


def acknowledge_promptly(sock: socket.socket) -> None:
    """Make the kernel acknowledge what the broker sent at once.

    Mosquitto leaves Nagle's algorithm on by default (`set_tcp_nodelay false`), so after
    the first PUBACK of a batch it holds the others back until that segment is ACKed, and
    a client that has nothing more to send (it is waiting for those PUBACKs) delays its
    ACK by up to 40 ms. A pipelined batch then spent most of its time waiting: aiomqtt
    alone published about 1,500 QoS 1 messages/s against a default mosquitto, about 4,000/s
    with quick ACKs, the same as against a broker with `set_tcp_nodelay true`
    (docs/performance.md, figure 6). Linux turns quick ACK mode off again by itself, hence
    once per read.
    """
    if TCP_QUICKACK is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, TCP_QUICKACK, 1)


class BatchingClient(mqtt.Client):
    """paho's client, doing a pipelined batch's socket I/O in bulk.

    paho sends each packet with a send() of its own and reads each packet with three
    recv()s (its type, its length, the rest). A relayed batch of 100 QoS 1 messages was
    100 sends and 100 TCP segments for the broker to wake up for, then 300 receives for
    the PUBACKs; and for every MQTT 3.1.1 PUBACK, which carries nothing but a packet id,
    paho built a `ReasonCode` and a `Properties` object. Together that was about a third
    of the relay's CPU per message (docs/performance.md, change 21). Here:

    - the PUBLISH packets of one `loop_write` gather into one send, made when paho writes
      its last queued packet (or `SEND_AT` bytes have gathered); any other packet
      (CONNECT, PINGREQ, DISCONNECT) is sent at once, after what gathered before it;
    - reads take up to `RECEIVE_UP_TO` bytes at once and hand them out as paho asks;
      `unread` says how many are left for the next `loop_read`;
    - an MQTT 3.1.1 PUBACK is answered with the shared `PUBACK_SUCCESS`;
    - after each PUBACK paho walks every unacknowledged message, looking for one queued
      behind the in-flight bound: a batch of n cost n²/2 steps. It walks only when some
      message is queued.

    These override paho's internal `_sock_send`, `_sock_recv`, `_handle_pubackcomp` and
    `_update_inflight`
    (the same in paho 2.1 and 2.2; pyproject.toml keeps paho below 2.3 for that). paho
    takes a gathered packet as written: if the connection breaks before the send, its
    PUBACK never comes and the relay sends it again, as for any unanswered message.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._gathered = bytearray()
        #: A send would block: try the same bytes again (TLS asks for that) before
        #: gathering more.
        self._retrying = False
        self._received = b""
        self._read_at = 0

    @property
    def unread(self) -> int:
        """Bytes received from the socket that paho has not read yet."""
        return max(0, len(self._received) - self._read_at)

    def _sock_send(self, buf: bytes | bytearray) -> int:
        gathered = self._gathered
        if (
            not self._retrying
            and buf[0] & 0xF0 == PUBLISH_PACKET
            and self.want_write()  # more packets follow in this loop_write
            and len(gathered) + len(buf) < SEND_AT
        ):
            gathered += buf
            return len(buf)
        before = len(gathered)
        try:
            sent = super()._sock_send(gathered + buf if before else buf)
        except BlockingIOError:
            self._retrying = True
            raise
        self._retrying = False
        if sent < before:
            # Not even what paho already counts as written went out: paho keeps `buf`
            # queued and waits until the socket is writable again.
            del gathered[:sent]
            self._retrying = True
            raise BlockingIOError
        gathered.clear()
        return sent - before

    def _sock_recv(self, bufsize: int) -> bytes:
        start = self._read_at
        if start >= len(self._received):
            data = super()._sock_recv(RECEIVE_UP_TO)
            self._received, start = data, 0
            if not data:  # the broker closed the connection
                self._read_at = 0
                return data
        self._read_at = start + bufsize
        return self._received[start : start + bufsize]

    def _handle_pubackcomp(self, cmd: Literal["PUBACK", "PUBCOMP"]) -> MQTTErrorCode:
        packet = self._in_packet["packet"]
        if cmd != "PUBACK" or self._protocol == MQTTProtocolVersion.MQTTv5 or len(packet) != 2:
            return super()._handle_pubackcomp(cmd)
        mid = (packet[0] << 8) | packet[1]
        with self._out_message_mutex:
            if mid in self._out_messages:
                return self._do_on_publish(mid, PUBACK_SUCCESS, NO_PROPERTIES)
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    def _update_inflight(self) -> MQTTErrorCode:
        # Every message of `_out_messages` is in flight unless some wait for a slot.
        if len(self._out_messages) <= self._inflight_messages:
            return MQTTErrorCode.MQTT_ERR_SUCCESS
        return super()._update_inflight()


class MqttLink:
    """A connection to one broker, for publishing; `closed` resolves (with why) when it ends.

    Not reused: after `closed`, make a new link.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        protocol: MQTTProtocolVersion = MQTTProtocolVersion.MQTTv311,
        client_id: str | None = None,
        username: str | None = None,
        password: str | None = None,
        tls_context: ssl.SSLContext | None = None,
        max_in_flight: int | None = None,
        connect_timeout: float = 10.0,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._host, self._port = host, port
        client = BatchingClient(CallbackAPIVersion.VERSION2, client_id or "", protocol=protocol)
        if username is not None:
            client.username_pw_set(username, password)
        if tls_context is not None:
            client.tls_set_context(tls_context)
        if max_in_flight is not None:
            client.max_inflight_messages_set(max_in_flight)
        client.connect_timeout = connect_timeout
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_socket_register_write
        client.on_socket_unregister_write = self._on_socket_unregister_write
        self.client = client
        #: QoS 1 publishes the broker takes unacknowledged at once, if its CONNACK said
        #: (MQTT 5). paho does not keep to it by itself.
        self.receive_maximum: int | None = None
        #: Resolves with the reason once the connection has ended (or never came up).
        self.closed: asyncio.Future[str] = self._loop.create_future()
        self._connack: asyncio.Future[None] = self._loop.create_future()
        self._waiting: dict[int, Acknowledged] = {}
        self._watched: socket.socket | None = None
        self._misc: asyncio.Task[None] | None = None

    @property
    def alive(self) -> bool:
        return self._connack.done() and not self._connack.exception() and not self.closed.done()

    async def connect(self, within: float) -> None:
        """Open the connection and wait for the broker's CONNACK, all within `within` s.

        Raises OSError (ssl.SSLError too) or LinkError, or TimeoutError."""
        connecting = asyncio.ensure_future(
            asyncio.to_thread(self.client.connect, self._host, self._port, KEEPALIVE)
        )
        try:
            async with asyncio.timeout(within):
                await asyncio.shield(connecting)
                await self._connack
        except BaseException as exc:
            # A connect still running in its thread is closed once it is done.
            reason = f"cannot connect: {exc!r}"
            connecting.add_done_callback(lambda _: self.abort(reason))
            raise
        self._misc = self._loop.create_task(self._keep_alive(), name="mqtt-keepalive")

    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int,
        retain: bool,
        properties: Properties | None,
        acknowledged: Acknowledged,
    ) -> None:
        """Hand one PUBLISH to paho; `acknowledged(reason)` runs once the broker answered
        it (QoS 1) or it was written (QoS 0).

        Raises ValueError for a message paho refuses (topic, size), LinkError when the
        connection cannot take it."""
        if self.closed.done():
            raise LinkError(f"connection lost: {self.closed.result()}")
        info = self.client.publish(topic, payload, qos, retain, properties)
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise LinkError(f"cannot publish: {mqtt.error_string(info.rc)}")
        # Written only when the loop next runs the writer, so never acknowledged yet.
        self._waiting[info.mid] = acknowledged

    async def aclose(self, wait: float = 1.0) -> None:
        """Say goodbye to the broker if it still listens, then close the socket."""
        if self.alive:
            with contextlib.suppress(Exception):
                self.client.disconnect()
                async with asyncio.timeout(wait):
                    await asyncio.shield(self.closed)
        self.abort("closed")

    def abort(self, reason: str) -> None:
        """Close at once, without a DISCONNECT."""
        self._unwatch()
        if self._misc is not None:
            self._misc.cancel()
        sock = self.client.socket()
        if sock is not None:
            sock.close()
        self._ended(reason)

    # --------------------------------------------------------- paho's callbacks

    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode, props: Any
    ) -> None:
        if self._connack.done():
            return
        if reason.is_failure:
            self._connack.set_exception(LinkError(f"broker refused the connection: {reason}"))
        else:
            self.receive_maximum = getattr(props, "ReceiveMaximum", None)
            self._connack.set_result(None)

    def _on_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode, props: Any
    ) -> None:
        self._ended(str(reason))

    def _on_publish(
        self, client: mqtt.Client, userdata: Any, mid: int, reason: ReasonCode, props: Any
    ) -> None:
        acknowledged = self._waiting.pop(mid, None)
        if acknowledged is not None:
            acknowledged(reason)

    def _on_socket_open(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        self._on_loop(self._watch, sock)

    def _on_socket_close(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        self._on_loop(self._unwatch)

    def _on_socket_register_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        self._on_loop(self._want_write, True)

    def _on_socket_unregister_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        self._on_loop(self._want_write, False)

    # --------------------------------------------------------- the event loop's side

    def _on_loop(self, fn: Callable[..., None], *args: Any) -> None:
        if threading.get_ident() == self._loop_thread:
            fn(*args)
            return
        # paho also closes its socket when the client is collected, on whatever thread the
        # collector runs, perhaps long after the loop closed: then nothing is left to do.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(fn, *args)

    def _watch(self, sock: socket.socket) -> None:
        if self.closed.done() or sock.fileno() < 0:
            return
        self._watched = sock
        self._loop.add_reader(sock, self._readable)
        if self.client.want_write():
            self._loop.add_writer(sock, self._writable)

    def _unwatch(self) -> None:
        sock, self._watched = self._watched, None
        if sock is not None:
            self._loop.remove_reader(sock)
            self._loop.remove_writer(sock)

    def _want_write(self, wanted: bool) -> None:
        sock = self._watched
        if sock is None:
            return  # not watched yet: `_watch` looks at `want_write` itself
        if wanted:
            self._loop.add_writer(sock, self._writable)
        else:
            self._loop.remove_writer(sock)

    def _readable(self) -> None:
        client = self.client
        try:
            while True:
                rc = client.loop_read()
                sock = client.socket()
                if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or not isinstance(sock, socket.socket):
                    break
                acknowledge_promptly(sock)
                # Bytes already taken from the socket (paho reads a bounded number of
                # packets per call), or decrypted bytes an SSL socket holds, are not
                # reported by the next select.
                if not client.unread and not (isinstance(sock, ssl.SSLSocket) and sock.pending()):
                    break
        except Exception as exc:  # a broken socket, a TLS error: the connection is over
            self.abort(f"read failed: {exc!r}")

    def _writable(self) -> None:
        try:
            self.client.loop_write()
        except Exception as exc:
            self.abort(f"write failed: {exc!r}")

    async def _keep_alive(self) -> None:
        # paho's clock (PINGREQ when due, a broker silent too long) is polled, not evented.
        while self.client.loop_misc() == MQTTErrorCode.MQTT_ERR_SUCCESS:  # noqa: ASYNC110
            await asyncio.sleep(1.0)

    def _ended(self, reason: str) -> None:
        if not self._connack.done():
            self._connack.set_exception(LinkError(f"connection closed: {reason}"))
            self._connack.exception()  # retrieved: nobody may be waiting any more
        if not self.closed.done():
            self.closed.set_result(reason)
