"""Deterministic device physics for the rules tests.

The same equations and parameters as the simulator's models (device_sim/models: a
first-order thermal fridge with a hysteresis compressor and a door alarm, a street light's
lamp, a tracker moving on a flat-earth approximation), without their randomness, so a test
knows exactly when a door opens and a lamp fails.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

METRES_PER_DEG_LAT = 111_320.0


@dataclass
class Fridge:
    temp: float = 4.0
    setpoint: float = 4.0
    hysteresis: float = 1.5
    ambient: float = 21.0
    leak: float = 1 / 5400
    door_leak: float = 1 / 240
    cooling: float = 0.012
    alarm_after: float = 60.0
    compressor: bool = False
    door_open: bool = False
    door_opened_at: float | None = None
    stock: dict[str, int] = field(default_factory=lambda: {"milk": 4, "eggs": 12, "butter": 2})
    t: float = 0.0

    def open_door(self, at: float) -> None:
        self.door_open, self.door_opened_at = True, at

    def close_door(self) -> None:
        self.door_open, self.door_opened_at = False, None

    def step(self, now: float) -> None:
        while self.t < now:
            dt = min(5.0, now - self.t)
            self.t += dt
            k = self.door_leak if self.door_open else self.leak
            self.temp += (self.ambient - self.temp) * k * dt
            if self.compressor:
                self.temp -= self.cooling * dt
            half = self.hysteresis / 2
            if not self.compressor and self.temp > self.setpoint + half:
                self.compressor = True
            elif self.compressor and self.temp < self.setpoint - half:
                self.compressor = False

    def measurements(self) -> dict[str, float | bool | int]:
        alarm = (
            self.door_open
            and self.door_opened_at is not None
            and self.t - self.door_opened_at >= self.alarm_after
        )
        # A little sensor noise: it must not turn one warm spell into many alerts.
        noise = 0.3 * math.sin(self.t / 7.0)
        out: dict[str, float | bool | int] = {
            "temp": round(self.temp + noise, 2),
            "setpoint": self.setpoint,
            "door": self.door_open,
            "compressor": self.compressor,
            "door_alarm": alarm,
        }
        out.update({f"stock_{item}": count for item, count in self.stock.items()})
        return out


def move(lat: float, lon: float, heading: float, metres: float) -> tuple[float, float]:
    rad = math.radians(heading)
    lat2 = lat + metres * math.cos(rad) / METRES_PER_DEG_LAT
    lon2 = lon + metres * math.sin(rad) / (METRES_PER_DEG_LAT * math.cos(math.radians(lat)))
    return lat2, lon2
