"""The payload decoders and validation: any input gives checked measurements or a DeviceError.

Bounded for `make test` (FUZZ_EXAMPLES, default 300); `make fuzz` runs many more.
"""

from __future__ import annotations

import math
import os
from typing import Any

import cbor2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.core.readings import CF_CBOR, CF_JSON, CF_SENML_CBOR, CF_SENML_JSON, decode_readings
from gateway.core.validate import Limits, schema_for, validate_measurements
from gateway.errors import DeviceError

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "300"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FORMATS = st.sampled_from([CF_CBOR, CF_JSON, CF_SENML_CBOR, CF_SENML_JSON, None])
TYPES = st.sampled_from(["fridge", "tracker", "streetlight", "generic"])
NAMES = st.sampled_from(
    ["temp", "door", "stock_milk", "lat", "lon", "speed", "on", "dim", "lux", "ts", "seq", ""]
) | st.text(max_size=80)
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=300)
    | st.binary(max_size=20)
)
PLAIN = st.dictionaries(NAMES, SCALARS, max_size=70)
SENML = st.lists(
    st.dictionaries(
        st.sampled_from([-2, -3, -4, -5, 0, 1, 2, 3, 4, 6, "n", "v", "bn", "bt", 99]),
        SCALARS,
        max_size=6,
    ),
    max_size=10,
)
LIMITS = Limits()


def documents() -> st.SearchStrategy[bytes]:
    structured = st.one_of(PLAIN, st.lists(PLAIN, max_size=4), SENML).map(
        lambda doc: cbor2.dumps(doc)
    )
    return st.one_of(st.binary(max_size=400), structured, structured.map(lambda b: b[:-1]))


def assert_valid(measurement: Any, device_type: str) -> None:
    """What the store may hold: a named, finite, schema-conforming value."""
    assert measurement.name and len(measurement.name) <= LIMITS.max_name_length
    value = measurement.value
    assert isinstance(value, bool | int | float | str)
    if isinstance(value, float):
        assert math.isfinite(value)
    if isinstance(value, str):
        assert len(value) <= LIMITS.max_string_length
    spec = schema_for(device_type).spec_for(measurement.name)
    if spec is not None and spec.minimum is not None and not isinstance(value, bool | str):
        assert spec.minimum <= value <= (spec.maximum if spec.maximum is not None else value)


@FUZZ
@given(payload=documents(), content_format=FORMATS, device_type=TYPES)
def test_any_payload_gives_valid_measurements_or_a_device_error(
    payload: bytes, content_format: int | None, device_type: str
) -> None:
    try:
        measurements = decode_readings(payload, content_format, now=1_700_000_000.0)
        checked = validate_measurements(measurements, device_type, LIMITS)
    except DeviceError:
        return
    assert 1 <= len(checked) <= LIMITS.max_fields
    for measurement in checked:
        assert_valid(measurement, device_type)
