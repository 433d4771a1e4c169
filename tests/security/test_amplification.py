"""RFC 7252 §11.3: an unauthenticated peer never gets more than three times what it sent."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import aiocoap
import cbor2
from aiocoap.numbers.codes import Code
from aiocoap.numbers.types import Type

from gateway.app import Gateway
from tests.support.gateway import post, register

STOCK = {f"stock_item{index:02d}": index for index in range(40)}


class RawClient(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.received: asyncio.Queue[bytes] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.received.put_nowait(data)


async def exchange(port: int, wire: bytes) -> bytes:
    """One datagram to the gateway from a fresh socket; its first answer, as sent."""
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_datagram_endpoint(
        RawClient, remote_addr=("127.0.0.1", port), family=socket.AF_INET
    )
    try:
        transport.sendto(wire)
        return await asyncio.wait_for(protocol.received.get(), 5)
    finally:
        transport.close()


async def test_large_answer_comes_in_small_blocks(
    gateway: Gateway, gateway_url: str, coap_client: aiocoap.Context
) -> None:
    await register(coap_client, gateway_url, "fr1")
    assert (await post(coap_client, gateway_url, "r/fr1", cbor2.dumps(STOCK))).code == Code.CHANGED

    request = aiocoap.Message(code=Code.GET, uri_path=("r", "fr1"))
    request.mtype = Type.CON
    request.mid = 77
    request.token = b"\x07"
    wire = request.encode()
    data = await exchange(gateway.config.server.port, wire)
    answer = aiocoap.Message.decode(data)
    assert answer.code == Code.CONTENT
    assert len(data) <= 3 * len(wire), (len(data), len(wire))
    assert answer.opt.block2 is not None and answer.opt.block2.more

    # A block-wise client still gets the whole answer, one small block at a time.
    full = await coap_client.request(
        aiocoap.Message(code=Code.GET, uri=f"{gateway_url}/r/fr1")
    ).response
    assert full.code == Code.CONTENT
    assert len(full.payload) > 3 * len(wire)
    assert "stock_item39" in repr(cbor2.loads(full.payload))


async def test_small_answers_are_untouched(
    gateway: Gateway, gateway_url: str, coap_client: aiocoap.Context
) -> None:
    await register(coap_client, gateway_url, "fr1")
    response = await post(coap_client, gateway_url, "r/fr1", cbor2.dumps({"temp": 3.5}))
    assert response.code == Code.CHANGED
    assert response.opt.block2 is None


async def test_long_diagnostic_is_cut_to_fit_not_dropped(
    gateway: Gateway, gateway_url: str, coap_client: aiocoap.Context
) -> None:
    await register(coap_client, gateway_url, "fr1")
    # One broken byte of CBOR: a tiny request whose diagnostic is longer than 3x its size.
    # No token, so that the client's request below is larger whatever token it draws
    # (aiocoap's first token is random below 65,536: one byte long once in 256 contexts).
    request = aiocoap.Message(
        code=Code.POST, uri_path=("r", "fr1"), payload=b"\xff", content_format=60
    )
    request.mtype, request.mid, request.token = Type.CON, 78, b""
    wire = request.encode()
    data = await exchange(gateway.config.server.port, wire)
    answer = aiocoap.Message.decode(data)
    assert answer.code == Code.BAD_REQUEST
    assert len(data) <= 3 * len(wire), (len(data), len(wire))
    assert answer.opt.block2 is None
    full = await post(coap_client, gateway_url, "r/fr1", b"\xff")
    assert len(full.payload) > len(answer.payload) > 10, (full.payload, answer.payload)
    assert full.payload.startswith(answer.payload)
