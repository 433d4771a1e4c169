"""Per-type validation and registration request parsing."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.core.readings import Measurement
from gateway.core.registration import LifetimeBounds, parse_registration, parse_update
from gateway.core.validate import Limits, validate_measurements
from gateway.errors import BadRequestError, PayloadTooLargeError, ValidationError

LIMITS = Limits(max_fields=4, max_name_length=16, max_string_length=8)
BOUNDS = LifetimeBounds(default=3600, minimum=10, maximum=86_400)


def m(name: str, value: object, unit: str | None = None) -> Measurement:
    return Measurement(name, value, unit)  # type: ignore[arg-type]


def test_known_fields_get_units_filled_in() -> None:
    checked = validate_measurements([m("temp", 4.5), m("stock_milk", 2)], "fridge", LIMITS)
    assert [(x.name, x.unit) for x in checked] == [("temp", "Cel"), ("stock_milk", "count")]


def test_unknown_fields_pass_generic_checks() -> None:
    (checked,) = validate_measurements([m("humidity", 40)], "fridge", LIMITS)
    assert checked.unit is None


@pytest.mark.parametrize(
    ("measurement", "device_type", "field", "text"),
    [
        (m("temp", 99), "fridge", "temp", "above the maximum"),
        (m("temp", "hot"), "fridge", "temp", "expected number"),
        (m("door", 1), "fridge", "door", "expected bool"),
        (m("stock_milk", 1.5), "fridge", "stock_milk", "expected integer"),
        (m("temp", 4, "K"), "fridge", "temp", "unit"),
        (m("lat", -91), "tracker", "lat", "below the minimum"),
        (m("dim", 101), "streetlight", "dim", "above"),
        (m("note", "x" * 9), "generic", "note", "string longer"),
        (m("bad name", 1), "generic", "bad name", "name must match"),
        (m("n" * 17, 1), "generic", "n" * 17, "name longer"),
    ],
)
def test_invalid_values_name_the_field(
    measurement: Measurement, device_type: str, field: str, text: str
) -> None:
    with pytest.raises(ValidationError, match=text) as caught:
        validate_measurements([measurement], device_type, LIMITS)
    assert caught.value.field == field


def test_too_many_fields() -> None:
    with pytest.raises(ValidationError, match="too many fields"):
        validate_measurements([m(f"f{i}", i) for i in range(5)], "generic", LIMITS)


SERIES = st.lists(
    st.builds(
        Measurement,
        st.sampled_from(["temp", "door", "stock_milk", "stock_", "lat", "dim", "x" * 17, "-a"]),
        st.one_of(
            st.floats(-100, 2000), st.integers(-5, 2000), st.booleans(), st.text(max_size=10)
        ),
        st.sampled_from([None, None, "Cel", "%", "count", "u" * 17]),
    ),
    min_size=1,
    max_size=LIMITS.max_fields,
)


def outcome(measurements: list[Measurement], device_type: str) -> object:
    try:
        return validate_measurements(measurements, device_type, LIMITS)
    except ValidationError as exc:
        return (str(exc), exc.field)


def one_by_one(measurements: list[Measurement], device_type: str) -> object:
    checked: list[Measurement] = []
    for measurement in measurements:
        alone = outcome([measurement], device_type)
        if not isinstance(alone, list):
            return alone  # the first error
        checked += alone
    return checked


@given(SERIES, st.sampled_from(["fridge", "tracker", "streetlight", "generic"]))
def test_a_pack_validates_as_its_measurements_one_by_one(
    measurements: list[Measurement], device_type: str
) -> None:
    # Names repeated in a pack are checked once per request; that must not change anything.
    assert outcome(measurements, device_type) == one_by_one(measurements, device_type)


def test_registration_parses_query_and_links() -> None:
    request = parse_registration(
        ["ep=light-7", "et=streetlight", "lt=120", "q"],
        b'</state>;rt="light";obs,</dim>',
        bounds=BOUNDS,
        max_links_size=256,
    )
    assert (request.endpoint, request.device_type, request.lifetime, request.queue_mode) == (
        "light-7",
        "streetlight",
        120,
        True,
    )
    assert [(r.path, r.observable) for r in request.resources] == [
        ("/state", True),
        ("/dim", False),
    ]


def test_registration_defaults() -> None:
    request = parse_registration(["ep=x"], b"", bounds=BOUNDS, max_links_size=256)
    assert (request.device_type, request.lifetime, request.queue_mode) == ("generic", 3600, False)


@pytest.mark.parametrize(
    "query",
    [
        [],
        ["et=fridge"],
        ["ep=bad name"],
        ["ep=x", "lt=5"],
        ["ep=x", "lt=abc"],
        ["ep=x", "ep=y"],
        ["ep=x", "et=a b"],
    ],
)
def test_bad_registrations(query: list[str]) -> None:
    with pytest.raises(BadRequestError):
        parse_registration(query, b"", bounds=BOUNDS, max_links_size=256)


def test_oversized_or_malformed_links() -> None:
    with pytest.raises(PayloadTooLargeError):
        parse_registration(["ep=x"], b"</a>" * 100, bounds=BOUNDS, max_links_size=64)
    with pytest.raises(BadRequestError):
        parse_registration(["ep=x"], b"\xff\xfe", bounds=BOUNDS, max_links_size=64)


def test_update_lifetime() -> None:
    assert parse_update([], bounds=BOUNDS) is None
    assert parse_update(["lt=60"], bounds=BOUNDS) == 60
