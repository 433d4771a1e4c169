"""Sending queued commands to devices when they can be reached.

A device that registered without `q` and is online gets its commands at once, in order. A
device in queue mode (`q`, a sleepy device) is reachable only during its wake window: the
`commands.wake_window` seconds (per device type in `wake_windows`) after its registration,
registration update or reading. Commands go to the device's latest address (where its
latest message came from), read from the store when the command is sent.

The queue lives in SQLite, so commands outlive a restart. The CLI writes commands into the
database from another process; the dispatcher notices them by looking at the queue every
`commands.poll_interval` seconds (and at once for commands submitted over CoAP). The same
look expires queued commands whose TTL has passed.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from typing import Any

import aiocoap
import aiosqlite
import structlog
from aiocoap import Message
from aiocoap.numbers.codes import Code

from gateway.commands import store
from gateway.config import CommandsConfig
from gateway.core.commands import CommandRequest, CommandState, outcome_of
from gateway.core.model import StoredReading
from gateway.errors import QueueFullError, UnknownDeviceError
from gateway.registry import RegistryEvent
from gateway.store.writer import StoreWriter

log = structlog.get_logger(__name__)


def device_uri(address: str, path: str) -> str:
    """`host:port` (IPv6 hosts in brackets, as aiocoap writes them) and a path -> a URI."""
    return f"coap://{address}{path}"


def queue_full_message(device: str, unsettled: int, limit: int) -> str:
    return (
        f"command queue of {device!r:.40} is full ({unsettled} unsettled, limit {limit});"
        " retry after some are delivered"
    )


class CommandDispatcher:
    def __init__(
        self,
        config: CommandsConfig,
        *,
        writer: StoreWriter,
        reader: aiosqlite.Connection,
        context: Callable[[], Any],
        clock: Callable[[], float] = time.time,
        reaches: Callable[[str | None], bool] = lambda address: True,
    ) -> None:
        self._config = config
        #: Whether this process may send to an address: with several workers, only the one
        #: the device's answers reach (gateway/coap/steering.py).
        self._reaches = reaches
        self._writer = writer
        self._reader = reader
        self._context = context
        self._clock = clock
        self._wake = asyncio.Event()
        self._windows: dict[str, float] = {}
        self._busy: set[str] = set()
        #: Devices with queued commands as of the last look at the queue (or a submit since):
        #: a reading from any other device need not wake the loop.
        self._queued: set[str] = set()
        self._slots = asyncio.Semaphore(config.max_in_flight)
        #: Commands refused because their device's queue was full, since start.
        self.refused_full = 0

    # --- what wakes it ------------------------------------------------------------------

    def _opened(self, device: str, device_type: str, *, wake: bool = True) -> None:
        until = self._clock() + self._config.window(device_type)
        self._windows[device] = max(self._windows.get(device, 0.0), until)
        if wake:
            self._wake.set()

    def on_registry_event(self, event: RegistryEvent) -> None:
        if event.kind in ("registered", "updated"):
            self._opened(event.device.name, event.device.type)
        else:
            self._windows.pop(event.device.name, None)

    def on_commit(self, readings: Sequence[StoredReading]) -> None:
        # Called for every group commit: waking the loop (two queries) only for devices
        # known to have commands keeps ingest from paying for the command queue. Commands
        # queued by another process are found by the next poll, within the wake window.
        # Keyed by name: a str keeps its hash, a Device hashes its fields every time, and a
        # commit holds a reading per record of every pack.
        devices = {reading.device.name: reading.device for reading in readings}
        for device in devices.values():
            self._opened(device.name, device.type, wake=device.name in self._queued)

    def on_address(self, device: str, address: str) -> None:
        # Told of every reading's source; only a device with commands waiting cares.
        if device in self._queued:
            self._wake.set()

    def window_open(self, device: str, now: float) -> bool:
        return self._windows.get(device, 0.0) > now

    async def submit(self, device: str, request: CommandRequest, *, origin: str = "api") -> int:
        """Queue a command; UnknownDeviceError (4.04), or QueueFullError (5.03 with Max-Age)
        when the device already has `max_queued_per_device` unsettled commands. A refusal is
        logged here, once, with the running count."""
        now = self._clock()
        limit = self._config.max_queued_per_device

        async def op(conn: aiosqlite.Connection) -> int | store.QueueFull | None:
            return await store.enqueue(
                conn, device, request, now=now, origin=origin, max_queued=limit
            )

        command_id = await self._writer.transaction(op)
        if command_id is None:
            raise UnknownDeviceError(f"unknown device {device!r:.70}", device=device)
        if isinstance(command_id, store.QueueFull):
            self.refused_full += 1
            log.warning(
                "command.queue_full",
                outcome="refused",
                device=device,
                unsettled=command_id.unsettled,
                limit=limit,
                origin=origin,
                count=self.refused_full,
            )
            raise QueueFullError(
                queue_full_message(device, command_id.unsettled, limit),
                max_age=self._config.queue_full_retry_after,
                device=device,
            )
        log.info(
            "command.queued",
            device=device,
            command=command_id,
            method=request.method,
            path=request.path,
            origin=origin,
        )
        self._queued.add(device)
        self._wake.set()
        return command_id

    # --- the loop -----------------------------------------------------------------------

    async def run(self) -> None:
        requeued = await self._writer.transaction(
            lambda conn: store.requeue_sent(conn, reaches=self._reaches)
        )
        if requeued:
            log.info("command.requeued", commands=requeued)
        async with asyncio.TaskGroup() as deliveries:
            while True:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._config.poll_interval):
                        await self._wake.wait()
                self._wake.clear()
                try:
                    await self._step(deliveries)
                except Exception:
                    log.exception("command.dispatch_failed")

    async def _step(self, deliveries: asyncio.TaskGroup) -> None:
        now = self._clock()
        if await store.any_expired(self._reader, now):
            expired = await self._writer.transaction(lambda conn: store.expire_due(conn, now))
            for command in expired:
                log.info("command.expired", device=command.device, command=command.id)
        pending = await store.pending(self._reader)
        self._queued = {item.command.device for item in pending}
        for item in pending:
            name = item.command.device
            if name in self._busy or not self._reachable(item, now):
                continue
            self._busy.add(name)
            deliveries.create_task(self._deliver(name), name=f"commands.deliver[{name}]")

    def _reachable(self, item: store.Pending, now: float) -> bool:
        if not item.online or item.address is None or not self._reaches(item.address):
            return False
        return not item.queue_mode or self.window_open(item.command.device, now)

    async def _deliver(self, device: str) -> None:
        """Send the device's queued commands in order while it is reachable."""
        try:
            async with self._slots:
                while True:
                    now = self._clock()
                    queued = await store.pending(self._reader, device=device)
                    if not queued or not self._reachable(queued[0], now):
                        return
                    item = queued[0]
                    command_id = item.command.id

                    async def claim(
                        conn: aiosqlite.Connection, cid: int = command_id, at: float = now
                    ) -> Any:
                        return await store.claim(conn, cid, at)

                    command = await self._writer.transaction(claim)
                    if command is None:
                        continue  # expired, or settled elsewhere
                    assert item.address is not None
                    if not await self._send(command, item.address):
                        return  # unanswered: the device is asleep or gone; next window
        except Exception:
            log.exception("command.delivery_failed", device=device)
        finally:
            self._busy.discard(device)

    async def _send(self, command: store.CommandRow, address: str) -> bool:
        """Send one claimed command and settle it; False when the device did not answer."""
        bound = structlog.contextvars.bound_contextvars(
            device=command.device, command=command.id, peer=address
        )
        with bound:
            message = Message(
                code=Code[command.method],
                uri=device_uri(address, command.path),
                payload=command.payload or b"",
            )
            if command.content_format is not None:
                message.opt.content_format = command.content_format
            log.debug("command.sending", method=command.method, path=command.path)
            try:
                async with asyncio.timeout(self._config.response_timeout):
                    response = await self._context().request(message).response
            except (TimeoutError, aiocoap.error.Error, OSError) as exc:
                reason = type(exc).__name__ if isinstance(exc, TimeoutError) else str(exc)
                retry = command.attempts < self._config.max_attempts
                target = CommandState.QUEUED if retry else CommandState.FAILED
                await self._settle(command.id, target, error=f"no answer: {reason}")
                log.warning(
                    "command.unanswered",
                    outcome="requeued" if retry else "failed",
                    attempt=command.attempts,
                    reason=reason,
                )
                return False
            target = outcome_of(response.code.class_)
            await self._settle(
                command.id,
                target,
                code=str(response.code.dotted),
                payload=response.payload,
                content_format=response.opt.content_format,
            )
            log.info("command.settled", outcome=target.value, code=response.code.dotted)
            return True

    async def _settle(self, command_id: int, target: CommandState, **result: Any) -> None:
        now = self._clock()

        async def op(conn: aiosqlite.Connection) -> None:
            await store.settle(conn, command_id, target, now=now, **result)

        await self._writer.transaction(op)
