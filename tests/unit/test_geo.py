"""Geofence maths: haversine distances and point-in-polygon."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.core import geo

PARIS = (48.8566, 2.3522)
# A square of about 1.1 km around the Paris home point.
SQUARE = [(48.8516, 2.3452), (48.8516, 2.3592), (48.8616, 2.3592), (48.8616, 2.3452)]


def test_haversine_known_distances() -> None:
    # Paris to London is about 343.5 km along the great circle.
    assert geo.haversine_m(*PARIS, 51.5074, -0.1278) == pytest.approx(343_500, rel=0.005)
    # One degree of latitude is about 111.2 km.
    assert geo.haversine_m(0, 0, 1, 0) == pytest.approx(111_195, rel=0.001)
    assert geo.haversine_m(*PARIS, *PARIS) == 0


@given(st.floats(-89, 89), st.floats(-179, 179), st.floats(-89, 89), st.floats(-179, 179))
def test_haversine_symmetric_and_bounded(
    lat1: float, lon1: float, lat2: float, lon2: float
) -> None:
    d = geo.haversine_m(lat1, lon1, lat2, lon2)
    assert d == pytest.approx(geo.haversine_m(lat2, lon2, lat1, lon1), abs=1e-6)
    assert 0 <= d <= math.pi * geo.EARTH_RADIUS_M + 1e-6


def test_circle_signed_distance() -> None:
    # 0.009 degrees of latitude is about 1000 m.
    assert geo.outside_distance_circle_m(48.8656, 2.3522, *PARIS, 500) == pytest.approx(
        500.8, abs=1
    )
    assert geo.outside_distance_circle_m(*PARIS, *PARIS, 500) == -500


def test_point_in_polygon_square_and_concave() -> None:
    assert geo.point_in_polygon(*PARIS, SQUARE)
    assert not geo.point_in_polygon(48.8700, 2.3522, SQUARE)
    assert not geo.point_in_polygon(48.8566, 2.3400, SQUARE)
    # A "U": the notch between the arms is outside.
    u_shape = [(0, 0), (0, 3), (3, 3), (3, 2), (1, 2), (1, 1), (3, 1), (3, 0)]
    assert geo.point_in_polygon(0.5, 1.5, u_shape)
    assert not geo.point_in_polygon(2, 1.5, u_shape)
    assert geo.point_in_polygon(2, 0.5, u_shape)
    assert geo.point_in_polygon(2, 2.5, u_shape)


def test_polygon_signed_distance() -> None:
    # The centre is ~555 m from the north and south edges, ~513 m from east and west.
    inside = geo.outside_distance_polygon_m(*PARIS, SQUARE)
    assert inside == pytest.approx(-513, abs=5)
    # 0.0045 degrees north of the north edge: about 500 m outside.
    assert geo.outside_distance_polygon_m(48.8661, 2.3522, SQUARE) == pytest.approx(500, abs=2)


@given(st.floats(48.80, 48.90), st.floats(2.30, 2.40))
def test_polygon_sign_agrees_with_containment(lat: float, lon: float) -> None:
    signed = geo.outside_distance_polygon_m(lat, lon, SQUARE)
    assert (signed <= 0) == geo.point_in_polygon(lat, lon, SQUARE) or abs(signed) < 1e-6
