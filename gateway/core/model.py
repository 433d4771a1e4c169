"""Plain values that cross layers: devices and committed readings."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from gateway.core.readings import Value


@dataclass(frozen=True, slots=True)
class Device:
    id: int
    name: str
    type: str


class StoredReading(NamedTuple):
    """A reading as committed: `id` is its stable message id downstream.

    A named tuple, like `Measurement` and for the same reason: one is built for every
    committed reading, and a frozen dataclass takes more than twice as long to build.
    """

    id: int
    device: Device
    measurement: str
    value: Value
    unit: str | None
    device_time: float | None
    received_at: float
    seq: int | None

    @property
    def time(self) -> float:
        """Device time when the device gave one, else when the gateway received it."""
        return self.device_time if self.device_time is not None else self.received_at


def value_kind(value: Value) -> str:
    """The one-letter kind stored beside a value, so bools come back as bools."""
    if isinstance(value, bool):
        return "b"
    if isinstance(value, str):
        return "s"
    return "n"


def value_from_row(value: object, kind: str) -> Value:
    if kind == "b":
        return bool(value)
    if kind == "s":
        return str(value)
    if isinstance(value, int | float):
        return value
    raise ValueError(f"stored value of kind {kind!r} is {type(value).__name__}")
