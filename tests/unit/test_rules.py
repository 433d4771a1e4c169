"""Rules as pure functions over sequences of readings with explicit times."""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence

import pytest

from gateway.core.alerts import TRANSITIONS, Action, Phase
from gateway.core.rules import (
    AlertCleared,
    AlertRaised,
    AlertRenotified,
    Circle,
    Condition,
    Decision,
    GeofenceRule,
    OpenAlert,
    RateRule,
    RuleConfig,
    RuleEngine,
    ShoppingListChanged,
    SilenceRule,
    StateRule,
    StockRule,
    ThresholdRule,
)
from gateway.core.shopping import ListItem

Step = tuple[float, dict[str, object]]


def feed(
    engine: RuleEngine, steps: Iterable[Step], device: str = "fridge-1", device_type: str = "fridge"
) -> list[Decision]:
    decisions: list[Decision] = []
    for at, values in steps:
        decisions += engine.evaluate(values, device, device_type, at)  # type: ignore[arg-type]
    return decisions


def kinds(decisions: Sequence[Decision]) -> list[tuple[str, float]]:
    return [(type(d).__name__, d.at) for d in decisions]


def warm(**overrides: object) -> ThresholdRule:
    base: dict[str, object] = {
        "name": "fridge-warm",
        "device_types": ("fridge",),
        "measurement": "temp",
        "above": 8.0,
        "hysteresis": 1.0,
        "for_seconds": 300.0,
    }
    base.update(overrides)
    return ThresholdRule(**base)  # type: ignore[arg-type]


# ------------------------------------------------------------------ lifecycle table


def test_transition_table_is_complete_and_only_raise_opens() -> None:
    assert len(TRANSITIONS) == len(Phase) * 2 * 2
    for (phase, _condition, _due), (after, action) in TRANSITIONS.items():
        if action is Action.RAISE:
            assert phase is not Phase.RAISED and after is Phase.RAISED
        if action in (Action.CLEAR, Action.RENOTIFY):
            assert phase is Phase.RAISED


# ------------------------------------------------------------------ threshold


def test_threshold_raises_only_after_holding_for_the_minimum_duration() -> None:
    engine = RuleEngine([warm()])
    steps = [(0.0, {"temp": 7.0})] + [(30.0 * i, {"temp": 9.0}) for i in range(1, 13)]
    decisions = feed(engine, steps)
    # Above 8 since t=30, so due at t=330: the reading at 330 raises it, once.
    assert kinds(decisions) == [("AlertRaised", 330.0)]
    raised = decisions[0]
    assert isinstance(raised, AlertRaised)
    assert (raised.rule, raised.device, raised.value, raised.threshold) == (
        "fridge-warm",
        "fridge-1",
        9.0,
        8.0,
    )
    assert raised.message == "fridge-1: temp 9.0 is above 8.0"
    assert raised.severity == "warning"


def test_threshold_hysteresis_band_keeps_alert_open_until_below_it() -> None:
    engine = RuleEngine([warm(for_seconds=0)])
    decisions = feed(
        engine,
        [(0, {"temp": 9.0}), (10, {"temp": 7.5}), (20, {"temp": 8.5}), (30, {"temp": 7.0})],
    )
    assert kinds(decisions) == [("AlertRaised", 0), ("AlertCleared", 30)]
    cleared = decisions[1]
    assert isinstance(cleared, AlertCleared)
    assert cleared.raised_at == 0 and cleared.value == 7.0
    assert cleared.message == "fridge-warm cleared on fridge-1"


def test_pending_threshold_restarts_when_condition_ends() -> None:
    engine = RuleEngine([warm()])
    decisions = feed(
        engine,
        [(0, {"temp": 9.0}), (100, {"temp": 6.0}), (200, {"temp": 9.0}), (400, {"temp": 9.0})],
    )
    assert decisions == []
    assert kinds(feed(engine, [(500, {"temp": 9.5})])) == [("AlertRaised", 500)]


def test_pending_threshold_becomes_due_on_tick_without_a_reading() -> None:
    engine = RuleEngine([warm()])
    assert feed(engine, [(1000, {"temp": 12.0})]) == []
    assert engine.tick(1299) == []
    decisions = engine.tick(1300)
    assert kinds(decisions) == [("AlertRaised", 1300)]
    assert decisions[0].value == 12.0  # type: ignore[union-attr]
    assert engine.tick(1301) == []


def test_threshold_below_with_hysteresis() -> None:
    rule = ThresholdRule(name="battery-low", measurement="battery", below=15, hysteresis=5)
    engine = RuleEngine([rule])
    steps: list[Step] = [(t, {"battery": v}) for t, v in enumerate([40, 16, 14, 13, 17, 19, 20])]
    decisions = feed(engine, steps, device="tracker-1", device_type="tracker")
    assert kinds(decisions) == [("AlertRaised", 2), ("AlertCleared", 6)]


def test_threshold_ignores_missing_bool_and_string_values() -> None:
    engine = RuleEngine([warm(for_seconds=0)])
    assert feed(engine, [(0, {"door": True}), (1, {"temp": True}), (2, {"temp": "hot"})]) == []
    assert engine.open_alerts() == []


def test_rules_apply_by_device_type_and_name_glob() -> None:
    rule = warm(for_seconds=0, devices="kitchen-*")
    engine = RuleEngine([rule])
    assert feed(engine, [(0, {"temp": 20.0})], device="garage-1") == []
    assert feed(engine, [(0, {"temp": 20.0})], device="kitchen-1", device_type="tracker") == []
    assert kinds(feed(engine, [(0, {"temp": 20.0})], device="kitchen-1")) == [("AlertRaised", 0)]


def test_out_of_order_reading_is_ignored() -> None:
    engine = RuleEngine([warm(for_seconds=0)])
    feed(engine, [(100, {"temp": 5.0})])
    assert feed(engine, [(50, {"temp": 20.0})]) == []


def test_renotify_no_more_often_than_the_interval() -> None:
    engine = RuleEngine([warm(for_seconds=0, renotify_interval=600)])
    steps: list[Step] = [(float(t), {"temp": 10.0}) for t in range(0, 1300, 50)]
    decisions = feed(engine, steps)
    assert kinds(decisions) == [
        ("AlertRaised", 0),
        ("AlertRenotified", 600),
        ("AlertRenotified", 1200),
    ]
    assert [d.count for d in decisions if isinstance(d, AlertRenotified)] == [2, 3]
    # With no new reading, tick re-notifies on the same schedule, from the last value.
    assert kinds(engine.tick(1799)) == []
    assert kinds(engine.tick(1800)) == [("AlertRenotified", 1800)]


def test_renotify_zero_never_renotifies() -> None:
    engine = RuleEngine([warm(for_seconds=0)])
    decisions = feed(engine, [(float(t), {"temp": 10.0}) for t in range(0, 10_000, 500)])
    assert kinds(decisions) == [("AlertRaised", 0)]
    assert engine.tick(100_000) == []


def test_message_templates() -> None:
    rule = warm(
        for_seconds=0,
        severity="critical",
        message="{device} ({device_type}) at {value:.1f} °C, limit {threshold}: {rule}/{kind}",
        clear_message="{device} back to {value} °C",
    )
    engine = RuleEngine([rule])
    raised, cleared = feed(engine, [(0, {"temp": 9.25}), (1, {"temp": 4})])
    assert raised.message == "fridge-1 (fridge) at 9.2 °C, limit 8.0: fridge-warm/threshold"
    assert isinstance(raised, AlertRaised) and raised.severity == "critical"
    assert cleared.message == "fridge-1 back to 4 °C"


def test_template_that_fails_on_a_value_falls_back_to_the_default() -> None:
    rule = StateRule(name="mode", measurement="mode", equals="eco", message="{value:.1f}")
    engine = RuleEngine([rule])
    (raised,) = feed(engine, [(0, {"mode": "eco"})])
    assert raised.message == "fridge-1: mode is eco"


# ------------------------------------------------------------------ rate


def door_rule(**overrides: object) -> RateRule:
    base: dict[str, object] = {
        "name": "fridge-door-open",
        "device_types": ("fridge",),
        "measurement": "temp",
        "per_minute": 0.5,
        "window": 120.0,
    }
    base.update(overrides)
    return RateRule(**base)  # type: ignore[arg-type]


def test_rate_rising_raises_and_clears() -> None:
    engine = RuleEngine([door_rule()])
    steady: list[Step] = [
        (float(t), {"temp": 4.0 + (0.05 if t % 20 else 0)}) for t in range(0, 180, 10)
    ]
    assert feed(engine, steady) == []
    # Door opened at t=180: +1 °C per minute.
    rising: list[Step] = [(180.0 + t, {"temp": 4.0 + t / 60}) for t in range(10, 130, 10)]
    decisions = feed(engine, rising)
    assert [type(d) for d in decisions] == [AlertRaised]
    assert decisions[0].value is not None and float(decisions[0].value) > 0.5  # type: ignore[arg-type]
    # Door closed: the temperature falls back; the slope turns negative and the alert clears.
    falling: list[Step] = [(310.0 + t, {"temp": 6.0 - t / 60}) for t in range(10, 130, 10)]
    assert [type(d) for d in feed(engine, falling)] == [AlertCleared]


def test_rate_needs_half_a_window_of_samples() -> None:
    engine = RuleEngine([door_rule()])
    # A 5 °C jump in one second is noise until samples span 60 s.
    assert feed(engine, [(0, {"temp": 4.0}), (1, {"temp": 9.0}), (30, {"temp": 9.0})]) == []
    assert [type(d) for d in feed(engine, [(60, {"temp": 9.0})])] == [AlertRaised]


def test_rate_falling_direction() -> None:
    rule = door_rule(name="cooling-fast", direction="falling", per_minute=1.0, window=60)
    engine = RuleEngine([rule])
    steps: list[Step] = [(float(t), {"temp": 10 - 2 * t / 60}) for t in range(0, 70, 10)]
    decisions = feed(engine, steps)
    assert [type(d) for d in decisions] == [AlertRaised]
    assert decisions[0].value == pytest.approx(-2.0)


# ------------------------------------------------------------------ state


def test_state_lamp_failure() -> None:
    rule = StateRule(name="lamp-failure", measurement="lamp_ok", equals=False, severity="critical")
    engine = RuleEngine([rule])
    decisions = feed(
        engine,
        [
            (0, {"lamp_ok": True}),
            (1, {"lamp_ok": False}),
            (2, {"lamp_ok": False}),
            (3, {"lamp_ok": True}),
        ],
        device="light-1",
        device_type="streetlight",
    )
    assert kinds(decisions) == [("AlertRaised", 1), ("AlertCleared", 3)]
    assert decisions[0].message == "light-1: lamp_ok is False"


def test_state_bool_does_not_match_numbers() -> None:
    engine = RuleEngine([StateRule(name="lamp-failure", measurement="lamp_ok", equals=False)])
    assert feed(engine, [(0, {"lamp_ok": 0}), (1, {"lamp_ok": 0.0})]) == []


def test_state_with_condition_on_another_measurement_on_in_daylight() -> None:
    rule = StateRule(
        name="on-in-daylight",
        measurement="on",
        equals=True,
        when=Condition(measurement="lux", above=1000),
        for_seconds=600,
    )
    engine = RuleEngine([rule])

    def feed_light(steps: list[Step]) -> list[Decision]:
        return feed(engine, steps, "light-1", "streetlight")

    # Dusk: on, dark. Morning: lux rises while the light stays on.
    assert feed_light([(0, {"on": True, "lux": 5.0}), (300, {"lux": 4000.0})]) == []
    # Readings of only "on" use the latest lux; 600 s after the condition began it raises.
    assert kinds(feed_light([(600, {"on": True}), (900, {"on": True})])) == [("AlertRaised", 900)]
    assert kinds(feed_light([(1000, {"on": False})])) == [("AlertCleared", 1000)]


def test_state_unknown_condition_measurement_decides_nothing() -> None:
    rule = StateRule(
        name="on-in-daylight",
        measurement="on",
        equals=True,
        when=Condition(measurement="lux", above=1000),
    )
    engine = RuleEngine([rule])
    assert feed(engine, [(0, {"on": True})], "light-1", "streetlight") == []


# ------------------------------------------------------------------ geofence

HOME = Circle(lat=48.8566, lon=2.3522, radius_m=500)
# Metres north of home, as degrees of latitude.
M = 1 / 111_195


def north(metres: float) -> dict[str, object]:
    return {"lat": HOME.lat + metres * M, "lon": HOME.lon}


def test_geofence_circle_leave_with_hysteresis() -> None:
    rule = GeofenceRule(name="left-home", circle=HOME, hysteresis_m=100)
    engine = RuleEngine([rule])
    steps: list[Step] = [
        (0, north(100)),
        (10, north(700)),
        (20, north(800)),
        (30, north(450)),
        (40, north(350)),
    ]
    decisions = feed(engine, steps, "tracker-1", "tracker")
    assert kinds(decisions) == [("AlertRaised", 10), ("AlertCleared", 40)]
    raised = decisions[0]
    assert raised.value == pytest.approx(200, abs=1)
    assert raised.threshold == 500
    assert raised.message == f"tracker-1 left left-home ({raised.value} m outside)"


def test_geofence_uses_latest_of_the_other_coordinate() -> None:
    engine = RuleEngine([GeofenceRule(name="left-home", circle=HOME)])
    feed(engine, [(0, north(0))], "tracker-1", "tracker")
    decisions = feed(engine, [(10, {"lat": HOME.lat + 600 * M})], "tracker-1", "tracker")
    assert [type(d) for d in decisions] == [AlertRaised]


def test_geofence_polygon_enter() -> None:
    depot = ((48.90, 2.30), (48.90, 2.31), (48.91, 2.31), (48.91, 2.30))
    engine = RuleEngine([GeofenceRule(name="at-depot", polygon=depot, mode="enter")])
    steps: list[Step] = [
        (0, {"lat": 48.85, "lon": 2.35}),
        (10, {"lat": 48.905, "lon": 2.305}),
        (20, {"lat": 48.906, "lon": 2.306}),
        (30, {"lat": 48.95, "lon": 2.305}),
    ]
    decisions = feed(engine, steps, "tracker-1", "tracker")
    assert kinds(decisions) == [("AlertRaised", 10), ("AlertCleared", 30)]
    # About 370 m from the nearest edge (west edge: 0.005 deg of longitude).
    assert decisions[0].value == pytest.approx(366, abs=5)


# ------------------------------------------------------------------ silence


def test_silence_with_a_given_interval_via_tick() -> None:
    engine = RuleEngine([SilenceRule(name="silent", interval=60, factor=3)])
    feed(engine, [(0, {"temp": 4.0})])
    assert engine.tick(100) == []
    assert engine.tick(180) == []
    decisions = engine.tick(181)
    assert kinds(decisions) == [("AlertRaised", 181)]
    assert decisions[0].message == "fridge-1 silent for 181.0 s (limit 180.0 s)"
    assert engine.tick(500) == []
    assert kinds(feed(engine, [(600, {"temp": 4.0})])) == [("AlertCleared", 600)]
    assert engine.tick(700) == []


def test_silence_from_the_observed_interval() -> None:
    engine = RuleEngine([SilenceRule(name="silent", factor=3)])
    assert engine.tick(10_000) == []  # no devices yet
    feed(engine, [(float(t), {"temp": 4.0}) for t in range(0, 150, 30)])  # last at 120
    assert engine.tick(120 + 90) == []
    assert kinds(engine.tick(120 + 91)) == [("AlertRaised", 211)]


def test_silence_is_not_fooled_by_a_burst() -> None:
    # A POST and the notifications of observed resources arrive together: 0.1 s apart.
    engine = RuleEngine([SilenceRule(name="silent", factor=3, min_interval=10)])
    feed(engine, [(0.0, {"temp": 4.0}), (0.1, {"door": False}), (0.2, {"temp": 4.1})])
    assert engine.tick(5) == []  # no interval known from a burst
    feed(engine, [(60.0, {"temp": 4.0}), (60.1, {"door": False})])
    assert engine.tick(60 + 179) == []  # interval 60 s: silent only past 180 s
    assert kinds(engine.tick(60 + 181)) == [("AlertRaised", 241)]


def test_silence_needs_an_interval() -> None:
    engine = RuleEngine([SilenceRule(name="silent")])
    feed(engine, [(0, {"temp": 4.0})])
    assert engine.tick(1_000_000) == []


def test_seen_at_start_up_neither_blames_devices_nor_clears_a_dead_one() -> None:
    rule = SilenceRule(name="silent", interval=60)
    engine = RuleEngine([rule])
    feed(engine, [(0, {"temp": 4.0})], device="dead")
    engine.tick(200)
    stored = engine.open_alerts()
    assert [a.device for a in stored] == ["dead"]

    # Restart an hour later: both devices last sent a reading long ago.
    restarted = RuleEngine([rule])
    assert restarted.restore_alerts(stored) == []
    restarted.seen("dead", "fridge", 3600)
    restarted.seen("alive", "fridge", 3600)
    assert restarted.tick(3601) == []
    assert [a.device for a in restarted.open_alerts()] == ["dead"]
    assert kinds(restarted.tick(3600 + 181)) == [("AlertRaised", 3781)]  # "alive" now silent
    assert kinds(feed(restarted, [(3800, {"temp": 4.0})], device="dead")) == [
        ("AlertCleared", 3800)
    ]


# ------------------------------------------------------------------ stock


def test_stock_add_update_remove_on_restock() -> None:
    rule = StockRule(name="groceries", minimums={"eggs": 6}, minimum=1)
    engine = RuleEngine([rule])
    assert feed(engine, [(0, {"stock_milk": 2, "stock_eggs": 10, "temp": 4.0})]) == []
    changes = feed(engine, [(10, {"stock_milk": 0, "stock_eggs": 4})])
    assert changes == [
        ShoppingListChanged(
            list_name="fridge-1",
            item="milk",
            action="added",
            level=0,
            minimum=1,
            device="fridge-1",
            at=10,
        ),
        ShoppingListChanged(
            list_name="fridge-1",
            item="eggs",
            action="added",
            level=4,
            minimum=6,
            device="fridge-1",
            at=10,
        ),
    ]
    assert feed(engine, [(20, {"stock_milk": 0, "stock_eggs": 4})]) == []
    (updated,) = feed(engine, [(30, {"stock_eggs": 2})])
    assert isinstance(updated, ShoppingListChanged) and updated.action == "updated"
    assert [i.item for i in engine.shopping_list("fridge-1")] == ["eggs", "milk"]
    assert engine.shopping_list("fridge-1")[0].level == 2
    (removed,) = feed(engine, [(40, {"stock_eggs": 12})])
    assert isinstance(removed, ShoppingListChanged)
    assert (removed.item, removed.action, removed.level) == ("eggs", "removed", 12)
    assert [i.item for i in engine.shopping_list("fridge-1")] == ["milk"]
    assert engine.shopping_lists() == ["fridge-1"]


def test_stock_shared_list_stays_until_every_device_restocks() -> None:
    engine = RuleEngine([StockRule(name="groceries", items=("milk",), list_name="home")])
    assert feed(engine, [(0, {"stock_milk": 0, "stock_beer": 0})], device="fridge-a") == [
        ShoppingListChanged(
            list_name="home",
            item="milk",
            action="added",
            level=0,
            minimum=1,
            device="fridge-a",
            at=0,
        )
    ]
    feed(engine, [(1, {"stock_milk": 0})], device="fridge-b")
    (change,) = feed(engine, [(2, {"stock_milk": 3})], device="fridge-a")
    assert isinstance(change, ShoppingListChanged) and change.action == "updated"
    assert engine.shopping_list("home")[0].levels == {"fridge-b": 0}
    (change,) = feed(engine, [(3, {"stock_milk": 3})], device="fridge-b")
    assert isinstance(change, ShoppingListChanged) and change.action == "removed"
    assert engine.shopping_list("home") == []


def test_stock_list_name_template_and_restore() -> None:
    engine = RuleEngine([StockRule(name="g", list_name="{device_type}-{device}")])
    feed(engine, [(0, {"stock_butter": 0, "stock_milk": 1.5})])
    items = engine.shopping_list("fridge-fridge-1")
    assert [(i.item, i.level) for i in items] == [("butter", 0)]
    restarted = RuleEngine(engine.rules)
    restarted.restore_shopping_lists(items)
    (change,) = feed(restarted, [(5, {"stock_butter": 2})])
    assert isinstance(change, ShoppingListChanged) and change.action == "removed"


# ------------------------------------------------------------------ persistence


def test_open_alerts_survive_a_restart_and_clear_later() -> None:
    rules: list[RuleConfig] = [warm(for_seconds=0, renotify_interval=600)]
    engine = RuleEngine(rules)
    feed(engine, [(0, {"temp": 12.0})])
    stored = engine.open_alerts()
    assert stored == [
        OpenAlert(
            rule="fridge-warm",
            device="fridge-1",
            device_type="fridge",
            raised_at=0,
            last_notified_at=0,
            notify_count=1,
            value=12.0,
            threshold=8.0,
            message="fridge-1: temp 12.0 is above 8.0",
        )
    ]
    gone = OpenAlert(
        rule="deleted-rule",
        device="fridge-1",
        device_type="fridge",
        raised_at=0,
        last_notified_at=0,
        notify_count=1,
        value=1,
        threshold=None,
        message="",
    )
    restarted = RuleEngine(rules)
    assert restarted.restore_alerts([*stored, gone]) == [gone]
    # Still open: a warm reading raises nothing new (one open alert per rule and device).
    assert feed(restarted, [(100, {"temp": 12.0})]) == []
    assert kinds(feed(restarted, [(600, {"temp": 12.0})])) == [("AlertRenotified", 600)]
    (cleared,) = feed(restarted, [(700, {"temp": 3.0})])
    assert isinstance(cleared, AlertCleared) and cleared.raised_at == 0


def test_snapshot_by_deepcopy_continues_identically() -> None:
    rules: list[RuleConfig] = [warm(), door_rule(), SilenceRule(name="silent", interval=30)]
    engine = RuleEngine(rules)
    feed(engine, [(float(t), {"temp": 9.0 + t / 100}) for t in range(0, 200, 20)])
    twin = RuleEngine(rules, state=copy.deepcopy(engine.state))
    later: list[Step] = [(float(t), {"temp": 9.0 + t / 100}) for t in range(200, 400, 20)]
    assert feed(engine, later) == feed(twin, later)
    assert engine.tick(1000) == twin.tick(1000)


def test_forget_device_clears_its_alerts_and_list_items() -> None:
    engine = RuleEngine([warm(for_seconds=0), StockRule(name="g")])
    feed(engine, [(0, {"temp": 12.0, "stock_milk": 0})])
    decisions = engine.forget_device("fridge-1", 50)
    assert [type(d) for d in decisions] == [AlertCleared, ShoppingListChanged]
    assert engine.open_alerts() == [] and engine.shopping_lists() == []
    assert engine.tick(10_000) == []


def test_list_item_is_plain_data() -> None:
    item = ListItem(
        list_name="home", item="milk", level=0, minimum=1, levels={"f": 0}, added_at=1, updated_at=2
    )
    assert copy.deepcopy(item) == item
