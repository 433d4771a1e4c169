"""Distances on the Earth for geofence rules: pure functions over degrees and metres.

A circle is exact on a sphere (haversine). A polygon is tested in the plane of its
latitude/longitude coordinates, which is accurate for the zones a gateway watches (a few
kilometres across) and wrong for polygons that cross the antimeridian or enclose a pole:
those are not supported. Distances to a polygon's edges use a local equirectangular
projection centred on the point, good to well under a metre at that scale.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

#: Mean Earth radius (IUGG), metres.
EARTH_RADIUS_M = 6_371_008.8

Point = tuple[float, float]
"""(latitude, longitude) in degrees."""


def haversine_m(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Great-circle distance in metres between two points given in degrees."""
    phi1, phi2 = math.radians(lat1), math.radians(lat2)
    dphi = phi2 - phi1
    dlambda = math.radians(lon2 - lon1)
    a = math.sin(dphi / 2) ** 2 + math.cos(phi1) * math.cos(phi2) * math.sin(dlambda / 2) ** 2
    return 2 * EARTH_RADIUS_M * math.asin(min(1.0, math.sqrt(a)))


def point_in_polygon(lat: float, lon: float, polygon: Sequence[Point]) -> bool:
    """Whether the point lies inside the polygon (even-odd rule; the ring closes itself)."""
    inside = False
    count = len(polygon)
    for index in range(count):
        lat_a, lon_a = polygon[index]
        lat_b, lon_b = polygon[index - 1]
        # Ray cast towards increasing longitude; the half-open test on latitude counts a
        # vertex shared by two edges once.
        if (lat_a > lat) != (lat_b > lat):
            crossing = lon_a + (lat - lat_a) * (lon_b - lon_a) / (lat_b - lat_a)
            if lon < crossing:
                inside = not inside
    return inside


def _project(lat0: float, lon0: float, lat: float, lon: float) -> tuple[float, float]:
    x = math.radians(lon - lon0) * math.cos(math.radians(lat0)) * EARTH_RADIUS_M
    y = math.radians(lat - lat0) * EARTH_RADIUS_M
    return x, y


def _distance_to_segment(ax: float, ay: float, bx: float, by: float) -> float:
    """Distance from the origin to the segment a-b, in the plane."""
    dx, dy = bx - ax, by - ay
    length2 = dx * dx + dy * dy
    t = 0.0 if length2 == 0 else max(0.0, min(1.0, -(ax * dx + ay * dy) / length2))
    return math.hypot(ax + t * dx, ay + t * dy)


def distance_to_polygon_edge_m(lat: float, lon: float, polygon: Sequence[Point]) -> float:
    """Distance in metres from the point to the polygon's nearest edge."""
    projected = [_project(lat, lon, plat, plon) for plat, plon in polygon]
    return min(
        _distance_to_segment(*projected[index - 1], *projected[index])
        for index in range(len(projected))
    )


def outside_distance_circle_m(
    lat: float, lon: float, center_lat: float, center_lon: float, radius_m: float
) -> float:
    """Signed distance to the circle's edge: positive outside, negative inside."""
    return haversine_m(lat, lon, center_lat, center_lon) - radius_m


def outside_distance_polygon_m(lat: float, lon: float, polygon: Sequence[Point]) -> float:
    """Signed distance to the polygon's edge: positive outside, negative inside."""
    distance = distance_to_polygon_edge_m(lat, lon, polygon)
    return -distance if point_in_polygon(lat, lon, polygon) else distance
