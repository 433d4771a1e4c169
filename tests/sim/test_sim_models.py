"""The device models over simulated time: no event loop, no waiting, a seed fixes everything."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from device_sim.models import CommandError, Fridge, StreetLight, Tracker
from device_sim.models.tracker import bearing_and_distance

T0 = 1_700_000_000.0  # 2023-11-14 22:13:20 UTC


def run(model, state, start, seconds, every, rng):  # type: ignore[no-untyped-def]
    events = []
    t = start
    while t < start + seconds:
        t += every
        state, evs = model.step(state, t, rng)
        events.extend(evs)
    return state, events


def test_fridge_holds_its_setpoint_with_the_door_shut() -> None:
    fridge = Fridge(door_rate=0.0)
    rng = random.Random(1)
    state = fridge.initial(T0, rng)
    temps = []
    for i in range(1, 24 * 60):
        state, _ = fridge.step(state, T0 + 60 * i, rng)
        temps.append(state.temp)
    assert all(2.0 < t < 6.0 for t in temps[60:])
    states = {fridge.step(state, T0 + 60 * i, rng)[0].compressor for i in range(1440, 1500)}
    assert states == {True, False}


def test_fridge_warms_while_the_door_stays_open_and_cools_back_when_closed() -> None:
    fridge = Fridge(door_rate=60.0, door_fault_rate=1.0, stuck_for=1800.0)
    rng = random.Random(2)
    state = replace(fridge.initial(T0, rng), temp=4.0)
    state, events = run(fridge, state, T0, 600, 10, rng)
    assert any(e.kind == "door.stuck" for e in events)
    assert state.door_open and state.door_alarm
    m = fridge.measurements(state)
    assert m["door"] is True and m["door_alarm"] is True
    warm = state.temp
    assert warm > 8.0

    quiet = replace(fridge, door_rate=0.0)
    state, events = run(quiet, state, state.t, 1800 + 3600, 10, rng)
    assert any(e.kind == "door.closed" for e in events)
    assert not state.door_open and not state.door_alarm
    assert state.temp < warm - 2.0
    assert abs(state.temp - state.setpoint) < 2.0


def test_fridge_stock_is_used_up_and_restocked() -> None:
    fridge = Fridge(door_rate=0.0, items={"milk": (4, 20.0)}, restock_below=0, restock_delay=600)
    rng = random.Random(3)
    state = fridge.initial(T0, rng)
    assert state.stock_of("milk") == 4
    levels = []
    events = []
    for i in range(1, 200):
        state, evs = fridge.step(state, T0 + 30 * i, rng)
        events.extend(evs)
        levels.append(state.stock_of("milk"))
    assert min(levels) == 0
    assert any(e.kind == "stock.restocked" for e in events)
    first_empty = levels.index(0)
    assert 4 in levels[first_empty:]
    assert fridge.measurements(state)["stock_milk"] == state.stock_of("milk")


def test_fridge_measurements_follow_the_contract() -> None:
    fridge = Fridge()
    m = fridge.measurements(fridge.initial(T0, random.Random(0)))
    assert set(m) == {
        "temp",
        "setpoint",
        "door",
        "compressor",
        "door_alarm",
        "stock_milk",
        "stock_eggs",
        "stock_butter",
    }
    assert all(isinstance(m[k], bool) for k in ("door", "compressor", "door_alarm"))
    assert all(isinstance(m[k], int) and 0 <= m[k] <= 1000 for k in m if k.startswith("stock_"))


def test_fridge_setpoint_command() -> None:
    fridge = Fridge()
    state = fridge.initial(T0, random.Random(0))
    assert fridge.command(state, "setpoint", 2.5).setpoint == 2.5
    for bad in (True, "cold", 99, float("nan")):
        with pytest.raises(CommandError):
            fridge.command(state, "setpoint", bad)
    with pytest.raises(CommandError):
        fridge.command(state, "temp", 3)


def test_tracker_moves_plausibly_and_drains_its_battery() -> None:
    tracker = Tracker(cruise_speed=1.5, drain_per_hour=2.0)
    rng = random.Random(4)
    state = tracker.initial(T0, rng)
    start = (state.lat, state.lon)
    prev = state
    for i in range(1, 121):
        state, _ = tracker.step(state, T0 + 60 * i, rng)
        state = tracker.reported(state)
        _, metres = bearing_and_distance(prev.lat, prev.lon, state.lat, state.lon)
        assert metres <= 60 * 100  # never faster than the contract's 100 m/s
        assert 0 <= state.speed <= 100 and 0 <= state.heading < 360
        prev = state
    _, travelled = bearing_and_distance(*start, state.lat, state.lon)
    assert 0 < travelled < 2 * 3600 * 1.5 * 3
    # 2 h at 2 %/h plus 120 reports at 0.01 % each
    assert state.battery == pytest.approx(100 - 4 - 1.2)
    m = tracker.measurements(state)
    assert set(m) == {"lat", "lon", "speed", "heading", "battery"}


def test_tracker_follows_its_route() -> None:
    route = ((52.5200, 13.4050), (52.5300, 13.4050), (52.5300, 13.4200))
    tracker = Tracker(route=route, cruise_speed=10.0)
    rng = random.Random(5)
    state = tracker.initial(T0, rng)
    state, events = run(tracker, state, T0, 600, 30, rng)
    assert [e.detail for e in events if e.kind == "waypoint.reached"][:1] == ["2"]
    assert 52.52 <= state.lat <= 52.5301 and 13.405 <= state.lon <= 13.4201


def test_tracker_with_empty_battery_stops() -> None:
    tracker = Tracker(drain_per_hour=100.0)
    rng = random.Random(6)
    state, events = run(tracker, tracker.initial(T0, rng), T0, 7200, 60, rng)
    assert state.battery == 0.0 and state.speed == 0.0
    assert [e.kind for e in events if e.kind.startswith("battery")] == [
        "battery.low",
        "battery.empty",
    ]


def at_hour(hour: float) -> float:
    return 1_700_006_400.0 + hour * 3600  # 1_700_006_400 is midnight UTC


def test_streetlight_follows_the_dusk_to_dawn_schedule() -> None:
    light = StreetLight()
    rng = random.Random(7)
    state = light.initial(at_hour(0), rng)
    seen = {}
    for minutes in range(10, 48 * 60, 10):
        state, _ = light.step(state, at_hour(minutes / 60), rng)
        seen[minutes / 60 % 24] = light.measurements(state)
    assert seen[12.0]["on"] is False and seen[12.0]["power"] < 1 and seen[12.0]["lux"] > 1000
    assert seen[21.0]["on"] is True and seen[21.0]["dim"] == 100.0
    assert seen[3.0]["on"] is True and seen[3.0]["dim"] == 50.0
    assert seen[3.0]["lux"] < 100
    assert seen[21.0]["power"] == pytest.approx(120.0)
    assert seen[3.0]["power"] == pytest.approx(60.0)


def test_streetlight_commands_override_the_schedule() -> None:
    light = StreetLight()
    rng = random.Random(8)
    state = light.initial(at_hour(12), rng)
    state = light.command(state, "on", True)
    state = light.command(state, "dim", 30)
    state, _ = light.step(state, at_hour(12.1), rng)
    assert state.on and state.dim == 30.0 and state.power == pytest.approx(36.0)
    with pytest.raises(CommandError):
        light.command(state, "dim", 101)
    with pytest.raises(CommandError):
        light.command(state, "on", 1)


@pytest.mark.parametrize("seed", range(5))
def test_failure_rate_zero_never_fails_and_one_always_fails(seed: int) -> None:
    for rate, expect_ok in ((0.0, True), (1.0, False)):
        light = StreetLight(failure_rate=rate)
        rng = random.Random(seed)
        state, events = run(
            light, light.initial(at_hour(20), rng), at_hour(20), 72 * 3600, 600, rng
        )
        assert state.lamp_ok is expect_ok
        if not expect_ok:
            assert light.measurements(state)["lamp_ok"] is False
            assert state.power == 0.0
            assert [e.kind for e in events].count("lamp.failed") == 1


@pytest.mark.parametrize("model", [Fridge(door_fault_rate=0.2), Tracker(), StreetLight(0.1)])
def test_models_are_deterministic_for_a_seed(model) -> None:  # type: ignore[no-untyped-def]
    def trajectory(seed: int) -> list[dict[str, object]]:
        rng = random.Random(seed)
        state = model.initial(T0, rng)
        out = []
        for i in range(1, 300):
            state, _ = model.step(state, T0 + 37 * i, rng)
            out.append(model.measurements(state))
        return out

    assert trajectory(42) == trajectory(42)
    assert trajectory(42) != trajectory(43)


def test_stepping_backwards_changes_nothing() -> None:
    fridge = Fridge()
    rng = random.Random(9)
    state = fridge.initial(T0, rng)
    again, events = fridge.step(state, T0 - 10, rng)
    assert again == state and events == []
