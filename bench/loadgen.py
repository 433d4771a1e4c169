"""A raw-UDP CoAP load generator: many sockets, a window of Confirmable requests in flight.

Messages are built with `struct` from pre-encoded option bytes, so the generator spends its
time on the wire, not in a CoAP library: one process on one core can saturate a Python
CoAP server. Each socket stands for one device (its own source port, its own message-id and
token counters). Responses are matched by (socket, message id) for ACKs and by (socket,
token) for separate responses; an empty ACK stops retransmission and the separate CON
response that follows is acknowledged, as RFC 7252 asks.

A socket can also observe a resource (RFC 7641): the `Observations` workload sends a GET
with Observe: 0 from each socket for its own name. A 2.05 answer that carries an Observe
option (piggybacked or separate) keeps the request's token registered on that socket; every
later message with that token is a notification, counted, its Observe sequence number
checked for gaps (notifications lost on the way), and acknowledged when it is confirmable,
since a server drops an observer that leaves a confirmable notification unacknowledged.
`fanout` drives one device's readings through one socket while the observing sockets count
the notifications of each reading.

Use it as a library:

    workload = CborReadings(names)
    async with LoadGenerator(("127.0.0.1", port), sockets=len(names)) as gen:
        stats = await gen.run(workload, duration=10, window=64)        # closed loop
        stats = await gen.run(workload, duration=10, rate=1500)        # open loop
    print(stats.rate, stats.percentile(99))

or from the command line: `python bench/loadgen.py --port 5683 --duration 5 --register 100`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import math
import random
import struct
import time
from collections import Counter, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import cbor2

# RFC 7252 message types and the codes the generator needs.
CON, NON, ACK, RST = 0, 1, 2, 3
GET = 0x01
POST = 0x02
CHANGED = 0x44  # 2.04
CREATED = 0x41  # 2.01
CONTENT = 0x45  # 2.05

OPT_OBSERVE = 6
OPT_URI_PATH = 11
OPT_CONTENT_FORMAT = 12
OPT_URI_QUERY = 15

CF_CBOR = 60
CF_SENML_CBOR = 112

# RFC 7252 §4.8 transmission parameters, shortened: the generator wants losses reported
# within a run, not after four minutes.
ACK_TIMEOUT = 2.0
MAX_RETRANSMIT = 2
SWEEP_INTERVAL = 0.05


def code_text(code: int) -> str:
    return f"{code >> 5}.{code & 0x1F:02d}"


def _option_part(value: int) -> tuple[int, bytes]:
    if value < 13:
        return value, b""
    if value < 269:
        return 13, bytes([value - 13])
    return 14, struct.pack("!H", value - 269)


def encode_options(options: Iterable[tuple[int, bytes]]) -> bytes:
    """Options in RFC 7252 §3.1 delta encoding (sorted by number, stable for repeats)."""
    out = bytearray()
    previous = 0
    for number, value in sorted(options, key=lambda item: item[0]):
        delta, delta_ext = _option_part(number - previous)
        length, length_ext = _option_part(len(value))
        out.append((delta << 4) | length)
        out += delta_ext + length_ext + value
        previous = number
    return bytes(out)


def _uint(value: int) -> bytes:
    """An option's uint value: as few bytes as it needs, none for 0 (RFC 7252 §3.2)."""
    return value.to_bytes((value.bit_length() + 7) // 8, "big")


def content_format(cf: int) -> bytes:
    return _uint(cf)


def _extended(nibble: int, data: bytes, index: int) -> tuple[int, int]:
    """An option delta or length nibble with its extended bytes (RFC 7252 §3.1); the value
    and the index after them."""
    if nibble == 13:
        return data[index] + 13, index + 1
    if nibble == 14:
        return ((data[index] << 8) | data[index + 1]) + 269, index + 2
    return nibble, index


def observe_option(data: bytes) -> int | None:
    """The Observe value of a received message, or None when it has no Observe option."""
    index = 4 + (data[0] & 0x0F)
    number = 0
    end = len(data)
    while index < end:
        first = data[index]
        if first == 0xFF:
            return None
        index += 1
        delta, index = _extended(first >> 4, data, index)
        length, index = _extended(first & 0x0F, data, index)
        number += delta
        if number == OPT_OBSERVE:
            return int.from_bytes(data[index : index + length], "big")
        if number > OPT_OBSERVE:
            return None
        index += length
    return None


def request_body(
    path: Sequence[str],
    payload: bytes = b"",
    *,
    cf: int | None = None,
    query: Sequence[str] = (),
    observe: int | None = None,
) -> bytes:
    """Options plus payload of a request: everything after header and token."""
    options = [(OPT_URI_PATH, part.encode()) for part in path]
    if observe is not None:
        options.append((OPT_OBSERVE, _uint(observe)))
    options += [(OPT_URI_QUERY, item.encode()) for item in query]
    if cf is not None:
        options.append((OPT_CONTENT_FORMAT, content_format(cf)))
    body = encode_options(options)
    return body + b"\xff" + payload if payload else body


#: Source ports the generators of this process used, per target address
#: (see `LoadGenerator._fresh_socket`).
_USED_PORTS: dict[tuple[str, int], set[int]] = {}


@dataclass(frozen=True, slots=True)
class Request:
    """What a workload asks the generator to send next from one socket."""

    body: bytes  # options (+ 0xFF + payload)
    key: Any  # recorded when the request is answered 2.04 (or 2.01), for verification
    readings: int = 1
    code: int = POST
    #: A GET with Observe: 0; a 2.05 answer with an Observe option starts an observation.
    observe: bool = False


class Workload(Protocol):
    def next(self, slot: int) -> Request | None:
        """The next request to send from socket `slot`, or None when there is no more."""


class CborReadings:
    """`POST /r/NAME` with a CBOR map of a fridge's temperature; `seq` counts per device.

    One measurement per request, so a request is one stored reading and one relayed message.
    """

    def __init__(self, names: Sequence[str], *, start_seq: int = 1) -> None:
        self._names = list(names)
        self._prefix = [request_body(("r", name), cf=CF_CBOR) + b"\xff" for name in self._names]
        self._seq = [start_seq] * len(self._names)
        self._rng = random.Random(7)

    def next(self, slot: int) -> Request:
        index = slot % len(self._names)
        seq = self._seq[index]
        self._seq[index] = seq + 1
        temp = round(3.0 + self._rng.random() * 2.0, 2)
        payload = cbor2.dumps({"temp": temp, "seq": seq})
        return Request(self._prefix[index] + payload, (self._names[index], seq), 1)


class SenmlPacks:
    """`POST /r/NAME` with a SenML-CBOR pack of `records` temperature samples, 1 s apart.

    Base time is absolute and unique per pack, so every record has an idempotency key and
    its stored device time identifies it. Values are quarter degrees, which CBOR encodes as
    half-precision floats: a pack of 50 fits the default 1024-byte payload limit.
    """

    def __init__(self, names: Sequence[str], records: int, *, base_time: int = 1_700_000_000):
        self._names = list(names)
        self.records = records
        self._prefix = [
            request_body(("r", name), cf=CF_SENML_CBOR) + b"\xff" for name in self._names
        ]
        self._pack = [0] * len(self._names)
        self._base_time = base_time
        self._rng = random.Random(11)

    def next(self, slot: int) -> Request:
        index = slot % len(self._names)
        pack = self._pack[index]
        self._pack[index] = pack + 1
        bt = self._base_time + pack * self.records
        rng = self._rng
        records: list[dict[int, Any]] = [
            {-3: bt, -4: "Cel", 0: "temp", 2: 3.0 + rng.randrange(12) / 4}
        ]
        records += [
            {0: "temp", 2: 3.0 + rng.randrange(12) / 4, 6: t} for t in range(1, self.records)
        ]
        payload = cbor2.dumps(records, canonical=True)
        return Request(self._prefix[index] + payload, (self._names[index], bt), self.records)


class Limited:
    """The first `count` requests of another workload."""

    def __init__(self, workload: Workload, count: int) -> None:
        self._workload = workload
        self._left = count

    def next(self, slot: int) -> Request | None:
        if self._left <= 0:
            return None
        self._left -= 1
        return self._workload.next(slot)


class Registrations:
    """`POST /rd?ep=NAME&et=TYPE&lt=...`: each name once, spread over the sockets."""

    def __init__(
        self, names: Iterable[str], *, device_type: str = "fridge", lifetime: int = 86_400
    ):
        self._names = iter(names)
        self._type = device_type
        self._lifetime = lifetime

    def next(self, slot: int) -> Request | None:
        name = next(self._names, None)
        if name is None:
            return None
        query = (f"ep={name}", f"et={self._type}", f"lt={self._lifetime}")
        return Request(request_body(("rd",), query=query), name, 1)


class Observations:
    """`GET /r/NAME` with Observe: 0, once from each socket: socket `slot` observes
    `names[slot]` with a token of its own.

    `run` hands out idle sockets in slot order, so in a run on a generator whose sockets
    are all idle the first `len(names)` requests go out from sockets 0, 1, ... in turn (as
    `Registrations` registers `names[i]` from socket i); a socket asked twice is an error.
    Names may repeat: 1,000 sockets can observe one device.
    """

    def __init__(self, names: Sequence[str], *, prefix: str = "r") -> None:
        self._bodies = [request_body((prefix, name), observe=0) for name in names]
        self._names = list(names)
        self._asked: set[int] = set()

    def next(self, slot: int) -> Request | None:
        if len(self._asked) == len(self._names):
            return None
        if slot in self._asked or slot >= len(self._names):
            raise RuntimeError(f"socket {slot} asked twice for an observation")
        self._asked.add(slot)
        return Request(self._bodies[slot], self._names[slot], 1, GET, observe=True)


@dataclass
class Stats:
    """One run's figures. `duration` is the measured interval (after warm-up)."""

    duration: float = 0.0
    sent: int = 0  # requests first sent during the measured interval
    completed: int = 0  # answered (any code) during the measured interval
    readings: int = 0  # readings in requests answered 2.04/2.01 during the interval
    retransmissions: int = 0
    piggybacked: int = 0
    separate: int = 0
    lost: int = 0  # no answer after every retransmission (whole run)
    skipped: int = 0  # open loop: sends the window had no room for
    observations: int = 0  # 2.05 answers with an Observe option: observations started
    codes: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)  # seconds, measured interval

    @property
    def rate(self) -> float:
        """Requests answered with success (2.04, 2.01, or 2.05 to a GET) per second."""
        ok = self.codes["2.04"] + self.codes["2.01"] + self.codes["2.05"]
        return ok / self.duration if self.duration else 0.0

    @property
    def observation_rate(self) -> float:
        return self.observations / self.duration if self.duration else 0.0

    @property
    def readings_rate(self) -> float:
        return self.readings / self.duration if self.duration else 0.0

    @property
    def piggyback_share(self) -> float:
        answered = self.piggybacked + self.separate
        return self.piggybacked / answered if answered else 0.0

    def percentile(self, p: float) -> float:
        """Latency percentile in milliseconds (nearest rank)."""
        if not self.latencies:
            return math.nan
        ordered = sorted(self.latencies)
        rank = max(0, min(len(ordered) - 1, math.ceil(p / 100 * len(ordered)) - 1))
        return ordered[rank] * 1000

    def summary(self) -> str:
        return (
            f"{self.rate:9.0f} req/s {self.readings_rate:9.0f} readings/s"
            f"  p50 {self.percentile(50):6.2f} ms  p99 {self.percentile(99):6.2f} ms"
            f"  p99.9 {self.percentile(99.9):6.2f} ms  piggybacked {self.piggyback_share:6.1%}"
            f"  lost {self.lost}  codes {dict(self.codes)}"
            + (
                f"  observing {self.observations} ({self.observation_rate:.0f}/s)"
                if self.observations
                else ""
            )
        )


class _Pending:
    __slots__ = ("deadline", "first_sent", "mid", "request", "slot", "token", "tries", "waiting")

    def __init__(
        self, slot: int, mid: int, token: bytes, request: Request, now: float, timeout: float
    ):
        self.slot = slot
        self.mid = mid
        self.token = token
        self.request = request
        self.first_sent = now
        self.tries = 0
        self.deadline = now + timeout
        self.waiting = False  # empty ACK seen: no more retransmissions, wait for the response


@dataclass
class Notifications:
    """What the observing sockets of one generator received (whole life, all runs)."""

    observing: int = 0  # observations started (2.05 with Observe) and not ended
    received: int = 0  # notifications, not counting the answers that started observations
    confirmable: int = 0  # of them confirmable (each one acknowledged)
    duplicates: int = 0  # notifications whose Observe number was seen already
    ended: int = 0  # observations the server ended (an error, or an answer without Observe)
    lost_before_end: int = 0  # gaps in the Observe numbers of observations that ended

    def lost(self, gen: LoadGenerator) -> int:
        """Notifications the server numbered but that never arrived: gaps in each
        observation's Observe numbers (the last ones of a run are not seen as gaps)."""
        return self.lost_before_end + sum(
            observation.gaps() for sock in gen._sockets for observation in sock.observing.values()
        )


class _Observation:
    __slots__ = ("count", "first", "highest", "key", "round", "seen")

    def __init__(self, key: Any, first: int) -> None:
        self.key = key
        self.first = first  # Observe number of the answer that started it
        self.highest = first
        self.count = 0  # distinct notifications received
        self.round = 0  # the last fan-out round it was notified in
        self.seen: set[int] = set()  # Observe numbers above `first` received so far

    def gaps(self) -> int:
        return self.highest - self.first - self.count


class _Socket(asyncio.DatagramProtocol):
    __slots__ = ("by_mid", "by_token", "gen", "mid", "observing", "slot", "token", "transport")

    def __init__(self, gen: LoadGenerator, slot: int) -> None:
        self.gen = gen
        self.slot = slot
        self.mid = random.randrange(0x10000)
        self.token = random.randrange(1 << 32)
        self.transport: Any = None
        self.by_mid: dict[int, _Pending] = {}
        self.by_token: dict[bytes, _Pending] = {}
        self.observing: dict[bytes, _Observation] = {}

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.gen._received(self, data)

    def error_received(self, exc: Exception) -> None:
        self.gen.errors += 1


class LoadGenerator:
    """`sockets` UDP sockets towards `target`; `run` drives one workload through them."""

    def __init__(
        self, target: tuple[str, int], *, sockets: int = 64, ack_timeout: float = ACK_TIMEOUT
    ) -> None:
        self._target = target
        self._ack_timeout = ack_timeout
        self._count = sockets
        self._sockets: list[_Socket] = []
        self._idle: deque[int] = deque()
        self._inflight = 0
        self._workload: Workload | None = None
        self._exhausted = False
        self._refill = False
        self._measuring = False
        self._stats = Stats()
        self._done: asyncio.Event | None = None
        self.errors = 0
        #: Keys of every request answered 2.04/2.01 during this generator's life (all runs).
        self.acknowledged: list[Any] = []
        self.notifications = Notifications()
        # Fan-out rounds (`expect_round`): observations not yet notified in this round.
        self._round = 0
        self._round_left = 0
        self._round_notified = 0
        self._round_done = asyncio.Event()
        self._round_last = 0.0  # perf_counter() of this round's latest first notification
        #: When set, key -> perf_counter() of the request's first transmission.
        self.sent_at: dict[Any, float] | None = None

    async def __aenter__(self) -> LoadGenerator:
        for slot in range(self._count):
            self._sockets.append(await self._fresh_socket(slot))
        return self

    async def _fresh_socket(self, slot: int) -> _Socket:
        """A socket on a source port no earlier generator of this process used towards
        the same target.

        A server answers a request whose (source, message id) it saw within
        EXCHANGE_LIFETIME (247 s) from its deduplication cache, without processing it
        (RFC 7252 §4.5). A real device never reuses a message id that soon; a load
        generator that got a recycled ephemeral port could, and would count a cached
        2.04 as an acknowledged reading that was never stored. Ports are remembered per
        target, not for all: the benchmark opens some 30,000 sockets in one run (10,000
        devices against the gateway and again against a baseline), more than the
        ephemeral range has ports, and a server on another address has its own cache.
        """
        loop = asyncio.get_running_loop()
        used = _USED_PORTS.setdefault(self._target, set())
        held: list[asyncio.DatagramTransport] = []
        try:
            while True:
                sock = _Socket(self, slot)
                transport, _ = await loop.create_datagram_endpoint(
                    lambda sock=sock: sock, local_addr=("127.0.0.1", 0), remote_addr=self._target
                )
                port = transport.get_extra_info("sockname")[1]
                if port not in used:
                    used.add(port)
                    return sock
                held.append(transport)  # keep it bound so the kernel offers another port
        finally:
            for transport in held:
                transport.close()

    async def __aexit__(self, *exc: object) -> None:
        for sock in self._sockets:
            sock.transport.close()

    # --- sending -------------------------------------------------------------------------

    def _send_next(self) -> bool:
        """Send one new request from an idle socket; False if none idle or no work left."""
        if not self._idle or self._exhausted or self._workload is None:
            return False
        slot = self._idle.popleft()
        request = self._workload.next(slot)
        if request is None:
            self._exhausted = True
            self._idle.appendleft(slot)
            return False
        sock = self._sockets[slot]
        mid = sock.mid = (sock.mid + 1) & 0xFFFF
        sock.token = (sock.token + 1) & 0xFFFFFFFF
        token = struct.pack("!I", sock.token)
        now = time.perf_counter()
        pending = _Pending(slot, mid, token, request, now, self._ack_timeout)
        sock.by_mid[mid] = pending
        sock.by_token[token] = pending
        self._inflight += 1
        if self.sent_at is not None:
            self.sent_at[request.key] = now
        if self._measuring:
            self._stats.sent += 1
        sock.transport.sendto(_datagram(CON, request.code, mid, token, request.body))
        return True

    def _fill(self, window: int) -> None:
        while self._inflight < window and self._send_next():
            pass

    # --- receiving -----------------------------------------------------------------------

    def _received(self, sock: _Socket, data: bytes) -> None:
        if len(data) < 4:
            return
        first, code, mid = data[0], data[1], (data[2] << 8) | data[3]
        mtype = (first >> 4) & 0x03
        tkl = first & 0x0F
        if mtype in (ACK, RST):
            pending = sock.by_mid.get(mid)
            if pending is None or pending.waiting:
                return  # a duplicate ACK, or one for a request already answered
            if mtype == RST:
                self._complete(sock, pending, "RST", piggybacked=False)
            elif code == 0:
                pending.waiting = True
                pending.deadline = time.perf_counter() + self._ack_timeout * (MAX_RETRANSMIT + 2)
            else:
                self._complete(sock, pending, code_text(code), piggybacked=True, data=data)
            return
        # A separate response or a notification (CON or NON) carries our token.
        if mtype == CON:
            sock.transport.sendto(struct.pack("!BBH", 0x60, 0, mid))
        token = data[4 : 4 + tkl]
        pending = sock.by_token.get(token)
        if pending is not None:
            if code != 0:
                self._complete(sock, pending, code_text(code), piggybacked=False, data=data)
            return
        observation = sock.observing.get(token)
        if observation is not None and code != 0:
            self._notified(sock, token, observation, code, data, confirmable=mtype == CON)

    def _notified(
        self,
        sock: _Socket,
        token: bytes,
        observation: _Observation,
        code: int,
        data: bytes,
        *,
        confirmable: bool,
    ) -> None:
        counts = self.notifications
        number = observe_option(data)
        if number is None or code >> 5 != 2:
            # RFC 7641 §3.2/§4.2: an error, or a response without Observe, ends it.
            del sock.observing[token]
            counts.observing -= 1
            counts.ended += 1
            counts.lost_before_end += observation.gaps()
            self._notify_round(observation, notified=False)
            return
        if number <= observation.first or number in observation.seen:
            counts.duplicates += 1  # a retransmitted CON notification, or one reordered
            return
        observation.seen.add(number)
        observation.count += 1
        observation.highest = max(observation.highest, number)
        counts.received += 1
        counts.confirmable += confirmable
        self._notify_round(observation, notified=True)

    def _notify_round(self, observation: _Observation, *, notified: bool) -> None:
        if observation.round < self._round:
            observation.round = self._round
            if notified:
                self._round_notified += 1
                self._round_last = time.perf_counter()
            self._round_left -= 1
            if self._round_left <= 0:
                self._round_done.set()

    def _complete(
        self,
        sock: _Socket,
        pending: _Pending,
        code: str,
        *,
        piggybacked: bool,
        data: bytes = b"",
    ) -> None:
        del sock.by_mid[pending.mid]
        del sock.by_token[pending.token]
        self._inflight -= 1
        success = code in ("2.04", "2.01")
        if success:
            self.acknowledged.append(pending.request.key)
        observing = False
        if pending.request.observe and code == "2.05":
            number = observe_option(data)
            if number is not None:
                sock.observing[pending.token] = _Observation(pending.request.key, number)
                self.notifications.observing += 1
                observing = True
        if self._measuring:
            stats = self._stats
            stats.completed += 1
            stats.observations += observing
            stats.codes[code] += 1
            stats.latencies.append(time.perf_counter() - pending.first_sent)
            if piggybacked:
                stats.piggybacked += 1
            else:
                stats.separate += 1
            if success:
                stats.readings += pending.request.readings
        self._idle.append(pending.slot)
        if self._refill:
            self._fill(self._window)
        self._check_done()

    def _check_done(self) -> None:
        if self._done is not None and self._inflight == 0 and (self._exhausted or not self._refill):
            self._done.set()

    async def _sweep(self) -> None:
        """Retransmit what timed out (same message id: the server deduplicates) or give up."""
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            now = time.perf_counter()
            for sock in self._sockets:
                if not sock.by_mid:
                    continue
                for pending in [p for p in sock.by_mid.values() if p.deadline <= now]:
                    if pending.waiting or pending.tries >= MAX_RETRANSMIT:
                        del sock.by_mid[pending.mid]
                        del sock.by_token[pending.token]
                        self._inflight -= 1
                        self._stats.lost += 1
                        self._idle.append(pending.slot)
                        continue
                    pending.tries += 1
                    pending.deadline = now + self._ack_timeout * (2**pending.tries)
                    self._stats.retransmissions += 1
                    request = pending.request
                    sock.transport.sendto(
                        _datagram(CON, request.code, pending.mid, pending.token, request.body)
                    )
            if self._refill:
                self._fill(self._window)
            self._check_done()

    # --- running -------------------------------------------------------------------------

    async def run(
        self,
        workload: Workload,
        *,
        duration: float | None = None,
        window: int = 64,
        rate: float | None = None,
        warmup: float = 0.0,
        drain: float = 10.0,
    ) -> Stats:
        """Drive `workload` for `duration` seconds (or until it is exhausted when None).

        Closed loop (`rate` None): keep `window` requests in flight, a new one as soon as one
        is answered. Open loop: send at `rate` per second, at most `window` in flight (sends
        with no room are counted as skipped). Figures cover the interval after `warmup`;
        afterwards the generator stops sending and waits up to `drain` s for answers.
        """
        self._workload = workload
        self._exhausted = False
        self._stats = Stats()
        self._idle = deque(i for i, s in enumerate(self._sockets) if not s.by_mid)
        self._window = window
        self._done = asyncio.Event()
        sweeper = asyncio.create_task(self._sweep(), name="loadgen.sweep")
        self._measuring = warmup <= 0
        started = time.perf_counter()
        try:
            if rate is None:
                self._refill = True
                self._fill(window)
                if warmup > 0:
                    await asyncio.sleep(warmup)
                    self._measuring = True
                    started = time.perf_counter()
                if duration is None:
                    await self._done.wait()
                else:
                    await asyncio.sleep(duration)
            else:
                started = await self._open_loop(rate, window, duration, warmup)
            self._stats.duration = time.perf_counter() - started
            self._measuring = False
            self._refill = False
            self._done.clear()  # an open loop may have run dry before: only now counts
            self._check_done()
            if self._inflight:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._done.wait(), drain)
        finally:
            sweeper.cancel()
            self._refill = False
            self._measuring = False
        self._stats.lost += self._inflight
        return self._stats

    # --- fan-out rounds ------------------------------------------------------------------

    def expect_round(self) -> float:
        """Start a round: every current observation is to be notified once more; returns
        the round's start (perf_counter)."""
        self._round += 1
        self._round_left = self.notifications.observing
        self._round_notified = 0
        self._round_done.clear()
        now = self._round_last = time.perf_counter()
        if self._round_left <= 0:
            self._round_done.set()
        return now

    async def round_complete(self, within: float) -> tuple[int, int, float]:
        """Wait until every observation got a notification in this round (or ended), or
        `within` seconds have passed; returns (observations notified, observations left
        without a notification, perf_counter of the round's last first notification)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within):
                await self._round_done.wait()
        return self._round_notified, max(0, self._round_left), self._round_last

    async def _open_loop(
        self, rate: float, window: int, duration: float | None, warmup: float
    ) -> float:
        tick = 0.002
        begin = time.perf_counter()
        started = begin
        sent = 0
        total = math.inf if duration is None else warmup + duration
        for _ in itertools.count():
            now = time.perf_counter()
            elapsed = now - begin
            if elapsed >= total or self._exhausted:
                break
            if not self._measuring and elapsed >= warmup:
                self._measuring = True
                started = now
            due = int(elapsed * rate)
            while sent < due:
                sent += 1
                no_room = self._inflight >= window or not self._send_next()
                if no_room and self._measuring:
                    self._stats.skipped += 1
            await asyncio.sleep(tick)
        return started


@dataclass
class FanoutStats:
    """Notifications of one device's readings at its observers, measured interval only."""

    observers: int = 0  # observations live at the start
    readings: int = 0  # readings posted and answered 2.04
    failed: int = 0  # readings not answered 2.04 (no round waited for them)
    retransmitted: int = 0  # readings the device had to send again (no answer in time)
    notifications: int = 0  # first notifications of a reading at an observer
    duration: float = 0.0  # from each post to its round's last notification, summed
    incomplete: int = 0  # rounds in which some observer got nothing within the wait
    missing: int = 0  # (reading, observer) pairs without a notification
    lost: int = 0  # gaps in Observe numbers, whole run
    confirmable: int = 0  # confirmable notifications, whole run
    duplicates: int = 0  # notifications received again (retransmitted CONs), whole run
    ended: int = 0  # observations the server ended, whole run
    latencies: list[float] = field(default_factory=list)  # post -> last observer, seconds

    @property
    def rate(self) -> float:
        return self.notifications / self.duration if self.duration else 0.0

    @property
    def median_round_rate(self) -> float:
        """Observers notified per second in the median round: the rate without the rounds
        that waited for retransmissions."""
        median = Stats(latencies=self.latencies).percentile(50) / 1000
        return self.observers / median if median > 0 else 0.0

    def summary(self) -> str:
        rounds = Stats(latencies=self.latencies)
        return (
            f"{self.rate:9.0f} notifications/s  {self.readings} readings x {self.observers}"
            f" observers  round p50 {rounds.percentile(50):6.1f} ms"
            f" p99 {rounds.percentile(99):6.1f} ms  missing {self.missing}"
            f" in {self.incomplete} rounds  lost {self.lost}  confirmable {self.confirmable}"
            f"  duplicates {self.duplicates}  ended {self.ended}  failed posts {self.failed}"
            f"  retransmitted posts {self.retransmitted}"
        )


async def fanout(
    device: LoadGenerator,
    observers: LoadGenerator,
    readings: Workload,
    *,
    duration: float,
    warmup: float = 0.0,
    wait: float = 2.0,
    min_rounds: int = 1,
) -> FanoutStats:
    """Post readings one after another from `device` (a generator with one socket) while
    `observers` (whose sockets observe that device) count notifications.

    Each round posts one reading (Confirmable, until its 2.04) and waits until every
    observation has been notified once more, or `wait` seconds. A round lasts from the
    post to the last observer's notification, so the time spent waiting for a notification
    that was lost does not count; the missing ones are reported. Rounds start for `warmup`
    seconds unmeasured, then for `duration` seconds measured and at least `min_rounds`
    measured rounds (a post not answered 2.04 counts as a round, with no notifications).
    """
    stats = FanoutStats(observers=observers.notifications.observing)
    loop = asyncio.get_running_loop()
    begin = loop.time()
    measuring = warmup <= 0
    while True:
        elapsed = loop.time() - begin
        if elapsed >= warmup + duration and stats.readings + stats.failed >= min_rounds:
            break
        if not measuring and elapsed >= warmup:
            measuring = True
            stats.observers = observers.notifications.observing
        started = observers.expect_round()
        posted = await device.run(Limited(readings, 1), window=1)
        stats.retransmitted += measuring and posted.retransmissions > 0
        if posted.codes.get("2.04", 0) != 1:
            stats.failed += measuring
            continue
        notified, missing, last = await observers.round_complete(wait)
        if measuring:
            stats.readings += 1
            stats.notifications += notified
            stats.duration += last - started
            stats.latencies.append(last - started)
            stats.missing += missing
            stats.incomplete += missing > 0
    counts = observers.notifications
    stats.lost = counts.lost(observers)
    stats.confirmable = counts.confirmable
    stats.duplicates = counts.duplicates
    stats.ended = counts.ended
    return stats


def _datagram(mtype: int, code: int, mid: int, token: bytes, body: bytes) -> bytes:
    return struct.pack("!BBH", 0x40 | (mtype << 4) | len(token), code, mid) + token + body


def device_names(count: int, prefix: str = "bench") -> list[str]:
    return [f"{prefix}-{i:05d}" for i in range(count)]


async def _main(args: argparse.Namespace) -> None:
    names = device_names(args.devices)
    target = (args.host, args.port)
    async with LoadGenerator(target, sockets=args.devices) as gen:
        if args.register:
            stats = await gen.run(Registrations(names), window=args.window)
            print("register", stats.summary())
        workload: Workload = SenmlPacks(names, args.senml) if args.senml else CborReadings(names)
        stats = await gen.run(
            workload, duration=args.duration, window=args.window, rate=args.rate, warmup=1.0
        )
        print("readings", stats.summary(), f"acknowledged {len(gen.acknowledged)}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5683)
    parser.add_argument("--devices", type=int, default=100)
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--rate", type=float, default=None)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--senml", type=int, default=0, help="records per SenML pack (0: CBOR)")
    parser.add_argument("--register", action="store_true", help="register the devices first")
    asyncio.run(_main(parser.parse_args()))
