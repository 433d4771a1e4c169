"""Rules in a running gateway: readings over real CoAP, an injected clock, the example rules.

The devices are the simulator's models (device_sim.models), stepped on the test's clock with
a seeded random source; the faults (a door left open, a lamp failing, milk running out) are
set through the models' own parameters.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import replace
from typing import Any

import aiocoap
import cbor2
from aiocoap.numbers.codes import Code

from device_sim.models import Fridge, FridgeState, StreetLight, Tracker
from gateway.app import Gateway
from gateway.core import geo
from gateway.store import alerts as store
from tests.rules.conftest import T0, Clock, Devices
from tests.rules.observe import observing
from tests.support.gateway import base_url, wait_until

HOME = (52.52, 13.405)  # the example geofence's centre, and the simulated trackers' start
#: Items the fridge keeps; nobody uses any unless a test says so.
UNUSED = {"milk": (4, 0.0), "eggs": (12, 0.0), "butter": (2, 0.0)}


def fridge_reading(model: Fridge, state: FridgeState) -> dict[str, Any]:
    """The model's measurements with a little sensor noise, which must not cause storms."""
    values = model.measurements(state)
    values["temp"] = round(float(values["temp"]) + 0.3 * math.sin(state.t / 7.0), 2)
    return values


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
    # No one opens the door, except the test once; left open, it is noticed after 20 min.
    model = Fridge(door_rate=0.0, stuck_for=1200.0, items=UNUSED)
    rng = random.Random(7)
    state = model.initial(T0, rng)
    url = base_url(rules_gateway.config)
    async with observing(coap_client, f"{url}/alerts") as alerts:
        assert alerts.latest == []
        t = T0
        for _ in range(20):  # ten quiet minutes
            t += 30
            state, _ = model.step(state, t, rng)
            await devices.send("kitchen", fridge_reading(model, state), at=t)
        opened = t
        state = replace(state, door_open=True, door_opened_at=t, door_closes_at=None)
        closed = None
        for _ in range(120):  # twenty minutes open, then forty to cool down again
            t += 30
            state, events = model.step(state, t, rng)
            if any(event.kind == "door.closed" for event in events):
                closed = event_time = next(e.at for e in events if e.kind == "door.closed")
                assert event_time <= t
            await devices.send("kitchen", fridge_reading(model, state), at=t)
        assert closed is not None
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
    # Milk goes fast (a pint a minute on average); the fridge restocks it ten minutes after
    # it is down to one.
    model = Fridge(
        door_rate=0.0, items={**UNUSED, "milk": (4, 60.0)}, restock_below=1, restock_delay=600
    )
    rng = random.Random(3)
    state = model.initial(T0, rng)
    url = base_url(rules_gateway.config)
    t = T0
    levels: list[int] = []
    async with observing(coap_client, f"{url}/lists/pantry") as observed:
        assert observed.latest == {"list": "pantry", "items": []}
        while not levels or levels[-1] >= 2:  # the example's minimum for milk is 2
            assert t < T0 + 3600, "the milk never ran low"
            t += 60
            state, _ = model.step(state, t, rng)
            levels.append(state.stock_of("milk"))
            await devices.send("pantry", model.measurements(state), at=t)
        low_at = t
        await wait_until(lambda: observed.latest["items"] != [])
        (item,) = observed.latest["items"]
        assert item["item"] == "milk"
        assert (item["level"], item["minimum"]) == (levels[-1], 2)
        assert item["levels"] == {"pantry": levels[-1]}
        assert item["added_at"] == low_at

        # GET /lists names the list; JSON on request.
        response = await coap_client.request(
            aiocoap.Message(code=Code.GET, uri=f"{url}/lists", accept=50)
        ).response
        assert response.code == Code.CONTENT, (response.code, response.payload)
        assert json.loads(response.payload) == ["pantry"]

        while levels[-1] < 2:  # until the restock arrives
            assert t < low_at + 1800, "the milk was never restocked"
            t += 60
            state, _ = model.step(state, t, rng)
            levels.append(state.stock_of("milk"))
            await devices.send("pantry", model.measurements(state), at=t)
        await wait_until(lambda: observed.latest["items"] == [])

    changes = [c["body"] for c in relayed if c["kind"] == "event"]
    first, last = changes[0], changes[-1]
    assert (first["event"], first["item"]) == ("shopping_list.added", "milk")
    assert (last["event"], last["level"]) == ("shopping_list.removed", levels[-1])
    assert all(c["event"] == "shopping_list.updated" for c in changes[1:-1])
    assert await store.list_items(rules_gateway.reader, "pantry") == []


async def test_lamp_failure_raises_a_critical_alert_for_relay(
    devices: Devices, rules_gateway: Gateway, relayed: list[Any]
) -> None:
    await devices.register("lamp-7", "streetlight")
    rng = random.Random(5)
    healthy, failing = StreetLight(), StreetLight(failure_rate=1.0)  # fails once it burns
    state = healthy.initial(T0, rng)
    assert state.on, "T0 is at night: the lamp burns"
    for n in (1, 2):
        state, _ = healthy.step(state, T0 + 60 * n, rng)
        await devices.send("lamp-7", healthy.measurements(state), at=T0 + 60 * n)
    assert relayed == []
    for n in (3, 4):  # it fails; the second reading still says so, and raises nothing new
        state, _ = failing.step(state, T0 + 60 * n, rng)
        assert not state.lamp_ok
        await devices.send("lamp-7", failing.measurements(state), at=T0 + 60 * n)

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
    # Driving from home to a point 2 km east at about 10 m/s, reporting every 10 s.
    east = (HOME[0], HOME[1] + 2000 / (111_320 * math.cos(math.radians(HOME[0]))))
    model = Tracker(route=(HOME, east), cruise_speed=10.0, wake_interval=10.0)
    rng = random.Random(11)
    state = model.initial(T0, rng)
    t = T0
    left_at = None
    while left_at is None or t < left_at + 30:
        assert t < T0 + 200, "the tracker never left"
        t += 10
        state, _ = model.step(state, t, rng)
        reading = model.measurements(state)
        await devices.send("rex", reading, at=t)
        outside = geo.outside_distance_circle_m(
            float(reading["lat"]), float(reading["lon"]), *HOME, 500
        )
        if outside > 0 and left_at is None:
            left_at = t
        elif left_at is None:
            assert await store.open_alerts(rules_gateway.reader, device="rex") == []

    (row,) = await store.open_alerts(rules_gateway.reader, device="rex")
    assert row.rule == "tracker-left-home"
    assert row.raised_at == left_at  # the first reading more than 500 m out
    assert isinstance(row.value, float) and 0 < row.value <= 100
    assert row.message.startswith("rex left home:")
    assert alert_events(relayed, "tracker-left-home") == ["raised"]


async def test_silent_device_is_flagged_by_the_ticker_and_cleared_by_a_reading(
    devices: Devices, rules_gateway: Gateway, clock: Clock, relayed: list[Any]
) -> None:
    await devices.register("lamp-9", "streetlight")
    model = StreetLight()
    rng = random.Random(9)
    state = model.initial(T0, rng)
    for n in range(1, 6):  # a reading a minute, then nothing
        state, _ = model.step(state, T0 + 60 * n, rng)
        await devices.send("lamp-9", model.measurements(state), at=T0 + 60 * n)
    last = T0 + 300
    # Three times the observed 60 s interval is the limit.
    assert await devices.tick(last + 170) == 0
    assert await devices.tick(last + 190) == 1
    (row,) = await store.open_alerts(rules_gateway.reader, device="lamp-9")
    assert row.rule == "device-silent"
    assert row.value == 190.0 and row.threshold == 180.0
    assert await devices.tick(last + 200) == 0  # one alert, however long the silence

    state, _ = model.step(state, last + 400, rng)
    await devices.send("lamp-9", model.measurements(state), at=last + 400)
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
