"""A street light: dusk-to-dawn schedule, dimming, power draw, an ambient light sensor.

Daylight follows a half-sine between sunrise and sunset (local time = UTC + ``utc_offset``
hours), with cloud noise. The lamp is on from dusk to dawn, at full power until
``dim_from`` o'clock and at ``night_dim`` percent after; writes to ``on`` and ``dim``
override the schedule. A burning lamp fails with probability ``failure_rate`` per hour of
burning (0 never, 1 at the first step it burns); a failed lamp draws nothing and reports
``lamp_ok`` false for good.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from dataclasses import dataclass, replace

from device_sim.models.base import (
    CommandError,
    Event,
    Measurement,
    ResourceSpec,
    as_bool,
    as_number,
    per_hour_probability,
)


@dataclass(frozen=True)
class StreetLightState:
    t: float
    on: bool
    dim: float
    lamp_ok: bool
    lux: float
    power: float
    override_on: bool | None = None
    override_dim: float | None = None


@dataclass(frozen=True)
class StreetLight:
    utc_offset: float = 0.0
    sunrise: float = 6.5
    sunset: float = 18.5
    #: The lamp switches on this many hours before sunset's end of light and off after dawn.
    twilight: float = 0.5
    dim_from: float = 0.0
    night_dim: float = 50.0
    rated_power: float = 120.0
    standby_power: float = 0.5
    peak_lux: float = 60_000.0
    night_lux: float = 2.0
    failure_rate: float = 0.0

    device_type = "streetlight"

    @property
    def resources(self) -> tuple[ResourceSpec, ...]:
        return (
            ResourceSpec("state", "light", None, observable=True),
            ResourceSpec("on", "switch", "on", observable=True, writable=True),
            ResourceSpec("dim", "dimmer", "dim", writable=True),
            ResourceSpec("lux", "illuminance", "lux"),
        )

    @property
    def units(self) -> Mapping[str, str]:
        return {"dim": "%", "power": "W", "lux": "lx"}

    def hour_of_day(self, now: float) -> float:
        return ((now + self.utc_offset * 3600.0) % 86_400.0) / 3600.0

    def scheduled(self, now: float) -> tuple[bool, float]:
        """(on, dim percent) the schedule asks for at ``now``."""
        h = self.hour_of_day(now)
        on = not (self.sunrise + self.twilight <= h < self.sunset - self.twilight)
        if not on:
            return False, 0.0
        # Full light in the evening, dimmed from dim_from until dawn.
        dawn = self.sunrise + self.twilight
        after_dim = (h - self.dim_from) % 24.0 < (dawn - self.dim_from) % 24.0
        return True, self.night_dim if after_dim else 100.0

    def daylight(self, now: float) -> float:
        h = self.hour_of_day(now)
        if not self.sunrise <= h <= self.sunset:
            return 0.0
        return self.peak_lux * math.sin(math.pi * (h - self.sunrise) / (self.sunset - self.sunrise))

    def initial(self, now: float, rng: random.Random) -> StreetLightState:
        state = StreetLightState(t=now, on=False, dim=0.0, lamp_ok=True, lux=0.0, power=0.0)
        return self._settle(state, now, rng)

    def _levels(self, state: StreetLightState, now: float) -> StreetLightState:
        """On, dim and power from the schedule and any override, at ``now``."""
        on, dim = self.scheduled(now)
        if state.override_on is not None:
            on = state.override_on
        if state.override_dim is not None:
            dim = state.override_dim
        elif on and dim == 0.0:
            dim = 100.0
        burning = on and state.lamp_ok and dim > 0
        if burning:
            power = self.rated_power * dim / 100.0
        else:
            power = self.standby_power if state.lamp_ok else 0.0
        return replace(state, on=on, dim=dim if on else 0.0, power=power)

    def _settle(self, state: StreetLightState, now: float, rng: random.Random) -> StreetLightState:
        state = self._levels(state, now)
        cloud = rng.uniform(0.6, 1.0)
        lux = self.daylight(now) * cloud + self.night_lux * rng.uniform(0.5, 1.5)
        if state.on and state.lamp_ok:
            lux += 10.0 * state.dim / 100.0  # the sensor sees some of its own lamp
        return replace(state, t=max(now, state.t), lux=lux)

    def step(
        self, state: StreetLightState, now: float, rng: random.Random
    ) -> tuple[StreetLightState, list[Event]]:
        events: list[Event] = []
        dt = now - state.t
        burning = state.lamp_ok and state.on and state.dim > 0 and dt > 0
        if burning and rng.random() < per_hour_probability(self.failure_rate, dt):
            state = replace(state, lamp_ok=False)
            events.append(Event("lamp.failed", now))
        new = self._settle(state, now, rng)
        if new.on != state.on:
            events.append(Event("lamp.on" if new.on else "lamp.off", now))
        return new, events

    def measurements(self, state: StreetLightState) -> dict[str, Measurement]:
        return {
            "on": state.on,
            "dim": round(state.dim, 1),
            "power": round(state.power, 2),
            "lux": round(min(state.lux, 200_000.0), 1),
            "lamp_ok": state.lamp_ok,
        }

    def command(self, state: StreetLightState, name: str, value: object) -> StreetLightState:
        # Takes effect at once, at the time of the last step; the next step moves time on.
        if name == "on":
            return self._levels(replace(state, override_on=as_bool(value, name=name)), state.t)
        if name == "dim":
            dim = as_number(value, name=name)
            if not 0.0 <= dim <= 100.0:
                raise CommandError("dim: must be within [0, 100] %")
            return self._levels(replace(state, override_dim=dim), state.t)
        raise CommandError(f"{name}: not writable")
