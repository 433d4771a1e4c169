"""Observing the gateway: /r/NAME notifies on committed readings, /devices on registry changes."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
from typing import Any

import aiocoap
import cbor2
import pytest
from aiocoap import CON
from aiocoap.numbers.codes import Code

from gateway.app import Gateway
from tests.support.gateway import ON_UVLOOP, gateway_config, post, register, wait_until


def observe(client: aiocoap.Context, uri: str, accept: int | None = None) -> Any:
    request = aiocoap.Message(code=Code.GET, uri=uri, observe=0)
    if accept is not None:
        request.opt.accept = accept
    return client.request(request)


async def next_notification(iterator: Any, within: float = 5.0) -> aiocoap.Message:
    message: aiocoap.Message = await asyncio.wait_for(iterator.__anext__(), within)
    return message


async def test_observe_latest_reading_cbor_and_json(
    gateway: Gateway, gateway_url: str, coap_client: aiocoap.Context
) -> None:
    await register(coap_client, gateway_url, "fridge-1", "fridge")
    await post(coap_client, gateway_url, "r/fridge-1", cbor2.dumps({"temp": 4.0}))
    as_cbor = observe(coap_client, f"{gateway_url}/r/fridge-1")
    as_json = observe(coap_client, f"{gateway_url}/r/fridge-1", accept=50)
    first = await as_cbor.response
    assert first.opt.observe is not None and first.opt.max_age == 60
    assert cbor2.loads(first.payload)["temp"]["v"] == 4.0
    assert json.loads((await as_json.response).payload)["temp"]["v"] == 4.0
    cbor_updates = as_cbor.observation.__aiter__()
    json_updates = as_json.observation.__aiter__()

    response = await post(coap_client, gateway_url, "r/fridge-1", cbor2.dumps({"temp": 5.5}))
    assert response.code == Code.CHANGED
    update = await next_notification(cbor_updates)
    assert cbor2.loads(update.payload)["temp"]["v"] == 5.5
    assert update.opt.content_format == 60 and update.opt.max_age == 60
    update = await next_notification(json_updates)
    assert json.loads(update.payload)["temp"]["v"] == 5.5
    assert update.opt.content_format == 50


async def test_a_burst_of_readings_leaves_every_observer_with_the_newest(
    gateway: Gateway, gateway_url: str, coap_client: aiocoap.Context
) -> None:
    # Observe is latest-value: readings that come faster than the notifications may be
    # skipped, but each observer's last notification is the last reading.
    await register(coap_client, gateway_url, "fridge-1", "fridge")
    await post(coap_client, gateway_url, "r/fridge-1", cbor2.dumps({"temp": 0.0}))
    observations = [observe(coap_client, f"{gateway_url}/r/fridge-1") for _ in range(8)]
    for observation in observations:
        await observation.response
    seen: list[list[float]] = [[] for _ in observations]

    async def follow(index: int, observation: Any) -> None:
        async for update in observation.observation:
            seen[index].append(cbor2.loads(update.payload)["temp"]["v"])

    followers = [asyncio.create_task(follow(i, o)) for i, o in enumerate(observations)]
    try:
        burst = [
            post(coap_client, gateway_url, "r/fridge-1", cbor2.dumps({"temp": t / 10}))
            for t in range(1, 41)
        ]
        assert all(r.code == Code.CHANGED for r in await asyncio.gather(*burst))
        # The posts ran concurrently: the newest is what a plain GET answers now.
        request = aiocoap.Message(code=Code.GET, uri=f"{gateway_url}/r/fridge-1")
        current = await coap_client.request(request).response
        newest = cbor2.loads(current.payload)["temp"]["v"]
        await wait_until(lambda: all(values and values[-1] == newest for values in seen))
    finally:
        for follower in followers:
            follower.cancel()


async def test_rejected_reading_is_not_notified(
    gateway: Gateway, gateway_url: str, coap_client: aiocoap.Context
) -> None:
    await register(coap_client, gateway_url, "fridge-1", "fridge")
    observation = observe(coap_client, f"{gateway_url}/r/fridge-1")
    await observation.response
    updates = observation.observation.__aiter__()
    bad = await post(coap_client, gateway_url, "r/fridge-1", cbor2.dumps({"temp": 900}))
    assert bad.code == Code.UNPROCESSABLE_ENTITY
    await post(coap_client, gateway_url, "r/fridge-1", cbor2.dumps({"temp": 3.0}))
    update = await next_notification(updates)
    assert cbor2.loads(update.payload) == {"temp": {"v": 3.0, "u": "Cel", "t": update_time(update)}}


def update_time(message: aiocoap.Message) -> float:
    time: float = cbor2.loads(message.payload)["temp"]["t"]
    return time


async def test_observe_unknown_device_is_404(
    gateway: Gateway, gateway_url: str, coap_client: aiocoap.Context
) -> None:
    response = await observe(coap_client, f"{gateway_url}/r/nobody").response
    assert response.code == Code.NOT_FOUND
    assert gateway.readings.fanout.count() == 0


async def test_libcoap_client_observes(
    gateway: Gateway, gateway_url: str, coap_client: aiocoap.Context
) -> None:
    await register(coap_client, gateway_url, "fridge-1", "fridge")
    await post(coap_client, gateway_url, "r/fridge-1", cbor2.dumps({"temp": 1.0}))
    process = await asyncio.create_subprocess_exec(
        "/usr/bin/coap-client-notls",
        "-s",
        "4",
        "-A",
        "50",
        "-m",
        "get",
        f"{gateway_url}/r/fridge-1",
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        await wait_until(lambda: gateway.readings.fanout.count("fridge-1") == 1)
        for temp in (2.0, 3.0):
            await post(coap_client, gateway_url, "r/fridge-1", cbor2.dumps({"temp": temp}))
            await wait_until(lambda t=temp: gateway.readings.fanout.stats.notifications >= t - 1)
        stdout, _ = await asyncio.wait_for(process.communicate(), 15)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert [doc["temp"]["v"] for doc in json_documents(stdout.decode())] == [1.0, 2.0, 3.0]


def json_documents(text: str) -> list[Any]:
    """libcoap prints each notification's payload without a separator."""
    decoder, documents, index = json.JSONDecoder(), [], 0
    while index < len(text.rstrip()):
        document, index = decoder.raw_decode(text, index)
        documents.append(document)
        while index < len(text) and text[index].isspace():
            index += 1
    return documents


async def test_devices_observable(
    gateway: Gateway, gateway_url: str, coap_client: aiocoap.Context
) -> None:
    observation = observe(coap_client, f"{gateway_url}/devices")
    assert cbor2.loads((await observation.response).payload) == []
    updates = observation.observation.__aiter__()
    location = await register(coap_client, gateway_url, "tracker-1", "tracker", lifetime=10)
    devices = cbor2.loads((await next_notification(updates)).payload)
    assert [(d["name"], d["type"], d["online"]) for d in devices] == [
        ("tracker-1", "tracker", True)
    ]
    assert devices[0]["last_seen"] is not None
    request = aiocoap.Message(code=Code.DELETE, uri=f"{gateway_url}/{location}")
    assert (await coap_client.request(request).response).code == Code.DELETED
    devices = cbor2.loads((await next_notification(updates)).payload)
    assert devices[0]["online"] is False


async def test_devices_notified_on_expiry(
    gateway: Gateway, gateway_url: str, coap_client: aiocoap.Context
) -> None:
    await register(coap_client, gateway_url, "tracker-1", "tracker", lifetime=10)
    observation = observe(coap_client, f"{gateway_url}/devices", accept=50)
    assert json.loads((await observation.response).payload)[0]["online"] is True
    updates = observation.observation.__aiter__()

    async def lifetime_over(conn: Any) -> None:
        await conn.execute("UPDATE registrations SET expires_at = 0")

    await gateway.writer.transaction(lifetime_over)  # the expiry loop removes it shortly
    devices = json.loads((await next_notification(updates)).payload)
    assert devices[0]["online"] is False


async def test_every_nth_notification_is_confirmable(
    tmp_path: Any, coap_client: aiocoap.Context
) -> None:
    config = gateway_config(tmp_path, observe={"con_every": 3})
    async with Gateway(config):
        url = f"coap://127.0.0.1:{config.server.port}"
        await register(coap_client, url, "fridge-1", "fridge")
        watcher = await aiocoap.Context.create_client_context()
        try:
            observation = observe(watcher, f"{url}/r/fridge-1")
            await observation.response
            updates = observation.observation.__aiter__()
            kinds = []
            for temp in range(1, 7):
                await post(coap_client, url, "r/fridge-1", cbor2.dumps({"temp": float(temp)}))
                kinds.append((await next_notification(updates)).mtype)
        finally:
            await watcher.shutdown()
    # Every third is confirmable; where the cycle starts differs from observer to observer.
    confirmable = [index for index, kind in enumerate(kinds) if kind == CON]
    assert confirmable[0] < 3 and confirmable == [confirmable[0], confirmable[0] + 3], kinds


@pytest.mark.skipif(
    ON_UVLOOP,
    reason="on uvloop ICMP errors are ignored; the observation ends when a confirmable"
    " notification times out (docs/configuration.md, transport)",
)
async def test_an_observer_that_went_away_is_dropped_at_its_icmp_error(
    tmp_path: Any, coap_client: aiocoap.Context
) -> None:
    config = gateway_config(tmp_path, observe={"con_every": 3})
    async with Gateway(config) as gateway:
        url = f"coap://127.0.0.1:{config.server.port}"
        await register(coap_client, url, "fridge-1", "fridge")
        watcher = await aiocoap.Context.create_client_context()
        observation = observe(watcher, f"{url}/r/fridge-1")
        await observation.response
        assert gateway.readings.fanout.count("fridge-1") == 1
        await watcher.shutdown()  # the observer goes away without a word
        for temp in range(7, 12):
            await post(coap_client, url, "r/fridge-1", cbor2.dumps({"temp": float(temp)}))
            await asyncio.sleep(0.05)  # spread the readings so each is its own notification
        await wait_until(lambda: gateway.readings.fanout.count("fridge-1") == 0, within=10)


async def test_libcoap_deregistration_ends_observation(
    gateway: Gateway, gateway_url: str, coap_client: aiocoap.Context
) -> None:
    await register(coap_client, gateway_url, "fridge-1", "fridge")
    observation = observe(coap_client, f"{gateway_url}/r/fridge-1")
    await observation.response
    assert gateway.readings.fanout.count("fridge-1") == 1
    # RFC 7641 §3.6 with libcoap: a GET with the same token and no Observe ends it.
    process = await asyncio.create_subprocess_exec(
        "/usr/bin/coap-client-notls",
        "-s",
        "2",
        "-m",
        "get",
        f"{gateway_url}/r/fridge-1",
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    await wait_until(lambda: gateway.readings.fanout.count("fridge-1") == 2)
    await asyncio.wait_for(process.communicate(), 10)
    # libcoap deregisters when its -s time is up
    await wait_until(lambda: gateway.readings.fanout.count("fridge-1") == 1)


class RawObserver:
    """An observer on a plain UDP socket, so every notification is seen as it is on the wire
    (aiocoap's client hands an observation's final error to no one)."""

    def __init__(self, gateway_url: str) -> None:
        host, port = gateway_url.removeprefix("coap://").rsplit(":", 1)
        self.address = (host, int(port))
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.setblocking(False)

    async def observe(self, path: str) -> aiocoap.Message:
        # Hand-built so the test owns every byte: CON GET, message id 1, token "ob",
        # Observe (6) = 0 (empty), then Uri-Path (11) segments.
        options = bytes([0x60])
        delta = 11 - 6
        for segment in path.encode().split(b"/"):
            assert len(segment) < 13
            options += bytes([delta << 4 | len(segment)]) + segment
            delta = 0
        datagram = bytes([0x42, Code.GET, 0x00, 0x01]) + b"ob" + options
        self.sock.sendto(datagram, self.address)  # a datagram is sent whole or not at all
        return await self.receive()

    async def receive(self, within: float = 5.0) -> aiocoap.Message:
        loop = asyncio.get_running_loop()
        while True:
            data = await asyncio.wait_for(loop.sock_recv(self.sock, 2048), within)
            message = aiocoap.Message.decode(data)
            if data[0] >> 4 & 0x3 == 0:  # confirmable: acknowledge (empty ACK, same id)
                ack = bytes([0x60, 0x00]) + data[2:4]
                self.sock.sendto(ack, self.address)
            if message.code != Code.EMPTY:
                return message

    def close(self) -> None:
        self.sock.close()


async def test_deregistered_device_ends_its_observations_with_404(
    gateway: Gateway, gateway_url: str, coap_client: aiocoap.Context
) -> None:
    gone = await register(coap_client, gateway_url, "fridge-1", "fridge")
    await register(coap_client, gateway_url, "fridge-2", "fridge")
    await post(coap_client, gateway_url, "r/fridge-1", cbor2.dumps({"temp": 1.0}))
    raw = RawObserver(gateway_url)
    try:
        first = await raw.observe("r/fridge-1")
        assert first.code == Code.CONTENT and first.opt.observe is not None
        watched = observe(coap_client, f"{gateway_url}/r/fridge-1")
        other = observe(coap_client, f"{gateway_url}/r/fridge-2")
        await watched.response
        await other.response
        await wait_until(lambda: gateway.readings.fanout.count() == 3)

        request = aiocoap.Message(code=Code.DELETE, uri=f"{gateway_url}/{gone}")
        assert (await coap_client.request(request).response).code == Code.DELETED
        final = await raw.receive()
        assert final.code == Code.NOT_FOUND and final.token == b"ob"
        assert b"removed" in final.payload
        assert final.opt.observe is None and final.mtype == CON
        # aiocoap's client ends the observation at the 4.04.
        with pytest.raises(StopAsyncIteration):
            await next_notification(watched.observation.__aiter__())
        await wait_until(lambda: gateway.readings.fanout.count("fridge-1") == 0)
        # Nothing more for the ended observation, even when the device posts again.
        await post(coap_client, gateway_url, "r/fridge-1", cbor2.dumps({"temp": 3.0}))
        with pytest.raises(TimeoutError):
            await raw.receive(within=0.3)
    finally:
        raw.close()

    # The other device's observer is untouched and still notified.
    assert gateway.readings.fanout.count("fridge-2") == 1
    others = other.observation.__aiter__()
    await post(coap_client, gateway_url, "r/fridge-2", cbor2.dumps({"temp": 2.0}))
    notification = await next_notification(others)
    assert cbor2.loads(notification.payload)["temp"]["v"] == 2.0


async def test_expired_registration_ends_libcoap_observation(
    gateway: Gateway, gateway_url: str, coap_client: aiocoap.Context
) -> None:
    await register(coap_client, gateway_url, "fridge-1", "fridge", lifetime=10)
    await post(coap_client, gateway_url, "r/fridge-1", cbor2.dumps({"temp": 1.0}))
    process = await asyncio.create_subprocess_exec(
        "/usr/bin/coap-client-notls",
        "-s",
        "30",
        "-m",
        "get",
        f"{gateway_url}/r/fridge-1",
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        await wait_until(lambda: gateway.readings.fanout.count("fridge-1") == 1)

        async def lifetime_over(conn: Any) -> None:
            await conn.execute("UPDATE registrations SET expires_at = 0")

        await gateway.writer.transaction(lifetime_over)  # the expiry loop removes it shortly
        # libcoap 4.3 prints an error response on stderr (and keeps waiting out -s).
        assert process.stderr is not None
        line = await asyncio.wait_for(process.stderr.readline(), 10)
        assert line.startswith(b"4.04 ") and b"expired" in line, line
    finally:
        process.kill()
        await process.wait()
    await wait_until(lambda: gateway.readings.fanout.count("fridge-1") == 0)
