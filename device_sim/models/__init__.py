"""Pure device models: no I/O, no asyncio, no clock of their own.

Every model is a frozen parameter object with the same shape:

* ``initial(now, rng) -> state``
* ``step(state, now, rng) -> (state, events)``: advance the physics to ``now``
* ``measurements(state) -> {name: value}``: what the device reports (names per the wire contract)
* ``command(state, name, value) -> state``: a write to one of its resources; raises
  `CommandError` when the value is wrong

States are frozen dataclasses, so a step never mutates what the caller holds. Time is epoch
seconds, passed in; randomness comes from the `random.Random` passed in, so a seed fixes
every trajectory.
"""

from __future__ import annotations

from device_sim.models.base import (
    CommandError,
    DeviceModel,
    Event,
    Measurement,
    ResourceSpec,
)
from device_sim.models.fridge import Fridge, FridgeState
from device_sim.models.streetlight import StreetLight, StreetLightState
from device_sim.models.tracker import Tracker, TrackerState

__all__ = [
    "CommandError",
    "DeviceModel",
    "Event",
    "Fridge",
    "FridgeState",
    "Measurement",
    "ResourceSpec",
    "StreetLight",
    "StreetLightState",
    "Tracker",
    "TrackerState",
]
