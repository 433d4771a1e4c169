"""The one path every reading takes: limit → device → decode → validate → store.

Returns when the reading is committed; raises a `DeviceError` (which carries its CoAP code)
for anything the device got wrong. Notifications to observers, rules and relay come from the
store's commit listeners, not from here, so every path that stores a reading notifies.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import aiosqlite

from gateway.config import IngestConfig
from gateway.core.model import Device
from gateway.core.readings import (
    check_reading_format,
    decode_readings,
    resource_payload_as_reading,
)
from gateway.core.validate import Limits, validate_measurements
from gateway.errors import PayloadTooLargeError, UnknownDeviceError
from gateway.registry import Registry
from gateway.store.writer import ReadingBatch, StoreWriter

#: Called before a reading is stored: may make room for `count` measurements, or raise
#: `OverloadedError` (the relay's back-pressure).
Admission = Callable[[Device, int], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class IngestResult:
    device: Device
    measurements: int


class Ingest:
    def __init__(
        self,
        config: IngestConfig,
        *,
        registry: Registry,
        writer: StoreWriter,
        clock: Callable[[], float] = time.time,
        admit: Admission | None = None,
        lookup: aiosqlite.Connection | None = None,
    ) -> None:
        self._config = config
        #: Where to look for a device this process does not know yet (several workers).
        self._lookup = lookup
        self._admit = admit
        self._registry = registry
        self._writer = writer
        self._clock = clock
        self._limits = Limits(
            max_fields=config.max_fields,
            max_name_length=config.max_name_length,
            max_string_length=config.max_string_length,
        )

    def check_size(self, size: int, device: str | None = None) -> None:
        limit = self._config.max_payload
        if size > limit:
            raise PayloadTooLargeError(
                f"payload of {size} bytes exceeds the limit of {limit}", limit=limit, device=device
            )

    async def known_device(self, name: str) -> Device | None:
        if self._lookup is None:
            return self._registry.device(name)
        return await self._registry.find(name, self._lookup)

    async def device(self, name: str) -> Device:
        device = await self.known_device(name)
        if device is not None:
            return device
        if self._config.auto_register:
            return await self._registry.ensure_device(name)
        raise UnknownDeviceError(f"unknown device {name!r:.70}; register at /rd first", device=name)

    async def post(
        self,
        device_name: str,
        payload: bytes,
        content_format: int | None,
        *,
        address: str | None = None,
    ) -> IngestResult:
        self.check_size(len(payload), device_name)
        check_reading_format(content_format)
        device = await self.device(device_name)
        now = self._clock()
        measurements = decode_readings(payload, content_format, now=now)
        checked = validate_measurements(measurements, device.type, self._limits)
        if self._admit is not None:
            await self._admit(device, len(checked))
        await self._writer.insert_readings(ReadingBatch(device, checked, now, address))
        return IngestResult(device, len(checked))

    async def post_resource(
        self,
        device_name: str,
        path: str,
        payload: bytes,
        content_format: int | None,
        *,
        address: str | None = None,
    ) -> IngestResult:
        """A representation of a device's own resource (an observe notification) as a reading.

        The same pipeline as `post`; a bare value (`/temp` answering `4.5`) is stored as the
        measurement named after the path's last segment.
        """
        payload, content_format = resource_payload_as_reading(path, payload, content_format)
        return await self.post(device_name, payload, content_format, address=address)
