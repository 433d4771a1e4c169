"""Simulated fleets against the real gateway, started as a subprocess on a free port.

Readings are checked in the gateway's SQLite store, opened read-only: every reading the
simulator saw acknowledged must be there exactly once, however lossy the network.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import sqlite3
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from aiocoap import Message
from aiocoap.numbers.codes import Code

from device_sim.coap import Addr, Endpoint, RequestError, Transmission
from tests.sim_fixtures import StartFleet
from tests.support.downstreams import free_udp_port

pytest.importorskip("gateway.app", reason="the gateway is not in this tree yet")

ROOT = Path(__file__).resolve().parents[2]


async def _answers(addr: Addr) -> bool:
    loop = asyncio.get_running_loop()
    probe = Endpoint(rng=random.Random(0), transmission=Transmission(ack_timeout=0.1))
    await loop.create_datagram_endpoint(lambda: probe, local_addr=("127.0.0.1", 0))
    try:
        msg = Message(code=Code.GET, uri_path=(".well-known", "core"))
        await probe.request(msg, addr)
        return True
    except RequestError:
        return False
    finally:
        probe.close()


@contextlib.asynccontextmanager
async def running_gateway(db: Path) -> AsyncIterator[Addr]:
    port = free_udp_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    log_path = db.with_suffix(".log")
    with log_path.open("w") as log:
        proc = await asyncio.create_subprocess_exec(
            *[sys.executable, "-m", "gateway", "serve", "--bind", "127.0.0.1"],
            *["--port", str(port), "--db", str(db)],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=log,
        )
    addr = ("127.0.0.1", port)
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 20
        while not await _answers(addr):
            assert proc.returncode is None, log_path.read_text()
            assert loop.time() < deadline, "gateway did not answer in time"
        yield addr
    finally:
        if proc.returncode is None:
            proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 15)
        except TimeoutError:
            proc.kill()
            await proc.wait()


@pytest.fixture
async def gateway(tmp_path: Path) -> AsyncIterator[tuple[Addr, Path]]:
    db = tmp_path / "gw.db"
    async with running_gateway(db) as addr:
        yield addr, db


@contextlib.contextmanager
def store(db: Path) -> Iterator[sqlite3.Connection]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        yield conn
    finally:
        conn.close()


def stored_seqs(conn: sqlite3.Connection, device: str, measurement: str) -> list[int]:
    """Seqs of the readings the device posted (those the gateway stored from observing the
    device's own resources carry no seq)."""
    rows = conn.execute(
        "SELECT r.seq FROM readings r JOIN devices d ON d.id = r.device_id"
        " WHERE d.name = ? AND r.measurement = ? AND r.seq IS NOT NULL",
        (device, measurement),
    )
    return [seq for (seq,) in rows]


async def test_fleet_registers_and_readings_reach_the_store(
    gateway: tuple[Addr, Path], sim_fleet: StartFleet
) -> None:
    addr, db = gateway
    fleet = await sim_fleet(addr, fridges=4, trackers=3, lights=4, interval=0.3)
    assert await fleet.wait_registered(within=10) == 11
    await fleet.wait_acknowledged(44, within=20)
    await fleet.stop()
    summary = fleet.summary()
    assert summary.failed == 0, summary.codes
    with store(db) as conn:
        types = dict(conn.execute("SELECT name, type FROM devices"))
        queued = {n for (n,) in conn.execute(
            "SELECT d.name FROM registrations r JOIN devices d ON d.id = r.device_id"
            " WHERE r.queue_mode = 1")}  # fmt: skip
        for node in fleet.nodes:
            name = node.config.name
            assert types[name] == node.model.device_type
            first = next(iter(node.model.measurements(node.state)))
            assert sorted(stored_seqs(conn, name, first)) == node.stats.acked_seqs
    assert queued == {n.config.name for n in fleet.nodes if n.config.sleepy}


async def test_lossy_duplicating_network_every_ack_stored_exactly_once(
    gateway: tuple[Addr, Path], sim_fleet: StartFleet
) -> None:
    addr, db = gateway
    fleet = await sim_fleet(
        addr, fridges=5, trackers=2, lights=5, interval=0.2, loss=0.1, duplicate=0.1, jitter=0.01
    )
    assert await fleet.wait_registered(within=20) == 12
    await fleet.wait_acknowledged(150, within=30)
    await fleet.stop()
    summary = fleet.summary()
    assert summary.retransmitted > 0 and summary.acknowledged >= 150
    with store(db) as conn:
        dupes = conn.execute(
            "SELECT device_id, measurement, seq, COUNT(*) FROM readings WHERE seq IS NOT NULL"
            " GROUP BY device_id, measurement, seq HAVING COUNT(*) > 1"
        ).fetchall()
        assert dupes == []
        for node in fleet.nodes:
            for measurement in node.model.measurements(node.state):
                seqs = stored_seqs(conn, node.config.name, measurement)
                assert set(node.stats.acked_seqs) <= set(seqs), (node.config.name, measurement)


async def test_senml_readings_are_stored_under_their_measurement_names(
    gateway: tuple[Addr, Path], sim_fleet: StartFleet
) -> None:
    addr, db = gateway
    fleet = await sim_fleet(addr, fridges=2, lights=2, interval=0.2, payload_format="senml")
    await fleet.wait_acknowledged(8, within=15)
    await fleet.stop()
    assert fleet.summary().failed == 0, fleet.summary().codes
    with store(db) as conn:
        for node in fleet.nodes:
            rows = conn.execute(
                "SELECT r.measurement, r.device_time FROM readings r"
                " JOIN devices d ON d.id = r.device_id WHERE d.name = ?",
                (node.config.name,),
            ).fetchall()
            assert {m for m, _ in rows} == set(node.model.measurements(node.state))
            assert {t for _, t in rows} >= set(node.stats.acked_times)


async def test_cli_run_against_the_gateway(tmp_path: Path) -> None:
    async with running_gateway(tmp_path / "gw.db") as (host, port):
        args = ["run", "--gateway", f"coap://{host}:{port}", "--fridges", "3", "--lights", "3"]
        args += ["--trackers", "1", "--duration", "2", "--fridge-interval", "0.5"]
        args += ["--light-interval", "0.5", "--tracker-interval", "0.5", "--ramp", "0.3"]
        proc = await asyncio.create_subprocess_exec(
            *[sys.executable, "-m", "device_sim", *args, "--json", "--no-progress"],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, out.decode() + err.decode()
    summary = json.loads(out)
    assert summary["devices_up"] == 7 and summary["acknowledged"] == summary["sent"] > 0
