"""The simulator's CoAP message layer against a raw UDP peer: exactly what goes on the wire."""

from __future__ import annotations

import asyncio
import random
import struct
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiocoap import Message
from aiocoap.numbers.codes import Code
from aiocoap.numbers.types import Type

from device_sim.coap import Endpoint, Impairment, RequestReset, RequestTimeout, Transmission
from tests.sim.coap_server import wait_for

FAST = Transmission(ack_timeout=0.05, separate_timeout=1.0)


class Peer(asyncio.DatagramProtocol):
    """A raw UDP socket that queues what it receives."""

    def __init__(self) -> None:
        self.inbox: asyncio.Queue[tuple[Any, tuple[str, int]]] = asyncio.Queue()
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.inbox.put_nowait((Message.decode(data), addr))

    async def receive(self, within: float = 2.0) -> tuple[Any, tuple[str, int]]:
        return await asyncio.wait_for(self.inbox.get(), within)

    def send(self, msg: Any, mtype: Type, mid: int, token: bytes, to: tuple[str, int]) -> None:
        msg.mtype, msg.mid, msg.token = mtype, mid, token
        self.transport.sendto(msg.encode(), to)

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.transport.get_extra_info("sockname")[:2]
        return host, port


async def bind(protocol: Any) -> Any:
    loop = asyncio.get_running_loop()
    await loop.create_datagram_endpoint(lambda: protocol, local_addr=("127.0.0.1", 0))
    return protocol


@pytest.fixture
async def pair() -> AsyncIterator[tuple[Endpoint, Peer]]:
    ep = await bind(Endpoint(rng=random.Random(1), transmission=FAST, handler=handler))
    peer = await bind(Peer())
    yield ep, peer
    ep.close()
    peer.transport.close()


def handler(request: Any, peer: tuple[str, int]) -> Any:
    if request.opt.uri_path == ("boom",):
        raise RuntimeError("bug")
    return Message(code=Code.CONTENT, payload=b"hi")


def post() -> Any:
    return Message(code=Code.POST, uri_path=("r", "dev"), payload=b"\xa0")


async def test_piggybacked_response(pair: tuple[Endpoint, Peer]) -> None:
    ep, peer = pair
    task = asyncio.create_task(ep.request(post(), peer.address))
    req, addr = await peer.receive()
    assert req.mtype == Type.CON and req.code == Code.POST and len(req.token) == 4
    peer.send(Message(code=Code.CHANGED), Type.ACK, req.mid, req.token, addr)
    result = await task
    assert result.response.code == Code.CHANGED and result.retransmissions == 0
    assert not result.separate


async def test_retransmits_with_backoff_until_acknowledged(pair: tuple[Endpoint, Peer]) -> None:
    ep, peer = pair
    loop = asyncio.get_running_loop()
    task = asyncio.create_task(ep.request(post(), peer.address))
    times, mids = [], set()
    for _ in range(3):
        req, addr = await peer.receive()
        times.append(loop.time())
        mids.add(req.mid)
    assert len(mids) == 1  # a retransmission is the same message
    gap1, gap2 = times[1] - times[0], times[2] - times[1]
    assert 0.05 <= gap1 <= 0.075 * 1.5 and gap2 == pytest.approx(2 * gap1, rel=0.3)
    peer.send(Message(code=Code.CHANGED), Type.ACK, req.mid, req.token, addr)
    assert (await task).retransmissions == 2


async def test_gives_up_after_max_retransmit(pair: tuple[Endpoint, Peer]) -> None:
    ep, peer = pair
    with pytest.raises(RequestTimeout) as info:
        await ep.request(post(), peer.address)
    assert info.value.retransmissions == 4
    assert peer.inbox.qsize() == 5


async def test_reset_fails_the_request(pair: tuple[Endpoint, Peer]) -> None:
    ep, peer = pair
    task = asyncio.create_task(ep.request(post(), peer.address))
    req, addr = await peer.receive()
    peer.send(Message(code=Code.EMPTY), Type.RST, req.mid, b"", addr)
    with pytest.raises(RequestReset):
        await task


async def test_separate_response_is_acknowledged_once_and_duplicates_dropped(
    pair: tuple[Endpoint, Peer],
) -> None:
    ep, peer = pair
    task = asyncio.create_task(ep.request(post(), peer.address))
    req, addr = await peer.receive()
    peer.send(Message(code=Code.EMPTY), Type.ACK, req.mid, b"", addr)
    for _ in range(2):  # the separate response, and its duplicate
        peer.send(Message(code=Code.CHANGED), Type.CON, 0x4242, req.token, addr)
    result = await task
    assert result.separate and result.response.code == Code.CHANGED
    acks = [await peer.receive(), await peer.receive()]
    assert all(m.mtype == Type.ACK and m.mid == 0x4242 and m.code == Code.EMPTY for m, _ in acks)
    assert ep.stats.duplicates == 1


async def test_duplicate_piggybacked_ack_is_ignored(pair: tuple[Endpoint, Peer]) -> None:
    ep, peer = pair
    task = asyncio.create_task(ep.request(post(), peer.address))
    req, addr = await peer.receive()
    for _ in range(2):
        peer.send(Message(code=Code.CHANGED), Type.ACK, req.mid, req.token, addr)
    await task
    await wait_for(lambda: ep.stats.stray == 1, within=2)


async def test_server_answers_and_replays_duplicates_from_cache(
    pair: tuple[Endpoint, Peer],
) -> None:
    ep, peer = pair
    get = Message(code=Code.GET, uri_path=("temp",))
    for _ in range(2):
        peer.send(get, Type.CON, 7, b"tk", ep.local_address)
    first, _ = await peer.receive()
    again, _ = await peer.receive()
    assert first.mtype == Type.ACK and first.mid == 7 and first.token == b"tk"

    def wire(m: Any) -> tuple[Any, ...]:
        return (m.mtype, m.mid, m.token, m.code, m.payload)

    assert first.payload == b"hi" and wire(again) == wire(first)
    assert ep.stats.duplicates == 1


async def test_ping_gets_reset_and_handler_bugs_get_500(pair: tuple[Endpoint, Peer]) -> None:
    ep, peer = pair
    peer.send(Message(code=Code.EMPTY), Type.CON, 9, b"", ep.local_address)
    rst, _ = await peer.receive()
    assert rst.mtype == Type.RST and rst.mid == 9
    peer.send(Message(code=Code.GET, uri_path=("boom",)), Type.CON, 10, b"x", ep.local_address)
    err, _ = await peer.receive()
    assert err.code == Code.INTERNAL_SERVER_ERROR and err.mid == 10


async def test_garbage_con_gets_reset(pair: tuple[Endpoint, Peer]) -> None:
    ep, peer = pair
    # A CON GET whose first option has the reserved delta 15: undecodable.
    peer.transport.sendto(struct.pack("!BBHBB", 0x40, 0x01, 77, 0xF1, 0), ep.local_address)
    rst, _ = await peer.receive()
    assert rst.mtype == Type.RST and rst.mid == 77 and ep.stats.malformed == 1


async def test_impairment_is_seeded() -> None:
    async def build(seed: int) -> list[Any]:
        ep = Endpoint(rng=random.Random(seed), impairment=Impairment(0.3, 0.3, 0.01, 0.02))
        return [ep._impair() for _ in range(200)]

    a, b, c = await build(5), await build(5), await build(6)
    assert a == b != c
    lost = sum(f is None for fate in a for f in fate)
    copies = sum(len(fate) for fate in a)
    assert 220 < copies < 300 and 0.15 < lost / copies < 0.45
