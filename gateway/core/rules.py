"""Rules over readings: configuration, validation and a pure engine.

The engine is fed values and times and returns decisions; it never reads a clock, a socket or
the database. The shell calls `RuleEngine.evaluate` with every committed reading, `tick(now)`
every second or so (for silence, and for conditions that become due without a new reading),
then stores and relays the returned `AlertRaised`, `AlertRenotified`, `AlertCleared` and
`ShoppingListChanged` values. All times are epoch seconds on one clock: pass the gateway's
receive time as `at`, the same clock as `tick(now)`.

Rules are `msgspec.Struct`s rather than dataclasses because msgspec converts a tagged union of
Structs (``kind = "threshold"``) but refuses a union of dataclasses; so ``rules:
tuple[RuleConfig, ...]`` can sit in the frozen config and go through one `msgspec.convert`.
`check_rules` adds the checks types cannot express and names the offending key.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any, ClassVar, Literal

import msgspec

from gateway.core import geo
from gateway.core.alerts import (
    Action,
    AlertCleared,
    AlertEvent,
    AlertRaised,
    AlertRenotified,
    AlertState,
    OpenAlert,
    Phase,
    Value,
    step,
)
from gateway.core.shopping import ListItem, ShoppingListChanged, ShoppingLists
from gateway.errors import ConfigError

__all__ = [
    "AlertCleared",
    "AlertEvent",
    "AlertRaised",
    "AlertRenotified",
    "Circle",
    "Condition",
    "Decision",
    "EngineState",
    "GeofenceRule",
    "ListItem",
    "OpenAlert",
    "RateRule",
    "RuleConfig",
    "RuleEngine",
    "ShoppingListChanged",
    "SilenceRule",
    "StateRule",
    "StockRule",
    "ThresholdRule",
    "check_rules",
    "rules_from_config",
]

Severity = Literal["info", "warning", "critical"]

#: Names a message template may use.
MESSAGE_FIELDS = (
    "rule",
    "kind",
    "device",
    "device_type",
    "severity",
    "measurement",
    "value",
    "threshold",
)
#: Names a shopping list name template may use.
LIST_FIELDS = ("device", "device_type", "rule")

#: Recent gaps between a device's readings kept to estimate its interval (median).
_GAPS_KEPT = 8
#: Readings closer together than this are one burst, not an interval.
_MIN_GAP = 1.0
#: Bound on samples kept per rate rule and device, whatever the window.
_MAX_RATE_SAMPLES = 256


# --------------------------------------------------------------------------- configuration


class _RuleBase(
    msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, tag_field="kind"
):
    kind: ClassVar[str]
    name: str
    #: Device types the rule applies to; each entry is a glob ("*" = all).
    device_types: tuple[str, ...] = ("*",)
    #: Glob on the device name.
    devices: str = "*"


class _AlertRuleBase(_RuleBase, frozen=True, kw_only=True):
    severity: Severity = "warning"
    #: Template for raise and re-notify messages; empty = a default for the kind.
    message: str = ""
    clear_message: str = ""
    #: Re-notify an open alert at most this often, in seconds (0 = never).
    renotify_interval: float = 0.0
    #: The condition must hold this long before the alert is raised, in seconds.
    for_seconds: float = 0.0


class ThresholdRule(_AlertRuleBase, frozen=True, kw_only=True, tag="threshold"):
    """A measurement above (or below) a limit; clears past the limit minus the hysteresis."""

    kind: ClassVar[str] = "threshold"
    measurement: str
    above: float | None = None
    below: float | None = None
    hysteresis: float = 0.0


class RateRule(_AlertRuleBase, frozen=True, kw_only=True, tag="rate"):
    """A measurement changing faster than `per_minute`, as a least-squares slope over `window`."""

    kind: ClassVar[str] = "rate"
    measurement: str
    per_minute: float
    direction: Literal["rising", "falling", "either"] = "rising"
    #: Seconds of samples the slope is fitted over; judged once they span half of it.
    window: float = 60.0
    hysteresis: float = 0.0


class Condition(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A second measurement a state rule also requires (all given bounds must hold)."""

    measurement: str
    above: float | None = None
    below: float | None = None
    equals: bool | int | float | str | None = None


class StateRule(_AlertRuleBase, frozen=True, kw_only=True, tag="state"):
    """A measurement equal to a value, optionally while another measurement meets `when`."""

    kind: ClassVar[str] = "state"
    measurement: str
    equals: bool | int | float | str
    when: Condition | None = None


class Circle(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    lat: float
    lon: float
    radius_m: float


class GeofenceRule(_AlertRuleBase, frozen=True, kw_only=True, tag="geofence"):
    """A position leaving (or entering) a circle or polygon; the value is metres past the edge."""

    kind: ClassVar[str] = "geofence"
    mode: Literal["leave", "enter"] = "leave"
    circle: Circle | None = None
    #: Vertices as [lat, lon]; the ring closes itself.
    polygon: tuple[tuple[float, float], ...] = ()
    #: Once raised, the alert clears only this many metres back on the other side.
    hysteresis_m: float = 0.0
    lat: str = "lat"
    lon: str = "lon"


class SilenceRule(_AlertRuleBase, frozen=True, kw_only=True, tag="silence"):
    """No reading for `factor` x the device's interval (given, or the observed median)."""

    kind: ClassVar[str] = "silence"
    interval: float | None = None
    factor: float = 3.0
    #: Floor of an observed interval: a burst (a POST and the notifications of the device's
    #: observed resources arriving together) is not the device's reporting interval.
    min_interval: float = 10.0


class StockRule(_RuleBase, frozen=True, kw_only=True, tag="stock"):
    """``<prefix><item>`` below its minimum puts the item on a shopping list."""

    kind: ClassVar[str] = "stock"
    prefix: str = "stock_"
    minimum: int = 1
    #: Per-item minimums (item name without the prefix); others use `minimum`.
    minimums: dict[str, int] = msgspec.field(default_factory=dict)
    #: Only these items (without the prefix); empty = every item with the prefix.
    items: tuple[str, ...] = ()
    #: List name template (fields: device, device_type, rule).
    list_name: str = msgspec.field(default="{device}", name="list")


RuleConfig = ThresholdRule | RateRule | StateRule | GeofenceRule | SilenceRule | StockRule
AlertRule = ThresholdRule | RateRule | StateRule | GeofenceRule | SilenceRule


def _template_ok(template: str, names: Sequence[str], key: str) -> None:
    dummy: dict[str, Any] = {name: 1.0 for name in names}
    for name in ("rule", "kind", "device", "device_type", "severity", "measurement"):
        if name in dummy:
            dummy[name] = "x"
    try:
        template.format(**dummy)
    except (KeyError, IndexError, ValueError, AttributeError, TypeError) as exc:
        fields = ", ".join(names)
        raise ConfigError(
            f"{key}: bad template {template!r} ({exc!r}); fields are {fields}", key=key
        ) from exc


def _check_one(rule: RuleConfig, where: str) -> None:
    def fail(key: str, text: str) -> ConfigError:
        return ConfigError(f"{where}.{key}: {text}", key=f"{where}.{key}")

    if not rule.name:
        raise fail("name", "must not be empty")
    if not rule.device_types:
        raise fail("device_types", "must list at least one type (or '*')")
    if isinstance(rule, StockRule):
        if not rule.prefix:
            raise fail("prefix", "must not be empty")
        if rule.minimum < 0:
            raise fail("minimum", "must be >= 0")
        for item, minimum in rule.minimums.items():
            if minimum < 0:
                raise fail(f"minimums.{item}", "must be >= 0")
        _template_ok(rule.list_name, LIST_FIELDS, f"{where}.list")
        return
    if rule.for_seconds < 0:
        raise fail("for_seconds", "must be >= 0")
    if rule.renotify_interval < 0:
        raise fail("renotify_interval", "must be >= 0 (0 = never)")
    _template_ok(rule.message, MESSAGE_FIELDS, f"{where}.message")
    _template_ok(rule.clear_message, MESSAGE_FIELDS, f"{where}.clear_message")
    if isinstance(rule, ThresholdRule):
        if (rule.above is None) == (rule.below is None):
            raise fail("above", "give exactly one of 'above' or 'below'")
        if rule.hysteresis < 0:
            raise fail("hysteresis", "must be >= 0")
    elif isinstance(rule, RateRule):
        if not rule.per_minute > 0:
            raise fail("per_minute", "must be > 0 (use direction for falling)")
        if not rule.window > 0:
            raise fail("window", "must be > 0 seconds")
        if not 0 <= rule.hysteresis < rule.per_minute:
            raise fail("hysteresis", "must be >= 0 and below per_minute")
    elif isinstance(rule, StateRule):
        when = rule.when
        if when is not None and when.above is None and when.below is None and when.equals is None:
            raise fail("when", "needs at least one of 'above', 'below', 'equals'")
    elif isinstance(rule, GeofenceRule):
        if (rule.circle is None) == (not rule.polygon):
            raise fail("circle", "give exactly one of 'circle' or 'polygon'")
        points = [(rule.circle.lat, rule.circle.lon)] if rule.circle else list(rule.polygon)
        for index, (lat, lon) in enumerate(points):
            if not (-90 <= lat <= 90 and -180 <= lon <= 180):
                name = "circle" if rule.circle else f"polygon[{index}]"
                raise fail(name, "latitude must be within [-90, 90], longitude [-180, 180]")
        if rule.circle is not None and not rule.circle.radius_m > 0:
            raise fail("circle.radius_m", "must be > 0")
        if rule.polygon and len(rule.polygon) < 3:
            raise fail("polygon", "needs at least 3 points")
        if rule.hysteresis_m < 0:
            raise fail("hysteresis_m", "must be >= 0")
    elif isinstance(rule, SilenceRule):
        if rule.interval is not None and not rule.interval > 0:
            raise fail("interval", "must be > 0 seconds")
        if not rule.factor >= 1:
            raise fail("factor", "must be >= 1")


def check_rules(rules: Sequence[RuleConfig], *, prefix: str = "rules") -> None:
    """Checks types cannot express; raise `ConfigError` naming the key, e.g. ``rules[2].above``."""
    seen: dict[str, int] = {}
    for index, rule in enumerate(rules):
        where = f"{prefix}[{index}]"
        if rule.name in seen:
            raise ConfigError(
                f"{where}.name: duplicate rule name {rule.name!r}"
                f" (also {prefix}[{seen[rule.name]}])",
                key=f"{where}.name",
            )
        seen[rule.name] = index
        _check_one(rule, where)


def _key_from_msgspec(text: str, where: str) -> str:
    # msgspec says e.g. "Object contains unknown field `abve` - at `$.circle`".
    path = ""
    if " - at `$" in text:
        path = text.rsplit(" - at `$", 1)[1].rstrip("`")
    for marker in ("unknown field `", "missing required field `"):
        if marker in text:
            path += "." + text.split(marker, 1)[1].split("`", 1)[0]
            break
    return where + path


def rules_from_config(items: Any, *, prefix: str = "rules") -> tuple[RuleConfig, ...]:
    """Validate parsed TOML ``[[rules]]`` tables into rules; a `ConfigError` names the key."""
    if not isinstance(items, list | tuple):
        raise ConfigError(f"{prefix}: must be a list of tables ([[{prefix}]])", key=prefix)
    rules: list[RuleConfig] = []
    for index, item in enumerate(items):
        where = f"{prefix}[{index}]"
        if not isinstance(item, Mapping):
            raise ConfigError(f"{where}: must be a table", key=where)
        try:
            rules.append(msgspec.convert(dict(item), RuleConfig))
        except msgspec.ValidationError as exc:
            key = _key_from_msgspec(str(exc), where)
            raise ConfigError(f"invalid rule {where}: {exc}", key=key) from exc
    check_rules(rules, prefix=prefix)
    return tuple(rules)


# --------------------------------------------------------------------------- engine state

Decision = AlertRaised | AlertRenotified | AlertCleared | ShoppingListChanged


@dataclass
class DeviceState:
    device_type: str
    #: Time of the device's latest reading (or sign of life given to `seen`).
    last_seen: float | None = None
    #: Recent gaps between readings, oldest first; their median is the observed interval.
    gaps: list[float] = field(default_factory=list)
    #: Latest value of every measurement a state or geofence rule reads across readings.
    latest: dict[str, Value] = field(default_factory=dict)


@dataclass
class EngineState:
    """Everything the engine remembers; plain data, so `copy.deepcopy` snapshots it."""

    #: (rule name, device) -> lifecycle state.
    alerts: dict[tuple[str, str], AlertState] = field(default_factory=dict)
    #: (rule name, device) -> rate samples (time, value), oldest first.
    samples: dict[tuple[str, str], list[tuple[float, float]]] = field(default_factory=dict)
    devices: dict[str, DeviceState] = field(default_factory=dict)
    lists: ShoppingLists = field(default_factory=ShoppingLists)


@dataclass(frozen=True)
class _Observation:
    active: bool
    value: Value | None
    threshold: Value | None


def _number(value: Value | None) -> float | None:
    """Numbers only: a bool is not a temperature, however Python counts it."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _equal(value: Value, expected: Value) -> bool:
    if isinstance(expected, bool) or isinstance(value, bool):
        return isinstance(value, bool) and isinstance(expected, bool) and value is expected
    if isinstance(expected, str) or isinstance(value, str):
        return value == expected
    return float(value) == float(expected)


def _condition_holds(cond: Condition, value: Value) -> bool:
    if cond.equals is not None and not _equal(value, cond.equals):
        return False
    if cond.above is None and cond.below is None:
        return True
    number = _number(value)
    if number is None:
        return False
    if cond.above is not None and not number > cond.above:
        return False
    return cond.below is None or number < cond.below


def _slope_per_minute(samples: Sequence[tuple[float, float]]) -> float:
    mean_t = sum(t for t, _ in samples) / len(samples)
    mean_v = sum(v for _, v in samples) / len(samples)
    num = sum((t - mean_t) * (v - mean_v) for t, v in samples)
    den = sum((t - mean_t) ** 2 for t, _ in samples)
    return 60.0 * num / den


def _measurement(rule: AlertRule) -> str | None:
    if isinstance(rule, ThresholdRule | RateRule | StateRule):
        return rule.measurement
    if isinstance(rule, GeofenceRule):
        return f"{rule.lat},{rule.lon}"
    return None


def _default_message(rule: AlertRule) -> str:
    if isinstance(rule, ThresholdRule):
        side = "above" if rule.above is not None else "below"
        return f"{{device}}: {{measurement}} {{value}} is {side} {{threshold}}"
    if isinstance(rule, RateRule):
        return "{device}: {measurement} changing {value}/min (limit {threshold}/min)"
    if isinstance(rule, StateRule):
        return "{device}: {measurement} is {value}"
    if isinstance(rule, GeofenceRule):
        if rule.mode == "leave":
            return "{device} left {rule} ({value} m outside)"
        return "{device} entered {rule} ({value} m inside)"
    return "{device} silent for {value} s (limit {threshold} s)"


def _render(template: str, fallback: str, fields: Mapping[str, Any]) -> str:
    for candidate in (template, fallback):
        if not candidate:
            continue
        try:
            return candidate.format(**fields)
        except (KeyError, IndexError, ValueError, AttributeError, TypeError):
            # A valid template can still fail on a value of another type ({value:.1f} on
            # a string): fall back rather than lose the alert.
            continue
    return "{rule} on {device}".format(**fields)


# --------------------------------------------------------------------------- engine


class RuleEngine:
    """Evaluates rules over readings and time; returns decisions, keeps explicit state.

    One open alert per rule and device, by construction: the lifecycle state is keyed by
    (rule name, device) and only the idle -> raised move announces a raise.
    """

    def __init__(self, rules: Iterable[RuleConfig], *, state: EngineState | None = None) -> None:
        self._rules: tuple[RuleConfig, ...] = tuple(rules)
        check_rules(self._rules)
        self._by_name = {rule.name: rule for rule in self._rules}
        self._state = state if state is not None else EngineState()
        self._matching_cache: dict[tuple[str, str], tuple[RuleConfig, ...]] = {}
        remembered: set[str] = set()
        for rule in self._rules:
            if isinstance(rule, StateRule):
                remembered.add(rule.measurement)
                if rule.when is not None:
                    remembered.add(rule.when.measurement)
            elif isinstance(rule, GeofenceRule):
                remembered.update((rule.lat, rule.lon))
        self._remembered = frozenset(remembered)

    @property
    def rules(self) -> tuple[RuleConfig, ...]:
        return self._rules

    @property
    def state(self) -> EngineState:
        """The live state (deep-copy it to snapshot; pass it as `state=` to restore)."""
        return self._state

    def matching(self, device: str, device_type: str) -> tuple[RuleConfig, ...]:
        """The rules that apply to a device, in configuration order."""
        key = (device, device_type)
        found = self._matching_cache.get(key)
        if found is None:
            found = tuple(
                rule
                for rule in self._rules
                if fnmatchcase(device, rule.devices)
                and any(fnmatchcase(device_type, pattern) for pattern in rule.device_types)
            )
            self._matching_cache[key] = found
        return found

    # -- inputs

    def evaluate(
        self, values: Mapping[str, Value], device: str, device_type: str, at: float
    ) -> list[Decision]:
        """Judge one committed reading (measurement -> value) of `device` taken at `at`."""
        dev = self._device(device, device_type)
        previous_seen = dev.last_seen
        self._note_seen(dev, at)
        dev.latest.update({k: v for k, v in values.items() if k in self._remembered})
        decisions: list[Decision] = []
        for rule in self.matching(device, device_type):
            if isinstance(rule, StockRule):
                decisions.extend(self._stock(rule, values, device, device_type, at))
                continue
            state = self._alert_state(rule.name, device, device_type)
            if state.last_at is not None and at < state.last_at:
                continue  # older than what this rule already judged: out of order
            observation = self._observe(rule, values, dev, state, device, at, previous_seen)
            state.last_at = at
            if observation is not None:
                decisions.extend(self._apply(rule, device, state, observation, at))
        return decisions

    def tick(self, now: float) -> list[Decision]:
        """Advance time: raise what has been pending long enough, re-notify, detect silence."""
        decisions: list[Decision] = []
        for (rule_name, device), state in list(self._state.alerts.items()):
            rule = self._by_name.get(rule_name)
            if rule is None or isinstance(rule, StockRule) or state.phase is Phase.IDLE:
                continue
            if isinstance(rule, SilenceRule) and device in self._state.devices:
                continue  # judged below, from the device's last reading
            if state.last_at is not None and now < state.last_at:
                continue
            # No news is the last news: the condition is taken to hold still.
            held = _Observation(True, state.value, state.threshold)
            decisions.extend(self._apply(rule, device, state, held, now))
        for device, dev in list(self._state.devices.items()):
            for rule in self.matching(device, dev.device_type):
                if isinstance(rule, SilenceRule):
                    state = self._alert_state(rule.name, device, dev.device_type)
                    silence = self._silence_at(rule, dev, state, now)
                    if silence is not None:
                        decisions.extend(self._apply(rule, device, state, silence, now))
        return decisions

    def seen(
        self, device: str, device_type: str, at: float, *, interval: float | None = None
    ) -> None:
        """A sign of life without a reading: registration, or start-up for known devices.

        Calling it for every known device at start-up keeps the gateway's own downtime from
        being blamed on the devices. `interval` seeds the observed interval, if none yet.
        """
        dev = self._device(device, device_type)
        if dev.last_seen is None or at > dev.last_seen:
            dev.last_seen = at
        if interval is not None and interval > 0 and not dev.gaps:
            dev.gaps.append(interval)

    def forget_device(self, device: str, at: float) -> list[Decision]:
        """The device is gone (deregistered, deleted): clear its alerts, drop its list items."""
        decisions: list[Decision] = []
        for (rule_name, name), state in list(self._state.alerts.items()):
            if name != device:
                continue
            rule = self._by_name.get(rule_name)
            if state.phase is Phase.RAISED and rule is not None and not isinstance(rule, StockRule):
                observation = _Observation(False, state.value, state.threshold)
                decisions.extend(self._apply(rule, device, state, observation, at))
            del self._state.alerts[(rule_name, name)]
            self._state.samples.pop((rule_name, name), None)
        self._state.devices.pop(device, None)
        decisions.extend(self._state.lists.forget_device(device, at))
        self._matching_cache = {k: v for k, v in self._matching_cache.items() if k[0] != device}
        return decisions

    # -- persistence

    def open_alerts(self) -> list[OpenAlert]:
        """Raised, uncleared alerts, for the shell to store and to restore after a restart."""
        return [
            OpenAlert(
                rule=rule_name,
                device=device,
                device_type=state.device_type,
                raised_at=state.raised_at,
                last_notified_at=(
                    state.last_notified_at
                    if state.last_notified_at is not None
                    else state.raised_at
                ),
                notify_count=state.notify_count,
                value=state.value,
                threshold=state.threshold,
                message=state.message,
            )
            for (rule_name, device), state in self._state.alerts.items()
            if state.phase is Phase.RAISED and state.raised_at is not None
        ]

    def restore_alerts(self, alerts: Iterable[OpenAlert]) -> list[OpenAlert]:
        """Seed open alerts from storage; return those no current rule covers (close them)."""
        orphans: list[OpenAlert] = []
        for alert in alerts:
            rule = self._by_name.get(alert.rule)
            if (
                rule is None
                or isinstance(rule, StockRule)
                or rule not in self.matching(alert.device, alert.device_type)
            ):
                orphans.append(alert)
                continue
            state = self._alert_state(alert.rule, alert.device, alert.device_type)
            state.phase = Phase.RAISED
            state.since = state.raised_at = alert.raised_at
            state.last_notified_at = alert.last_notified_at
            state.notify_count = alert.notify_count
            state.value = alert.value
            state.threshold = alert.threshold
            state.message = alert.message
        return orphans

    # -- shopping lists

    def shopping_list(self, name: str) -> list[ListItem]:
        return self._state.lists.items(name)

    def shopping_lists(self) -> list[str]:
        return self._state.lists.names()

    def restore_shopping_lists(self, items: Iterable[ListItem]) -> None:
        self._state.lists.restore(items)

    # -- internals

    def _device(self, device: str, device_type: str) -> DeviceState:
        dev = self._state.devices.get(device)
        if dev is None:
            dev = self._state.devices[device] = DeviceState(device_type)
        elif dev.device_type != device_type:
            dev.device_type = device_type
        return dev

    @staticmethod
    def _note_seen(dev: DeviceState, at: float) -> None:
        if dev.last_seen is not None and at - dev.last_seen >= _MIN_GAP:
            dev.gaps.append(at - dev.last_seen)
            del dev.gaps[:-_GAPS_KEPT]
        if dev.last_seen is None or at > dev.last_seen:
            dev.last_seen = at

    def _alert_state(self, rule: str, device: str, device_type: str) -> AlertState:
        state = self._state.alerts.get((rule, device))
        if state is None:
            state = self._state.alerts[(rule, device)] = AlertState(device_type=device_type)
        state.device_type = device_type
        return state

    def _observe(
        self,
        rule: AlertRule,
        values: Mapping[str, Value],
        dev: DeviceState,
        state: AlertState,
        device: str,
        at: float,
        previous_seen: float | None,
    ) -> _Observation | None:
        was_active = state.active
        if isinstance(rule, ThresholdRule):
            number = _number(values.get(rule.measurement))
            if number is None:
                return None
            if rule.above is not None:
                limit = rule.above - rule.hysteresis if was_active else rule.above
                return _Observation(number > limit, values[rule.measurement], rule.above)
            assert rule.below is not None
            limit = rule.below + rule.hysteresis if was_active else rule.below
            return _Observation(number < limit, values[rule.measurement], rule.below)
        if isinstance(rule, RateRule):
            return self._rate(rule, values, device, was_active, at)
        if isinstance(rule, StateRule):
            if rule.measurement not in values and (
                rule.when is None or rule.when.measurement not in values
            ):
                return None
            value = dev.latest.get(rule.measurement)
            if value is None:
                return None
            active = _equal(value, rule.equals)
            if rule.when is not None:
                other = dev.latest.get(rule.when.measurement)
                if other is None:
                    return None
                active = active and _condition_holds(rule.when, other)
            return _Observation(active, value, rule.equals)
        if isinstance(rule, GeofenceRule):
            if rule.lat not in values and rule.lon not in values:
                return None
            lat = _number(dev.latest.get(rule.lat))
            lon = _number(dev.latest.get(rule.lon))
            if lat is None or lon is None:
                return None
            if rule.circle is not None:
                c = rule.circle
                outside = geo.outside_distance_circle_m(lat, lon, c.lat, c.lon, c.radius_m)
            else:
                outside = geo.outside_distance_polygon_m(lat, lon, rule.polygon)
            past_edge = outside if rule.mode == "leave" else -outside
            limit = -rule.hysteresis_m if was_active else 0.0
            threshold = rule.circle.radius_m if rule.circle is not None else None
            return _Observation(past_edge > limit, round(past_edge, 1), threshold)
        # Silence: a reading is the end of any silence.
        gap = round(float(at - previous_seen), 1) if previous_seen is not None else 0.0
        return _Observation(False, gap, state.threshold)

    def _rate(
        self,
        rule: RateRule,
        values: Mapping[str, Value],
        device: str,
        was_active: bool,
        at: float,
    ) -> _Observation | None:
        number = _number(values.get(rule.measurement))
        if number is None:
            return None
        samples = self._state.samples.setdefault((rule.name, device), [])
        if samples and samples[-1][0] == at:
            samples[-1] = (at, number)
        else:
            samples.append((at, number))
        horizon = at - rule.window
        while samples and samples[0][0] < horizon:
            samples.pop(0)
        del samples[:-_MAX_RATE_SAMPLES]
        if len(samples) < 2 or samples[-1][0] - samples[0][0] < rule.window / 2:
            return None  # too short a span: noise would read as a steep slope
        slope = _slope_per_minute(samples)
        if rule.direction == "rising":
            speed = slope
        elif rule.direction == "falling":
            speed = -slope
        else:
            speed = abs(slope)
        limit = rule.per_minute - rule.hysteresis if was_active else rule.per_minute
        return _Observation(speed > limit, round(slope, 3), rule.per_minute)

    def _silence_at(
        self, rule: SilenceRule, dev: DeviceState, state: AlertState, now: float
    ) -> _Observation | None:
        interval = rule.interval
        if interval is None and dev.gaps:
            interval = max(statistics.median(dev.gaps), rule.min_interval)
        silent_for = None if dev.last_seen is None else round(float(now - dev.last_seen), 1)
        if state.phase is Phase.RAISED:
            # Only a reading ends a silence; a sign of life given to seen() (say, at
            # start-up) must not clear a dead device's alert.
            return _Observation(
                True, silent_for if silent_for is not None else state.value, state.threshold
            )
        if interval is None or silent_for is None:
            return None
        limit = round(float(rule.factor * interval), 1)
        return _Observation(silent_for > limit, silent_for, limit)

    def _apply(
        self,
        rule: AlertRule,
        device: str,
        state: AlertState,
        observation: _Observation,
        at: float,
    ) -> list[Decision]:
        raised_at = state.raised_at
        action = step(
            state,
            observation.active,
            at,
            for_seconds=rule.for_seconds,
            renotify_interval=rule.renotify_interval,
        )
        state.value = observation.value
        state.threshold = observation.threshold
        if action is Action.NONE:
            return []
        fields: dict[str, Any] = {
            "rule": rule.name,
            "kind": rule.kind,
            "device": device,
            "device_type": state.device_type,
            "severity": rule.severity,
            "measurement": _measurement(rule),
            "value": observation.value,
            "threshold": observation.threshold,
        }
        common: dict[str, Any] = {
            "rule": rule.name,
            "kind": rule.kind,
            "device": device,
            "device_type": state.device_type,
            "severity": rule.severity,
            "at": at,
            "value": observation.value,
            "threshold": observation.threshold,
        }
        if action is Action.CLEAR:
            message = _render(rule.clear_message, "{rule} cleared on {device}", fields)
            assert raised_at is not None
            return [AlertCleared(**common, message=message, raised_at=raised_at)]
        message = _render(rule.message, _default_message(rule), fields)
        state.message = message
        assert state.raised_at is not None
        if action is Action.RAISE:
            return [AlertRaised(**common, message=message, raised_at=state.raised_at)]
        return [
            AlertRenotified(
                **common, message=message, raised_at=state.raised_at, count=state.notify_count
            )
        ]

    def _stock(
        self,
        rule: StockRule,
        values: Mapping[str, Value],
        device: str,
        device_type: str,
        at: float,
    ) -> list[Decision]:
        changes: list[Decision] = []
        list_name = _render(
            rule.list_name,
            "{device}",
            {"device": device, "device_type": device_type, "rule": rule.name},
        )
        for name, value in values.items():
            item = name[len(rule.prefix) :]
            if not name.startswith(rule.prefix) or not item:
                continue
            if rule.items and item not in rule.items:
                continue
            number = _number(value)
            if number is None or not number.is_integer():
                continue
            change = self._state.lists.report(
                list_name=list_name,
                item=item,
                device=device,
                level=int(number),
                minimum=rule.minimums.get(item, rule.minimum),
                at=at,
            )
            if change is not None:
                changes.append(change)
        return changes
