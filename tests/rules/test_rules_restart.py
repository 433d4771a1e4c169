"""Open alerts and shopping lists survive a restart; alerts of removed rules are closed."""

from __future__ import annotations

import dataclasses
from typing import Any

import aiocoap

from gateway.app import Gateway
from gateway.config import GatewayConfig
from gateway.store import alerts as store
from tests.rules.conftest import T0, Clock, Devices


async def run(config: GatewayConfig, client: aiocoap.Context, clock: Clock, story: Any) -> Any:
    async with Gateway(config, clock=clock) as gateway:
        return await story(Devices(gateway, client, clock), gateway)


async def test_open_alert_and_list_survive_a_restart(
    rules_config: GatewayConfig, coap_client: aiocoap.Context, clock: Clock, relayed: list[Any]
) -> None:
    async def before(devices: Devices, gateway: Gateway) -> int:
        await devices.register("lamp-3", "streetlight")
        await devices.send("lamp-3", {"on": True, "lamp_ok": False}, at=T0 + 10)
        await devices.register("fridge-3", "fridge")
        await devices.send("fridge-3", {"temp": 4.0, "stock_butter": 0}, at=T0 + 20)
        (row,) = await store.open_alerts(gateway.reader)
        return row.id

    alert_id = await run(rules_config, coap_client, clock, before)

    async def after(devices: Devices, gateway: Gateway) -> None:
        # Still open: a reading that still says "failed" raises nothing new.
        await devices.send("lamp-3", {"on": True, "lamp_ok": False}, at=T0 + 100)
        (row,) = await store.open_alerts(gateway.reader)
        assert row.id == alert_id
        assert [i.item for i in gateway.rules.engine.shopping_list("fridge-3")] == ["butter"]
        # The lamp is replaced: the same alert clears.
        await devices.send("lamp-3", {"on": True, "lamp_ok": True}, at=T0 + 200)
        assert await store.open_alerts(gateway.reader) == []
        cleared = await store.get_alert(gateway.reader, alert_id)
        assert cleared is not None and cleared.cleared_at == T0 + 200
        await devices.send("fridge-3", {"stock_butter": 2}, at=T0 + 210)
        assert await store.list_items(gateway.reader, "fridge-3") == []

    await run(rules_config, coap_client, clock, after)
    assert [c["body"]["event"] for c in relayed if c["kind"] == "alert"] == ["raised", "cleared"]


async def test_alerts_of_a_removed_rule_are_closed_at_start(
    rules_config: GatewayConfig, coap_client: aiocoap.Context, clock: Clock, relayed: list[Any]
) -> None:
    async def before(devices: Devices, gateway: Gateway) -> None:
        await devices.register("lamp-4", "streetlight")
        await devices.send("lamp-4", {"on": True, "lamp_ok": False}, at=T0 + 10)

    await run(rules_config, coap_client, clock, before)
    fewer = dataclasses.replace(
        rules_config,
        rules=tuple(r for r in rules_config.rules if r.name != "streetlight-lamp-failure"),
    )
    clock.now = T0 + 500

    async def after(devices: Devices, gateway: Gateway) -> None:
        (row,) = await store.list_alerts(gateway.reader, device="lamp-4")
        assert row.state == "cleared" and row.cleared_at == T0 + 500
        assert row.clear_message is not None and "no longer configured" in row.clear_message

    await run(fewer, coap_client, clock, after)
    closing = relayed[-1]
    assert closing["kind"] == "alert"
    assert closing["body"]["event"] == "cleared"
    assert closing["body"]["reason"] == "rule_removed"
    assert closing["device"].name == "lamp-4"
