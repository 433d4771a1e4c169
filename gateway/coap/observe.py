"""Observable resources of the gateway (RFC 7641): `/r/NAME` and `/devices`.

`GET /r/NAME` with Observe: 0 notifies on every committed reading of that device; the
notifications come from the store's commit listener (`on_commit`), so POSTed readings,
readings from observed devices and replays all notify, and only committed ones do.
When a device's registration is removed or expires, the observers of its `/r/NAME` get a
final 4.04 (RFC 7641 §3.2), which ends their observations.
`GET /devices` with Observe: 0 notifies on registrations, updates, removals and expiries.
Fan-out, coalescing and confirmable notifications: `gateway.observe.fanout`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

import aiosqlite
import cbor2
import structlog
from aiocoap import Message, interfaces
from aiocoap.numbers.codes import Code

from gateway.coap.base import GatewayResource, peer_of
from gateway.coap.readings import LATEST_FORMATS, ReadingsResource
from gateway.config import ObserveConfig
from gateway.core.model import StoredReading
from gateway.core.readings import CF_CBOR, CF_JSON, LatestValue, encode_latest
from gateway.errors import NotAcceptableError
from gateway.ingest import Ingest
from gateway.observe.fanout import Fanout
from gateway.registry import RegistryEvent
from gateway.store.queries import latest_values, list_devices

log = structlog.get_logger("gateway.coap")

DEVICES_KEY = "devices"
DEVICES_FORMATS = (CF_CBOR, CF_JSON)


def _accepted(request: Message, formats: Sequence[int]) -> int | None:
    accept = request.opt.accept
    content_format = CF_CBOR if accept is None else int(accept)
    return content_format if content_format in formats else None


def _refuse(observation: Any) -> None:
    # aiocoap needs every observation accepted; the render that follows answers the error
    # (4.04, 4.06), which ends the observation at once.
    observation.accept(lambda: None)


class ObservableReadingsResource(ReadingsResource, interfaces.ObservableResource):  # type: ignore[misc]
    """`/r/NAME` whose GET can be observed; one `Fanout` keyed by device name."""

    def __init__(self, ingest: Ingest, reader: aiosqlite.Connection, config: ObserveConfig) -> None:
        super().__init__(ingest, reader)
        self._config = config
        self.fanout = Fanout("readings", config, self._render)
        #: Told `(device, "host:port")` after each stored POST, so observations and commands
        #: follow a device that moved (NAT rebinding, new port after a reboot).
        self.address_listeners: list[Callable[[str, str], None]] = []
        # Latest value per measurement of devices that are or were observed, kept from the
        # commits, so a notification costs no database read.
        self._latest: dict[str, dict[str, LatestValue]] = {}

    async def add_observation(self, request: Message, observation: Any) -> None:
        path = request.opt.uri_path
        content_format = _accepted(request, LATEST_FORMATS)
        device = await self._ingest.known_device(path[0]) if len(path) == 1 else None
        if request.code != Code.GET or device is None or content_format is None:
            _refuse(observation)
            return
        if device.name not in self._latest:
            cache = self._latest[device.name] = {}
            for value in await latest_values(self._reader, device.id):
                # Commits seen while reading are newer than what the read returned.
                cache.setdefault(value.name, value)
        self.fanout.add(device.name, observation, content_format, peer_of(request))

    async def render_get(self, request: Message) -> Message:
        response: Message = await super().render_get(request)
        response.opt.max_age = self._config.max_age
        return response

    async def render_post(self, request: Message) -> Message:
        response: Message = await super().render_post(request)
        peer = peer_of(request)
        path = request.opt.uri_path
        if peer is not None and len(path) == 1:
            for listener in self.address_listeners:
                listener(path[0], peer)
        return response

    def observed(self) -> bool:
        """Whether any device is or was observed (else commits need not be looked at)."""
        return bool(self._latest)

    def on_commit(self, readings: Sequence[StoredReading]) -> None:
        """Store commit listener: remember the new values, mark their devices changed."""
        for reading in readings:
            cache = self._latest.get(reading.device.name)
            if cache is None:
                continue
            cache[reading.measurement] = LatestValue(
                reading.measurement, reading.value, reading.unit, reading.time
            )
            self.fanout.mark(reading.device.name)

    def on_registry_event(self, event: RegistryEvent) -> None:
        """A device whose registration is removed or expires has disappeared: its observers
        get a final 4.04 that ends their observations. Its latest values stay readable,
        and a new observation of it is accepted."""
        if event.kind not in ("removed", "expired"):
            return
        name = event.device.name
        told = self.fanout.end(name, f"device {name!r:.60} {event.kind}: registration ended")
        if told:
            log.info("observe.device_gone", device=name, reason=event.kind, observers=told)

    async def _render(self, name: str, formats: frozenset[int]) -> dict[int, bytes] | None:
        values = sorted(self._latest.get(name, {}).values(), key=lambda value: value.name)
        return {cf: encode_latest(name, values, cf) for cf in formats}


def encode_devices(rows: Sequence[Any], content_format: int) -> bytes:
    document = [
        {"name": row.name, "type": row.type, "online": row.online, "last_seen": row.last_seen}
        for row in rows
    ]
    if content_format == CF_JSON:
        return json.dumps(document, separators=(",", ":")).encode()
    return bytes(cbor2.dumps(document))


class DevicesResource(GatewayResource, interfaces.ObservableResource):  # type: ignore[misc]
    """`GET /devices`: name, type, online and last seen of every device; observable."""

    event = "devices"

    def __init__(self, reader: aiosqlite.Connection, config: ObserveConfig) -> None:
        super().__init__()
        self._reader = reader
        self.fanout = Fanout("devices", config, self._render)

    async def add_observation(self, request: Message, observation: Any) -> None:
        content_format = _accepted(request, DEVICES_FORMATS)
        if request.code != Code.GET or content_format is None:
            _refuse(observation)
            return
        self.fanout.add(DEVICES_KEY, observation, content_format, peer_of(request))

    def on_registry_event(self, event: RegistryEvent) -> None:
        self.fanout.mark(DEVICES_KEY)

    async def render_get(self, request: Message) -> Message:
        content_format = _accepted(request, DEVICES_FORMATS)
        if content_format is None:
            raise NotAcceptableError("accept 60 (CBOR) or 50 (JSON)")
        rows = await list_devices(self._reader)
        return Message(
            code=Code.CONTENT,
            payload=encode_devices(rows, content_format),
            content_format=content_format,
        )

    async def _render(self, key: str, formats: frozenset[int]) -> dict[int, bytes]:
        rows = await list_devices(self._reader)
        return {cf: encode_devices(rows, cf) for cf in formats}
