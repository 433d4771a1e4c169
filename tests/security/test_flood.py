"""Floods: a source over its limit gets 4.29; a well-behaved fleet beside it loses nothing."""

from __future__ import annotations

import asyncio
import socket
import statistics
import threading
import time
from pathlib import Path

import aiocoap
import cbor2
import pytest
from aiocoap.numbers.codes import Code
from aiocoap.numbers.types import Type

from gateway.app import Gateway
from gateway.config import GatewayConfig
from tests.support.gateway import GatewayProcess, post, register, wait_until
from tests.support.gateway import gateway_config as make_config

SOURCE_RATE = 20.0
FLEET = 8
FLEET_INTERVAL = 0.2  # each fleet device posts 5 times a second
PHASE = 2.0


@pytest.fixture
def gateway_config(tmp_path: Path) -> GatewayConfig:
    return make_config(
        tmp_path,
        security={
            "source_rate": SOURCE_RATE,
            "source_burst": SOURCE_RATE,
            "device_rate": 50.0,
            "device_burst": 50.0,
        },
        store={"synchronous": "normal"},
    )


async def test_source_over_its_limit_gets_429_with_max_age(
    gateway: Gateway, gateway_url: str, coap_client: aiocoap.Context
) -> None:
    await register(coap_client, gateway_url, "fr1")
    codes = []
    for _ in range(int(SOURCE_RATE) + 5):
        response = await post(coap_client, gateway_url, "r/fr1", cbor2.dumps({"temp": 1.0}))
        codes.append(response.code)
        if response.code == Code.TOO_MANY_REQUESTS:
            assert response.opt.max_age is not None and response.opt.max_age >= 1
    assert Code.TOO_MANY_REQUESTS in codes
    stored = codes.count(Code.CHANGED)
    async with gateway.reader.execute("SELECT count(*) FROM readings") as cursor:
        row = await cursor.fetchone()
    assert row is not None and row[0] == stored


def flood(port: int, rate: float, stop: threading.Event, answers: dict[str, int]) -> None:
    """Raw CON POSTs to /r/flooder at `rate` per second; tallies the answer codes.

    Between sends it blocks in recv (no busy loop), so the flooder itself does not starve
    the fleet's client of the CPU: what the fleet measures is the gateway under flood.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.connect(("127.0.0.1", port))
    payload = cbor2.dumps({"temp": 1.0})
    interval = 1.0 / rate
    mid = 0
    next_send = time.monotonic()
    while not stop.is_set():
        now = time.monotonic()
        if now >= next_send:
            mid = (mid + 1) & 0xFFFF
            message = aiocoap.Message(
                code=Code.POST,
                uri_path=("r", "flooder"),
                payload=payload,
                content_format=60,
            )
            message.mid = mid
            message.mtype = Type.CON
            message.token = mid.to_bytes(2, "big")
            sock.send(message.encode())
            answers["sent"] += 1
            next_send += interval
            continue
        sock.settimeout(max(next_send - now, 0.0005))
        try:
            data = sock.recv(2048)
        except (TimeoutError, BlockingIOError):
            continue
        code = str(aiocoap.Message.decode(data).code)
        answers[code] = answers.get(code, 0) + 1
    sock.close()


async def run_fleet(url: str, names: list[str], duration: float) -> list[float]:
    """Each device posts every FLEET_INTERVAL; returns every request's latency (s)."""
    latencies: list[float] = []

    async def device(name: str, client: aiocoap.Context) -> None:
        deadline = time.monotonic() + duration
        seq = 0
        while time.monotonic() < deadline:
            seq += 1
            started = time.monotonic()
            response = await post(client, url, f"r/{name}", cbor2.dumps({"temp": 2.0, "seq": seq}))
            latencies.append(time.monotonic() - started)
            assert response.code == Code.CHANGED, (name, response.code, response.payload)
            await asyncio.sleep(max(0.0, FLEET_INTERVAL - (time.monotonic() - started)))

    clients = [await aiocoap.Context.create_client_context(transports=["udp6"]) for _ in names]
    try:
        for name, client in zip(names, clients, strict=True):
            await register(client, url, name)
        async with asyncio.TaskGroup() as group:
            for name, client in zip(names, clients, strict=True):
                group.create_task(device(name, client), name=f"fleet[{name}]")
    finally:
        for client in clients:
            await client.shutdown()
    return latencies


def p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100)[98]


async def test_flood_at_20x_does_not_hurt_the_fleet(gateway_process: GatewayProcess) -> None:
    gateway_process.start()
    url = gateway_process.url
    names = [f"fr{index}" for index in range(FLEET)]
    client = await aiocoap.Context.create_client_context(transports=["udp6"])
    try:
        await register(client, url, "flooder")
    finally:
        await client.shutdown()

    unloaded = await run_fleet(url, names, PHASE)

    stop = threading.Event()
    answers: dict[str, int] = {"sent": 0}
    flooder = threading.Thread(
        target=flood,
        args=(gateway_process.config.server.port, 20 * SOURCE_RATE, stop, answers),
        daemon=True,
    )
    flooder.start()
    try:
        await wait_until(lambda: answers["sent"] >= 100)  # the flood is under way first
        loaded = await run_fleet(url, names, PHASE)
    finally:
        stop.set()
        await asyncio.to_thread(flooder.join, 5)

    limited = answers.get(str(Code.TOO_MANY_REQUESTS), 0)
    assert limited > answers["sent"] * 0.8, answers
    # Every fleet request was answered 2.04 (run_fleet asserts it); latency stays close.
    # A floor of 10 ms on the unloaded figure keeps scheduler noise on a shared machine
    # from deciding the test when both figures are a few milliseconds.
    unloaded_p99, loaded_p99 = p99(unloaded), p99(loaded)
    print(f"p99 unloaded {unloaded_p99 * 1e3:.2f} ms, loaded {loaded_p99 * 1e3:.2f} ms, {answers}")
    assert loaded_p99 <= 2 * max(unloaded_p99, 0.010), (unloaded_p99, loaded_p99, answers)
