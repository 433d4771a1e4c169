"""A small CoAP message layer on one UDP socket, cheap enough for thousands per process.

aiocoap's `Context` is a complete stack (transports, block-wise, OSCORE hooks, a task per
exchange); one per simulated device does not fit thousands of devices on one core. This
module keeps only what a constrained device does on the wire and reuses aiocoap's `Message`
for the encoding:

* confirmable requests retransmitted with RFC 7252 section 4.8 timing (ACK_TIMEOUT times a
  random factor, doubled on each of MAX_RETRANSMIT retries), matched by Message ID;
* responses matched by token, piggybacked in the ACK or separate (an empty ACK, then a CON or
  NON response that we acknowledge);
* deduplication of incoming messages by (peer, Message ID) for EXCHANGE_LIFETIME; a duplicate
  request gets the cached response again, a duplicate response is acknowledged and dropped;
* a synchronous request handler for the device's own resources, answered piggybacked;
* notifications (Observe) sent NON or CON, with a callback when the observer resets them;
* seeded network impairment (loss, duplication, delay) on every datagram in and out.

All timers are `loop.call_later` handles; there is no task per exchange.
"""

from __future__ import annotations

import asyncio
import random
import struct
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from aiocoap import Message
from aiocoap.numbers.codes import Code
from aiocoap.numbers.types import Type

Addr = tuple[str, int]
Handler = Callable[[Any, Addr], Any]
"""Called with (request Message, peer); returns the response Message (code, options, payload)."""


@dataclass(frozen=True)
class Impairment:
    """Seeded misbehaviour of the network, applied to each datagram in and out.

    ``loss`` and ``duplicate`` are probabilities per datagram; each copy is delayed by
    ``delay`` plus a uniform ``jitter``, so jitter also reorders.
    """

    loss: float = 0.0
    duplicate: float = 0.0
    delay: float = 0.0
    jitter: float = 0.0

    def __post_init__(self) -> None:
        for name in ("loss", "duplicate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"impairment {name} must be within [0, 1]")
        if self.delay < 0 or self.jitter < 0:
            raise ValueError("impairment delay and jitter must not be negative")

    @property
    def active(self) -> bool:
        return bool(self.loss or self.duplicate or self.delay or self.jitter)


@dataclass(frozen=True)
class Transmission:
    """RFC 7252 section 4.8 transmission parameters."""

    ack_timeout: float = 2.0
    ack_random_factor: float = 1.5
    max_retransmit: int = 4
    #: How long to wait for a separate response after the empty ACK.
    separate_timeout: float = 30.0
    #: How long an incoming Message ID is remembered for deduplication.
    exchange_lifetime: float = 247.0

    @property
    def max_transmit_wait(self) -> float:
        return self.ack_timeout * ((1 << (self.max_retransmit + 1)) - 1) * self.ack_random_factor


@dataclass
class EndpointStats:
    datagrams_sent: int = 0
    datagrams_received: int = 0
    retransmissions: int = 0
    #: Incoming messages recognised as duplicates (by peer and Message ID) and not re-processed.
    duplicates: int = 0
    #: ACK or RST for an exchange we no longer had (late or duplicated).
    stray: int = 0
    malformed: int = 0
    dropped_out: int = 0
    dropped_in: int = 0


class RequestError(Exception):
    """A confirmable request got no response."""

    def __init__(self, message: str, *, retransmissions: int = 0) -> None:
        super().__init__(message)
        self.retransmissions = retransmissions


class RequestTimeout(RequestError):
    """No ACK after MAX_RETRANSMIT retransmissions, or no separate response in time."""


class RequestReset(RequestError):
    """The peer answered with RST."""


@dataclass
class Result:
    response: Any
    retransmissions: int
    #: True when the response came separately after an empty ACK.
    separate: bool = False


@dataclass
class _Outgoing:
    mid: int
    data: bytes
    remote: Addr
    timeout: float
    on_ack: Callable[[Any], None]
    on_fail: Callable[[RequestError], None]
    attempts: int = 0
    handle: asyncio.TimerHandle | None = None


@dataclass
class _Waiting:
    future: asyncio.Future[Result]
    outgoing: _Outgoing | None = None
    separate: bool = False
    timer: asyncio.TimerHandle | None = None
    retransmissions: int = 0


def _empty(mtype: Type, mid: int) -> bytes:
    # Version 1, no token, code 0.00: the four-byte empty ACK / RST of RFC 7252 section 3.
    return struct.pack("!BBH", 0x40 | (mtype << 4), 0, mid)


class Endpoint(asyncio.DatagramProtocol):
    """One device's UDP socket: a CoAP client and, when given a handler, a server."""

    def __init__(
        self,
        *,
        rng: random.Random,
        handler: Handler | None = None,
        impairment: Impairment | None = None,
        transmission: Transmission | None = None,
        notification_con_every: int = 20,
    ) -> None:
        self._rng = rng
        self._handler = handler
        self._impairment = impairment or Impairment()
        self.transmission = transmission or Transmission()
        self._con_every = notification_con_every
        self.stats = EndpointStats()
        self._transport: asyncio.DatagramTransport | None = None
        self._loop = asyncio.get_running_loop()
        self._mid = rng.getrandbits(16)
        self._token_base = rng.getrandbits(32)
        self._token_count = 0
        self._outgoing: dict[int, _Outgoing] = {}
        self._waiting: dict[bytes, _Waiting] = {}
        # (peer, mid) -> (expires at, cached reply or None); insertion order is expiry order.
        self._seen: OrderedDict[tuple[Addr, int], tuple[float, bytes | None]] = OrderedDict()
        # Message IDs of NON notifications recently sent, so an RST can cancel the observation.
        self._non_sent: OrderedDict[int, Callable[[], None]] = OrderedDict()
        self._notifications = 0
        #: A sleeping device's radio is off: nothing goes out, nothing comes in.
        self.radio_on = True
        self.closed = asyncio.Event()

    # asyncio protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # The selector loop's datagram transport does not derive from DatagramTransport.
        self._transport = cast(asyncio.DatagramTransport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        for out in list(self._outgoing.values()):
            if out.handle is not None:
                out.handle.cancel()
        self._outgoing.clear()
        for waiting in list(self._waiting.values()):
            if waiting.timer is not None:
                waiting.timer.cancel()
            if not waiting.future.done():
                waiting.future.set_exception(RequestTimeout("endpoint closed"))
        self._waiting.clear()
        self.closed.set()

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable and friends: CoAP treats the exchange as still open and
        # lets retransmission decide, as a device without socket errors would.
        pass

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        if not self.radio_on:
            self.stats.dropped_in += 1
            return
        peer: Addr = (addr[0], addr[1])
        imp = self._impairment
        if not imp.active:
            self._receive(data, peer)
            return
        for delay in self._impair():
            if delay is None:
                self.stats.dropped_in += 1
            elif delay == 0.0:
                self._receive(data, peer)
            else:
                self._loop.call_later(delay, self._receive, data, peer)

    # public API

    @property
    def local_address(self) -> Addr:
        assert self._transport is not None
        host, port = self._transport.get_extra_info("sockname")[:2]
        return (host, port)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    async def request(self, message: Any, remote: Addr) -> Result:
        """Send ``message`` as a confirmable request and wait for its final response."""
        mid = self._next_mid()
        token = self._next_token()
        message.mtype = Type.CON
        message.mid = mid
        message.token = token
        data = message.encode()
        waiting = _Waiting(future=self._loop.create_future())
        self._waiting[token] = waiting

        def on_ack(ack: Any) -> None:
            assert waiting.outgoing is not None
            waiting.retransmissions = waiting.outgoing.attempts
            if ack.code == Code.EMPTY:
                # RFC 7252 section 5.2.2: the response follows in its own message.
                waiting.separate = True
                waiting.timer = self._loop.call_later(
                    self.transmission.separate_timeout, fail, RequestTimeout("no separate response")
                )
            else:
                self._resolve(ack)

        def fail(exc: RequestError) -> None:
            exc.retransmissions = waiting.outgoing.attempts if waiting.outgoing else 0
            if not waiting.future.done():
                waiting.future.set_exception(exc)

        waiting.outgoing = self._send_confirmable(mid, data, remote, on_ack, fail)
        try:
            return await waiting.future
        finally:
            self._waiting.pop(token, None)
            if waiting.timer is not None:
                waiting.timer.cancel()
            out = self._outgoing.pop(mid, None)
            if out is not None and out.handle is not None:
                out.handle.cancel()

    def notify(
        self,
        message: Any,
        remote: Addr,
        token: bytes,
        *,
        on_gone: Callable[[], None],
    ) -> None:
        """Send an Observe notification; ``on_gone`` runs if the observer resets or vanishes.

        Most notifications go NON; every ``notification_con_every``-th goes CON, so an observer
        that went away without an RST is noticed (RFC 7641 section 4.5).
        """
        self._notifications += 1
        mid = self._next_mid()
        message.mid = mid
        message.token = token
        if self._con_every and self._notifications % self._con_every == 0:
            message.mtype = Type.CON
            self._send_confirmable(
                mid, message.encode(), remote, lambda ack: None, lambda exc: on_gone()
            )
            return
        message.mtype = Type.NON
        self._non_sent[mid] = on_gone
        while len(self._non_sent) > 64:
            self._non_sent.popitem(last=False)
        self._send(message.encode(), remote)

    # internals

    def _next_mid(self) -> int:
        self._mid = (self._mid + 1) & 0xFFFF
        return self._mid

    def _next_token(self) -> bytes:
        self._token_count += 1
        return struct.pack("!I", (self._token_base + self._token_count) & 0xFFFFFFFF)

    def _impair(self) -> list[float | None]:
        """Fate of one datagram: a delay per copy delivered, None for a copy lost."""
        imp, rng = self._impairment, self._rng
        copies = 2 if imp.duplicate and rng.random() < imp.duplicate else 1
        fates: list[float | None] = []
        for _ in range(copies):
            if imp.loss and rng.random() < imp.loss:
                fates.append(None)
            else:
                fates.append(imp.delay + (rng.uniform(0.0, imp.jitter) if imp.jitter else 0.0))
        return fates

    def _send(self, data: bytes, remote: Addr) -> None:
        if not self.radio_on:
            self.stats.dropped_out += 1
            return
        if not self._impairment.active:
            self._sendto(data, remote)
            return
        for delay in self._impair():
            if delay is None:
                self.stats.dropped_out += 1
            elif delay == 0.0:
                self._sendto(data, remote)
            else:
                self._loop.call_later(delay, self._sendto, data, remote)

    def _sendto(self, data: bytes, remote: Addr) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self.stats.datagrams_sent += 1
            self._transport.sendto(data, remote)

    def _send_confirmable(
        self,
        mid: int,
        data: bytes,
        remote: Addr,
        on_ack: Callable[[Any], None],
        on_fail: Callable[[RequestError], None],
    ) -> _Outgoing:
        params = self.transmission
        timeout = params.ack_timeout * self._rng.uniform(1.0, params.ack_random_factor)
        out = _Outgoing(mid, data, remote, timeout, on_ack, on_fail)
        self._outgoing[mid] = out
        self._send(data, remote)
        out.handle = self._loop.call_later(timeout, self._retransmit, out)
        return out

    def _retransmit(self, out: _Outgoing) -> None:
        if self._outgoing.get(out.mid) is not out:
            return
        if out.attempts >= self.transmission.max_retransmit:
            del self._outgoing[out.mid]
            out.on_fail(RequestTimeout(f"no ACK after {out.attempts} retransmissions"))
            return
        out.attempts += 1
        out.timeout *= 2
        self.stats.retransmissions += 1
        self._send(out.data, out.remote)
        out.handle = self._loop.call_later(out.timeout, self._retransmit, out)

    def _remember(self, key: tuple[Addr, int], reply: bytes | None) -> None:
        now = self._loop.time()
        seen = self._seen
        while seen:
            oldest = next(iter(seen.values()))
            if oldest[0] > now:
                break
            seen.popitem(last=False)
        seen[key] = (now + self.transmission.exchange_lifetime, reply)

    def _resolve(self, response: Any) -> None:
        waiting = self._waiting.get(response.token)
        if waiting is None or waiting.future.done():
            return
        if waiting.timer is not None:
            waiting.timer.cancel()
        waiting.future.set_result(Result(response, waiting.retransmissions, waiting.separate))

    def _receive(self, data: bytes, peer: Addr) -> None:
        self.stats.datagrams_received += 1
        try:
            msg = Message.decode(data)
        except Exception:
            # Undecodable: RFC 7252 section 4.2 says reject a CON, silently ignore anything else.
            self.stats.malformed += 1
            if len(data) >= 4 and data[0] >> 6 == 1 and (data[0] >> 4) & 3 == Type.CON:
                self._send(_empty(Type.RST, struct.unpack("!H", data[2:4])[0]), peer)
            return

        if msg.mtype in (Type.ACK, Type.RST):
            out = self._outgoing.get(msg.mid)
            if out is None or out.remote != peer:
                non_gone = self._non_sent.pop(msg.mid, None) if msg.mtype == Type.RST else None
                if non_gone is not None:
                    non_gone()
                else:
                    self.stats.stray += 1
                return
            del self._outgoing[msg.mid]
            if out.handle is not None:
                out.handle.cancel()
            if msg.mtype == Type.RST:
                out.on_fail(RequestReset("reset by peer"))
            else:
                out.on_ack(msg)
            return

        if msg.code == Code.EMPTY:
            # A CoAP ping (empty CON) is answered with RST; an empty NON is meaningless.
            if msg.mtype == Type.CON:
                self._send(_empty(Type.RST, msg.mid), peer)
            return

        key = (peer, msg.mid)
        seen = self._seen.get(key)
        if seen is not None:
            self.stats.duplicates += 1
            if seen[1] is not None:
                self._send(seen[1], peer)
            return

        if msg.code.is_request():
            self._serve(msg, peer, key)
            return

        # A separate response or a notification for us.
        waiting = self._waiting.get(msg.token)
        if waiting is None or waiting.future.done():
            rst = _empty(Type.RST, msg.mid)
            self._remember(key, rst if msg.mtype == Type.CON else None)
            self._send(rst, peer)
            return
        reply = _empty(Type.ACK, msg.mid) if msg.mtype == Type.CON else None
        self._remember(key, reply)
        if reply is not None:
            self._send(reply, peer)
        if waiting.outgoing is not None and msg.mid != waiting.outgoing.mid:
            # The separate response may overtake the empty ACK it belongs to.
            out = self._outgoing.pop(waiting.outgoing.mid, None)
            if out is not None and out.handle is not None:
                out.handle.cancel()
            waiting.retransmissions = waiting.outgoing.attempts
            waiting.separate = True
        self._resolve(msg)

    def _serve(self, request: Any, peer: Addr, key: tuple[Addr, int]) -> None:
        if self._handler is None:
            response = Message(code=Code.NOT_FOUND)
        else:
            try:
                response = self._handler(request, peer)
            except Exception:
                response = Message(code=Code.INTERNAL_SERVER_ERROR)
        response.token = request.token
        if request.mtype == Type.CON:
            response.mtype = Type.ACK
            response.mid = request.mid
        else:
            response.mtype = Type.NON
            response.mid = self._next_mid()
        reply = response.encode()
        self._remember(key, reply)
        self._send(reply, peer)
