"""Deliveries for relay tests."""

from __future__ import annotations

from gateway.relay.envelope import Encoding, RelayMessage, reading_message
from gateway.relay.sinks.base import Delivery


def message(reading_id: int, device: str = "fridge-1", value: float | str = 4.5) -> RelayMessage:
    return reading_message(
        reading_id=reading_id,
        device=device,
        device_type="fridge",
        gateway="gw1",
        name="temp",
        value=value,
        unit="Cel",
        device_time=1_700_000_000.0 + reading_id,
        received_at=1_700_000_000.5 + reading_id,
    )


def deliveries(
    count: int,
    *,
    devices: tuple[str, ...] = ("fridge-1",),
    encoding: Encoding = Encoding.JSON,
    value: float | str = 4.5,
) -> list[Delivery]:
    """`count` deliveries, ids r-1.., devices taken in turn."""
    return [
        Delivery(message(i, devices[(i - 1) % len(devices)], value), encoding, entry_id=i)
        for i in range(1, count + 1)
    ]
