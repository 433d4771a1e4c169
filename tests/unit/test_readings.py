"""Decoding of CBOR, JSON and SenML payloads into measurements."""

from __future__ import annotations

import json
import math
from collections.abc import Callable

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.core.readings import (
    CF_CBOR,
    CF_JSON,
    CF_SENML_CBOR,
    CF_SENML_JSON,
    SENML_CBOR_LABELS,
    LatestValue,
    Measurement,
    decode_readings,
    encode_latest,
)
from gateway.core.validate import Limits, validate_measurements
from gateway.errors import DecodeError, DeviceError, UnsupportedFormatError, ValidationError
from tests.unit.senml_reference import reference_senml

NOW = 1_800_000_000.0


def test_cbor_map_with_time_and_seq() -> None:
    payload = cbor2.dumps({"temp": 4.5, "door": False, "note": "ok", "ts": 1_700_000_000, "seq": 7})
    decoded = decode_readings(payload, CF_CBOR, now=NOW)
    assert {m.name: m.value for m in decoded} == {"temp": 4.5, "door": False, "note": "ok"}
    assert all(m.time == 1_700_000_000 and m.seq == 7 for m in decoded)
    assert {m.key for m in decoded} == {"s7/temp", "s7/door", "s7/note"}


def test_cbor_array_of_maps_keeps_each_time() -> None:
    payload = cbor2.dumps([{"temp": 4.0, "ts": 1_700_000_000}, {"temp": 4.2, "ts": 1_700_000_060}])
    decoded = decode_readings(payload, CF_CBOR, now=NOW)
    assert [(m.value, m.time) for m in decoded] == [(4.0, 1_700_000_000), (4.2, 1_700_000_060)]
    assert decoded[0].key != decoded[1].key


def test_cbor_without_time_or_seq_has_no_idempotency_key() -> None:
    (measurement,) = decode_readings(cbor2.dumps({"temp": 1}), CF_CBOR, now=NOW)
    assert measurement.key is None and measurement.time is None


def test_json_same_shapes_as_cbor() -> None:
    payload = json.dumps({"temp": 3.5, "seq": 1}).encode()
    assert decode_readings(payload, CF_JSON, now=NOW) == [
        Measurement("temp", 3.5, None, None, 1, "s1/temp")
    ]


def test_senml_cbor_resolves_base_fields() -> None:
    pack = [
        {-2: "urn:dev:fridge-1/", -3: 1_700_000_000.0, -4: "Cel", 0: "temp", 2: 4.0},
        {0: "temp", 6: 60, 2: 4.5},
        {0: "door", 4: True, 1: "/"},
        {0: "label", 3: "kitchen"},
    ]
    decoded = decode_readings(cbor2.dumps(pack), CF_SENML_CBOR, now=NOW)
    # A base name ending in ":" or "/" names the device; measurements keep their own names.
    assert [(m.name, m.value, m.unit, m.time) for m in decoded] == [
        ("temp", 4.0, "Cel", 1_700_000_000.0),
        ("temp", 4.5, "Cel", 1_700_000_060.0),
        ("door", True, "/", 1_700_000_000.0),
        ("label", "kitchen", "Cel", 1_700_000_000.0),
    ]
    assert decoded[0].key == "t1700000000.0/temp"


def test_senml_plain_base_name_is_a_prefix() -> None:
    pack = [{"bn": "kitchen.", "n": "temp", "v": 1}]
    (decoded,) = decode_readings(json.dumps(pack).encode(), CF_SENML_JSON, now=NOW)
    assert decoded.name == "kitchen.temp"


def test_senml_base_value_and_relative_time() -> None:
    pack = [{"bv": 10, "n": "a", "v": 1.5, "t": -5}, {"n": "b", "v": 2}]
    decoded = decode_readings(json.dumps(pack).encode(), CF_SENML_JSON, now=NOW)
    assert [(m.name, m.value) for m in decoded] == [("a", 11.5), ("b", 12)]
    # RFC 8428 §4.5.3: relative to now, so no stable idempotency key.
    assert decoded[0].time == NOW - 5 and decoded[0].key is None
    assert decoded[1].time is None


@pytest.mark.parametrize(
    ("payload", "cf", "error"),
    [
        (b"", CF_CBOR, DecodeError),
        (b"\xa1\x64te", CF_CBOR, DecodeError),  # truncated map
        (b"\xff", CF_CBOR, DecodeError),
        (b"{", CF_JSON, DecodeError),
        (b'{"a": NaN}', CF_JSON, DecodeError),
        (cbor2.dumps(5), CF_CBOR, ValidationError),
        (cbor2.dumps({"a": [1]}), CF_CBOR, ValidationError),
        (cbor2.dumps({"a": b"x"}), CF_CBOR, ValidationError),
        (cbor2.dumps({"a": float("inf")}), CF_CBOR, ValidationError),
        (cbor2.dumps({1: 2}), CF_CBOR, ValidationError),
        (cbor2.dumps({"a": 1, "seq": -1}), CF_CBOR, ValidationError),
        (cbor2.dumps({"ts": 5}), CF_CBOR, ValidationError),
        (cbor2.dumps([]), CF_SENML_CBOR, ValidationError),
        (cbor2.dumps([{0: "a"}]), CF_SENML_CBOR, ValidationError),  # no value
        (cbor2.dumps([{0: "a", 2: "x"}]), CF_SENML_CBOR, ValidationError),
        (cbor2.dumps([{"n": "a", "v": 1}]), CF_SENML_CBOR, ValidationError),  # text labels
        (json.dumps([{"n": "a", "v": 1, "x_": 1}]).encode(), CF_SENML_JSON, ValidationError),
        (cbor2.dumps({"a": 1}), 0, UnsupportedFormatError),
        (cbor2.dumps({"a": 1}), 41, UnsupportedFormatError),
    ],
)
def test_bad_payloads_get_the_right_error(payload: bytes, cf: int, error: type[Exception]) -> None:
    with pytest.raises(error):
        decode_readings(payload, cf, now=NOW)


def test_cbor_tags_are_refused() -> None:
    with pytest.raises(DecodeError, match="tag"):
        decode_readings(cbor2.dumps({"a": cbor2.CBORTag(9999, 1)}), CF_CBOR, now=NOW)
    # Tags cbor2 knows (here a decimal fraction) decode, then fail as a wrong value type.
    with pytest.raises(ValidationError):
        decode_readings(cbor2.dumps({"a": cbor2.CBORTag(4, [1, 2])}), CF_CBOR, now=NOW)


def test_every_truncation_of_a_valid_payload_is_a_clean_error() -> None:
    payload = cbor2.dumps({"temp": 4.25, "door": True, "ts": 1_700_000_000, "seq": 99})
    for end in range(len(payload)):
        with pytest.raises(DeviceError):
            decode_readings(payload[:end], CF_CBOR, now=NOW)


FORMATS = st.sampled_from([CF_CBOR, CF_JSON, CF_SENML_CBOR, CF_SENML_JSON])


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=200), FORMATS)
def test_arbitrary_bytes_decode_or_fail_cleanly(payload: bytes, cf: int) -> None:
    try:
        decoded = decode_readings(payload, cf, now=NOW)
    except DeviceError:
        return
    assert all(isinstance(m, Measurement) for m in decoded)


scalars = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.binary(max_size=4),
    st.none(),
)
documents = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.one_of(st.text(max_size=4), st.integers(-8, 8)), children, max_size=5),
    ),
    max_leaves=12,
)


@settings(max_examples=400, deadline=None)
@given(documents, st.sampled_from([CF_CBOR, CF_SENML_CBOR]))
def test_arbitrary_cbor_documents_decode_or_fail_cleanly(document: object, cf: int) -> None:
    try:
        decoded = validate_measurements(
            decode_readings(cbor2.dumps(document), cf, now=NOW), "generic", Limits()
        )
    except DeviceError:
        return
    for m in decoded:
        assert isinstance(m.name, str) and m.name
        assert isinstance(m.value, bool | int | float | str)
        assert not isinstance(m.value, float) or math.isfinite(m.value)


@given(
    st.dictionaries(
        st.text(min_size=1, max_size=10).filter(lambda k: k not in ("ts", "seq")),
        st.one_of(
            st.booleans(),
            st.integers(-(2**31), 2**31),
            st.floats(allow_nan=False, allow_infinity=False),
            st.text(max_size=10),
        ),
        min_size=1,
        max_size=8,
    ),
    st.integers(0, 2**40),
)
def test_cbor_round_trip(values: dict[str, object], seq: int) -> None:
    decoded = decode_readings(cbor2.dumps({**values, "seq": seq}), CF_CBOR, now=NOW)
    assert {m.name: m.value for m in decoded} == values
    assert {m.seq for m in decoded} == {seq}


@pytest.mark.parametrize("cf", [CF_CBOR, CF_JSON, CF_SENML_CBOR, CF_SENML_JSON])
def test_latest_encodings_carry_values(cf: int) -> None:
    values = [LatestValue("door", True, None, 1.0), LatestValue("temp", 4.5, "Cel", 2.0)]
    encoded = encode_latest("fridge-1", values, cf)
    if cf in (CF_CBOR, CF_JSON):
        document = cbor2.loads(encoded) if cf == CF_CBOR else json.loads(encoded)
        assert document == {"door": {"v": True, "t": 1.0}, "temp": {"v": 4.5, "t": 2.0, "u": "Cel"}}
    else:
        decoded = decode_readings(encoded, cf, now=NOW)
        assert [(m.name, m.value, m.unit) for m in decoded] == [
            ("door", True, None),
            ("temp", 4.5, "Cel"),
        ]


# --- the one-pass SenML decoder against the straightforward reference --------------------

SENML_NAMES = st.sampled_from(["temp", "", "a:", "dev/", "x_"]) | st.text(min_size=1, max_size=6)
SENML_TIMES = st.sampled_from([0, 0.0, -5, 1, 2**28 - 1, 2**28, 1_700_000_000, 1.5]) | st.floats()
SENML_ANY = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**64), 2**64),
    st.floats(),
    st.text(max_size=6),
    st.binary(max_size=3),
    st.lists(st.integers(), max_size=2),
)
#: Values that make sense for each label; any label gets any value now and then.
SENML_FIELDS = {
    -1: st.integers(0, 20),  # bver
    -2: SENML_NAMES,  # bn
    -3: SENML_TIMES,  # bt
    -4: st.sampled_from(["Cel", "%", ""]),  # bu
    -5: st.floats(allow_nan=False, allow_infinity=False) | st.integers(-100, 100),  # bv
    0: SENML_NAMES,  # n
    1: st.sampled_from(["Cel", "/"]),  # u
    2: st.floats(width=16) | st.floats() | st.integers(-(2**64), 2**64),  # v
    3: st.text(max_size=6),  # vs
    4: st.booleans(),  # vb
    5: st.floats() | st.integers(-100, 100),  # s
    6: SENML_TIMES,  # t
    8: st.text(max_size=6),  # vd
}
#: Labels that are not SenML-CBOR's: unknown integers, and keys that equal integer labels
#: (True == 1, 0.0 == 0) or are the JSON names.
ODD_LABELS = st.sampled_from([-6, 7, 9, -9, 99, True, False, 0.0, 1.0, "n", "v", "x_"])
#: Which value labels a record has: mostly one, sometimes none, the allowed pair or two.
VALUE_LABEL_CHOICES = st.sampled_from([(2,)] * 8 + [(3,), (4,), (5,), (8,), (2, 5), (), (2, 3)])
OTHER_LABELS = st.sets(st.sampled_from([-1, -2, -3, -4, -5, 1, 6]), max_size=3)


@st.composite
def senml_records(draw: st.DrawFn, *, odd: bool) -> dict[object, object]:
    labels = [*draw(VALUE_LABEL_CHOICES), *draw(OTHER_LABELS)]
    if draw(st.integers(0, 7)):
        labels.append(0)  # usually a name
    record: dict[object, object] = {}
    for label in labels:
        sensible = draw(st.integers(0, 19)) > 0
        record[label] = draw(SENML_FIELDS[label] if sensible else SENML_ANY)
    if odd and draw(st.integers(0, 9)) == 0:
        record[draw(ODD_LABELS)] = draw(SENML_ANY)
    return record


def senml_packs(*, odd: bool) -> st.SearchStrategy[object]:
    records = senml_records(odd=odd)
    odd_packs = st.lists(records | SENML_ANY, max_size=3) | SENML_ANY  # not all records
    return st.integers(0, 9).flatmap(
        lambda pick: st.lists(records, min_size=1, max_size=5) if pick else odd_packs
    )


def outcome(decode: Callable[[], list[Measurement]]) -> object:
    """What a decoder gave: the measurements with the types of their values, or the error."""
    try:
        return [(repr(m), type(m.value), type(m.time)) for m in decode()]
    except DeviceError as exc:
        return (type(exc), str(exc), exc.field)


@settings(max_examples=1500, deadline=None)
@given(senml_packs(odd=True))
def test_senml_cbor_decodes_as_the_reference_does(pack: object) -> None:
    payload = cbor2.dumps(pack)
    assert outcome(lambda: decode_readings(payload, CF_SENML_CBOR, now=NOW)) == outcome(
        lambda: reference_senml(cbor2.loads(payload), cbor_labels=True, now=NOW)
    )


JSON_NAMES = {label: name for label, name in SENML_CBOR_LABELS.items()}


@settings(max_examples=500, deadline=None)
@given(senml_packs(odd=False))
def test_senml_json_decodes_as_the_reference_does(pack: object) -> None:
    def as_json(item: object) -> object:
        if isinstance(item, dict):
            return {JSON_NAMES.get(label, str(label)): as_json(v) for label, v in item.items()}
        if isinstance(item, list):
            return [as_json(v) for v in item]
        return item.hex() if isinstance(item, bytes) else item

    document = as_json(pack)
    try:
        payload = json.dumps(document, allow_nan=False).encode()
    except ValueError:
        return  # NaN or infinity: not JSON
    assert outcome(lambda: decode_readings(payload, CF_SENML_JSON, now=NOW)) == outcome(
        lambda: reference_senml(json.loads(payload), cbor_labels=False, now=NOW)
    )


def test_senml_pack_of_the_benchmark_decodes_as_the_reference_does() -> None:
    pack = [{-3: 1_700_000_000, -4: "Cel", 0: "temp", 2: 4.25}]
    pack += [{0: "temp", 2: 3.0 + i / 4, 6: i} for i in range(1, 50)]
    payload = cbor2.dumps(pack, canonical=True)
    decoded = decode_readings(payload, CF_SENML_CBOR, now=NOW)
    assert outcome(lambda: decoded) == outcome(
        lambda: reference_senml(cbor2.loads(payload), cbor_labels=True, now=NOW)
    )
    assert [m.key for m in decoded[:2]] == ["t1700000000.0/temp", "t1700000001.0/temp"]


huge_ints = st.one_of(
    st.integers(min_value=2**63 - 2, max_value=2**63 + 2),
    st.integers(min_value=-(2**63) - 2, max_value=-(2**63) + 2),
    st.integers(min_value=10**300, max_value=10**400),
    st.integers(min_value=-(10**400), max_value=-(10**300)),
)


@given(huge_ints, st.sampled_from(["v", "s", "t", "bt", "bv", "plain", "ts"]))
def test_integers_of_any_size_give_a_reading_or_a_device_error(value: int, where: str) -> None:
    if where == "plain":
        documents = [(cbor2.dumps({"temp": value}), 60), (json.dumps({"temp": value}), 50)]
    elif where == "ts":
        documents = [(json.dumps({"temp": 1, "ts": value}), 50)]
    else:
        record: dict[str, object] = {"n": "temp", "v": 1.0}
        if where in ("v", "s"):
            record.pop("v")
        record[where] = value
        documents = [(json.dumps([record]), 110)]
    for payload, content_format in documents:
        raw = payload.encode() if isinstance(payload, str) else payload
        try:
            measurements = decode_readings(raw, content_format, now=1.0)
        except DeviceError:
            continue
        for measurement in measurements:
            if isinstance(measurement.value, int):
                assert -(2**63) <= measurement.value < 2**63  # fits an SQLite integer
