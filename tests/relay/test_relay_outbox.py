"""The relay inside a running gateway, with memory sinks: outbox, workers, back-pressure.

Devices post over real CoAP to an in-process gateway; the sinks are `MemorySink`s so a
test can make them fail, go down or hang. Real brokers are in test_relay_e2e*.py.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiocoap
import cbor2
import pytest
from aiocoap.numbers.codes import Code
from click.testing import CliRunner

from gateway.app import Gateway
from gateway.cli import main as cli
from gateway.config import GatewayConfig
from gateway.core.model import Device
from gateway.relay.events import record_event
from gateway.relay.sinks.memory import MemorySink
from tests.support.gateway import base_url, gateway_config, post, register, wait_until

FAST_RETRY = {"base_delay": 0.05, "max_delay": 0.2, "jitter": 0.0, "max_attempts": 50}


def relay_config(tmp_path: Path, *, routes: list[dict[str, Any]] | None = None, **relay: Any):
    return gateway_config(
        tmp_path,
        sinks=[{"name": "a", "type": "memory"}, {"name": "b", "type": "memory"}],
        routes=routes
        if routes is not None
        else [{"sink": "a"}, {"sink": "b", "device_types": ["tracker"]}],
        relay={"poll_interval": 0.5, "status_interval": 0.2, "retry": FAST_RETRY, **relay},
    )


#: What each sink still has to send: its outbox and the readings after its cursor.
QUEUED = "SELECT sink, state, attempt FROM relay_queue"


def outbox(config: GatewayConfig, sql: str = "SELECT sink, state, attempt FROM outbox") -> list:
    with sqlite3.connect(config.store.path) as conn:
        return conn.execute(sql).fetchall()


class Running:
    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.url = base_url(config)
        self.a = MemorySink("a")
        self.b = MemorySink("b")

    def gateway(self) -> Gateway:
        return Gateway(self.config, sinks={"a": self.a, "b": self.b})


@pytest.fixture
async def running(tmp_path: Path) -> AsyncIterator[tuple[Running, Gateway]]:
    setup = Running(relay_config(tmp_path))
    async with setup.gateway() as gateway:
        yield setup, gateway


async def run_cli(*args: str) -> Any:
    """The operator CLI, in a thread: it runs its own event loop."""
    return await asyncio.to_thread(CliRunner().invoke, cli, list(args))


async def send(client: aiocoap.Context, url: str, name: str, **values: Any) -> aiocoap.Message:
    return await post(client, url, f"r/{name}", cbor2.dumps(values))


async def test_readings_reach_the_routed_sinks_in_order(
    running: tuple[Running, Gateway], coap_client: aiocoap.Context
) -> None:
    setup, gateway = running
    await register(coap_client, setup.url, "fridge-1", "fridge")
    await register(coap_client, setup.url, "truck-1", "tracker")
    for seq in range(5):
        assert (
            await send(coap_client, setup.url, "fridge-1", temp=seq, seq=seq)
        ).code == Code.CHANGED
    assert (await send(coap_client, setup.url, "truck-1", speed=3.5)).code == Code.CHANGED
    got = await setup.a.wait_for(6)
    fridge = [d.message for d in got if d.device == "fridge-1"]
    assert [m.values[0].value for m in fridge] == [0, 1, 2, 3, 4]
    assert [m.extra for m in fridge] == [{"seq": s} for s in range(5)]
    assert fridge[0].gateway == gateway.config.server.name
    # Only the tracker is routed to b.
    (only,) = await setup.b.wait_for(1)
    assert only.device == "truck-1" and only.message.values[0].name == "speed"
    await wait_until(lambda: outbox(setup.config) == [])


async def test_a_repeated_request_creates_no_second_entry(
    running: tuple[Running, Gateway], coap_client: aiocoap.Context
) -> None:
    setup, _ = running
    setup.a.hang()  # keep what is queued to count it
    await register(coap_client, setup.url, "fridge-1", "fridge")
    for _ in range(2):
        assert (
            await send(coap_client, setup.url, "fridge-1", temp=4.0, seq=7)
        ).code == Code.CHANGED
    assert len(outbox(setup.config, "SELECT ref_id FROM relay_queue WHERE sink = 'a'")) == 1
    setup.a.release()
    await setup.a.wait_for(1)


async def test_depths_count_every_entry_of_packs_from_several_devices(
    running: tuple[Running, Gateway], coap_client: aiocoap.Context
) -> None:
    setup, gateway = running
    setup.a.set_down()
    setup.b.set_down()  # nothing leaves the queue: each depth must equal its entries
    await register(coap_client, setup.url, "fridge-1", "fridge")
    await register(coap_client, setup.url, "tracker-1", "tracker")
    pack = [{-2: "fridge-1:", -3: 1_700_000_000, 0: "temp", 2: 4.0}]
    pack += [{0: "temp", 2: 4.5, 6: t} for t in range(1, 5)]
    sent = await asyncio.gather(
        post(coap_client, setup.url, "r/fridge-1", cbor2.dumps(pack), content_format=112),
        send(coap_client, setup.url, "tracker-1", lat=1.0, lon=2.0, seq=1),
        send(coap_client, setup.url, "fridge-1", temp=3.0, door=True, seq=2),
        send(coap_client, setup.url, "tracker-1", speed=3.0, seq=2),
    )
    assert all(response.code == Code.CHANGED for response in sent)
    entries = dict(outbox(setup.config, "SELECT sink, count(*) FROM relay_queue GROUP BY sink"))
    assert entries == {"a": 5 + 2 + 2 + 1, "b": 2 + 1}  # route b takes trackers only
    assert {name: stats.depth for name, stats in gateway.relay.stats.items()} == entries


async def test_events_are_relayed_to_routes_of_their_kind(tmp_path: Path) -> None:
    setup = Running(
        relay_config(tmp_path, routes=[{"sink": "a", "kinds": ["alert"], "devices": ["f*"]}])
    )
    async with setup.gateway() as gateway:
        device = await gateway.registry.ensure_device("fridge-9", "fridge")

        at = time.time()

        async def op(conn: Any) -> int:
            return await record_event(
                conn, kind="alert", device=device, at=at, body={"rule": "warm", "state": "on"}
            )

        event_id = await gateway.writer.transaction(op)
        (delivery,) = await setup.a.wait_for(1)
        message = delivery.message
        assert message.message_id == f"e-{event_id}"
        assert (message.kind, message.device, message.device_type) == (
            "alert",
            "fridge-9",
            "fridge",
        )
        assert message.received_at == at and message.extra == {"rule": "warm", "state": "on"}
        # A device the gateway no longer knows (id 0) still has its event relayed.
        ghost = Device(0, "fridge-ghost", "fridge")
        await gateway.writer.transaction(
            lambda conn: record_event(conn, kind="alert", device=ghost, at=at, body={})
        )
        (_, second) = await setup.a.wait_for(2)
        assert (second.message.device, second.message.kind) == ("fridge-ghost", "alert")
        with pytest.raises(ValueError):
            await gateway.writer.transaction(
                lambda conn: record_event(conn, kind="reading", device=device, at=1.0, body={})
            )


async def test_cancelled_worker_releases_its_entries_and_they_go_out_after_restart(
    tmp_path: Path, coap_client: aiocoap.Context
) -> None:
    setup = Running(relay_config(tmp_path))
    async with setup.gateway():
        await register(coap_client, setup.url, "fridge-1", "fridge")
        setup.a.hang()
        assert (await send(coap_client, setup.url, "fridge-1", temp=1.0)).code == Code.CHANGED
        await wait_until(lambda: setup.a.calls >= 1)
    # Shut down mid-publish: not confirmed, so the sink's cursor did not pass it, and no
    # attempt was counted.
    assert outbox(setup.config, QUEUED) == [("a", "pending", 0)]
    assert outbox(setup.config) == []
    setup.a = MemorySink("a")
    async with setup.gateway():
        (delivery,) = await setup.a.wait_for(1)
        assert delivery.message.values[0].value == 1.0
        await wait_until(lambda: outbox(setup.config, QUEUED) == [])


async def test_entries_left_in_flight_by_a_crash_go_out_after_restart(
    tmp_path: Path, coap_client: aiocoap.Context
) -> None:
    setup = Running(relay_config(tmp_path))
    setup.a.set_down()
    async with setup.gateway():
        await register(coap_client, setup.url, "fridge-1", "fridge")
        assert (await send(coap_client, setup.url, "fridge-1", temp=2.0)).code == Code.CHANGED
    with sqlite3.connect(setup.config.store.path) as conn:
        conn.execute("UPDATE outbox SET state = 'in_flight'")  # as a SIGKILL mid-batch leaves it
    setup.a = MemorySink("a")
    async with setup.gateway():
        (delivery,) = await setup.a.wait_for(1)
        assert delivery.message.values[0].value == 2.0


async def test_transient_failures_retry_in_order_and_permanent_ones_are_dead_letters(
    running: tuple[Running, Gateway], coap_client: aiocoap.Context
) -> None:
    setup, gateway = running
    await register(coap_client, setup.url, "fridge-1", "fridge")
    setup.a.set_down()
    for value in range(3):
        assert (await send(coap_client, setup.url, "fridge-1", temp=value)).code == Code.CHANGED
    await wait_until(lambda: gateway.relay.stats["a"].retries >= 2)
    setup.a.fail_message("r-2", "permanent")
    setup.a.set_down(False)
    got = await setup.a.wait_for(2)
    assert [d.message_id for d in got] == ["r-1", "r-3"]
    await wait_until(lambda: outbox(setup.config, "SELECT id FROM outbox WHERE sink = 'a'") == [])
    db = ["--db", setup.config.store.path]
    listed = await run_cli("relay", "dead-letters", "list", "--json", *db)
    assert listed.exit_code == 0, listed.output
    (dead,) = json.loads(listed.output)
    assert (dead["sink"], dead["message_id"], dead["reason"]) == ("a", "r-2", "permanent")
    assert dead["device"] == "fridge-1"
    setup.a.clear_failures()
    replay = await run_cli("relay", "dead-letters", "replay", "--id", str(dead["id"]), *db)
    assert replay.exit_code == 0, replay.output
    got = await setup.a.wait_for(3)
    assert got[-1].message_id == "r-2"
    missing = await run_cli("relay", "dead-letters", "replay", "--id", "999", *db)
    assert missing.exit_code == 3


async def test_refuse_at_the_bound_answers_5_03_and_stores_nothing(
    tmp_path: Path, coap_client: aiocoap.Context
) -> None:
    setup = Running(relay_config(tmp_path, max_outbox=3, retry_after=7))
    setup.a.set_down()
    async with setup.gateway() as gateway:
        await register(coap_client, setup.url, "fridge-1", "fridge")
        for value in range(3):
            assert (await send(coap_client, setup.url, "fridge-1", temp=value)).code == Code.CHANGED
        refused = await send(coap_client, setup.url, "fridge-1", temp=9)
        assert refused.code == Code.SERVICE_UNAVAILABLE and refused.opt.max_age == 7
        assert len(outbox(setup.config, "SELECT id FROM readings")) == 3
        setup.a.set_down(False)
        await setup.a.wait_for(3)
        await wait_until(lambda: gateway.relay.stats["a"].depth == 0)
        assert (await send(coap_client, setup.url, "fridge-1", temp=9)).code == Code.CHANGED
        got = await setup.a.wait_for(4)
        assert [d.message.values[0].value for d in got] == [0, 1, 2, 9]


async def test_drop_oldest_makes_room_and_counts(
    tmp_path: Path, coap_client: aiocoap.Context
) -> None:
    setup = Running(relay_config(tmp_path, max_outbox=3, policy="drop_oldest"))
    setup.a.hang()
    async with setup.gateway() as gateway:
        await register(coap_client, setup.url, "fridge-1", "fridge")
        assert (await send(coap_client, setup.url, "fridge-1", temp=0)).code == Code.CHANGED
        await wait_until(lambda: setup.a.calls == 1)  # the first entry is being sent
        for value in range(1, 5):
            assert (await send(coap_client, setup.url, "fridge-1", temp=value)).code == Code.CHANGED
        # The oldest entries made room: the first was on its way, and goes out all the same;
        # the second was dropped.
        assert len(outbox(setup.config, "SELECT ref_id FROM relay_queue WHERE sink = 'a'")) == 3
        assert gateway.relay.stats["a"].dropped == 2
        await wait_until(
            lambda: (
                outbox(setup.config, "SELECT dropped FROM relay_status WHERE sink='a'") == [(2,)]
            )
        )
        setup.a.release()
        got = await setup.a.wait_for(4)
        assert [d.message.values[0].value for d in got] == [0, 2, 3, 4]


async def test_status_command_shows_live_and_stored_figures(
    running: tuple[Running, Gateway], coap_client: aiocoap.Context
) -> None:
    setup, gateway = running
    setup.a.set_down()
    await register(coap_client, setup.url, "fridge-1", "fridge")
    assert (await send(coap_client, setup.url, "fridge-1", temp=1)).code == Code.CHANGED
    await wait_until(lambda: gateway.relay.stats["a"].retries >= 1)

    async def status() -> dict[str, Any]:
        result = await run_cli("relay", "status", "--json", "--db", setup.config.store.path)
        assert result.exit_code == 0, result.output
        return {row["sink"]: row for row in json.loads(result.output)}

    async def retried() -> dict[str, Any] | None:
        rows = await status()
        return rows if rows["a"]["retries"] else None

    rows = await wait_until(retried)
    assert rows["a"]["connected"] is False and rows["a"]["depth"] == 1
    assert rows["a"]["oldest_age"] >= 0 and "down" in rows["a"]["last_error"]
    assert rows["b"]["connected"] is True and rows["b"]["depth"] == 0
    table = await run_cli("relay", "status", "--db", setup.config.store.path)
    assert table.exit_code == 0 and "relay: 2 sinks" in table.output
