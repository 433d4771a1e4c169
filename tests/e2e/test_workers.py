"""`gateway serve --workers N`: several processes on one port, one database, one gateway.

Each test device talks from a port the steering program sends to a chosen worker, so the
tests show what crosses between workers: readings relayed by worker 0 whoever stored them,
an observer on one worker told of a device posting to the other, a command queued on one
worker delivered by the one the device talks to, and a killed worker restarted on its seat.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sqlite3
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiocoap
import cbor2
import pytest
from aiocoap.numbers.codes import Code
from click.testing import CliRunner

from gateway.cli import main as cli
from gateway.coap.steering import WorkerSeat, bind_worker_sockets, worker_for
from tests.relay.e2e import FAST_RETRY, MqttCollector, collecting, toml
from tests.support.brokers import Mosquitto
from tests.support.devices import FakeDevice
from tests.support.downstreams import free_udp_port
from tests.support.gateway import GatewayProcess, gateway_config, post, register, wait_until

WORKERS = 2


def port_for_worker(index: int, workers: int = WORKERS) -> int:
    """A free loopback port whose datagrams the steering program gives to worker `index`."""
    while True:
        port = free_udp_port()
        if worker_for("127.0.0.1", port, workers) == index:
            return port


@asynccontextmanager
async def client_on_worker(index: int) -> AsyncIterator[aiocoap.Context]:
    """A CoAP client whose requests reach worker `index`."""
    context = await aiocoap.Context.create_server_context(
        None, bind=("127.0.0.1", port_for_worker(index))
    )
    try:
        yield context
    finally:
        await context.shutdown()


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[GatewayProcess]:
    process = GatewayProcess(
        gateway_config(tmp_path, commands={"poll_interval": 0.1}), workers=WORKERS
    )
    process.start()
    try:
        yield process
    finally:
        process.stop()


def relaying_workers(
    tmp_path: Path, mosquitto: Mosquitto, **sections: dict[str, Any]
) -> GatewayProcess:
    """Two workers relaying every reading to `mosquitto`; `sections` add to the config file."""
    sink = {"name": "broker", "type": "mqtt", "url": mosquitto.url}
    settings = toml({"sinks": [sink], "routes": [{"sink": "broker"}], **sections})
    return GatewayProcess.with_settings(
        gateway_config(tmp_path), tmp_path, settings, workers=WORKERS
    )


def served_by(process: GatewayProcess, event: str, device: str) -> set[int]:
    return {e["worker"] for e in process.events_named(event) if e.get("device") == device}


# --- steering, on real sockets ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("bind", "dual_stack", "client_host", "family"),
    [
        ("127.0.0.1", False, "127.0.0.1", socket.AF_INET),
        ("::1", False, "::1", socket.AF_INET6),
        ("::", True, "127.0.0.1", socket.AF_INET),
        ("::", True, "::1", socket.AF_INET6),
    ],
)
def test_each_peer_reaches_the_socket_worker_for_names(
    bind: str, dual_stack: bool, client_host: str, family: socket.AddressFamily
) -> None:
    sockets = bind_worker_sockets(bind, 0, 3, dual_stack=dual_stack)
    port = sockets[0].getsockname()[1]
    try:
        for sock in sockets:
            sock.settimeout(2.0)
        seen: set[int] = set()
        for _ in range(24):
            with socket.socket(family, socket.SOCK_DGRAM) as client:
                client.bind((client_host, 0))
                client.sendto(b"\x40\x01\x00\x01", (client_host, port))
                source_port = client.getsockname()[1]
                expected = worker_for(client_host, source_port, 3)
                data, peer = sockets[expected].recvfrom(64)
                assert data == b"\x40\x01\x00\x01" and peer[1] == source_port
                seat = WorkerSeat(expected, 3)
                host = f"[{client_host}]" if ":" in client_host else client_host
                assert seat.owns(f"{host}:{source_port}")
                seen.add(expected)
        assert seen == {0, 1, 2}  # 24 ports spread over all three
    finally:
        for sock in sockets:
            sock.close()


def test_workers_refuse_per_process_security_state(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        cli,
        ["serve", "--workers", "2", "--db", str(tmp_path / "gw.db"), "--port", "0"],
        env={"GATEWAY_SECURITY_MODE": "authenticated"},
    )
    assert result.exit_code == 1
    assert "server.workers > 1 needs security.mode" in result.output


# --- a gateway of two workers -----------------------------------------------------------------


async def test_readings_to_either_worker_are_stored_and_relayed_once(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    process = relaying_workers(tmp_path, mosquitto, relay={"retry": FAST_RETRY})
    config = process.config
    try:
        process.start()
        async with (
            collecting(MqttCollector(mosquitto.port)) as collector,
            client_on_worker(0) as first,
            client_on_worker(1) as second,
        ):
            for client, name in ((first, "fridge-0"), (second, "fridge-1")):
                await register(client, process.url, name, "fridge")
                for seq in range(10):
                    payload = cbor2.dumps({"temp": 4.0, "seq": seq})
                    response = await post(client, process.url, f"r/{name}", payload)
                    assert response.code == Code.CHANGED
            await wait_until(lambda: len(collector.ids()) == 20, within=15)
            relayed = {(topic.split("/")[-2], m.extra["seq"]) for topic, m in collector.messages}
            assert relayed == {(n, s) for n in ("fridge-0", "fridge-1") for s in range(10)}
        process.wait_for_event("registration.created", count=2)
        assert served_by(process, "registration.created", "fridge-0") == {0}
        assert served_by(process, "registration.created", "fridge-1") == {1}
        with sqlite3.connect(config.store.path) as conn:
            assert conn.execute("SELECT count(*) FROM readings").fetchone() == (20,)
            await wait_until(lambda: conn.execute("SELECT count(*) FROM outbox").fetchone() == (0,))
        assert process.terminate() == 0
    finally:
        process.stop()


async def test_a_device_registered_on_one_worker_posts_to_the_other(
    workers: GatewayProcess,
) -> None:
    async with client_on_worker(0) as registrar, client_on_worker(1) as poster:
        await register(registrar, workers.url, "tracker-1", "tracker")
        # At once: worker 1 has not heard of the registration yet; it asks the database.
        response = await post(poster, workers.url, "r/tracker-1", cbor2.dumps({"battery": 80}))
        assert response.code == Code.CHANGED, response.payload
        unknown = await post(poster, workers.url, "r/nobody", cbor2.dumps({"battery": 80}))
        assert unknown.code == Code.NOT_FOUND


async def test_observer_on_one_worker_hears_a_device_posting_to_the_other(
    workers: GatewayProcess,
) -> None:
    async with client_on_worker(0) as device, client_on_worker(1) as watcher:
        await register(device, workers.url, "fridge-1", "fridge")
        await post(device, workers.url, "r/fridge-1", cbor2.dumps({"temp": 4.0}))
        request = aiocoap.Message(code=Code.GET, uri=f"{workers.url}/r/fridge-1", observe=0)
        observation = watcher.request(request)
        first = await observation.response
        assert first.opt.observe is not None
        assert cbor2.loads(first.payload)["temp"]["v"] == 4.0
        updates = observation.observation.__aiter__()
        await post(device, workers.url, "r/fridge-1", cbor2.dumps({"temp": 5.5}))
        await notified(updates, lambda body: body["temp"]["v"] == 5.5)

        # The device list's observers hear of a registration made on the other worker.
        request = aiocoap.Message(code=Code.GET, uri=f"{workers.url}/devices", observe=0)
        devices = watcher.request(request)
        assert [d["name"] for d in cbor2.loads((await devices.response).payload)] == ["fridge-1"]
        listing = devices.observation.__aiter__()
        await register(device, workers.url, "fridge-2", "fridge")
        await notified(listing, lambda body: [d["name"] for d in body] == ["fridge-1", "fridge-2"])


async def notified(updates: Any, wanted: Callable[[Any], bool], within: float = 5.0) -> None:
    """Until a notification whose CBOR body is `wanted` (Observe is latest-value: an
    earlier change may be notified first)."""
    async with asyncio.timeout(within):
        while not wanted(cbor2.loads((await updates.__anext__()).payload)):
            pass


async def test_command_queued_on_one_worker_is_sent_by_the_devices_worker(
    workers: GatewayProcess,
) -> None:
    light = await FakeDevice("light-1", "streetlight", {"dim": 100}).start(port_for_worker(1))
    try:
        await light.register(workers.url, links=b"</light>")
        async with client_on_worker(0) as operator:
            body = cbor2.dumps({"path": "/light", "method": "PUT", "payload": {"dim": 10}})
            request = aiocoap.Message(
                code=Code.POST, uri=f"{workers.url}/cmd/light-1", payload=body
            )
            request.opt.content_format = 60
            response = await operator.request(request).response
            assert response.code == Code.CREATED, response.payload
            await wait_until(lambda: light.state["dim"] == 10, within=10)
        workers.wait_for_event("command.settled")
        assert len(light.commands) == 1
        assert served_by(workers, "command.settled", "light-1") == {1}
    finally:
        await light.stop()


async def test_a_killed_worker_is_restarted_on_its_seat_and_nothing_is_lost(
    workers: GatewayProcess,
) -> None:
    async with client_on_worker(1) as device:
        await register(device, workers.url, "fridge-1", "fridge")
        victim = workers.worker_pid(1)
        os.kill(victim, signal.SIGKILL)
        workers.wait_for_event("worker.exited")
        # Sent while worker 1 is down: it waits in the socket the supervisor keeps open.
        response = await post(device, workers.url, "r/fridge-1", cbor2.dumps({"temp": 3.0}))
        assert response.code == Code.CHANGED
    assert workers.worker_pid(1) != victim
    assert workers.events_named("worker.exited")[0]["code"] == -signal.SIGKILL
    with sqlite3.connect(workers.config.store.path) as conn:
        assert conn.execute("SELECT count(*) FROM readings").fetchone() == (1,)
    assert workers.terminate() == 0


async def test_outbox_bound_holds_on_every_worker(tmp_path: Path, mosquitto: Mosquitto) -> None:
    mosquitto.stop()  # nothing drains: the outbox only grows
    process = relaying_workers(
        tmp_path,
        mosquitto,
        relay={"max_outbox": 6, "policy": "refuse", "status_interval": 0.2},
        server={"feed_interval": 0.02},
    )
    config = process.config
    try:
        process.start()
        async with client_on_worker(0) as first, client_on_worker(1) as second:
            await register(first, process.url, "fridge-0", "fridge")
            await register(second, process.url, "fridge-1", "fridge")
            accepted = 0
            refused: set[str] = set()
            for seq in range(20):
                for client, name in ((first, "fridge-0"), (second, "fridge-1")):
                    response = await post(client, process.url, f"r/{name}", reading(seq))
                    if response.code == Code.CHANGED:
                        accepted += 1
                    else:
                        assert response.code == Code.SERVICE_UNAVAILABLE
                        assert response.opt.max_age == 30
                        refused.add(name)
                if refused == {"fridge-0", "fridge-1"}:
                    break
                await asyncio.sleep(0.1)  # paced like devices, so the workers hear of each other
            assert refused == {"fridge-0", "fridge-1"}
            # Each worker counts the other's entries within a moment: at most one reading per
            # worker slips past the bound.
            assert 6 <= accepted <= 6 + WORKERS
        with sqlite3.connect(config.store.path) as conn:
            assert conn.execute("SELECT count(*) FROM outbox").fetchone() == (accepted,)
    finally:
        process.stop()


def reading(seq: int) -> bytes:
    return cbor2.dumps({"temp": 4.0, "seq": seq})


async def test_rules_on_worker_0_decide_on_readings_stored_by_the_other(
    tmp_path: Path,
) -> None:
    config = gateway_config(tmp_path)
    rule = {"kind": "threshold", "name": "warm", "measurement": "temp", "above": 8.0}
    process = GatewayProcess.with_settings(
        config, tmp_path, toml({"rules": [rule]}), workers=WORKERS
    )
    try:
        process.start()
        async with client_on_worker(1) as device:
            await register(device, process.url, "fridge-1", "fridge")
            request = aiocoap.Message(code=Code.GET, uri=f"{process.url}/alerts", observe=0)
            alerts = device.request(request)
            assert cbor2.loads((await alerts.response).payload) == []
            updates = alerts.observation.__aiter__()
            response = await post(device, process.url, "r/fridge-1", cbor2.dumps({"temp": 12.0}))
            assert response.code == Code.CHANGED
            # Worker 0 raised the alert; worker 1 tells its observer of /alerts.
            warm = ("warm", "fridge-1")
            await notified(updates, lambda body: [(a["rule"], a["device"]) for a in body] == [warm])
        process.wait_for_event("rules.alert_raised")
        assert served_by(process, "rules.alert_raised", "fridge-1") == {0}
    finally:
        process.stop()


async def test_workers_stop_when_the_supervisor_is_killed(workers: GatewayProcess) -> None:
    pids = [workers.worker_pid(index) for index in range(WORKERS)]
    workers.kill()  # SIGKILL: the supervisor cannot tell anyone

    def alive(pid: int) -> bool:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return False
        return state != "Z"

    await wait_until(lambda: not any(alive(pid) for pid in pids), within=15)
    # Nothing holds the port any more: it can be bound without SO_REUSEPORT.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", workers.config.server.port))
