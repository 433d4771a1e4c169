"""A household fridge: a first-order thermal model, a door, and a few items of stock.

The compartment exchanges heat with the room (``leak`` per second closed, ``door_leak`` per
second open) and the compressor pulls ``cooling`` degrees per second out while running. The
compressor cycles with hysteresis around the setpoint. People open the door at random (a
Poisson process); a small fraction of openings leave the door ajar (the door-left-open
fault) until someone notices after ``stuck_for`` seconds. Items are used up at random while
there is stock, and are restocked to capacity ``restock_delay`` seconds after running low.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType

from device_sim.models.base import (
    CommandError,
    Event,
    Measurement,
    ResourceSpec,
    as_number,
    chance,
    substeps,
)

#: Integration slice: small against the thermal time constants, cheap enough for thousands.
MAX_DT = 5.0

DEFAULT_ITEMS: Mapping[str, tuple[int, float]] = MappingProxyType(
    # item -> (capacity, uses per hour)
    {"milk": (4, 0.15), "eggs": (12, 0.4), "butter": (2, 0.05)}
)


@dataclass(frozen=True)
class FridgeState:
    t: float
    temp: float
    setpoint: float
    door_open: bool
    #: When an open door closes by itself; None while it is stuck open.
    door_closes_at: float | None
    door_opened_at: float | None
    compressor: bool
    door_alarm: bool
    stock: tuple[tuple[str, int], ...]
    #: item -> time its restock arrives
    restock_due: tuple[tuple[str, float], ...] = ()

    def stock_of(self, item: str) -> int:
        return dict(self.stock)[item]


@dataclass(frozen=True)
class Fridge:
    setpoint: float = 4.0
    hysteresis: float = 1.5
    ambient: float = 21.0
    leak: float = 1 / 5400
    door_leak: float = 1 / 240
    cooling: float = 0.012
    #: Door openings per hour.
    door_rate: float = 3.0
    #: Mean seconds an opening lasts.
    door_duration: float = 15.0
    #: Probability that an opening leaves the door ajar.
    door_fault_rate: float = 0.0
    #: How long a stuck door stays open before someone closes it.
    stuck_for: float = 1800.0
    #: An open door raises the alarm after this many seconds.
    alarm_after: float = 60.0
    items: Mapping[str, tuple[int, float]] = field(default_factory=lambda: DEFAULT_ITEMS)
    restock_below: int = 1
    restock_delay: float = 3600.0

    device_type = "fridge"

    @property
    def resources(self) -> tuple[ResourceSpec, ...]:
        return (
            ResourceSpec("temp", "temperature", "temp", observable=True),
            ResourceSpec("setpoint", "setpoint", "setpoint", writable=True),
            ResourceSpec("door", "door", "door", observable=True),
            ResourceSpec("state", "fridge", None),
        )

    @property
    def units(self) -> Mapping[str, str]:
        return {"temp": "Cel", "setpoint": "Cel"} | {
            f"stock_{item}": "count" for item in self.items
        }

    def initial(self, now: float, rng: random.Random) -> FridgeState:
        return FridgeState(
            t=now,
            temp=self.setpoint + rng.uniform(-1.0, 1.0),
            setpoint=self.setpoint,
            door_open=False,
            door_closes_at=None,
            door_opened_at=None,
            compressor=False,
            door_alarm=False,
            stock=tuple((item, cap) for item, (cap, _) in sorted(self.items.items())),
        )

    def step(
        self, state: FridgeState, now: float, rng: random.Random
    ) -> tuple[FridgeState, list[Event]]:
        events: list[Event] = []
        temp, compressor = state.temp, state.compressor
        door_open, closes_at = state.door_open, state.door_closes_at
        opened_at = state.door_opened_at
        stock = dict(state.stock)
        restock_due = dict(state.restock_due)
        for t, dt in substeps(state.t, now, MAX_DT):
            if door_open:
                close_time = closes_at
                if close_time is None:
                    close_time = (opened_at if opened_at is not None else t) + self.stuck_for
                if t >= close_time:
                    door_open, closes_at, opened_at = False, None, None
                    events.append(Event("door.closed", t))
            elif rng.random() < chance(self.door_rate / 3600.0, dt):
                door_open, opened_at = True, t
                if rng.random() < self.door_fault_rate:
                    closes_at = None
                    events.append(Event("door.stuck", t))
                else:
                    closes_at = t + rng.expovariate(1.0 / self.door_duration)
                events.append(Event("door.opened", t))

            k = self.door_leak if door_open else self.leak
            temp += (self.ambient - temp) * k * dt
            if compressor:
                temp -= self.cooling * dt
            half = self.hysteresis / 2
            if not compressor and temp > state.setpoint + half:
                compressor = True
                events.append(Event("compressor.on", t))
            elif compressor and temp < state.setpoint - half:
                compressor = False
                events.append(Event("compressor.off", t))

            for item, (cap, per_hour) in self.items.items():
                if stock[item] > 0 and rng.random() < chance(per_hour / 3600.0, dt):
                    stock[item] -= 1
                    events.append(Event("stock.used", t, item))
                if stock[item] <= self.restock_below and item not in restock_due:
                    restock_due[item] = t + self.restock_delay
                if item in restock_due and t >= restock_due[item]:
                    del restock_due[item]
                    stock[item] = cap
                    events.append(Event("stock.restocked", t, item))

        alarm = door_open and opened_at is not None and now - opened_at >= self.alarm_after
        if alarm and not state.door_alarm:
            events.append(Event("door.alarm", now))
        new = replace(
            state,
            t=max(now, state.t),
            temp=temp,
            compressor=compressor,
            door_open=door_open,
            door_closes_at=closes_at,
            door_opened_at=opened_at,
            door_alarm=alarm,
            stock=tuple(sorted(stock.items())),
            restock_due=tuple(sorted(restock_due.items())),
        )
        return new, events

    def measurements(self, state: FridgeState) -> dict[str, Measurement]:
        out: dict[str, Measurement] = {
            "temp": round(state.temp, 2),
            "setpoint": state.setpoint,
            "door": state.door_open,
            "compressor": state.compressor,
            "door_alarm": state.door_alarm,
        }
        for item, count in state.stock:
            out[f"stock_{item}"] = count
        return out

    def command(self, state: FridgeState, name: str, value: object) -> FridgeState:
        if name != "setpoint":
            raise CommandError(f"{name}: not writable")
        setpoint = as_number(value, name=name)
        if not -30.0 <= setpoint <= 15.0:
            raise CommandError("setpoint: must be within [-30, 15] Cel")
        return replace(state, setpoint=setpoint)
