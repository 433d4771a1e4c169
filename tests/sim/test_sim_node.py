"""A simulated node against a real aiocoap server over loopback UDP."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import aiocoap
import cbor2
import pytest
from aiocoap.numbers.codes import Code

from device_sim.coap import Impairment, Transmission
from device_sim.models import Fridge, StreetLight, Tracker
from device_sim.node import Node, NodeConfig
from tests.sim.coap_server import coap_server, wait_for

FAST = Transmission(ack_timeout=0.1, separate_timeout=5.0)


def fridge_node(gateway: tuple[str, int], **kw: Any) -> Node:
    cfg = NodeConfig(name=kw.pop("name", "fridge-1"), gateway=gateway, interval=0.05, **kw)
    return Node(cfg, Fridge(), seed=1, epoch0=time.time(), transmission=FAST)


async def run_node(node: Node) -> asyncio.Task[None]:
    return asyncio.create_task(node.run(), name=f"node[{node.config.name}]")


async def stop(node: Node, task: asyncio.Task[None]) -> None:
    node.stop()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_node_registers_and_posts_readings() -> None:
    async with coap_server() as (gw, rec), fridge_node(gw) as node:
        task = await run_node(node)
        # The server records a reading before its answer reaches the node: wait for both.
        await wait_for(lambda: len(rec.readings) >= 3 and node.stats.acknowledged >= 3)
        await stop(node, task)
    reg = rec.registrations[0]
    assert reg["query"] == {"ep": "fridge-1", "et": "fridge", "lt": "300"}
    assert '</temp>;rt="temperature";obs' in reg["links"]
    assert rec.seqs("fridge-1")[:3] == [1, 2, 3]
    _, _, values = rec.readings[0]
    assert {"temp", "setpoint", "door", "stock_milk", "ts"} <= set(values)
    assert node.stats.acknowledged >= 3 and node.stats.failed == 0
    assert node.stats.codes["2.04"] >= 3 and node.stats.latencies


async def test_sleepy_node_registers_in_queue_mode_with_senml() -> None:
    async with coap_server() as (gw, rec):
        cfg = NodeConfig(
            name="tr-1",
            gateway=gw,
            interval=0.05,
            sleepy=True,
            listen_window=0.01,
            payload_format="senml",
        )
        async with Node(cfg, Tracker(), seed=2, epoch0=time.time(), transmission=FAST) as node:
            task = await run_node(node)
            await wait_for(lambda: len(rec.readings) >= 2)
            await stop(node, task)
    assert rec.registrations[0]["query"]["q"] == ""
    _, seq, values = rec.readings[0]
    assert seq is None  # SenML packs are identified by their absolute base time
    assert set(values) == {"lat", "lon", "speed", "heading", "battery", "ts"}
    assert values["ts"] == node.stats.acked_times[0] > 1.6e9


async def test_separate_responses_are_awaited() -> None:
    async with coap_server() as (gw, rec), fridge_node(gw) as node:
        rec.slow = 0.3  # aiocoap sends an empty ACK after 0.1 s, then the response
        task = await run_node(node)
        await wait_for(lambda: node.stats.acknowledged >= 2)
        await stop(node, task)
    assert node.stats.separate_responses >= 2
    assert node.stats.failed == 0
    # Our ACKs to the separate responses were taken: the server never had to repeat them.
    assert node.endpoint is not None and node.endpoint.stats.duplicates == 0


async def test_node_registers_again_after_404_and_resends_the_reading() -> None:
    async with coap_server() as (gw, rec), fridge_node(gw) as node:
        task = await run_node(node)
        await wait_for(lambda: len(rec.readings) >= 2)
        rec.forget.add("fridge-1")
        await wait_for(lambda: len(rec.registrations) >= 2 and len(rec.readings) >= 4)
        await stop(node, task)
    seqs = rec.seqs("fridge-1")
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert seqs[: len(seqs)] == list(range(1, len(seqs) + 1))  # the refused one was resent
    assert node.stats.reregistrations == 1 and node.stats.codes["4.04"] == 1
    assert node.stats.failed == 0


async def test_lossy_network_retransmits_and_every_ack_means_stored() -> None:
    async with coap_server() as (gw, rec):
        cfg = NodeConfig(name="f-lossy", gateway=gw, interval=0.02)
        imp = Impairment(loss=0.3, duplicate=0.3, jitter=0.02)
        node = Node(cfg, Fridge(), seed=3, epoch0=time.time(), impairment=imp, transmission=FAST)
        async with node:
            task = await run_node(node)
            await wait_for(lambda: node.stats.acknowledged >= 20, within=20)
            await stop(node, task)
    assert node.stats.retransmissions > 0
    stored = set(rec.seqs("f-lossy"))
    assert set(node.stats.acked_seqs) <= stored


async def test_node_serves_observe_and_takes_commands() -> None:
    async with coap_server() as (gw, rec):
        cfg = NodeConfig(name="light-1", gateway=gw, interval=0.05)
        node = Node(cfg, StreetLight(), seed=4, epoch0=time.time(), transmission=FAST)
        async with node:
            task = await run_node(node)
            await wait_for(lambda: len(rec.readings) >= 1)
            host, port = node.address
            client = await aiocoap.Context.create_client_context()
            try:
                base = f"coap://{host}:{port}"
                wk = await client.request(
                    aiocoap.Message(code=Code.GET, uri=f"{base}/.well-known/core")
                ).response
                assert b'</on>;rt="switch";obs' in wk.payload

                obs_req = aiocoap.Message(code=Code.GET, uri=f"{base}/on", observe=0)
                obs = client.request(obs_req)
                first = await obs.response
                assert first.code == Code.CONTENT and first.opt.observe is not None
                notes = obs.observation.__aiter__()

                put = aiocoap.Message(code=Code.PUT, uri=f"{base}/dim", payload=cbor2.dumps(30))
                assert (await client.request(put).response).code == Code.CHANGED
                put = aiocoap.Message(code=Code.PUT, uri=f"{base}/on", payload=cbor2.dumps(True))
                assert (await client.request(put).response).code == Code.CHANGED

                async def until_on() -> None:
                    while cbor2.loads((await notes.__anext__()).payload) is not True:
                        pass

                await asyncio.wait_for(until_on(), 5)

                bad = aiocoap.Message(code=Code.PUT, uri=f"{base}/dim", payload=cbor2.dumps(300))
                assert (await client.request(bad).response).code == Code.UNPROCESSABLE_ENTITY
                bad = aiocoap.Message(code=Code.PUT, uri=f"{base}/lux", payload=cbor2.dumps(3))
                assert (await client.request(bad).response).code == Code.METHOD_NOT_ALLOWED
                obs.observation.cancel()
            finally:
                await client.shutdown()
            await wait_for(
                lambda: any(
                    v.get("on") is True and v.get("dim") == 30.0 for _, _, v in rec.readings
                )
            )
            await stop(node, task)
    assert node.stats.commands == 2


async def _coap_client(*args: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        "/usr/bin/coap-client-notls", *args, stdout=asyncio.subprocess.PIPE
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 0
    return out.decode(errors="replace")


@pytest.mark.skipif(not Path("/usr/bin/coap-client-notls").exists(), reason="needs libcoap")
async def test_libcoap_client_reads_and_writes_a_fridge(tmp_path: Path) -> None:
    payload = tmp_path / "setpoint.cbor"
    payload.write_bytes(cbor2.dumps(2.5))
    async with coap_server() as (gw, rec), fridge_node(gw) as node:
        task = await run_node(node)
        await wait_for(lambda: len(rec.readings) >= 1)
        host, port = node.address
        base = f"coap://{host}:{port}"
        links = await _coap_client("-m", "get", f"{base}/.well-known/core")
        assert '</setpoint>;rt="setpoint"' in links
        await _coap_client("-m", "put", "-t", "60", "-f", str(payload), f"{base}/setpoint")
        assert node.state.setpoint == 2.5
        await stop(node, task)


async def test_node_refreshes_its_registration_before_the_lifetime_ends() -> None:
    async with coap_server() as (gw, rec), fridge_node(gw, lifetime=1) as node:
        task = await run_node(node)
        await wait_for(lambda: node.stats.refreshes >= 2)
        await stop(node, task)
    assert len(rec.registrations) == 1 and rec.registrations[0]["query"]["lt"] == "1"
