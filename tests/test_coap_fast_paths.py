"""The cheaper request path keeps CoAP behaviour: routing, both transports, the readings
fast lane (and the generic way without it), block-wise POST, deduplication, separate
responses, and the store's one-trip group commit."""

from __future__ import annotations

import asyncio
import socket
import sqlite3
import subprocess
from pathlib import Path

import aiocoap
import aiocoap.error
import cbor2
import pytest
from aiocoap.numbers.codes import Code

from gateway.app import Gateway
from gateway.coap.server import choose_transport
from gateway.core.model import Device, StoredReading
from gateway.core.readings import Measurement
from gateway.store.writer import ReadingBatch
from tests.support.gateway import ON_UVLOOP, base_url, gateway_config, post, register

COAP_CLIENT = "/usr/bin/coap-client-notls"


def test_transport_is_chosen_by_bind_address() -> None:
    assert choose_transport("::") == "udp6"
    assert choose_transport("0.0.0.0") == "udp6"
    assert choose_transport("127.0.0.1") == "simplesocketserver"
    assert choose_transport("::1") == "simplesocketserver"
    assert choose_transport("127.0.0.1", "udp6") == "udp6"


@pytest.mark.parametrize("fast_lane", [True, False])
@pytest.mark.parametrize("transport", ["simplesocketserver", "udp6"])
async def test_requests_reach_their_resources_on_either_transport(
    tmp_path: Path, coap_client: aiocoap.Context, transport: str, fast_lane: bool
) -> None:
    config = gateway_config(tmp_path, server={"transport": transport, "fast_lane": fast_lane})
    url = base_url(config)
    async with Gateway(config):
        location = await register(coap_client, url, "f1", "fridge")
        stored = await post(coap_client, url, "r/f1", cbor2.dumps({"temp": 4.5, "seq": 1}))
        assert stored.code == Code.CHANGED
        latest = await coap_client.request(
            aiocoap.Message(code=Code.GET, uri=f"{url}/r/f1")
        ).response
        assert latest.code == Code.CONTENT
        assert cbor2.loads(latest.payload)["temp"]["v"] == 4.5
        refreshed = await coap_client.request(
            aiocoap.Message(code=Code.POST, uri=f"{url}/{location}")
        ).response
        assert refreshed.code == Code.CHANGED
        wkc = await coap_client.request(
            aiocoap.Message(code=Code.GET, uri=f"{url}/.well-known/core")
        ).response
        assert b"</rd>" in wkc.payload and b"</r>" in wkc.payload
        for path in ("nothing", "r", "r/f1/extra", "rd/unknown/x"):
            missing = await coap_client.request(
                aiocoap.Message(code=Code.POST, uri=f"{url}/{path}", payload=b"\xa0")
            ).response
            assert missing.code == Code.NOT_FOUND, path


async def test_unknown_device_is_answered_with_its_path_in_the_log(
    gateway: Gateway, gateway_url: str, coap_client: aiocoap.Context
) -> None:
    from structlog.testing import capture_logs

    with capture_logs() as logs:
        response = await post(coap_client, gateway_url, "r/ghost", cbor2.dumps({"temp": 1}))
    assert response.code == Code.NOT_FOUND
    rejected = [entry for entry in logs if entry["event"] == "reading.rejected"]
    assert rejected and rejected[0]["path"] == "/r/ghost"


async def test_blockwise_post_of_readings_is_reassembled(
    gateway: Gateway, gateway_url: str, coap_client: aiocoap.Context, tmp_path: Path
) -> None:
    await register(coap_client, gateway_url, "f2", "fridge")
    document = {f"stock_item{i:02d}": i for i in range(30)} | {"seq": 7}
    payload = cbor2.dumps(document)
    assert len(payload) > 64 * 4
    body = tmp_path / "reading.cbor"
    body.write_bytes(payload)
    done = await asyncio.to_thread(
        subprocess.run,
        [COAP_CLIENT, "-m", "post", "-b", "64", "-t", "60", "-f", str(body), f"{gateway_url}/r/f2"],
        capture_output=True,
        timeout=20,
    )
    assert done.returncode == 0, done.stderr
    async with gateway.reader.execute(
        "SELECT count(*) FROM readings r JOIN devices d ON d.id = r.device_id"
        " WHERE d.name = 'f2' AND r.seq = 7"
    ) as cursor:
        (count,) = await cursor.fetchone()  # type: ignore[misc]
    assert count == 30


async def stored_readings(gateway: Gateway, device: str) -> int:
    async with gateway.reader.execute(
        "SELECT count(*) FROM readings r JOIN devices d ON d.id = r.device_id WHERE d.name = ?",
        (device,),
    ) as cursor:
        (count,) = await cursor.fetchone()  # type: ignore[misc]
    return int(count)


async def test_a_repeated_message_is_answered_again_without_storing_twice(
    gateway: Gateway, gateway_url: str, coap_client: aiocoap.Context
) -> None:
    await register(coap_client, gateway_url, "f3", "fridge")
    port = gateway.config.server.port
    loop = asyncio.get_running_loop()
    answers: asyncio.Queue[bytes] = asyncio.Queue()

    class Device(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: object) -> None:
            answers.put_nowait(data)

    transport, _ = await loop.create_datagram_endpoint(Device, remote_addr=("127.0.0.1", port))
    try:
        # CON POST /r/f3, message id 0x0101, token 0xAB, a CBOR reading without seq
        options = bytes([0xB1]) + b"r" + bytes([0x02]) + b"f3" + bytes([0x11, 60])
        datagram = b"\x41\x02\x01\x01\xab" + options + b"\xff" + cbor2.dumps({"temp": 3.25})
        for _ in range(2):
            transport.sendto(datagram)
            answer = await asyncio.wait_for(answers.get(), 5)
            assert answer[:5] == b"\x61\x44\x01\x01\xab"  # piggybacked 2.04, same id, token
        # What is kept for the next retransmission is the answer's bytes, not the answer
        # with its request (aiocoap's own cache holds 3.8 KB a request for 247 s).
        kept = [d.recent.answer(key) for d in gateway.coap.deduplication for key in d.recent]
        assert answer in kept
    finally:
        transport.close()
    assert await stored_readings(gateway, "f3") == 1


async def test_group_commit_of_readings_and_operations(gateway: Gateway) -> None:
    device = await gateway.registry.ensure_device("w1")
    committed: list[StoredReading] = []
    gateway.writer.add_commit_listener(committed.extend)

    def batch(seq: int) -> ReadingBatch:
        measurement = Measurement("temp", float(seq), "Cel", None, seq, f"s{seq}/temp")
        return ReadingBatch(device, [measurement], 1000.0 + seq, "127.0.0.1:1")

    async def count_readings(conn: object) -> int:
        async with gateway.db.execute("SELECT count(*) FROM readings") as cursor:
            (count,) = await cursor.fetchone()  # type: ignore[misc]
        return int(count)

    # Readings alone (one trip), then readings mixed with an operation (statement by
    # statement), then a duplicate: same results either way.
    await asyncio.gather(*(gateway.writer.insert_readings(batch(seq)) for seq in range(5)))
    results = await asyncio.gather(
        gateway.writer.insert_readings(batch(5)),
        gateway.writer.transaction(count_readings),
        gateway.writer.insert_readings(batch(6)),
    )
    await gateway.writer.insert_readings(batch(3))
    assert results[1] >= 5
    assert [reading.seq for reading in committed] == list(range(7))
    assert len({reading.id for reading in committed}) == 7
    assert all(reading.device == device for reading in committed)
    assert gateway.writer.stats.readings == 7 and gateway.writer.stats.duplicates == 1


async def test_two_writers_on_one_database_each_report_only_their_own_rows(
    tmp_path: Path,
) -> None:
    """Several gateway processes may share a database: a writer's commit listeners must
    never be told of rows another process committed."""
    from gateway.store.db import migrate, open_database
    from gateway.store.writer import StoreWriter

    path = tmp_path / "shared.db"
    connections = [await open_database(path) for _ in range(2)]
    try:
        await migrate(connections[0])
        async with connections[0].execute(
            "INSERT INTO devices (name, type, created_at) VALUES ('a', 'fridge', 0), "
            "('b', 'fridge', 0) RETURNING id, name"
        ) as cursor:
            ids = {name: id_ async for id_, name in cursor}
        writers = [StoreWriter(conn) for conn in connections]
        seen: list[list[StoredReading]] = [[], []]
        tasks = []
        for writer, log in zip(writers, seen, strict=True):
            writer.add_commit_listener(log.extend)
            tasks.append(asyncio.create_task(writer.run()))
        devices = [Device(ids["a"], "a", "fridge"), Device(ids["b"], "b", "fridge")]
        for seq in range(6):
            index = seq % 2
            measurement = Measurement("temp", 1.0, None, None, seq, f"s{seq}/temp")
            await writers[index].insert_readings(
                ReadingBatch(devices[index], [measurement], 10.0 + seq, None)
            )
        for writer in writers:
            await writer.close()
        await asyncio.gather(*tasks)
    finally:
        for conn in connections:
            await conn.close()
    assert [r.seq for r in seen[0]] == [0, 2, 4] and {r.device.name for r in seen[0]} == {"a"}
    assert [r.seq for r in seen[1]] == [1, 3, 5] and {r.device.name for r in seen[1]} == {"b"}


@pytest.mark.skipif(
    ON_UVLOOP, reason="on uvloop the simple transport ignores ICMP errors (docs/configuration.md)"
)
async def test_a_peer_that_went_away_fails_at_once_on_the_simple_transport(
    gateway: Gateway,
) -> None:
    """An ICMP port-unreachable ends the exchange (and so an observation) right away,
    instead of after the CON retransmissions time out."""
    assert gateway.coap._transports[0] == "simplesocketserver"
    context = gateway.coap.context
    peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    peer.bind(("127.0.0.1", 0))
    port = peer.getsockname()[1]
    peer.close()
    request = aiocoap.Message(code=Code.GET, uri=f"coap://127.0.0.1:{port}/temp")
    with pytest.raises(aiocoap.error.NetworkError):
        await asyncio.wait_for(context.request(request).response, 5)


async def test_plain_reading_posts_take_the_fast_lane_and_others_the_generic_way(
    gateway: Gateway, gateway_url: str, coap_client: aiocoap.Context
) -> None:
    lane = gateway.fast_lane
    assert lane is not None
    await register(coap_client, gateway_url, "f4", "fridge")
    before = lane.served
    assert (await post(coap_client, gateway_url, "r/f4", cbor2.dumps({"temp": 1.0}))).code == (
        Code.CHANGED
    )
    assert lane.served == before + 1
    # A query, or an unknown device: still answered, the query one the generic way.
    queried = await coap_client.request(
        aiocoap.Message(
            code=Code.POST,
            uri=f"{gateway_url}/r/f4?x=1",
            payload=cbor2.dumps({"temp": 2.0}),
            content_format=60,
        )
    ).response
    assert queried.code == Code.CHANGED and lane.served == before + 1
    unknown = await post(coap_client, gateway_url, "r/nobody", cbor2.dumps({"temp": 2.0}))
    assert unknown.code == Code.NOT_FOUND and b"nobody" in unknown.payload
    assert lane.served == before + 2


async def test_a_slow_commit_gets_an_empty_ack_then_a_confirmable_answer(
    gateway: Gateway, gateway_url: str, coap_client: aiocoap.Context
) -> None:
    """The fast lane leaves piggybacking to aiocoap: an answer later than its empty-ACK
    delay goes out as a separate CON response, retransmitted until acknowledged. A
    retransmitted request is answered with the empty ACK, before and after."""
    await register(coap_client, gateway_url, "f5", "fridge")
    loop = asyncio.get_running_loop()
    answers: asyncio.Queue[bytes] = asyncio.Queue()

    class Device(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: object) -> None:
            answers.put_nowait(data)

    # Another connection holds the write lock, so the reading's commit waits for it.
    blocker = sqlite3.connect(gateway.config.store.path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    transport, _ = await loop.create_datagram_endpoint(
        Device, remote_addr=("127.0.0.1", gateway.config.server.port)
    )
    try:
        options = bytes([0xB1]) + b"r" + bytes([0x02]) + b"f5" + bytes([0x11, 60])
        datagram = b"\x41\x02\x02\x02\xac" + options + b"\xff" + cbor2.dumps({"temp": 3.5})
        transport.sendto(datagram)
        empty_ack = await asyncio.wait_for(answers.get(), 5)
        assert empty_ack == b"\x60\x00\x02\x02"  # ACK, 0.00, same message id, no token
        # The device missed the empty ACK and retransmits: it gets the same ACK again.
        transport.sendto(datagram)
        assert await asyncio.wait_for(answers.get(), 5) == empty_ack
        blocker.execute("COMMIT")
        separate = await asyncio.wait_for(answers.get(), 5)
        assert separate[0] == 0x41 and separate[1] == 0x44  # CON 2.04 ...
        assert separate[4:5] == b"\xac"  # ... with the request's token
        transport.sendto(bytes([0x60, 0x00]) + separate[2:4])  # acknowledge it
        # A late retransmission of the request is still answered, not stored again.
        transport.sendto(datagram)
        assert await asyncio.wait_for(answers.get(), 5) == empty_ack
    finally:
        transport.close()
        if blocker.in_transaction:
            blocker.execute("ROLLBACK")
        blocker.close()
    assert await stored_readings(gateway, "f5") == 1
