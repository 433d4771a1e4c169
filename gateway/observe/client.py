"""The gateway observing devices (RFC 7641 client side).

When a device registers, each resource its link-format payload marks `obs` (or, for a device
type listed in `observe.paths`, the paths listed there) is observed from the gateway's own
CoAP endpoint. Every notification goes through `Ingest.post_resource`, the same pipeline as a
POSTed reading, so it is validated, stored and notified like one.

Observations follow the device: re-registration (a reboot) starts them afresh, a
registration update or a reading from a new address or port re-targets them, and removal
or expiry of the registration cancels them. An observation that goes silent for longer than
expected (Max-Age of its last notification plus `grace`, at most `reestablish_after`) or
that the device ends is re-established. At start-up, the devices registered in the store
are observed again.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiocoap
import aiosqlite
import structlog
from aiocoap import Message
from aiocoap.numbers.codes import Code

from gateway.commands.dispatcher import device_uri
from gateway.config import ObserveConfig
from gateway.core.registration import parse_links
from gateway.errors import DeviceError, GatewayError
from gateway.ingest import Ingest
from gateway.registry import RegistryEvent

log = structlog.get_logger(__name__)

#: Bound on registry and address events waiting for the observer task.
MAX_EVENTS = 10_000


@dataclass(slots=True)
class _Observed:
    device: str
    address: str
    paths: tuple[str, ...]
    tasks: dict[str, asyncio.Task[None]] = field(default_factory=dict)


@dataclass(slots=True)
class ObserverStats:
    established: int = 0
    notifications: int = 0
    stored: int = 0
    rejected: int = 0
    reestablished: int = 0


def observed_paths(config: ObserveConfig, device_type: str, links: str) -> tuple[str, ...]:
    if device_type in config.paths:
        return tuple(config.paths[device_type])
    try:
        _, resources = parse_links(links.encode(), max_size=1 << 20)
    except GatewayError:
        return ()
    return tuple(resource.path for resource in resources if resource.observable)


class DeviceObserver:
    def __init__(
        self,
        config: ObserveConfig,
        *,
        ingest: Ingest,
        reader: aiosqlite.Connection,
        context: Callable[[], Any],
        clock: Callable[[], float] = time.monotonic,
        reaches: Callable[[str | None], bool] = lambda address: True,
    ) -> None:
        self._config = config
        #: Whether this process may talk to an address: with several workers, only the one
        #: the device's datagrams reach gets its notifications (gateway/coap/steering.py).
        self._reaches = reaches
        self._ingest = ingest
        self._reader = reader
        self._context = context
        self._clock = clock
        self._events: asyncio.Queue[tuple[str, str, str | None]] = asyncio.Queue(MAX_EVENTS)
        self._observed: dict[str, _Observed] = {}
        self._last_payload: dict[tuple[str, str], bytes] = {}
        self._tasks: asyncio.TaskGroup | None = None
        self.stats = ObserverStats()

    # --- inputs (synchronous listeners) ---------------------------------------------------

    def _put(self, kind: str, device: str, address: str | None) -> None:
        try:
            self._events.put_nowait((kind, device, address))
        except asyncio.QueueFull:
            log.warning("observe.events_dropped", device=device, kind=kind)

    def on_registry_event(self, event: RegistryEvent) -> None:
        self._put(event.kind, event.device.name, event.address)

    def on_address(self, device: str, address: str) -> None:
        observed = self._observed.get(device)
        if observed is not None and observed.address != address:
            self._put("moved", device, address)

    def observing(self, device: str) -> dict[str, str]:
        """Path -> address of the device's running observations (for status and tests)."""
        observed = self._observed.get(device)
        if observed is None:
            return {}
        return {path: observed.address for path in observed.tasks}

    # --- the task -----------------------------------------------------------------------

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tasks:
            self._tasks = tasks
            try:
                await self._resume()
            except Exception:
                log.exception("observe.resume_failed")
            while True:
                kind, device, address = await self._events.get()
                try:
                    await self._handle(kind, device, address)
                except Exception:
                    log.exception("observe.event_failed", device=device, kind=kind)

    async def _resume(self) -> None:
        async with self._reader.execute(
            "SELECT d.name, d.type, d.address, r.links FROM registrations r"
            " JOIN devices d ON d.id = r.device_id WHERE d.address IS NOT NULL"
        ) as cursor:
            rows = await cursor.fetchall()
        for name, device_type, address, links in rows:
            self._start(name, address, observed_paths(self._config, device_type, links))

    async def _handle(self, kind: str, device: str, address: str | None) -> None:
        if kind in ("removed", "expired"):
            self._stop(device)
            log.info("observe.cancelled", device=device, reason=kind)
            return
        current = self._observed.get(device)
        if kind == "registered" or (kind == "updated" and current is None):
            await self._from_registration(device)
            return
        if current is not None and address is not None and address != current.address:
            log.info("observe.moved", device=device, old=current.address, new=address)
            self._start(device, address, current.paths)

    async def _from_registration(self, device: str) -> None:
        async with self._reader.execute(
            "SELECT d.type, d.address, r.links FROM registrations r"
            " JOIN devices d ON d.id = r.device_id WHERE d.name = ?",
            (device,),
        ) as cursor:
            row = await cursor.fetchone()
        if row is None or row[1] is None:
            self._stop(device)
            return
        self._start(device, row[1], observed_paths(self._config, row[0], row[2]))

    def _stop(self, device: str) -> None:
        observed = self._observed.pop(device, None)
        if observed is not None:
            for task in observed.tasks.values():
                task.cancel()

    def _start(self, device: str, address: str, paths: tuple[str, ...]) -> None:
        self._stop(device)
        if not self._reaches(address):
            return
        observed = self._observed[device] = _Observed(device, address, paths)
        assert self._tasks is not None
        for path in paths:
            observed.tasks[path] = self._tasks.create_task(
                self._observe(device, path, address), name=f"observe[{device}{path}]"
            )

    # --- one observation ----------------------------------------------------------------

    def _silence_limit(self, message: Message) -> float:
        limit = self._config.reestablish_after
        max_age = message.opt.max_age
        if max_age is not None:
            limit = min(limit, max_age + self._config.grace)
        return limit

    async def _observe(self, device: str, path: str, address: str) -> None:
        """Keep one observation alive until cancelled; re-establish it when it fails."""
        with structlog.contextvars.bound_contextvars(device=device, path=path, peer=address):
            first = True
            while True:
                wait = self._config.retry_after
                try:
                    wait = await self._observe_once(device, path, address, first)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    log.warning("observe.failed", outcome="retry", reason=str(exc) or repr(exc))
                first = False
                self.stats.reestablished += 1
                await asyncio.sleep(wait)

    async def _observe_once(self, device: str, path: str, address: str, first: bool) -> float:
        """One observe exchange; returns how long to wait before establishing it again."""
        request = Message(code=Code.GET, uri=device_uri(address, path), observe=0)
        pending = self._context().request(request)
        try:
            try:
                async with asyncio.timeout(self._config.request_timeout):
                    response = await pending.response
            except TimeoutError:
                log.warning("observe.unanswered", outcome="retry")
                return self._config.retry_after
            if not response.code.is_successful():
                log.warning("observe.refused", outcome="retry", code=response.code.dotted)
                return self._config.reestablish_after
            await self._store(device, path, address, response, initial=not first)
            if response.opt.observe is None:
                # Not observable after all: read it again when an observation would have
                # been re-established.
                log.warning("observe.unsupported", outcome="poll")
                return self._silence_limit(response)
            self.stats.established += 1
            log.info("observe.established")
            limit = self._silence_limit(response)
            notifications = pending.observation.__aiter__()
            while True:
                try:
                    async with asyncio.timeout(limit):
                        notification = await notifications.__anext__()
                except TimeoutError:
                    log.info("observe.silent", outcome="reestablish", seconds=limit)
                    return 0.0
                except StopAsyncIteration:
                    log.info("observe.ended_by_device", outcome="reestablish")
                    return self._config.retry_after
                self.stats.notifications += 1
                if not notification.code.is_successful():
                    log.warning("observe.error", code=notification.code.dotted)
                    return self._config.retry_after
                await self._store(device, path, address, notification, initial=False)
                limit = self._silence_limit(notification)
        finally:
            pending.observation.cancel()

    async def _store(
        self, device: str, path: str, address: str, message: Message, *, initial: bool
    ) -> None:
        key = (device, path)
        # Re-establishing returns the current state; unchanged, it is not a new reading.
        if initial and self._last_payload.get(key) == message.payload:
            return
        self._last_payload[key] = message.payload
        try:
            await self._ingest.post_resource(
                device, path, message.payload, message.opt.content_format, address=address
            )
        except DeviceError as exc:
            self.stats.rejected += 1
            log.warning(
                "observe.rejected",
                outcome="rejected",
                code=str(exc.coap_code),
                reason=exc.diagnostic,
            )
            return
        except aiocoap.error.Error:
            raise
        self.stats.stored += 1
