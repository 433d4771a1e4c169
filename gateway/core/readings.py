"""Readings and their wire encodings: bytes in, `Measurement`s out, or a `DecodeError`.

Pure: no I/O. Accepted formats (RFC 7252 Content-Format numbers):

* 60 application/cbor: a map of measurement name to number, bool or text, with optional
  ``ts`` (device time, epoch seconds) and ``seq`` (device counter); or an array of such maps.
* 112 application/senml+cbor and 110 application/senml+json: a SenML pack (RFC 8428), base
  name, time, unit and value resolved.
* 50 application/json: the same shapes as CBOR, for debugging.

Whether a well-formed value is acceptable (types, ranges, units, limits) is `validate`'s job;
here a structural mistake is a `DecodeError` (4.00) and a wrong value type is a
`ValidationError` (4.22), so that "bytes that are not CBOR" and "CBOR that says the wrong
thing" get different answers.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import cbor2

from gateway.errors import DecodeError, UnsupportedFormatError, ValidationError

CF_TEXT = 0
CF_LINK_FORMAT = 40
CF_JSON = 50
CF_CBOR = 60
CF_SENML_JSON = 110
CF_SENML_CBOR = 112

READING_FORMATS = {
    CF_CBOR: "application/cbor",
    CF_SENML_CBOR: "application/senml+cbor",
    CF_JSON: "application/json",
    CF_SENML_JSON: "application/senml+json",
}

Value = float | int | bool | str

#: RFC 8428 §4.5.3: a resolved SenML time below 2**28 is relative to "now".
SENML_RELATIVE_TIME_LIMIT = 2**28
MAX_SEQ = 2**63 - 1

# RFC 8428 §6 integer labels for CBOR, and the JSON names they stand for.
SENML_CBOR_LABELS = {
    -1: "bver",
    -2: "bn",
    -3: "bt",
    -4: "bu",
    -5: "bv",
    -6: "bs",
    0: "n",
    1: "u",
    2: "v",
    3: "vs",
    4: "vb",
    5: "s",
    6: "t",
    7: "ut",
    8: "vd",
}
SENML_JSON_LABELS = {name: label for label, name in SENML_CBOR_LABELS.items()}


@dataclass(frozen=True, slots=True)
class Measurement:
    """One named value a device reported.

    `key` is the idempotency key that makes a retried request harmless: built from the
    device's `seq` when it sent one, else from an absolute device time, else None (only
    message-layer deduplication protects it then).
    """

    name: str
    value: Value
    unit: str | None = None
    time: float | None = None
    seq: int | None = None
    key: str | None = None


def idempotency_key(name: str, *, seq: int | None, time: float | None) -> str | None:
    if seq is not None:
        return f"s{seq}/{name}"
    if time is not None:
        return f"t{time!r}/{name}"
    return None


def check_reading_format(content_format: int | None) -> None:
    if content_format is not None and content_format not in READING_FORMATS:
        accepted = ", ".join(f"{number} ({name})" for number, name in READING_FORMATS.items())
        raise UnsupportedFormatError(
            f"content-format {content_format} not accepted; use {accepted}"
        )


def decode_readings(payload: bytes, content_format: int | None, *, now: float) -> list[Measurement]:
    """Decode a request payload of the given Content-Format into measurements."""
    if content_format is None:
        content_format = CF_CBOR
    if content_format == CF_CBOR:
        return list(_from_plain(load_cbor(payload)))
    if content_format == CF_JSON:
        return list(_from_plain(load_json(payload)))
    if content_format == CF_SENML_CBOR:
        return list(_from_senml(load_cbor(payload), cbor_labels=True, now=now))
    if content_format == CF_SENML_JSON:
        return list(_from_senml(load_json(payload), cbor_labels=False, now=now))
    check_reading_format(content_format)
    raise AssertionError("unreachable")


def resource_payload_as_reading(
    path: str, payload: bytes, content_format: int | None
) -> tuple[bytes, int | None]:
    """A device resource's bare CBOR/JSON value, re-encoded as `{last path segment: value}`.

    Anything else (maps, arrays, SenML, malformed bytes) is returned unchanged, for
    `decode_readings` to accept or refuse as usual.
    """
    name = path.rstrip("/").rsplit("/", 1)[-1]
    if not name or content_format not in (None, CF_CBOR, CF_JSON) or not payload:
        return payload, content_format
    try:
        value = load_cbor(payload) if content_format != CF_JSON else load_json(payload)
    except DecodeError:
        return payload, content_format
    if isinstance(value, bool | int | float | str):
        return cbor2.dumps({name: value}), CF_CBOR
    return payload, content_format


def load_cbor(payload: bytes) -> Any:
    if not payload:
        raise DecodeError("empty payload")
    try:
        # Tags are refused outright: no reading format here uses them, and some (e.g. big
        # decimals, regexes) are costly or surprising to build from untrusted bytes.
        return cbor2.loads(payload, tag_hook=_refuse_tag)
    except DecodeError:
        raise
    except Exception as exc:  # cbor2 raises several types for truncated or invalid input
        raise DecodeError(f"malformed CBOR: {_short(exc)}") from exc


def _refuse_tag(decoder: Any, tag: Any) -> Any:
    raise DecodeError(f"CBOR tag {tag.tag} is not accepted")


def load_json(payload: bytes) -> Any:
    if not payload:
        raise DecodeError("empty payload")
    try:
        return json.loads(payload, parse_constant=_refuse_constant)
    except DecodeError:
        raise
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise DecodeError(f"malformed JSON: {_short(exc)}") from exc


def _refuse_constant(name: str) -> Any:
    raise DecodeError(f"JSON constant {name} is not a number")


def _short(exc: BaseException) -> str:
    return str(exc).splitlines()[0][:80] if str(exc) else type(exc).__name__


def _check_scalar(name: str, value: Any) -> Value:
    if isinstance(value, bool | str):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValidationError(f"{name}: value must be finite", field=name)
        return value
    raise ValidationError(
        f"{name}: value must be a number, bool or string, not {_type_name(value)}", field=name
    )


def _type_name(value: Any) -> str:
    if isinstance(value, bytes | bytearray):
        return "bytes"
    if isinstance(value, Mapping):
        return "map"
    if isinstance(value, list | tuple):
        return "array"
    if value is None:
        return "null"
    return type(value).__name__


def _check_time(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValidationError(f"{name}: must be a finite number of seconds", field=name)
    return float(value)


def _from_plain(document: Any) -> Iterator[Measurement]:
    if isinstance(document, Mapping):
        yield from _from_plain_map(document)
    elif isinstance(document, list):
        if not document:
            raise ValidationError("empty array: no readings")
        for item in document:
            if not isinstance(item, Mapping):
                raise ValidationError(f"array items must be maps, not {_type_name(item)}")
            yield from _from_plain_map(item)
    else:
        raise ValidationError(
            f"payload must be a map or an array of maps, not {_type_name(document)}"
        )


def _from_plain_map(document: Mapping[Any, Any]) -> Iterator[Measurement]:
    time: float | None = None
    seq: int | None = None
    if "ts" in document:
        time = _check_time("ts", document["ts"])
        if time < 0:
            raise ValidationError("ts: must not be negative", field="ts")
    if "seq" in document:
        raw_seq = document["seq"]
        if isinstance(raw_seq, bool) or not isinstance(raw_seq, int) or not 0 <= raw_seq <= MAX_SEQ:
            raise ValidationError("seq: must be an integer 0..2^63-1", field="seq")
        seq = raw_seq
    found = False
    for name, value in document.items():
        if name in ("ts", "seq"):
            continue
        if not isinstance(name, str):
            raise ValidationError(f"measurement names must be strings, not {_type_name(name)}")
        found = True
        yield Measurement(
            name=name,
            value=_check_scalar(name, value),
            time=time,
            seq=seq,
            key=idempotency_key(name, seq=seq, time=time),
        )
    if not found:
        raise ValidationError("no measurements in map")


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
                # RFC 8428 §4.4: labels ending in "_" must be understood; others may be ignored.
                if isinstance(label, str) and label.endswith("_"):
                    raise ValidationError(f"SenML: unsupported mandatory label {label!r:.20}")
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
            if not isinstance(record["bn"], str):
                raise ValidationError("SenML bn must be a string", field="bn")
            base_name = record["bn"]
        if "bt" in record:
            base_time = _check_time("bt", record["bt"])
        if "bu" in record:
            if not isinstance(record["bu"], str):
                raise ValidationError("SenML bu must be a string", field="bu")
            base_unit = record["bu"]
        if "bv" in record:
            base_value = _check_time("bv", record["bv"])
        value_labels = [label for label in ("v", "vs", "vb", "vd", "s") if label in record]
        if not value_labels:
            if "n" in record:
                raise ValidationError(f"SenML record {record['n']!r:.40} has no value")
            continue  # a record that only sets base fields
        if len(value_labels) > 1 and value_labels != ["v", "s"]:
            raise ValidationError("SenML record has more than one value")
        name_part = record.get("n", "")
        if not isinstance(name_part, str):
            raise ValidationError("SenML n must be a string", field="n")
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
    value = record[label]
    if label in ("v", "s"):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValidationError(f"{name}: SenML {label} must be a number", field=name)
        result = base_value + value if label == "v" else value
        return _check_scalar(name, result)
    if label == "vb":
        if not isinstance(value, bool):
            raise ValidationError(f"{name}: SenML vb must be a bool", field=name)
        return value
    if not isinstance(value, str):  # vs, vd
        raise ValidationError(f"{name}: SenML {label} must be a string", field=name)
    return value


# --- encoding the latest values (GET /r/NAME) ---------------------------------------------


@dataclass(frozen=True, slots=True)
class LatestValue:
    name: str
    value: Value
    unit: str | None
    time: float


def latest_document(values: Iterable[LatestValue]) -> dict[str, dict[str, Value | float]]:
    """`{name: {"v": value, "u": unit, "t": time}}`, "u" omitted when unknown."""
    document: dict[str, dict[str, Value | float]] = {}
    for item in values:
        entry: dict[str, Value | float] = {"v": item.value, "t": item.time}
        if item.unit is not None:
            entry["u"] = item.unit
        document[item.name] = entry
    return document


def senml_records(device: str, values: Iterable[LatestValue]) -> list[dict[str, Any]]:
    """A SenML pack (JSON labels) with base name `device:`."""
    records: list[dict[str, Any]] = []
    for item in values:
        record: dict[str, Any] = {"n": item.name, "t": item.time}
        if isinstance(item.value, bool):
            record["vb"] = item.value
        elif isinstance(item.value, str):
            record["vs"] = item.value
        else:
            record["v"] = item.value
        if item.unit is not None:
            record["u"] = item.unit
        records.append(record)
    if records:
        records[0] = {"bn": f"{device}:", **records[0]}
    return records


def encode_latest(device: str, values: list[LatestValue], content_format: int) -> bytes:
    if content_format == CF_CBOR:
        return cbor2.dumps(latest_document(values))
    if content_format == CF_JSON:
        return json.dumps(latest_document(values), separators=(",", ":")).encode()
    if content_format == CF_SENML_JSON:
        return json.dumps(senml_records(device, values), separators=(",", ":")).encode()
    if content_format == CF_SENML_CBOR:
        packed = [
            {SENML_JSON_LABELS[label]: value for label, value in record.items()}
            for record in senml_records(device, values)
        ]
        return cbor2.dumps(packed)
    raise UnsupportedFormatError(f"cannot encode content-format {content_format}")
