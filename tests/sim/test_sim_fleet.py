"""A fleet against the aiocoap stand-in and the simulator's own sink, over loopback UDP."""

from __future__ import annotations

from device_sim.sink import Sink
from tests.sim.coap_server import coap_server
from tests.sim_fixtures import StartFleet


async def test_fleet_registers_everyone_and_readings_arrive(sim_fleet: StartFleet) -> None:
    async with coap_server() as (gw, rec):
        fleet = await sim_fleet(gw, fridges=4, trackers=3, lights=4, interval=0.2)
        assert await fleet.wait_registered(within=5) == 11
        await fleet.wait_acknowledged(33, within=10)
        await fleet.stop()
        summary = fleet.summary()
    assert summary.devices_up == 11 and summary.failed == 0
    assert summary.acknowledged >= 33 and summary.codes.get("2.04") == summary.acknowledged
    assert summary.latency_p50_ms is not None
    kinds = {r["query"]["et"] for r in rec.registrations}
    assert kinds == {"fridge", "tracker", "streetlight"}
    assert sum("q" in r["query"] for r in rec.registrations) == 3
    for node in fleet.nodes:
        assert set(node.stats.acked_seqs) <= set(rec.seqs(node.config.name))


async def test_lossy_fleet_every_acknowledged_reading_arrived(sim_fleet: StartFleet) -> None:
    async with coap_server() as (gw, rec):
        fleet = await sim_fleet(
            gw, fridges=5, lights=5, interval=0.1, loss=0.1, duplicate=0.1, jitter=0.01
        )
        assert await fleet.wait_registered(within=10) == 10
        await fleet.wait_acknowledged(100, within=15)
        await fleet.stop()
        summary = fleet.summary()
    assert summary.retransmitted > 0
    for node in fleet.nodes:
        stored = rec.seqs(node.config.name)
        assert set(node.stats.acked_seqs) <= set(stored)


async def test_fleet_is_deterministic_for_a_seed(sim_fleet: StartFleet) -> None:
    runs = []
    for _ in range(2):
        async with coap_server() as (gw, rec):
            fleet = await sim_fleet(gw, fridges=2, trackers=1, lights=2, interval=0.1, seed=7)
            await fleet.wait_acknowledged(25, within=10)
            await fleet.stop()
        runs.append({(name, seq): values for name, seq, values in rec.readings if seq <= 4})
    assert runs[0] == runs[1]
    assert len(runs[0]) == 5 * 4


async def test_fleet_against_the_sink_in_senml(sim_fleet: StartFleet) -> None:
    async with Sink() as sink:
        fleet = await sim_fleet(sink.address, fridges=3, lights=3, payload_format="senml")
        await fleet.wait_acknowledged(12, within=10)
        await fleet.stop()
    assert sink.counts["registrations"] == 6
    assert sink.counts["readings"] == fleet.summary().acknowledged >= 12
