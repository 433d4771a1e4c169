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
from typing import Any, NamedTuple

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
#: Integer values are stored as SQLite integers: signed 64 bits.
MIN_INT, MAX_INT = -(2**63), 2**63 - 1

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


class Measurement(NamedTuple):
    """One named value a device reported.

    `key` is the idempotency key that makes a retried request harmless: built from the
    device's `seq` when it sent one, else from an absolute device time, else None (only
    message-layer deduplication protects it then).

    A named tuple rather than a frozen dataclass: as immutable, and built in less than half
    the time, which counts at one per record of every SenML pack.
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
        return _from_senml(load_cbor(payload), cbor_labels=True, now=now)
    if content_format == CF_SENML_JSON:
        return _from_senml(load_json(payload), cbor_labels=False, now=now)
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
        if not MIN_INT <= value <= MAX_INT:
            raise ValidationError(f"{name}: integer out of the 64-bit range", field=name)
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
    try:  # an integer beyond a float's range overflows here
        if isinstance(value, bool) or not math.isfinite(value):
            raise TypeError
        return float(value)
    except (TypeError, OverflowError):
        raise ValidationError(f"{name}: must be a finite number of seconds", field=name) from None


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


# The SenML-CBOR labels the decoder reads (RFC 8428 §6). A JSON record is translated to
# these first, so both encodings share one decoder.
LABEL_BVER = -1
LABEL_BN = -2
LABEL_BT = -3
LABEL_BU = -4
LABEL_BV = -5
LABEL_N = 0
LABEL_U = 1
LABEL_V = 2
LABEL_VS = 3
LABEL_VB = 4
LABEL_S = 5
LABEL_T = 6
LABEL_VD = 8
#: A record has one value; "v" with "s" (a value and a sum) is the one pair allowed, and
#: its value is "v".
VALUE_LABELS = frozenset((LABEL_V, LABEL_VS, LABEL_VB, LABEL_VD, LABEL_S))
VALUE_AND_SUM = frozenset((LABEL_V, LABEL_S))


def _from_senml(document: Any, *, cbor_labels: bool, now: float) -> list[Measurement]:
    """A SenML pack's measurements, base fields resolved (RFC 8428 §4).

    One pass over the records, reading each by its integer labels, with the common cases
    (float values and times) checked inline: a pack of 50 records is decoded for every
    request, so this is the gateway's busiest loop after CBOR itself. The checks and their
    order are those of the straightforward version kept in tests/unit/senml_reference.py.
    """
    if not isinstance(document, list) or not document:
        raise ValidationError("SenML pack must be a non-empty array of records")
    measurements: list[Measurement] = []
    base_name = ""
    # A base name ending in ":" or "/" (e.g. "urn:dev:ow:10e2073a01080063:", or the device's
    # own name) identifies the device, which the URI path already does; the measurement
    # keeps its own name. Any other base name is a plain prefix.
    base_names_device = False
    base_time = 0.0
    base_unit: str | None = None
    base_value = 0.0
    for item in document:
        record = _cbor_record(item) if cbor_labels else _json_record(item)
        if record and min(record) < 0:  # labels are ints by now; base fields are negative
            if LABEL_BVER in record and (
                isinstance(record[LABEL_BVER], bool) or not isinstance(record[LABEL_BVER], int)
            ):
                raise ValidationError("SenML bver must be an integer", field="bver")
            if LABEL_BN in record:
                base_name = senml_string("bn", record[LABEL_BN])
                base_names_device = base_name.endswith((":", "/"))
            if LABEL_BT in record:
                base_time = _check_time("bt", record[LABEL_BT])
            if LABEL_BU in record:
                base_unit = senml_string("bu", record[LABEL_BU])
            if LABEL_BV in record:
                base_value = _check_time("bv", record[LABEL_BV])
        value_labels = VALUE_LABELS.intersection(record)
        if len(value_labels) == 1:
            (value_label,) = value_labels
        elif not value_labels:
            if LABEL_N in record:
                raise ValidationError(f"SenML record {record[LABEL_N]!r:.40} has no value")
            continue  # a record that only sets base fields
        elif value_labels == VALUE_AND_SUM:
            value_label = LABEL_V
        else:
            raise ValidationError("SenML record has more than one value")
        name_part = record.get(LABEL_N, "")
        if name_part.__class__ is not str:
            name_part = senml_string("n", name_part)
        name = name_part if base_names_device and name_part else base_name + name_part
        if not name:
            raise ValidationError("SenML record has no name")
        value = record[value_label]
        if value_label == LABEL_V and value.__class__ is float:
            value = base_value + value
            if not -math.inf < value < math.inf:
                raise ValidationError(f"{name}: value must be finite", field=name)
        else:
            value = _senml_value(name, value_label, value, base_value)
        unit = record.get(LABEL_U, base_unit)
        if unit is not None and unit.__class__ is not str and not isinstance(unit, str):
            raise ValidationError(f"{name}: SenML u must be a string", field=name)
        offset = record.get(LABEL_T, 0.0)
        if offset.__class__ is int and -MAX_INT <= offset <= MAX_INT:
            offset = float(offset)  # CBOR's shortest form of a whole second
        elif offset.__class__ is not float or not -math.inf < offset < math.inf:
            offset = _check_time("t", offset)
        resolved = base_time + offset
        if resolved >= SENML_RELATIVE_TIME_LIMIT:
            key = idempotency_key(name, seq=None, time=resolved)
            measurements.append(Measurement(name, value, unit, resolved, None, key))
        else:
            # Relative times (and no time at all) mean "about now": no stable idempotency key.
            time = now + resolved if resolved != 0 else None
            measurements.append(Measurement(name, value, unit, time, None, None))
    if not measurements:
        raise ValidationError("SenML pack has no records with values")
    return measurements


def _cbor_record(record: Any) -> dict[Any, Any]:
    """A SenML-CBOR record whose labels are all integers (unknown ones are ignored)."""
    if record.__class__ is not dict and not isinstance(record, Mapping):
        raise ValidationError(f"SenML records must be maps, not {_type_name(record)}")
    for label in record:
        # True and 1.0 would find the record's 1 ("u"), so only true integers pass.
        if label.__class__ is not int and (isinstance(label, bool) or not isinstance(label, int)):
            raise ValidationError(f"SenML-CBOR labels must be integers, not {label!r:.20}")
    return record if record.__class__ is dict else dict(record)


def _json_record(record: Any) -> dict[int, Any]:
    """A SenML-JSON record with its known labels as the CBOR integers."""
    if not isinstance(record, Mapping):
        raise ValidationError(f"SenML records must be maps, not {_type_name(record)}")
    labelled: dict[int, Any] = {}
    for label, value in record.items():
        number = SENML_JSON_LABELS.get(label)
        if number is None:
            skip_unknown_label(label)
            continue
        labelled[number] = value
    return labelled


def skip_unknown_label(label: Any) -> None:
    """RFC 8428 §4.4: labels ending in "_" must be understood; others may be ignored."""
    if isinstance(label, str) and label.endswith("_"):
        raise ValidationError(f"SenML: unsupported mandatory label {label!r:.20}")


def senml_string(label: str, value: Any) -> str:
    """A SenML field that must be a string (bn, bu, n)."""
    if not isinstance(value, str):
        raise ValidationError(f"SenML {label} must be a string", field=label)
    return value


def _senml_value(name: str, label: int, value: Any, base_value: float) -> Value:
    """The value of a record, for every case but the common float "v"."""
    text_label = SENML_CBOR_LABELS[label]
    if text_label in ("v", "s"):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValidationError(f"{name}: SenML {text_label} must be a number", field=name)
        try:
            result = base_value + value if text_label == "v" else value
        except OverflowError:
            raise ValidationError(f"{name}: SenML {text_label} out of range", field=name) from None
        return _check_scalar(name, result)
    if text_label == "vb":
        if not isinstance(value, bool):
            raise ValidationError(f"{name}: SenML vb must be a bool", field=name)
        return value
    if not isinstance(value, str):  # vs, vd
        raise ValidationError(f"{name}: SenML {text_label} must be a string", field=name)
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
