"""Floods: a source over its limit gets 4.29; a well-behaved fleet beside it loses nothing."""

from __future__ import annotations

import asyncio
import contextlib
import json
import statistics
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiocoap
import cbor2
import pytest
from aiocoap.numbers.codes import Code

from gateway.app import Gateway
from gateway.config import GatewayConfig
from tests.support.gateway import REPO_ROOT, GatewayProcess, post, register
from tests.support.gateway import gateway_config as make_config

SOURCE_RATE = 20.0
FLEET = 8
FLEET_INTERVAL = 0.2  # each fleet device posts 5 times a second
PHASE = 2.0
ATTEMPTS = 3


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


@contextlib.asynccontextmanager
async def flooding(port: int, rate: float) -> AsyncIterator[dict[str, int]]:
    """A flooder process under way for the body; its tally of answers fills in on exit."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.support.flooder",
        str(port),
        str(rate),
        cwd=REPO_ROOT,
        stdout=asyncio.subprocess.PIPE,
    )
    assert process.stdout is not None
    answers: dict[str, int] = {}
    try:
        started = await asyncio.wait_for(process.stdout.readline(), timeout=10)
        assert started.strip() == b"started", started
        yield answers
    finally:
        process.terminate()
        tally, _ = await asyncio.wait_for(process.communicate(), timeout=10)
    answers.update(json.loads(tally.decode().strip().splitlines()[-1]))


async def test_flood_at_20x_does_not_hurt_the_fleet(gateway_process: GatewayProcess) -> None:
    gateway_process.start()
    url = gateway_process.url
    port = gateway_process.config.server.port
    names = [f"fr{index}" for index in range(FLEET)]
    client = await aiocoap.Context.create_client_context(transports=["udp6"])
    try:
        await register(client, url, "flooder")
    finally:
        await client.shutdown()

    # A stall of the shared machine (another process, a disk flush) lands on one phase at
    # random and can alone decide a p99 of a few hundred samples; a slowdown the flood
    # causes lands on every loaded phase. So the pair is measured afresh up to ATTEMPTS
    # times, and the fleet must be as fast under flood in at least one of them.
    figures = []
    for _ in range(ATTEMPTS):
        unloaded = await run_fleet(url, names, PHASE)
        async with flooding(port, 20 * SOURCE_RATE) as answers:
            loaded = await run_fleet(url, names, PHASE)
        # Every fleet request was answered 2.04 (run_fleet asserts it); the flooder was
        # refused nearly always.
        limited = answers.get(str(Code.TOO_MANY_REQUESTS), 0)
        assert limited > answers["sent"] * 0.8, answers
        unloaded_p99, loaded_p99 = p99(unloaded), p99(loaded)
        figures.append((round(unloaded_p99 * 1e3, 2), round(loaded_p99 * 1e3, 2)))
        print(
            f"p99 unloaded {unloaded_p99 * 1e3:.2f} ms, loaded {loaded_p99 * 1e3:.2f} ms, {answers}"
        )
        # A floor of 10 ms on the unloaded figure keeps scheduler noise from deciding the
        # test when both figures are a few milliseconds.
        if loaded_p99 <= 2 * max(unloaded_p99, 0.010):
            break
    else:
        pytest.fail(
            f"p99 under flood above 2x the unloaded figure in every attempt (ms): {figures}"
        )
