"""Random bytes and garbled CoAP: the gateway answers what it can and keeps serving."""

from __future__ import annotations

import asyncio
import random
import socket

import aiocoap
import cbor2
from aiocoap.numbers.codes import Code

from gateway.app import Gateway
from tests.support.gateway import post, register


def valid_datagram(message_id: int, token: bytes) -> bytes:
    # The underscore arguments build a message as it would look on the wire, without the
    # library assigning message id and type (which only a client context does).
    message = aiocoap.Message(
        code=Code.POST,
        _mid=message_id,
        _mtype=aiocoap.CON,
        _token=token,
        uri_path=("r", "victim"),
        content_format=60,
        payload=cbor2.dumps({"temp": 4.0, "seq": message_id}),
    )
    return bytes(message.encode())


async def test_flood_of_garbage_then_correct_answers(
    gateway: Gateway, gateway_url: str, coap_client: aiocoap.Context, gateway_config
) -> None:
    await register(coap_client, gateway_url, "victim", "fridge")
    rng = random.Random(1234)
    target = ("127.0.0.1", gateway_config.server.port)
    template = valid_datagram(1, b"tk")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)
        for index in range(3000):
            kind = index % 4
            if kind == 0:
                datagram = rng.randbytes(rng.randint(0, 80))
            elif kind == 1:
                datagram = template[: rng.randint(0, len(template))]
            elif kind == 2:
                garbled = bytearray(template)
                for _ in range(rng.randint(1, 4)):
                    garbled[rng.randrange(len(garbled))] = rng.randrange(256)
                datagram = bytes(garbled)
            else:
                # Valid header, hostile options: huge option deltas and lengths.
                datagram = template[:4] + bytes([0xED, 0xFF, 0xFF, 0xEE]) + rng.randbytes(20)
            sock.sendto(datagram, target)
            if index % 200 == 0:
                await asyncio.sleep(0)  # let the server drain its socket buffer
    # The gateway still answers correctly, to a well-behaved client.
    response = await post(
        coap_client, gateway_url, "r/victim", cbor2.dumps({"temp": 5.5, "seq": 10_000})
    )
    assert response.code == Code.CHANGED
    async with gateway.reader.execute(
        "SELECT value FROM readings WHERE measurement='temp' ORDER BY id DESC LIMIT 1"
    ) as cursor:
        assert (await cursor.fetchone()) == (5.5,)
    # Whatever garbled requests slipped through as valid CoAP were validated: none out of range.
    async with gateway.reader.execute(
        "SELECT count(*) FROM readings WHERE measurement='temp' AND (value < -40 OR value > 60)"
    ) as cursor:
        assert (await cursor.fetchone()) == (0,)
