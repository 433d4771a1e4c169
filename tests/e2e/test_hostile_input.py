"""Random bytes and garbled CoAP: the gateway answers what it can and keeps serving."""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import aiocoap
import cbor2
import pytest
from aiocoap.numbers.codes import Code

from gateway.app import Gateway
from gateway.config import GatewayConfig
from tests.support.gateway import GatewayProcess, post, register


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


def garbage(count: int, seed: int = 1234) -> list[bytes]:
    """Random bytes, truncated and garbled readings, and hostile options, in turn."""
    rng = random.Random(seed)
    template = valid_datagram(1, b"tk")
    datagrams = []
    for index in range(count):
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
        datagrams.append(datagram)
    return datagrams


# Two garbled datagrams that pass as requests with the same token (the empty one, say) from
# the one socket: aiocoap's token layer lets the second override the first, cancelling the
# task that renders the first. Read in the same pass of the loop, that task is cancelled
# before its first step, and the render coroutine it was to await is never awaited. aiocoap's
# own, harmless, a matter of timing (once in a dozen runs here): this warning alone is let
# through.
@pytest.mark.filterwarnings(
    "ignore:coroutine 'Context._render_to_pipe' was never awaited:RuntimeWarning"
)
async def test_flood_of_garbage_then_correct_answers(
    gateway: Gateway, gateway_url: str, coap_client: aiocoap.Context, gateway_config
) -> None:
    await register(coap_client, gateway_url, "victim", "fridge")
    target = ("127.0.0.1", gateway_config.server.port)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)
        for index, datagram in enumerate(garbage(3000)):
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


def well_known_core_request(message_id: int) -> bytes:
    message = aiocoap.Message(
        code=Code.GET,
        _mid=message_id,
        _mtype=aiocoap.CON,
        _token=b"g",
        uri_path=(".well-known", "core"),
    )
    return bytes(message.encode())


@contextlib.asynccontextmanager
async def still_serving_after(process: GatewayProcess) -> AsyncIterator[aiocoap.Context]:
    """A client of the started `process`; when the block is done, the process must still
    be running and stop cleanly at SIGTERM."""
    client = await aiocoap.Context.create_client_context(transports=["udp6"])
    try:
        yield client
    finally:
        await client.shutdown()
    assert process.running
    assert process.terminate() == 0


@pytest.mark.parametrize("transport", ["simplesocketserver", "udp6"])
@pytest.mark.parametrize("event_loop", ["uvloop", "asyncio"])
async def test_peers_gone_before_their_answer_do_not_bring_the_gateway_down(
    gateway_config: GatewayConfig, tmp_path: Path, event_loop: str, transport: str
) -> None:
    """Each answer to a port that has closed comes back as an ICMP port unreachable, as for
    a spoofed source address or a device that went to sleep. Under uvloop the first such
    error used to kill the process bound to one address (simplesocketserver: SIGSEGV in
    uvloop, reading libuv's error-queue report as a 4 GB datagram), and to leave it deaf
    to every device on `::` (udp6, the default: libuv stopped watching the socket)."""
    process = GatewayProcess.with_settings(
        gateway_config,
        tmp_path,
        f'[server]\nevent_loop = "{event_loop}"\ntransport = "{transport}"\n',
    )
    try:
        process.start()
        (listening,) = process.events_named("coap.listening")
        assert listening["transports"] == [transport]
        # On asyncio such errors end the peer's exchanges at once; under uvloop they are
        # ignored, as by aiocoap's simple transport itself.
        assert listening["icmp_errors"] is (event_loop == "asyncio")
        target = ("127.0.0.1", gateway_config.server.port)
        for message_id in range(20):
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as gone:
                gone.sendto(well_known_core_request(message_id), target)
        async with still_serving_after(process) as client:
            for name in ("fridge-1", "fridge-2"):
                await register(client, process.url, name, "fridge")
    finally:
        process.stop()


async def test_flood_of_garbage_on_uvloop_then_correct_answers(
    gateway_config: GatewayConfig, tmp_path: Path
) -> None:
    """The flood above against `gateway serve` on its default loop (uvloop, where
    installed), whose UDP code is libuv's rather than asyncio's; half of it from sockets
    closed at once, so the answers come back as ICMP errors."""
    # Without rate limits, as in `gateway_config`: every datagram reaches the parser.
    process = GatewayProcess.with_settings(
        gateway_config,
        tmp_path,
        '[server]\nevent_loop = "uvloop"\n[security]\nsource_rate = 0\ndevice_rate = 0\n',
    )
    target = ("127.0.0.1", gateway_config.server.port)
    try:
        process.start()
        async with still_serving_after(process) as client:
            await register(client, process.url, "victim", "fridge")
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                for index, datagram in enumerate(garbage(3000)):
                    if index % 2:
                        sock.sendto(datagram, target)
                    else:
                        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as gone:
                            gone.sendto(datagram, target)
                    if index % 200 == 0:
                        # Answered, so the gateway has read what came before.
                        await register(client, process.url, "victim", "fridge")
            response = await post(
                client, process.url, "r/victim", cbor2.dumps({"temp": 5.5, "seq": 10_000})
            )
            assert response.code == Code.CHANGED
    finally:
        process.stop()
    with sqlite3.connect(gateway_config.store.path) as conn:
        (last,) = conn.execute(
            "SELECT value FROM readings WHERE measurement='temp' ORDER BY id DESC LIMIT 1"
        ).fetchone()
        (out_of_range,) = conn.execute(
            "SELECT count(*) FROM readings WHERE measurement='temp' AND (value < -40 OR value > 60)"
        ).fetchone()
    assert (last, out_of_range) == (5.5, 0)


@pytest.mark.parametrize("option", [b"\xe0", b"\x07", b"\x03\x01"])
async def test_a_malformed_oscore_option_gets_4_02(
    gateway: Gateway, gateway_config: GatewayConfig, option: bytes
) -> None:
    """Reserved flag bits, a reserved Partial IV length, a Partial IV cut short: RFC 8613
    §8.2 answers 4.02 Bad Option (aiocoap alone logged an exception and answered 5.00)."""
    message = aiocoap.Message(
        code=Code.POST,
        _mid=0x0BAD,
        _mtype=aiocoap.CON,
        _token=b"os",
        uri_path=("r", "victim"),
        oscore=option,
        payload=b"\x00" * 9,
    )
    loop = asyncio.get_running_loop()
    answers: asyncio.Queue[bytes] = asyncio.Queue()

    class Device(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: object) -> None:
            answers.put_nowait(data)

    transport, _ = await loop.create_datagram_endpoint(
        Device, remote_addr=("127.0.0.1", gateway_config.server.port)
    )
    try:
        transport.sendto(bytes(message.encode()))
        answer = aiocoap.Message.decode(await asyncio.wait_for(answers.get(), 5))
    finally:
        transport.close()
    assert answer.code == Code.BAD_OPTION and answer.mid == 0x0BAD
    assert b"OSCORE" in answer.payload
