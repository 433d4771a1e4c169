"""Types shared by the device models."""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol, TypeVar

Measurement = float | int | bool | str

S = TypeVar("S")


class CommandError(ValueError):
    """A write to a device resource was refused (unknown resource or a bad value)."""


@dataclass(frozen=True)
class Event:
    """Something that happened inside a step, e.g. ``door.opened`` at ``at``."""

    kind: str
    at: float
    detail: str = ""


@dataclass(frozen=True)
class ResourceSpec:
    """A CoAP resource the device hosts, described for its link-format registration.

    ``measurement`` names the value a GET returns; None means the whole measurement map.
    """

    path: str
    rt: str
    measurement: str | None = None
    observable: bool = False
    writable: bool = False

    def link(self) -> str:
        attrs = f'</{self.path}>;rt="{self.rt}"'
        if self.observable:
            attrs += ";obs"
        return attrs


class DeviceModel(Protocol[S]):
    """What a node needs from a model. Implemented by `Fridge`, `Tracker`, `StreetLight`."""

    @property
    def device_type(self) -> str: ...

    @property
    def resources(self) -> tuple[ResourceSpec, ...]: ...

    @property
    def units(self) -> Mapping[str, str]: ...

    def initial(self, now: float, rng: random.Random) -> S: ...

    def step(self, state: S, now: float, rng: random.Random) -> tuple[S, list[Event]]: ...

    def measurements(self, state: S) -> dict[str, Measurement]: ...

    def command(self, state: S, name: str, value: object) -> S: ...


def chance(rate_per_s: float, dt: float) -> float:
    """Probability that a Poisson process with ``rate_per_s`` fires within ``dt`` seconds."""
    if rate_per_s <= 0 or dt <= 0:
        return 0.0
    return 1.0 - math.exp(-rate_per_s * dt)


def per_hour_probability(p_hour: float, dt: float) -> float:
    """Scale a per-hour probability to ``dt`` seconds; 0 stays 0 and 1 stays 1."""
    if p_hour <= 0 or dt <= 0:
        return 0.0
    if p_hour >= 1:
        return 1.0
    return 1.0 - math.exp(math.log1p(-p_hour) * dt / 3600.0)


def substeps(start: float, end: float, max_dt: float) -> list[tuple[float, float]]:
    """Split (start, end] into slices of at most ``max_dt``: (slice_end, dt) pairs."""
    if end <= start:
        return []
    n = max(1, math.ceil((end - start) / max_dt))
    dt = (end - start) / n
    return [(start + dt * (i + 1), dt) for i in range(n)]


def as_number(value: object, *, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise CommandError(f"{name}: expected a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise CommandError(f"{name}: must be finite")
    return float(value)


def as_bool(value: object, *, name: str) -> bool:
    if not isinstance(value, bool):
        raise CommandError(f"{name}: expected a boolean, got {type(value).__name__}")
    return value
