"""A reading acknowledged with 2.04 is on disk, whatever happens to the process after."""

from __future__ import annotations

import asyncio
import sqlite3
from contextlib import suppress
from pathlib import Path

import aiocoap
import cbor2
import pytest
from aiocoap.numbers.codes import Code

from gateway.config import GatewayConfig
from tests.support.gateway import GatewayProcess, register

pytestmark = pytest.mark.slow


async def test_sigkill_loses_no_acknowledged_reading(gateway_process: GatewayProcess) -> None:
    gateway_process.start()
    url = gateway_process.url
    client = await aiocoap.Context.create_client_context(transports=["udp6"])
    acknowledged: set[int] = set()
    try:
        await register(client, url, "durable", "fridge")
        at_least = asyncio.Event()

        async def poster(worker: int) -> None:
            seq = worker
            while True:
                request = aiocoap.Message(
                    code=Code.POST,
                    uri=f"{url}/r/durable",
                    content_format=60,
                    payload=cbor2.dumps({"temp": 4.0, "seq": seq}),
                )
                try:
                    response = await client.request(request).response
                except aiocoap.error.Error:
                    return  # the gateway is gone
                if response.code == Code.CHANGED:
                    acknowledged.add(seq)
                    if len(acknowledged) >= 200:
                        at_least.set()
                seq += 8

        tasks = [asyncio.create_task(poster(worker)) for worker in range(8)]
        await asyncio.wait_for(at_least.wait(), timeout=30)
        gateway_process.kill()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with suppress(asyncio.CancelledError):
                await task
    finally:
        await client.shutdown()

    gateway_process.start()  # recovery on restart replays the WAL
    gateway_process.stop()
    with sqlite3.connect(gateway_process.config.store.path) as conn:
        stored = {row[0] for row in conn.execute("SELECT seq FROM readings")}
    assert acknowledged, "no reading was acknowledged before the kill"
    assert acknowledged <= stored, f"lost {len(acknowledged - stored)} acknowledged readings"


@pytest.mark.parametrize("event_loop", ["uvloop", "asyncio"])
async def test_sigterm_exits_cleanly(
    gateway_config: GatewayConfig, tmp_path: Path, event_loop: str
) -> None:
    gateway_process = GatewayProcess.with_settings(
        gateway_config, tmp_path, f'[server]\nevent_loop = "{event_loop}"\n'
    )
    try:
        gateway_process.start()
        (started,) = gateway_process.events_named("gateway.started")
        assert started["event_loop"] == event_loop
        client = await aiocoap.Context.create_client_context(transports=["udp6"])
        try:
            await register(client, gateway_process.url, "fridge-1", "fridge")
        finally:
            await client.shutdown()
        assert gateway_process.terminate() == 0
        gateway_process.wait_for_event("gateway.stopped")
    finally:
        gateway_process.stop()
