"""Rule configuration: validation with named keys, and the shipped example."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import pytest

from gateway.core.rules import (
    Circle,
    GeofenceRule,
    RuleConfig,
    RuleEngine,
    ShoppingListChanged,
    StateRule,
    StockRule,
    ThresholdRule,
    check_rules,
    rules_from_config,
)
from gateway.errors import ConfigError

EXAMPLE = Path(__file__).resolve().parents[2] / "docs" / "examples" / "gateway.toml"

#: Measurements per device type, as the wire contract defines them.
MEASUREMENTS = {
    "fridge": {"temp", "setpoint", "door", "compressor", "door_alarm"},
    "tracker": {"lat", "lon", "speed", "heading", "battery"},
    "streetlight": {"on", "dim", "power", "lux", "lamp_ok"},
}


def load(text: str) -> tuple[RuleConfig, ...]:
    return rules_from_config(tomllib.loads(text)["rules"])


def test_toml_tables_become_typed_rules() -> None:
    rules = load(
        """
        [[rules]]
        kind = "threshold"
        name = "warm"
        device_types = ["fridge"]
        measurement = "temp"
        above = 8
        [[rules]]
        kind = "geofence"
        name = "home"
        polygon = [[48.85, 2.34], [48.85, 2.36], [48.86, 2.35]]
        [[rules]]
        kind = "stock"
        name = "groceries"
        list = "home"
        minimums = { eggs = 6 }
        """
    )
    warm, home, groceries = rules
    assert warm == ThresholdRule(
        name="warm", device_types=("fridge",), measurement="temp", above=8.0
    )
    assert isinstance(warm.above, float)
    assert isinstance(home, GeofenceRule) and home.polygon[2] == (48.86, 2.35)
    assert isinstance(groceries, StockRule)
    assert (groceries.list_name, groceries.minimums) == ("home", {"eggs": 6})


T = 'kind = "threshold"\nname = "x"\nmeasurement = "t"\n'
S = 'kind = "state"\nname = "x"\nmeasurement = "on"\nequals = true\n'
G = 'kind = "geofence"\nname = "x"\n'
C = "circle = { lat = 1, lon = 2, radius_m = 5 }"


@pytest.mark.parametrize(
    ("table", "key"),
    [
        ('name = "x"\nmeasurement = "temp"\nabove = 1', "rules[0].kind"),
        ('kind = "magic"\nname = "x"', "rules[0].kind"),
        (T + "abve = 1", "rules[0].abve"),
        (T + 'above = "hot"', "rules[0].above"),
        ('kind = "threshold"\nname = "x"\nabove = 1', "rules[0].measurement"),
        (T, "rules[0].above"),
        (T + "above = 1\nbelow = 0", "rules[0].above"),
        (T + "above = 1\nhysteresis = -1", "rules[0].hysteresis"),
        (T + "above = 1\nfor_seconds = -5", "rules[0].for_seconds"),
        (T + 'above = 1\nseverity = "doom"', "rules[0].severity"),
        (T + 'above = 1\nmessage = "{oops}"', "rules[0].message"),
        (T + 'above = 1\nclear_message = "{"', "rules[0].clear_message"),
        ('kind = "rate"\nname = "x"\nmeasurement = "t"\nper_minute = 0', "rules[0].per_minute"),
        (
            'kind = "rate"\nname = "x"\nmeasurement = "t"\nper_minute = 1\nwindow = 0',
            "rules[0].window",
        ),
        (S + 'when = { measurement = "lux" }', "rules[0].when"),
        (S + 'when = { measurement = "lux", abov = 1 }', "rules[0].when.abov"),
        (G, "rules[0].circle"),
        (G + "circle = { lat = 1, lon = 2, radius = 5 }", "rules[0].circle.radius"),
        (G + "circle = { lat = 1, lon = 2, radius_m = 0 }", "rules[0].circle.radius_m"),
        (G + "circle = { lat = 91, lon = 2, radius_m = 5 }", "rules[0].circle"),
        (G + C + "\npolygon = [[1, 2], [3, 4], [5, 6]]", "rules[0].circle"),
        (G + "polygon = [[1, 2], [3, 4]]", "rules[0].polygon"),
        (G + "polygon = [[1, 2, 3], [3, 4], [5, 6]]", "rules[0].polygon[0]"),
        (G + 'mode = "hover"\n' + C, "rules[0].mode"),
        ('kind = "silence"\nname = "x"\nfactor = 0.5', "rules[0].factor"),
        ('kind = "silence"\nname = "x"\ninterval = 0', "rules[0].interval"),
        ('kind = "stock"\nname = "x"\nminimums = { milk = -1 }', "rules[0].minimums.milk"),
        ('kind = "stock"\nname = "x"\nlist = "{owner}"', "rules[0].list"),
        ('kind = "stock"\nname = "x"\nfor_seconds = 5', "rules[0].for_seconds"),
        ('kind = "silence"\nname = ""', "rules[0].name"),
        ('kind = "silence"\nname = "x"\ndevice_types = []', "rules[0].device_types"),
    ],
)
def test_bad_rules_name_the_key(table: str, key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load("[[rules]]\n" + table)
    assert caught.value.key == key, str(caught.value)


def test_duplicate_names_and_non_tables() -> None:
    with pytest.raises(ConfigError) as caught:
        load('[[rules]]\nkind = "silence"\nname = "a"\n[[rules]]\nkind = "silence"\nname = "a"')
    assert caught.value.key == "rules[1].name"
    with pytest.raises(ConfigError) as caught:
        rules_from_config([{"kind": "silence", "name": "a"}, 3])
    assert caught.value.key == "rules[1]"
    with pytest.raises(ConfigError) as caught:
        rules_from_config({"kind": "silence"})
    assert caught.value.key == "rules"


def test_engine_checks_rules_built_in_code() -> None:
    with pytest.raises(ConfigError) as caught:
        RuleEngine([ThresholdRule(name="x", measurement="t")])
    assert caught.value.key == "rules[0].above"
    check_rules([GeofenceRule(name="g", circle=Circle(lat=0, lon=0, radius_m=1))])


def test_rules_fit_a_frozen_config_through_one_msgspec_convert() -> None:
    @dataclass(frozen=True)
    class Config:
        rules: tuple[RuleConfig, ...] = ()

    data: dict[str, Any] = {
        "rules": [{"kind": "state", "name": "lamp", "measurement": "lamp_ok", "equals": False}]
    }
    config = msgspec.convert(data, Config)
    assert config.rules == (StateRule(name="lamp", measurement="lamp_ok", equals=False),)
    assert msgspec.convert({}, Config).rules == ()
    with pytest.raises(msgspec.ValidationError, match=r"\$\.rules\[0\]"):
        msgspec.convert({"rules": [{"kind": "state", "name": "x", "typo": 1}]}, Config)


def test_example_configuration_is_valid_and_uses_contract_measurements() -> None:
    with EXAMPLE.open("rb") as fh:
        rules = rules_from_config(tomllib.load(fh)["rules"])
    names = {rule.name for rule in rules}
    assert {
        "fridge-warm",
        "fridge-door-left-open",
        "fridge-door-alarm",
        "fridge-groceries",
        "tracker-battery-low",
        "tracker-left-home",
        "streetlight-lamp-failure",
        "streetlight-on-in-daylight",
        "device-silent",
    } <= names
    for rule in rules:
        used: set[str] = set()
        if isinstance(rule, ThresholdRule | StateRule) or hasattr(rule, "measurement"):
            used.add(rule.measurement)  # type: ignore[union-attr]
        if isinstance(rule, StateRule) and rule.when is not None:
            used.add(rule.when.measurement)
        if isinstance(rule, GeofenceRule):
            used |= {rule.lat, rule.lon}
        for device_type in rule.device_types:
            if device_type != "*":
                assert used <= MEASUREMENTS[device_type], rule.name
    home = next(r for r in rules if r.name == "tracker-left-home")
    assert isinstance(home, GeofenceRule)
    # The simulator's default tracker home point.
    assert home.circle == Circle(lat=52.52, lon=13.405, radius_m=500)


def test_example_rules_over_a_short_fridge_story() -> None:
    with EXAMPLE.open("rb") as fh:
        engine = RuleEngine(rules_from_config(tomllib.load(fh)["rules"]))
    decisions = []
    for t in range(0, 600, 30):
        values = {"temp": 4.0, "door": False, "stock_milk": 3, "stock_eggs": 12}
        decisions += engine.evaluate(values, "fridge-1", "fridge", float(t))
    assert decisions == []
    # The milk runs low; then the door is left open and the fridge warms up.
    decisions += engine.evaluate({"temp": 4.0, "stock_milk": 1}, "fridge-1", "fridge", 600.0)
    for t in range(630, 1500, 30):
        temp = 4.0 + (t - 600) / 60
        decisions += engine.evaluate({"temp": temp, "door": True}, "fridge-1", "fridge", float(t))
    rules_fired = [getattr(d, "rule", None) for d in decisions]
    assert rules_fired.count("fridge-door-left-open") == 1
    assert rules_fired.count("fridge-warm") == 1
    assert [d.item for d in decisions if isinstance(d, ShoppingListChanged)] == ["milk"]
    assert engine.shopping_list("fridge-1")[0].minimum == 2
    # Then it goes quiet: the silence rule fires once from tick.
    fired = engine.tick(1470 + 3 * 30 + 1)
    assert [getattr(d, "rule", None) for d in fired] == ["device-silent"]
