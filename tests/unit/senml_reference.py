"""The SenML decoder as it was before its one-pass rewrite, kept to compare against.

`tests/unit/test_readings.py` checks that `decode_readings` gives the same measurements, or
the same error with the same message, as this straightforward version for generated packs.
Do not optimise it: its job is to be obviously right.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

# RFC 8428's tables, the value and field checks and the idempotency key are the
# production ones: what is kept here is the old way through a pack.
from gateway.core.readings import (
    SENML_CBOR_LABELS,
    SENML_JSON_LABELS,
    SENML_RELATIVE_TIME_LIMIT,
    Measurement,
    Value,
    _check_time,
    _type_name,
    idempotency_key,
    senml_string,
    skip_unknown_label,
)
from gateway.core.readings import _senml_value as senml_value
from gateway.errors import ValidationError


def reference_senml(document: Any, *, cbor_labels: bool, now: float) -> list[Measurement]:
    return list(_from_senml(document, cbor_labels=cbor_labels, now=now))


def _senml_records(document: Any, *, cbor_labels: bool) -> Iterable[dict[str, Any]]:
    if not isinstance(document, list) or not document:
        raise ValidationError("SenML pack must be a non-empty array of records")
    for record in document:
        if not isinstance(record, Mapping):
            raise ValidationError(f"SenML records must be maps, not {_type_name(record)}")
        named: dict[str, Any] = {}
        for label, value in record.items():
            if cbor_labels:
                if isinstance(label, bool) or not isinstance(label, int):
                    raise ValidationError(f"SenML-CBOR labels must be integers, not {label!r:.20}")
                name = SENML_CBOR_LABELS.get(label)
            else:
                name = label if label in SENML_JSON_LABELS else None
            if name is None:
                skip_unknown_label(label)
                continue
            named[name] = value
        yield named


def _from_senml(document: Any, *, cbor_labels: bool, now: float) -> Iterator[Measurement]:
    base_name = ""
    base_time = 0.0
    base_unit: str | None = None
    base_value = 0.0
    found = False
    for record in _senml_records(document, cbor_labels=cbor_labels):
        if "bver" in record and (
            isinstance(record["bver"], bool) or not isinstance(record["bver"], int)
        ):
            raise ValidationError("SenML bver must be an integer", field="bver")
        if "bn" in record:
            base_name = senml_string("bn", record["bn"])
        if "bt" in record:
            base_time = _check_time("bt", record["bt"])
        if "bu" in record:
            base_unit = senml_string("bu", record["bu"])
        if "bv" in record:
            base_value = _check_time("bv", record["bv"])
        value_labels = [label for label in ("v", "vs", "vb", "vd", "s") if label in record]
        if not value_labels:
            if "n" in record:
                raise ValidationError(f"SenML record {record['n']!r:.40} has no value")
            continue  # a record that only sets base fields
        if len(value_labels) > 1 and value_labels != ["v", "s"]:
            raise ValidationError("SenML record has more than one value")
        name_part = senml_string("n", record.get("n", ""))
        # A base name ending in ":" or "/" (e.g. "urn:dev:ow:10e2073a01080063:", or the
        # device's own name) identifies the device, which the URI path already does; the
        # measurement keeps its own name. Any other base name is a plain prefix.
        name = name_part if base_name.endswith((":", "/")) and name_part else base_name + name_part
        if not name:
            raise ValidationError("SenML record has no name")
        value = _senml_value(name, record, value_labels[0], base_value)
        unit = record.get("u", base_unit)
        if unit is not None and not isinstance(unit, str):
            raise ValidationError(f"{name}: SenML u must be a string", field=name)
        offset = _check_time("t", record["t"]) if "t" in record else 0.0
        resolved = base_time + offset
        # Relative times (and no time at all) mean "about now": no stable idempotency key.
        absolute = resolved >= SENML_RELATIVE_TIME_LIMIT
        time = resolved if absolute else now + resolved
        found = True
        yield Measurement(
            name=name,
            value=value,
            unit=unit,
            time=time if absolute or resolved != 0 else None,
            key=idempotency_key(name, seq=None, time=resolved) if absolute else None,
        )
    if not found:
        raise ValidationError("SenML pack has no records with values")


def _senml_value(name: str, record: Mapping[str, Any], label: str, base_value: float) -> Value:
    return senml_value(name, SENML_JSON_LABELS[label], record[label], base_value)
