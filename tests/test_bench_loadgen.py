"""The benchmark's load generator counts what a device would see: answers, kinds, losses.

Correctness only (no timing): it runs against small responders on loopback that answer
piggybacked, answer separately, drop first transmissions, or never answer; its observers
against a raw server, an in-process gateway and the bare aiocoap Observe baseline.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiocoap
import pytest
from aiocoap.numbers.codes import Code

from bench.baselines import MinimalResponder, serve_aiocoap_observe
from bench.loadgen import (
    CborReadings,
    FanoutStats,
    Limited,
    LoadGenerator,
    Observations,
    Registrations,
    SenmlPacks,
    device_names,
    fanout,
    observe_option,
)
from gateway.app import Gateway
from tests.support.downstreams import free_udp_port
from tests.support.gateway import gateway_config, wait_until

Handler = Callable[[asyncio.DatagramTransport, bytes, Any], None]


class Responder(asyncio.DatagramProtocol):
    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.received: list[bytes] = []

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.received.append(data)
        self.handler(self.transport, data, addr)


async def serve(protocol: asyncio.DatagramProtocol) -> tuple[asyncio.BaseTransport, int]:
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(
        lambda: protocol, local_addr=("127.0.0.1", 0)
    )
    return transport, transport.get_extra_info("sockname")[1]


@pytest.fixture
async def minimal() -> AsyncIterator[int]:
    transport, port = await serve(MinimalResponder())
    try:
        yield port
    finally:
        transport.close()


def header(data: bytes) -> tuple[int, int, int, bytes]:
    """(type, code, message id, token) of a datagram."""
    tkl = data[0] & 0x0F
    return (data[0] >> 4) & 3, data[1], struct.unpack("!H", data[2:4])[0], data[4 : 4 + tkl]


async def test_every_request_is_answered_once_by_the_minimal_responder(minimal: int) -> None:
    names = device_names(20)
    async with LoadGenerator(("127.0.0.1", minimal), sockets=20) as gen:
        stats = await gen.run(Registrations(names), window=8)
    assert stats.codes == {"2.04": 20}
    assert sorted(gen.acknowledged) == names
    assert stats.piggyback_share == 1.0
    assert stats.lost == 0
    assert len(stats.latencies) == 20


async def test_closed_loop_keeps_the_window_and_counts_readings(minimal: int) -> None:
    names = device_names(10)
    async with LoadGenerator(("127.0.0.1", minimal), sockets=10) as gen:
        stats = await gen.run(SenmlPacks(names, 10), duration=0.3, window=4)
    assert stats.completed > 0
    assert stats.readings == 10 * stats.codes["2.04"]
    assert stats.lost == 0
    # every acknowledged key is (device, base time) and a device's packs never overlap
    assert len(set(gen.acknowledged)) == len(gen.acknowledged)


async def test_open_loop_sends_at_the_rate() -> None:
    transport, port = await serve(MinimalResponder())
    try:
        async with LoadGenerator(("127.0.0.1", port), sockets=10) as gen:
            stats = await gen.run(CborReadings(device_names(10)), duration=0.5, rate=200)
    finally:
        transport.close()
    assert 60 <= stats.sent <= 110
    assert stats.codes["2.04"] == stats.completed


async def test_separate_responses_are_acknowledged_and_counted() -> None:
    acks_from_client: list[int] = []

    def separate(transport: asyncio.DatagramTransport, data: bytes, addr: Any) -> None:
        mtype, _, mid, token = header(data)
        if mtype == 2:  # the client's ACK of our separate response
            acks_from_client.append(mid)
            return
        transport.sendto(struct.pack("!BBH", 0x60, 0, mid), addr)  # empty ACK
        response_mid = (mid + 1000) & 0xFFFF
        transport.sendto(struct.pack("!BBH", 0x40 | len(token), 0x44, response_mid) + token, addr)

    transport, port = await serve(Responder(separate))
    try:
        async with LoadGenerator(("127.0.0.1", port), sockets=5) as gen:
            stats = await gen.run(Registrations(device_names(5)), window=5)
        await wait_until(lambda: len(acks_from_client) == 5)
    finally:
        transport.close()
    assert stats.codes == {"2.04": 5}
    assert stats.separate == 5 and stats.piggyback_share == 0.0


async def test_lost_first_transmissions_are_retransmitted_with_the_same_message_id() -> None:
    seen: set[int] = set()

    def drop_first(transport: asyncio.DatagramTransport, data: bytes, addr: Any) -> None:
        _, _, mid, token = header(data)
        if mid not in seen:
            seen.add(mid)
            return
        transport.sendto(struct.pack("!BBH", 0x60 | len(token), 0x44, mid) + token, addr)

    responder = Responder(drop_first)
    transport, port = await serve(responder)
    try:
        async with LoadGenerator(("127.0.0.1", port), sockets=4, ack_timeout=0.05) as gen:
            stats = await gen.run(Registrations(device_names(4)), window=4)
    finally:
        transport.close()
    assert stats.codes == {"2.04": 4}
    assert stats.retransmissions == 4
    assert len(responder.received) == 8


async def test_requests_never_answered_are_counted_as_lost() -> None:
    transport, port = await serve(Responder(lambda *_: None))
    try:
        async with LoadGenerator(("127.0.0.1", port), sockets=3, ack_timeout=0.02) as gen:
            stats = await gen.run(Registrations(device_names(3)), window=3, drain=2)
    finally:
        transport.close()
    assert stats.lost == 3
    assert stats.codes == {}
    assert gen.acknowledged == []


# --- Observe ---------------------------------------------------------------------------------


def wire(message: aiocoap.Message, mtype: int = 2, mid: int = 1) -> bytes:
    """A message as on the wire, its options encoded by aiocoap."""
    token = message.token
    first = struct.pack("!BBH", 0x40 | (mtype << 4) | len(token), int(message.code), mid)
    body = message.opt.encode() + (b"\xff" + message.payload if message.payload else b"")
    return first + token + body


def test_observe_option_is_found_among_other_options() -> None:
    for value in (0, 5, 300, 70_000):
        message = aiocoap.Message(code=Code.CONTENT, payload=b"\xa0")
        message.token = b"\x01\x02\x03"
        message.opt.observe = value
        message.opt.content_format = 60
        message.opt.etag = b"\xaa" * 4
        message.opt.max_age = 60
        assert observe_option(wire(message)) == value
    plain = aiocoap.Message(code=Code.CONTENT, payload=b"\xff\x06")
    plain.token = b"\x09"
    plain.opt.content_format = 60
    assert observe_option(wire(plain)) is None
    assert observe_option(b"\x60\x45\x00\x01") is None


def notification(mtype: int, mid: int, token: bytes, number: int | None, code: int = 0x45) -> bytes:
    message = aiocoap.Message(code=Code(code), payload=b"\xa0")
    message.token = token
    if number is not None:
        message.opt.observe = number
    message.opt.content_format = 60
    return wire(message, mtype, mid)


async def test_observations_answered_separately_count_notifications_and_ack_confirmable_ones() -> (
    None
):
    """A raw server answers each observe GET with an empty ACK, then a confirmable 2.05
    with Observe; its notifications (one lost on purpose, one duplicate, then a final 4.04)
    are counted, gaps found, and every confirmable one acknowledged."""
    peers: dict[bytes, Any] = {}
    acks: set[int] = set()
    registered = asyncio.Event()
    all_acked = asyncio.Event()
    expected_acks: set[int] = set()

    def observe(transport: asyncio.DatagramTransport, data: bytes, addr: Any) -> None:
        mtype, code, mid, token = header(data)
        if mtype == 2:
            acks.add(mid)
            if expected_acks and expected_acks <= acks:
                all_acked.set()
            return
        assert code == 0x01 and observe_option(data) == 0  # GET, Observe: 0
        assert data[4 + len(token) :].endswith(b"dev-0" if not peers else b"dev-1")
        transport.sendto(struct.pack("!BBH", 0x60, 0, mid), addr)  # empty ACK
        transport.sendto(notification(0, 100 + len(peers), token, 7), addr)
        expected_acks.add(100 + len(peers))
        peers[token] = addr
        if len(peers) == 2:
            registered.set()

    transport, port = await serve(Responder(observe))
    try:
        async with LoadGenerator(("127.0.0.1", port), sockets=2) as gen:
            stats = await gen.run(Observations(["dev-0", "dev-1"]), window=2)
            await asyncio.wait_for(registered.wait(), 5)
            assert stats.observations == 2 and stats.codes == {"2.05": 2}
            assert stats.separate == 2
            assert gen.notifications.observing == 2
            await asyncio.wait_for(all_acked.wait(), 5)  # the two separate 2.05s
            gen.expect_round()
            all_acked.clear()
            expected_acks.update((201, 202, 211, 212))
            for mid, (token, addr) in zip((200, 210), peers.items(), strict=True):
                # 8 NON, 9 lost, 10 CON, 10 again (a retransmission), then a final 4.04
                transport.sendto(notification(1, mid, token, 8), addr)
                transport.sendto(notification(0, mid + 1, token, 10), addr)
                transport.sendto(notification(0, mid + 1, token, 10), addr)
                transport.sendto(notification(0, mid + 2, token, None, code=0x84), addr)
            await asyncio.wait_for(all_acked.wait(), 5)
            notified, left, _ = await gen.round_complete(5)
            counts = gen.notifications
            assert (notified, left) == (2, 0)
            assert counts.received == 4 and counts.confirmable == 2
            assert counts.duplicates == 2
            assert counts.ended == 2 and counts.observing == 0
            assert counts.lost(gen) == 2  # number 9 of each observation
    finally:
        transport.close()


async def test_every_socket_observes_its_own_device_on_the_gateway(tmp_path: Path) -> None:
    names = device_names(30, prefix="obs")
    config = gateway_config(tmp_path, logging={"level": "warning"})
    async with Gateway(config) as gateway:
        target = ("127.0.0.1", config.server.port)
        async with LoadGenerator(target, sockets=len(names)) as gen:
            registered = await gen.run(Registrations(names), window=8)
            observed = await gen.run(Observations(names), window=8)
            assert registered.codes == {"2.01": 30}
            assert observed.codes == {"2.05": 30} and observed.observations == 30
            assert observed.observation_rate > 0
            fanout = gateway.readings.fanout
            assert [fanout.count(name) for name in names] == [1] * 30
            # Each device posts one reading from its own socket: each observer, and only
            # it, is notified.
            gen.expect_round()
            posted = await gen.run(Limited(CborReadings(names), 30), window=8)
            assert posted.codes == {"2.04": 30}
            notified, left, _ = await gen.round_complete(10)
            assert (notified, left) == (30, 0)
            assert gen.notifications.received == 30
            assert gen.notifications.lost(gen) == 0


async def test_observations_past_the_observer_limit_are_not_counted(tmp_path: Path) -> None:
    names = device_names(3, prefix="lim")
    config = gateway_config(tmp_path, security={"max_observers": 2})
    async with Gateway(config) as gateway:
        async with LoadGenerator(("127.0.0.1", config.server.port), sockets=3) as gen:
            await gen.run(Registrations(names), window=3)
            observed = await gen.run(Observations(names), window=1)
        assert observed.codes == {"2.05": 3}  # the third as a plain GET (RFC 7641 §4.1)
        assert observed.observations == 2
        assert gen.notifications.observing == 2
        assert gateway.readings.fanout.count() == 2


async def fanout_run(port: int, observers: int, **kwargs: Any) -> tuple[FanoutStats, int]:
    """Fan-out rounds to `observers` sockets; the stats and the readings answered 2.04."""
    target = ("127.0.0.1", port)
    async with (
        LoadGenerator(target, sockets=1) as device,
        LoadGenerator(target, sockets=observers) as gen,
    ):
        await device.run(Registrations(["fan-0"]), window=1)
        observed = await gen.run(Observations(["fan-0"] * observers), window=16)
        assert observed.observations == observers
        stats = await fanout(device, gen, CborReadings(["fan-0"]), **kwargs)
    return stats, sum(isinstance(key, tuple) for key in device.acknowledged)


async def test_fanout_counts_every_reading_at_every_observer_of_the_gateway(
    tmp_path: Path,
) -> None:
    # Every notification confirmable: the observations survive only if each is acknowledged.
    config = gateway_config(tmp_path, observe={"con_every": 1})
    async with Gateway(config) as gateway:
        stats, posted = await fanout_run(config.server.port, 50, duration=0.5, wait=5)
        assert gateway.readings.fanout.count("fan-0") == 50
        assert gateway.readings.fanout.stats.confirmable >= 50 * stats.readings
    assert stats.readings == posted > 0 and stats.failed == 0
    assert stats.notifications == 50 * stats.readings
    assert stats.missing == 0 and stats.incomplete == 0 and stats.lost == 0
    assert stats.confirmable >= stats.notifications and stats.ended == 0
    assert stats.rate > 0 and len(stats.latencies) == stats.readings


@pytest.mark.parametrize("confirmable", [True, False])
async def test_fanout_against_the_bare_aiocoap_observe_baseline(confirmable: bool) -> None:
    port = free_udp_port()
    stop = asyncio.Event()
    server = asyncio.create_task(serve_aiocoap_observe(port, stop, confirmable=confirmable))
    try:
        await asyncio.wait_for(ping(port), 10)
        stats, posted = await fanout_run(port, 20, duration=0.3, warmup=0.1, wait=5)
    finally:
        stop.set()
        await asyncio.wait_for(server, 10)
    assert 0 < stats.readings < posted  # the warm-up's readings are not counted
    assert stats.missing == 0 and stats.lost == 0
    assert stats.notifications == 20 * stats.readings
    if confirmable:
        assert stats.confirmable >= stats.notifications
    else:
        assert stats.confirmable == 0


async def ping(port: int) -> None:
    """Until the server answers a CoAP ping (empty CON) with RST."""
    loop = asyncio.get_running_loop()
    answered = loop.create_future()

    class Pinger(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: Any) -> None:
            if not answered.done():
                answered.set_result(data)

    transport, _ = await loop.create_datagram_endpoint(Pinger, remote_addr=("127.0.0.1", port))
    try:
        while not answered.done():
            transport.sendto(b"\x40\x00\x12\x34")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(answered), 0.2)
    finally:
        transport.close()
