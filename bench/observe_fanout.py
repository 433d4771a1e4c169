"""How many Observe notifications per second one core delivers.

An in-process gateway on loopback, OBSERVERS observations of one device's /r/NAME from one
client endpoint, ROUNDS readings; measures from each reading's 2.04 until every observer has
its notification. Run: python bench/observe_fanout.py [OBSERVERS] [ROUNDS]
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from pathlib import Path

import aiocoap
import cbor2
from aiocoap.numbers.codes import Code

from gateway.app import Gateway
from tests.support.gateway import gateway_config, post, register


async def main(observers: int, rounds: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        config = gateway_config(Path(tmp), logging={"level": "warning"})
        async with Gateway(config) as gateway:
            url = f"coap://127.0.0.1:{config.server.port}"
            client = await aiocoap.Context.create_client_context()
            await register(client, url, "fridge-1", "fridge")
            # Ten client endpoints: one socket's receive buffer cannot hold a burst of 1000.
            endpoints = [await aiocoap.Context.create_client_context() for _ in range(10)]
            received = 0
            nonlocal_target = [0]
            all_in = asyncio.Event()
            keep = []  # aiocoap ends an observation whose request object is dropped
            for number in range(observers):
                request = endpoints[number % len(endpoints)].request(
                    aiocoap.Message(code=Code.GET, uri=f"{url}/r/fridge-1", observe=0)
                )
                await request.response
                keep.append(request)

                def count(_message: aiocoap.Message) -> None:
                    nonlocal received
                    received += 1
                    if received >= nonlocal_target[0]:
                        all_in.set()

                request.observation.register_callback(count)
            started = time.perf_counter()
            for index in range(rounds):
                target = (index + 1) * observers
                await post(client, url, "r/fridge-1", cbor2.dumps({"temp": float(index % 50)}))
                nonlocal_target[0] = target
                try:
                    await asyncio.wait_for(all_in.wait(), 30)
                except TimeoutError:
                    print(f"round {index}: {received}/{target} notifications arrived")
                    break
                all_in.clear()
            elapsed = time.perf_counter() - started
            stats = gateway.readings.fanout.stats
            print(
                f"{observers} observers x {rounds} readings: {received} notifications in"
                f" {elapsed:.2f} s = {received / elapsed:.0f}/s"
                f" (confirmable {stats.confirmable})"
            )
            for endpoint in endpoints:
                await endpoint.shutdown()
            await client.shutdown()


if __name__ == "__main__":
    asyncio.run(
        main(
            int(sys.argv[1]) if len(sys.argv) > 1 else 1000,
            int(sys.argv[2]) if len(sys.argv) > 2 else 20,
        )
    )
