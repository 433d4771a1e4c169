"""Hostile datagrams at a real gateway process: it answers or drops, and never breaks.

Each example is a CoAP message built from random parts (codes, types, tokens, options,
paths, queries, payloads in every accepted format and garbage), then possibly mutated
(truncated, a byte flipped, bytes inserted), sent over UDP to the gateway. Afterwards:
no handler raised (no error-level log line), every stored reading is one validation
accepts, the gateway still serves, and its memory did not grow without bound.

Bounded for `make test` (FUZZ_EXAMPLES, default 150); `make fuzz` runs many more.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiocoap
import cbor2
import pytest
from aiocoap.numbers.codes import Code
from aiocoap.numbers.types import Type
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.config import GatewayConfig
from gateway.core.readings import Measurement
from gateway.core.validate import Limits, validate_measurements
from gateway.errors import DeviceError
from tests.support.gateway import GatewayProcess, register
from tests.support.gateway import gateway_config as make_config

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "150"))
DEVICES = {"fridge1": "fridge", "tracker1": "tracker", "light1": "streetlight"}
#: Allowed growth of the gateway's resident memory over a run (bytes).
MEMORY_SLACK = 40 * 2**20

CODES = st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7, 69, 132, 255]) | st.integers(0, 255)
PATHS = st.sampled_from(
    [
        ("rd",),
        ("r", "fridge1"),
        ("r", "tracker1"),
        ("r", "light1"),
        ("r", "nobody"),
        (".well-known", "core"),
        ("cmd", "fridge1"),
        ("rd", "deadbeef"),
        (),
    ]
) | st.lists(st.text(max_size=30), max_size=4).map(tuple)
QUERIES = st.lists(
    st.sampled_from(["ep=fridge1", "et=fridge", "lt=60", "q", "ep=", "lt=-1", "lt=x", "et="])
    | st.text(max_size=40),
    max_size=5,
).map(tuple)
VALUES = (
    st.none() | st.booleans() | st.integers(-(2**65), 2**65) | st.floats() | st.text(max_size=50)
)
READINGS = st.dictionaries(
    st.sampled_from(["temp", "door", "stock_milk", "lat", "speed", "on", "dim", "ts", "seq"])
    | st.text(max_size=10),
    VALUES,
    max_size=8,
)
PAYLOADS = st.one_of(
    st.binary(max_size=300),
    READINGS.map(cbor2.dumps),
    st.lists(READINGS, max_size=3).map(cbor2.dumps),
    st.lists(
        st.dictionaries(st.sampled_from([-2, -3, 0, 2, 3, 4, 6]), VALUES, max_size=4), max_size=4
    ).map(cbor2.dumps),
    st.just(b'</temp>;rt="temperature";obs,</setpoint>' * 3),
)


@st.composite
def datagrams(draw: Any) -> bytes:
    message = aiocoap.Message(
        code=Code(draw(CODES)),
        uri_path=draw(PATHS),
        uri_query=draw(QUERIES),
        payload=draw(PAYLOADS),
    )
    message.mtype = draw(st.sampled_from([Type.CON, Type.NON, Type.ACK, Type.RST]))
    message.mid = draw(st.integers(0, 0xFFFF))
    message.token = draw(st.binary(max_size=8))
    if draw(st.booleans()):
        message.opt.content_format = draw(st.sampled_from([0, 40, 50, 60, 110, 112, 9999]))
    if draw(st.booleans()):
        message.opt.observe = draw(st.sampled_from([0, 1]))
    if draw(st.booleans()):
        message.opt.accept = draw(st.sampled_from([50, 60, 110, 112, 1]))
    try:
        wire = bytearray(message.encode())
    except Exception:
        wire = bytearray(draw(st.binary(min_size=4, max_size=64)))
    mutation = draw(st.sampled_from(["none", "truncate", "flip", "insert"]))
    if mutation == "truncate" and len(wire) > 1:
        wire = wire[: draw(st.integers(0, len(wire) - 1))]
    elif mutation == "flip" and wire:
        index = draw(st.integers(0, len(wire) - 1))
        wire[index] ^= draw(st.integers(1, 255))
    elif mutation == "insert":
        index = draw(st.integers(0, len(wire)))
        wire[index:index] = draw(st.binary(min_size=1, max_size=16))
    return bytes(wire)


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.fixture
def gateway_config(tmp_path: Path) -> GatewayConfig:
    # Limits off, so hostile input reaches the handlers instead of stopping at 4.29.
    return make_config(
        tmp_path,
        security={"source_rate": 0, "device_rate": 0},
        store={"synchronous": "normal"},
    )


@pytest.fixture
def running(gateway_process: GatewayProcess) -> Iterator[GatewayProcess]:
    gateway_process.start()

    async def setup() -> None:
        client = await aiocoap.Context.create_client_context(transports=["udp6"])
        try:
            for name, device_type in DEVICES.items():
                await register(client, gateway_process.url, name, device_type)
        finally:
            await client.shutdown()

    asyncio.run(setup())
    yield gateway_process


def stored_readings(db: str) -> list[tuple[str, str, Any, str]]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return conn.execute(
            "SELECT d.type, r.measurement, r.value, r.kind FROM readings r"
            " JOIN devices d ON d.id = r.device_id"
        ).fetchall()
    finally:
        conn.close()


def test_gateway_survives_hostile_datagrams(running: GatewayProcess) -> None:
    assert running.pid is not None
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.connect(("127.0.0.1", running.config.server.port))
    sock.settimeout(0.02)
    baseline = rss(running.pid)
    sent = 0

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(datagram=datagrams())
    def send(datagram: bytes) -> None:
        nonlocal sent
        sock.send(datagram)
        sent += 1
        try:
            while True:
                sock.recv(4096)
        except (TimeoutError, ConnectionRefusedError):
            pass

    try:
        send()
    finally:
        sock.close()

    assert running.running, "the gateway died"
    failures = [
        event
        for event in running.events
        if event.get("level") in ("error", "critical") or event.get("event") == "raw"
    ]
    assert not failures, "\n".join(str(event.get("text", event)) for event in failures[:20])

    async def still_serving() -> aiocoap.Message:
        client = await aiocoap.Context.create_client_context(transports=["udp6"])
        try:
            request = aiocoap.Message(code=Code.GET, uri=f"{running.url}/.well-known/core")
            response: aiocoap.Message = await asyncio.wait_for(client.request(request).response, 10)
            return response
        finally:
            await client.shutdown()

    assert asyncio.run(still_serving()).code == Code.CONTENT

    for device_type, name, value, kind in stored_readings(running.config.store.path):
        typed = bool(value) if kind == "b" else value
        try:
            validate_measurements([Measurement(name, typed)], device_type, Limits())
        except DeviceError as exc:
            raise AssertionError(f"stored an invalid reading {name}={value!r}: {exc}") from exc

    assert rss(running.pid) - baseline < MEMORY_SLACK, (baseline, rss(running.pid), sent)
