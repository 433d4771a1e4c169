"""Devices and their registrations (RFC 9176 registration interface), kept in the store.

The registry keeps an in-memory index of devices by name so the ingest path never queries
the database to find one; the database stays the truth, and every change goes through the
store writer. Re-registering an endpoint replaces its registration (a rebooted device); a
registration past its lifetime is removed and the device marked offline.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import aiosqlite
import structlog

from gateway.core.model import Device
from gateway.core.registration import GENERIC_TYPE, RegistrationRequest
from gateway.errors import UnknownDeviceError
from gateway.store.writer import StoreWriter

log = structlog.get_logger(__name__)

Clock = Callable[[], float]


@dataclass(frozen=True, slots=True)
class Registration:
    id: str
    device: Device
    lifetime: int
    expires_at: float
    address: str | None
    queue_mode: bool
    links: str


@dataclass(frozen=True, slots=True)
class RegistryEvent:
    """What changed: `registered`, `updated`, `removed` or `expired`."""

    kind: str
    device: Device
    registration_id: str
    address: str | None


RegistryListener = Callable[[RegistryEvent], None]


class Registry:
    def __init__(self, writer: StoreWriter, *, clock: Clock = time.time) -> None:
        self._writer = writer
        self._clock = clock
        self._devices: dict[str, Device] = {}
        self._by_id: dict[int, Device] = {}
        #: Device name -> (registration id, updated_at) as this process last knew them, to
        #: tell which registrations another process changed (`sync`).
        self._registrations: dict[str, tuple[str, float]] = {}
        self._listeners: list[RegistryListener] = []

    def add_listener(self, listener: RegistryListener) -> None:
        self._listeners.append(listener)

    def _emit(self, event: RegistryEvent) -> None:
        for listener in self._listeners:
            try:
                listener(event)
            except Exception:
                log.exception("registry.listener_failed")

    async def load(self, conn: aiosqlite.Connection) -> None:
        self._devices = {}
        self._by_id = {}
        await self._read_devices(conn)
        self._registrations = {row[1]: (row[4], row[5]) for row in await _registration_rows(conn)}

    def _remember(self, device: Device) -> None:
        self._devices[device.name] = device
        self._by_id[device.id] = device

    async def _read_devices(
        self, conn: aiosqlite.Connection, where: str = "", params: Sequence[Any] = ()
    ) -> None:
        """Remember the devices `where` selects (all of them by default)."""
        async with conn.execute(f"SELECT id, name, type FROM devices {where}", params) as cursor:
            for row in await cursor.fetchall():
                self._remember(Device(row[0], row[1], row[2]))

    def device(self, name: str) -> Device | None:
        return self._devices.get(name)

    async def find(self, name: str, conn: aiosqlite.Connection) -> Device | None:
        """The device, looked up in the database when this process does not know it yet
        (another worker process registered it a moment ago)."""
        device = self._devices.get(name)
        if device is None:
            await self._read_devices(conn, "WHERE name = ?", (name,))
            device = self._devices.get(name)
        return device

    async def by_ids(self, ids: set[int], conn: aiosqlite.Connection) -> dict[int, Device]:
        """Devices by id, those this process does not know yet read from the database."""
        missing = [device_id for device_id in ids if device_id not in self._by_id]
        if missing:
            await self._read_devices(conn, f"WHERE id IN ({','.join('?' * len(missing))})", missing)
        return {device_id: self._by_id[device_id] for device_id in ids if device_id in self._by_id}

    async def sync(self, conn: aiosqlite.Connection) -> int:
        """Take in registrations other processes changed, telling listeners as if they had
        happened here (a removal and an expiry both as `removed`); returns how many."""
        rows = await _registration_rows(conn)
        current = {row[1]: row for row in rows}
        events: list[RegistryEvent] = []
        for name, (
            device_id,
            _,
            device_type,
            address,
            registration_id,
            updated_at,
        ) in current.items():
            known = self._registrations.get(name)
            if known == (registration_id, updated_at):
                continue
            device = Device(device_id, name, device_type)
            kind = "registered" if known is None or known[0] != registration_id else "updated"
            self._remember(device)
            self._registrations[name] = (registration_id, updated_at)
            events.append(RegistryEvent(kind, device, registration_id, address))
        for name in [name for name in self._registrations if name not in current]:
            registration_id, _ = self._registrations.pop(name)
            gone = self._devices.get(name)
            if gone is not None:
                events.append(RegistryEvent("removed", gone, registration_id, None))
        for event in events:
            self._emit(event)
        return len(events)

    def __len__(self) -> int:
        return len(self._devices)

    async def ensure_device(self, name: str, device_type: str = GENERIC_TYPE) -> Device:
        """The device, created without a registration if it does not exist yet."""
        existing = self._devices.get(name)
        if existing is not None:
            return existing
        now = self._clock()

        async def create(conn: aiosqlite.Connection) -> Device:
            await conn.execute(
                "INSERT INTO devices (name, type, created_at) VALUES (?, ?, ?)"
                " ON CONFLICT(name) DO NOTHING",
                (name, device_type, now),
            )
            async with conn.execute("SELECT id, type FROM devices WHERE name = ?", (name,)) as cur:
                row = await cur.fetchone()
            assert row is not None
            return Device(row[0], name, row[1])

        device = await self._writer.transaction(create)
        self._remember(device)
        log.info("device.created", device=name, type=device.type)
        return device

    async def register(self, request: RegistrationRequest, *, address: str | None) -> Registration:
        now = self._clock()
        registration_id = secrets.token_hex(4)
        expires_at = now + request.lifetime

        async def write(conn: aiosqlite.Connection) -> Device:
            await conn.execute(
                "INSERT INTO devices (name, type, created_at, last_seen, address, online)"
                " VALUES (?, ?, ?, ?, ?, 1)"
                " ON CONFLICT(name) DO UPDATE SET type = excluded.type,"
                " last_seen = excluded.last_seen, address = excluded.address, online = 1",
                (request.endpoint, request.device_type, now, now, address),
            )
            async with conn.execute(
                "SELECT id FROM devices WHERE name = ?", (request.endpoint,)
            ) as cur:
                row = await cur.fetchone()
            assert row is not None
            device_id = int(row[0])
            # A new registration of the same endpoint replaces the old one (RFC 9176 §5.3).
            await conn.execute("DELETE FROM registrations WHERE device_id = ?", (device_id,))
            await conn.execute(
                "INSERT INTO registrations (id, device_id, lifetime, registered_at, updated_at,"
                " expires_at, address, links, queue_mode) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    registration_id,
                    device_id,
                    request.lifetime,
                    now,
                    now,
                    expires_at,
                    address,
                    request.links,
                    int(request.queue_mode),
                ),
            )
            return Device(device_id, request.endpoint, request.device_type)

        device = await self._writer.transaction(write)
        self._remember(device)
        self._registrations[device.name] = (registration_id, now)
        registration = Registration(
            registration_id,
            device,
            request.lifetime,
            expires_at,
            address,
            request.queue_mode,
            request.links,
        )
        self._emit(RegistryEvent("registered", device, registration_id, address))
        return registration

    async def update(
        self, registration_id: str, *, lifetime: int | None, address: str | None
    ) -> Registration:
        now = self._clock()

        async def write(conn: aiosqlite.Connection) -> Registration | None:
            async with conn.execute(
                "SELECT r.lifetime, r.queue_mode, r.links, d.id, d.name, d.type"
                " FROM registrations r JOIN devices d ON d.id = r.device_id WHERE r.id = ?",
                (registration_id,),
            ) as cur:
                row = await cur.fetchone()
            if row is None:
                return None
            new_lifetime = lifetime if lifetime is not None else int(row[0])
            expires_at = now + new_lifetime
            await conn.execute(
                "UPDATE registrations SET lifetime = ?, updated_at = ?, expires_at = ?,"
                " address = coalesce(?, address) WHERE id = ?",
                (new_lifetime, now, expires_at, address, registration_id),
            )
            await conn.execute(
                "UPDATE devices SET last_seen = ?, address = coalesce(?, address), online = 1"
                " WHERE id = ?",
                (now, address, row[3]),
            )
            device = Device(row[3], row[4], row[5])
            return Registration(
                registration_id, device, new_lifetime, expires_at, address, bool(row[1]), row[2]
            )

        registration = await self._writer.transaction(write)
        if registration is None:
            raise UnknownDeviceError(f"no registration {registration_id}; register again")
        self._registrations[registration.device.name] = (registration_id, now)
        self._emit(RegistryEvent("updated", registration.device, registration_id, address))
        return registration

    async def remove(self, registration_id: str) -> Device:
        async def write(conn: aiosqlite.Connection) -> Device | None:
            async with conn.execute(
                "SELECT d.id, d.name, d.type FROM registrations r"
                " JOIN devices d ON d.id = r.device_id WHERE r.id = ?",
                (registration_id,),
            ) as cur:
                row = await cur.fetchone()
            if row is None:
                return None
            await conn.execute("DELETE FROM registrations WHERE id = ?", (registration_id,))
            await conn.execute("UPDATE devices SET online = 0 WHERE id = ?", (row[0],))
            return Device(row[0], row[1], row[2])

        device = await self._writer.transaction(write)
        if device is None:
            raise UnknownDeviceError(f"no registration {registration_id}")
        self._registrations.pop(device.name, None)
        self._emit(RegistryEvent("removed", device, registration_id, None))
        return device

    async def expire(self) -> list[Device]:
        """Remove registrations past their lifetime; the devices go offline."""
        now = self._clock()

        async def write(conn: aiosqlite.Connection) -> list[tuple[str, Device]]:
            async with conn.execute(
                "SELECT r.id, d.id, d.name, d.type FROM registrations r"
                " JOIN devices d ON d.id = r.device_id WHERE r.expires_at <= ?",
                (now,),
            ) as cur:
                rows = await cur.fetchall()
            if rows:
                await conn.executemany(
                    "DELETE FROM registrations WHERE id = ?", [(row[0],) for row in rows]
                )
                await conn.executemany(
                    "UPDATE devices SET online = 0 WHERE id = ?", [(row[1],) for row in rows]
                )
            return [(row[0], Device(row[1], row[2], row[3])) for row in rows]

        expired = await self._writer.transaction(write)
        for registration_id, device in expired:
            self._registrations.pop(device.name, None)
            log.info("registration.expired", device=device.name, registration=registration_id)
            self._emit(RegistryEvent("expired", device, registration_id, None))
        return [device for _, device in expired]


async def _registration_rows(conn: aiosqlite.Connection) -> list[Any]:
    """(device id, name, type, address, registration id, updated_at) of every registration."""
    async with conn.execute(
        "SELECT d.id, d.name, d.type, d.address, r.id, r.updated_at"
        " FROM registrations r JOIN devices d ON d.id = r.device_id"
    ) as cursor:
        return list(await cursor.fetchall())
