"""Per-device-type checks of decoded measurements. Pure.

Known device types (`fridge`, `tracker`, `streetlight`) have a schema: each known
measurement has a kind, a unit and a range. A measurement a schema does not name still gets
the generic checks (name syntax, string length), so a firmware that adds a field keeps
working; a value of the wrong kind or out of range for a named one is refused with 4.22 and
the field named. A unit a device sends must match the schema's; a missing unit is filled in.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from gateway.core.readings import Measurement, Value
from gateway.errors import ValidationError

Kind = Literal["number", "integer", "bool", "string"]

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:/-]*$")


@dataclass(frozen=True, slots=True)
class FieldSpec:
    kind: Kind
    unit: str | None = None
    minimum: float | None = None
    maximum: float | None = None


@dataclass(frozen=True, slots=True)
class Limits:
    max_fields: int = 64
    max_name_length: int = 64
    max_string_length: int = 256


FRIDGE = {
    "temp": FieldSpec("number", "Cel", -40, 60),
    "setpoint": FieldSpec("number", "Cel", -30, 15),
    "door": FieldSpec("bool"),
    "compressor": FieldSpec("bool"),
    "door_alarm": FieldSpec("bool"),
}
FRIDGE_PREFIXES = {"stock_": FieldSpec("integer", "count", 0, 1000)}

TRACKER = {
    "lat": FieldSpec("number", "lat", -90, 90),
    "lon": FieldSpec("number", "lon", -180, 180),
    "speed": FieldSpec("number", "m/s", 0, 100),
    "heading": FieldSpec("number", "deg", 0, 360),
    "battery": FieldSpec("number", "%", 0, 100),
}

STREETLIGHT = {
    "on": FieldSpec("bool"),
    "dim": FieldSpec("number", "%", 0, 100),
    "power": FieldSpec("number", "W", 0, 2000),
    "lux": FieldSpec("number", "lx", 0, 200_000),
    "lamp_ok": FieldSpec("bool"),
}


@dataclass(frozen=True, slots=True)
class Schema:
    fields: dict[str, FieldSpec]
    prefixes: dict[str, FieldSpec]

    def spec_for(self, name: str) -> FieldSpec | None:
        if name in self.fields:
            return self.fields[name]
        for prefix, spec in self.prefixes.items():
            if name.startswith(prefix) and len(name) > len(prefix):
                return spec
        return None


SCHEMAS: dict[str, Schema] = {
    "fridge": Schema(FRIDGE, FRIDGE_PREFIXES),
    "tracker": Schema(TRACKER, {}),
    "streetlight": Schema(STREETLIGHT, {}),
}
GENERIC = Schema({}, {})


def schema_for(device_type: str) -> Schema:
    return SCHEMAS.get(device_type, GENERIC)


def validate_measurements(
    measurements: Sequence[Measurement], device_type: str, limits: Limits
) -> list[Measurement]:
    """Check every measurement; return them with units filled in from the schema."""
    if not measurements:
        raise ValidationError("no measurements")
    if len(measurements) > limits.max_fields:
        raise ValidationError(
            f"too many fields: {len(measurements)} > {limits.max_fields}", field="fields"
        )
    schema = schema_for(device_type)
    # A pack is often a series of one measurement: each name is checked, and its spec found,
    # once per request rather than once per value.
    specs: dict[str, FieldSpec | None] = {}
    checked: list[Measurement] = []
    for measurement in measurements:
        name = measurement.name
        if name in specs:
            spec = specs[name]
        else:
            spec = specs[name] = _check_name(name, schema, limits)
        checked.append(_check_value(measurement, spec, limits))
    return checked


def _check_name(name: str, schema: Schema, limits: Limits) -> FieldSpec | None:
    """The spec of a measurement name that is acceptable (None if the schema has none)."""
    shown = name[:40]
    if len(name) > limits.max_name_length:
        raise ValidationError(f"{shown}: name longer than {limits.max_name_length}", field=shown)
    if not NAME_PATTERN.match(name):
        raise ValidationError(f"{shown!r}: name must match {NAME_PATTERN.pattern}", field=shown)
    return schema.spec_for(name)


def _check_value(measurement: Measurement, spec: FieldSpec | None, limits: Limits) -> Measurement:
    """The measurement, its unit filled in from `spec`, if its value and unit are fine."""
    name, value, unit = measurement.name, measurement.value, measurement.unit
    if isinstance(value, str) and len(value) > limits.max_string_length:
        raise ValidationError(f"{name}: string longer than {limits.max_string_length}", field=name)
    if unit is not None and len(unit) > limits.max_name_length:
        raise ValidationError(f"{name}: unit too long", field=name)
    if spec is None:
        return measurement
    if not (value.__class__ is float and spec.kind == "number"):  # else the kind is right
        _check_kind(name, value, spec)
    if spec.unit is not None and unit not in (None, spec.unit):
        raise ValidationError(f"{name}: unit {unit!r:.20} should be {spec.unit!r}", field=name)
    if isinstance(value, int | float) and not isinstance(value, bool):
        if spec.minimum is not None and value < spec.minimum:
            raise ValidationError(
                f"{name}: {value} is below the minimum {spec.minimum:g}", field=name
            )
        if spec.maximum is not None and value > spec.maximum:
            raise ValidationError(
                f"{name}: {value} is above the maximum {spec.maximum:g}", field=name
            )
    if spec.unit is not None and unit is None:
        return measurement._replace(unit=spec.unit)
    return measurement


def _check_kind(name: str, value: Value, spec: FieldSpec) -> None:
    ok: bool
    if spec.kind == "bool":
        ok = isinstance(value, bool)
    elif spec.kind == "string":
        ok = isinstance(value, str)
    elif spec.kind == "integer":
        ok = (isinstance(value, int) and not isinstance(value, bool)) or (
            isinstance(value, float) and value.is_integer()
        )
    else:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
    if not ok:
        raise ValidationError(f"{name}: expected {spec.kind}, got {_kind_of(value)}", field=name)


def _kind_of(value: Value) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, str):
        return "string"
    return "number"
