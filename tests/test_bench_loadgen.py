"""The benchmark's load generator counts what a device would see: answers, kinds, losses.

Correctness only (no timing): it runs against small responders on loopback that answer
piggybacked, answer separately, drop first transmissions, or never answer.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from bench.baselines import MinimalResponder
from bench.loadgen import CborReadings, LoadGenerator, Registrations, SenmlPacks, device_names
from tests.support.gateway import wait_until

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
