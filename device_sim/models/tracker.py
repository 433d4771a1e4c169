"""A GPS tracker on a pet or a vehicle: position, speed, heading, battery.

With ``route`` empty the tracker wanders (a correlated random walk around its start);
otherwise it drives the waypoints in a loop at about ``cruise_speed``. Positions move on a
local flat-earth approximation, which is accurate to well under a metre per step at the
distances a step covers. The battery drains with time and with each report; an empty
battery stops the tracker where it is. Trackers are sleepy devices: the node wakes them
every ``wake_interval`` seconds to report, then they sleep again.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from dataclasses import dataclass, replace

from device_sim.models.base import CommandError, Event, Measurement, ResourceSpec, substeps

MAX_DT = 10.0
METRES_PER_DEG_LAT = 111_320.0
MAX_SPEED = 100.0


@dataclass(frozen=True)
class TrackerState:
    t: float
    lat: float
    lon: float
    speed: float
    heading: float
    battery: float
    waypoint: int = 0


def bearing_and_distance(lat1: float, lon1: float, lat2: float, lon2: float) -> tuple[float, float]:
    """Heading in degrees (0 = north, clockwise) and distance in metres, flat-earth."""
    dy = (lat2 - lat1) * METRES_PER_DEG_LAT
    dx = (lon2 - lon1) * METRES_PER_DEG_LAT * math.cos(math.radians((lat1 + lat2) / 2))
    return math.degrees(math.atan2(dx, dy)) % 360.0, math.hypot(dx, dy)


def move(lat: float, lon: float, heading: float, metres: float) -> tuple[float, float]:
    rad = math.radians(heading)
    lat2 = lat + metres * math.cos(rad) / METRES_PER_DEG_LAT
    coslat = max(math.cos(math.radians(lat)), 1e-6)
    lon2 = lon + metres * math.sin(rad) / (METRES_PER_DEG_LAT * coslat)
    lat2 = max(-90.0, min(90.0, lat2))
    lon2 = (lon2 + 180.0) % 360.0 - 180.0
    return lat2, lon2


@dataclass(frozen=True)
class Tracker:
    start: tuple[float, float] = (52.52, 13.405)
    #: Waypoints (lat, lon) driven in a loop; empty for a random walk.
    route: tuple[tuple[float, float], ...] = ()
    cruise_speed: float = 1.4
    #: Standard deviation of heading change, degrees per sqrt(second), for the walk.
    heading_jitter: float = 6.0
    #: Battery percent lost per hour awake-or-asleep, and per report sent.
    drain_per_hour: float = 0.5
    drain_per_report: float = 0.01
    wake_interval: float = 60.0

    device_type = "tracker"

    @property
    def resources(self) -> tuple[ResourceSpec, ...]:
        return (
            ResourceSpec("pos", "position", None),
            ResourceSpec("battery", "battery", "battery"),
        )

    @property
    def units(self) -> Mapping[str, str]:
        return {"lat": "lat", "lon": "lon", "speed": "m/s", "heading": "deg", "battery": "%"}

    def initial(self, now: float, rng: random.Random) -> TrackerState:
        lat, lon = self.route[0] if self.route else self.start
        return TrackerState(
            t=now,
            lat=lat,
            lon=lon,
            speed=self.cruise_speed * rng.uniform(0.5, 1.5),
            heading=rng.uniform(0.0, 360.0),
            battery=100.0,
            waypoint=1 % len(self.route) if self.route else 0,
        )

    def step(
        self, state: TrackerState, now: float, rng: random.Random
    ) -> tuple[TrackerState, list[Event]]:
        events: list[Event] = []
        lat, lon, speed, heading = state.lat, state.lon, state.speed, state.heading
        battery, waypoint = state.battery, state.waypoint
        for t, dt in substeps(state.t, now, MAX_DT):
            before = battery
            battery = max(0.0, battery - self.drain_per_hour * dt / 3600.0)
            if before > 20.0 >= battery:
                events.append(Event("battery.low", t))
            if battery <= 0.0:
                if before > 0.0:
                    events.append(Event("battery.empty", t))
                speed = 0.0
                continue
            if self.route:
                target = self.route[waypoint]
                heading, distance = bearing_and_distance(lat, lon, *target)
                speed = max(0.0, min(MAX_SPEED, self.cruise_speed * rng.uniform(0.8, 1.2)))
                if speed * dt >= distance:
                    lat, lon = target
                    waypoint = (waypoint + 1) % len(self.route)
                    events.append(Event("waypoint.reached", t, str(waypoint)))
                    continue
            else:
                heading = (heading + rng.gauss(0.0, self.heading_jitter * math.sqrt(dt))) % 360.0
                # Mean-reverting speed keeps the walk near cruise speed instead of drifting off.
                speed += (self.cruise_speed - speed) * min(1.0, dt / 60.0) + rng.gauss(0.0, 0.1)
                speed = max(0.0, min(MAX_SPEED, speed))
            lat, lon = move(lat, lon, heading, speed * dt)
        new = replace(
            state,
            t=max(now, state.t),
            lat=lat,
            lon=lon,
            speed=speed,
            heading=heading % 360.0,
            battery=battery,
            waypoint=waypoint,
        )
        return new, events

    def reported(self, state: TrackerState) -> TrackerState:
        """The state after the radio sent one report (which costs battery)."""
        return replace(state, battery=max(0.0, state.battery - self.drain_per_report))

    def measurements(self, state: TrackerState) -> dict[str, Measurement]:
        return {
            "lat": round(state.lat, 6),
            "lon": round(state.lon, 6),
            "speed": round(state.speed, 2),
            "heading": round(state.heading, 1) % 360.0,
            "battery": round(state.battery, 2),
        }

    def command(self, state: TrackerState, name: str, value: object) -> TrackerState:
        raise CommandError(f"{name}: not writable")
