"""Rules in a running gateway: readings over real CoAP, an injected clock, the example rules."""

from __future__ import annotations

import json
from typing import Any

import aiocoap
import cbor2
from aiocoap.numbers.codes import Code

from gateway.app import Gateway
from gateway.store import alerts as store
from tests.rules.conftest import T0, Clock, Devices
from tests.rules.observe import observing
from tests.rules.physics import Fridge, move
from tests.support.gateway import base_url, wait_until

HOME = (52.52, 13.405)  # the example geofence's centre


def alert_events(relayed: list[dict[str, Any]], rule: str) -> list[str]:
    return [
        call["body"]["event"]
        for call in relayed
        if call["kind"] == "alert" and call["body"]["rule"] == rule
    ]


async def test_fridge_door_left_open_raises_one_alert_cleared_when_cold_again(
    devices: Devices, rules_gateway: Gateway, coap_client: aiocoap.Context, relayed: list[Any]
) -> None:
    await devices.register("kitchen", "fridge")
    fridge = Fridge(t=T0)
    url = base_url(rules_gateway.config)
    async with observing(coap_client, f"{url}/alerts") as alerts:
        assert alerts.latest == []
        t = T0
        for _ in range(20):  # ten quiet minutes
            t += 30
            fridge.step(t)
            await devices.send("kitchen", fridge.measurements(), at=t)
        opened = t
        fridge.open_door(opened)
        for _ in range(40):  # the door stays open for twenty minutes
            t += 30
            fridge.step(t)
            await devices.send("kitchen", fridge.measurements(), at=t)
        closed = t
        fridge.close_door()
        for _ in range(80):  # forty minutes to cool down again
            t += 30
            fridge.step(t)
            await devices.send("kitchen", fridge.measurements(), at=t)
        await wait_until(lambda: alerts.latest == [])
        seen_open = {alert["rule"] for document in alerts.documents for alert in document}

    rows = await store.list_alerts(rules_gateway.reader, device="kitchen")
    warm = [row for row in rows if row.rule == "fridge-warm"]
    # One warm spell, one alert: the noise around 8 °C raises no second one.
    assert len(warm) == 1
    (alert,) = warm
    assert alert.state == "cleared"
    assert alert.severity == "critical"
    assert opened + 300 <= alert.raised_at < closed
    assert alert.cleared_at is not None and alert.cleared_at > closed
    # Still warm half an hour after the raise: re-notified once, with the value then.
    assert alert.notify_count == 2
    assert isinstance(alert.value, float) and alert.value > 7.0
    assert alert.threshold == 8.0
    assert alert.clear_message is not None and alert.clear_message.startswith("kitchen: back to")
    # Every rule that fired did so once, and nothing is left open.
    assert len({row.rule for row in rows}) == len(rows)
    assert {"fridge-warm", "fridge-door-alarm"} <= {row.rule for row in rows}
    assert all(row.state == "cleared" for row in rows)
    # An observer of /alerts was told of the raise and of the clear.
    assert "fridge-warm" in seen_open
    # Each raise and clear went to the relay.
    assert alert_events(relayed, "fridge-warm") == ["raised", "renotified", "cleared"]
    raised = next(c for c in relayed if c["body"]["rule"] == "fridge-warm")
    assert raised["device"].name == "kitchen"
    assert raised["body"]["value"] > 8.0
    assert raised["at"] == alert.raised_at
    assert raised["body"]["id"] == alert.id


async def test_milk_running_out_is_on_the_observed_list_until_restocked(
    devices: Devices, rules_gateway: Gateway, coap_client: aiocoap.Context, relayed: list[Any]
) -> None:
    await devices.register("pantry", "fridge")
    fridge = Fridge(t=T0)
    url = base_url(rules_gateway.config)
    t = T0
    async with observing(coap_client, f"{url}/lists/pantry") as observed:
        assert observed.latest == {"list": "pantry", "items": []}
        for milk in (4, 3, 2):  # the example's minimum for milk is 2
            t += 60
            fridge.stock["milk"] = milk
            fridge.step(t)
            await devices.send("pantry", fridge.measurements(), at=t)
        assert observed.latest["items"] == []
        t += 60
        fridge.stock["milk"] = 1
        fridge.step(t)
        await devices.send("pantry", fridge.measurements(), at=t)
        await wait_until(lambda: observed.latest["items"] != [])
        (item,) = observed.latest["items"]
        assert item["item"] == "milk"
        assert (item["level"], item["minimum"]) == (1, 2)
        assert item["levels"] == {"pantry": 1}
        assert item["added_at"] == t

        # GET /lists names the list; JSON on request.
        response = await coap_client.request(
            aiocoap.Message(code=Code.GET, uri=f"{url}/lists", accept=50)
        ).response
        assert response.code == Code.CONTENT, (response.code, response.payload)
        assert json.loads(response.payload) == ["pantry"]

        t += 60
        fridge.stock["milk"] = 4
        fridge.step(t)
        await devices.send("pantry", fridge.measurements(), at=t)
        await wait_until(lambda: observed.latest["items"] == [])

    changes = [c["body"] for c in relayed if c["kind"] == "event"]
    assert [(c["event"], c["item"], c["level"]) for c in changes] == [
        ("shopping_list.added", "milk", 1),
        ("shopping_list.removed", "milk", 4),
    ]
    assert await store.list_items(rules_gateway.reader, "pantry") == []


async def test_lamp_failure_raises_a_critical_alert_for_relay(
    devices: Devices, rules_gateway: Gateway, relayed: list[Any]
) -> None:
    await devices.register("lamp-7", "streetlight")
    night = {"on": True, "dim": 100.0, "power": 120.0, "lux": 2.0}
    await devices.send("lamp-7", {**night, "lamp_ok": True}, at=T0 + 60)
    await devices.send("lamp-7", {**night, "lamp_ok": True}, at=T0 + 120)
    assert relayed == []
    failed = {"on": True, "dim": 100.0, "power": 0.0, "lux": 2.0, "lamp_ok": False}
    await devices.send("lamp-7", failed, at=T0 + 180)
    await devices.send("lamp-7", failed, at=T0 + 240)  # still failed: no second alert

    (call,) = relayed
    assert call["kind"] == "alert"
    assert call["device"].name == "lamp-7" and call["device"].type == "streetlight"
    body = call["body"]
    assert body["event"] == "raised"
    assert body["rule"] == "streetlight-lamp-failure"
    assert body["severity"] == "critical"
    assert body["message"] == "lamp-7: lamp failure"
    assert body["value"] is False
    (row,) = await store.open_alerts(rules_gateway.reader, device="lamp-7")
    assert row.id == body["id"] and row.raised_at == T0 + 180


async def test_tracker_leaving_its_geofence_raises_an_alert(
    devices: Devices, rules_gateway: Gateway, relayed: list[Any]
) -> None:
    await devices.register("rex", "tracker")
    lat, lon = HOME
    t = T0
    for _ in range(12):  # east at 10 m/s, reporting every 10 s
        t += 10
        lat, lon = move(lat, lon, 90.0, 100.0)
        reading = {"lat": round(lat, 6), "lon": round(lon, 6), "speed": 10.0, "battery": 80.0}
        await devices.send("rex", reading, at=t)
        if t <= T0 + 50:  # within 500 m: inside the fence
            assert await store.open_alerts(rules_gateway.reader, device="rex") == []

    (row,) = await store.open_alerts(rules_gateway.reader, device="rex")
    assert row.rule == "tracker-left-home"
    assert row.raised_at == T0 + 60  # the first reading more than 500 m out
    assert isinstance(row.value, float) and 0 < row.value <= 100
    assert row.message.startswith("rex left home:")
    assert alert_events(relayed, "tracker-left-home") == ["raised"]


async def test_silent_device_is_flagged_by_the_ticker_and_cleared_by_a_reading(
    devices: Devices, rules_gateway: Gateway, clock: Clock, relayed: list[Any]
) -> None:
    await devices.register("lamp-9", "streetlight")
    day = {"on": False, "dim": 0.0, "power": 0.5, "lux": 30000.0, "lamp_ok": True}
    for n in range(1, 6):
        await devices.send("lamp-9", day, at=T0 + 60 * n)
    last = T0 + 300
    # Three times the observed 60 s interval is the limit.
    assert await devices.tick(last + 170) == 0
    assert await devices.tick(last + 190) == 1
    (row,) = await store.open_alerts(rules_gateway.reader, device="lamp-9")
    assert row.rule == "device-silent"
    assert row.value == 190.0 and row.threshold == 180.0
    assert await devices.tick(last + 200) == 0  # one alert, however long the silence

    await devices.send("lamp-9", day, at=last + 400)
    assert await store.open_alerts(rules_gateway.reader, device="lamp-9") == []
    assert alert_events(relayed, "device-silent") == ["raised", "cleared"]


async def test_alerts_resource_answers_json_and_refuses_other_formats(
    devices: Devices, rules_gateway: Gateway, coap_client: aiocoap.Context
) -> None:
    await devices.register("lamp-1", "streetlight")
    await devices.send("lamp-1", {"on": True, "lamp_ok": False}, at=T0 + 1)
    await devices.register("lamp-2", "streetlight")
    await devices.send("lamp-2", {"on": True, "lamp_ok": False}, at=T0 + 2)
    url = base_url(rules_gateway.config)
    response = await coap_client.request(
        aiocoap.Message(code=Code.GET, uri=f"{url}/alerts?device=lamp-2", accept=50)
    ).response
    assert response.code == Code.CONTENT and response.opt.content_format == 50
    (alert,) = json.loads(response.payload)
    assert (alert["device"], alert["rule"], alert["state"]) == (
        "lamp-2",
        "streetlight-lamp-failure",
        "open",
    )
    response = await coap_client.request(
        aiocoap.Message(code=Code.GET, uri=f"{url}/alerts")
    ).response
    assert [a["device"] for a in cbor2.loads(response.payload)] == ["lamp-2", "lamp-1"]
    response = await coap_client.request(
        aiocoap.Message(code=Code.GET, uri=f"{url}/alerts", accept=110)
    ).response
    assert response.code == Code.NOT_ACCEPTABLE
    response = await coap_client.request(
        aiocoap.Message(code=Code.GET, uri=f"{url}/.well-known/core")
    ).response
    links = response.payload.decode()
    assert '</alerts>;rt="coapgw.alerts";obs' in links
    assert '</lists>;rt="coapgw.lists";obs' in links
