"""The rules shell: feeds committed readings and time to the pure engine, stores its decisions.

The store writer tells us of committed readings through a commit listener, which must not
block the commit path: readings are grouped (per device and request) into a bounded backlog
that one task, ``rules.evaluator``, drains into `RuleEngine.evaluate`. At the bound the
oldest group is dropped, counted and logged (``rules.backlog_dropped``): rules judge the
latest state of a device, so the newest readings are the ones worth keeping. A second task,
``rules.ticker``, calls `RuleEngine.tick` once a second for silence, pending alerts that
came due and re-notification.

Each batch of decisions is stored in one writer transaction: alert rows, shopping-list rows
and the relay events that carry them to phones (`gateway.relay.events.record_event`), so an
alert is either stored and on its way, or neither. Listeners (the observable CoAP
resources) are told after the commit. Decisions are computed synchronously and submitted to
the writer before the next await, so they reach the database in the order they were made.

At start the engine is restored from the store: open alerts (those of rules no longer
configured are closed), shopping lists, and a sign of life for every known device so the
gateway's own downtime is not blamed on them.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiosqlite
import structlog

from gateway.core.alerts import AlertEvent, Value
from gateway.core.model import Device, StoredReading
from gateway.core.rules import (
    AlertCleared,
    AlertRaised,
    AlertRenotified,
    Decision,
    ListItem,
    RuleConfig,
    RuleEngine,
    ShoppingListChanged,
)
from gateway.errors import OverloadedError, StoreError
from gateway.registry import Registry, RegistryEvent
from gateway.relay import events as relay_events
from gateway.store import alerts as store
from gateway.store.writer import StoreWriter

log = structlog.get_logger(__name__)

Clock = Callable[[], float]
DecisionListener = Callable[[Sequence[Decision]], None]

#: Groups evaluated before their decisions are stored together.
MAX_GROUPS_PER_BATCH = 256
#: Attempts to store one batch of decisions while the writer is overloaded.
PERSIST_ATTEMPTS = 5


@dataclass(frozen=True, slots=True)
class _Group:
    """Readings of one device from one request (and one device time): one evaluation."""

    device: Device
    values: dict[str, Value]
    at: float


@dataclass(frozen=True, slots=True)
class _Forget:
    device: Device
    at: float


@dataclass(slots=True)
class RulesStats:
    evaluated: int = 0
    decisions: int = 0
    dropped: int = 0
    persist_failures: int = 0
    backlog: int = field(default=0)


@dataclass(frozen=True, slots=True)
class _Plan:
    """What one transaction writes: the decisions, and the lists as they are after them."""

    decisions: tuple[Decision, ...]
    devices: Mapping[str, Device]
    lists: Mapping[str, tuple[ListItem, ...]]


class RulesService:
    def __init__(
        self,
        rules: Sequence[RuleConfig],
        *,
        writer: StoreWriter,
        registry: Registry,
        clock: Clock = time.time,
        tick_interval: float = 1.0,
        max_backlog: int = 10_000,
    ) -> None:
        if max_backlog < 1 or tick_interval <= 0:
            raise ValueError("max_backlog and tick_interval must be positive")
        self.engine = RuleEngine(rules)
        self._writer = writer
        self._registry = registry
        self._clock = clock
        self._tick_interval = tick_interval
        self._max_backlog = max_backlog
        self._backlog: deque[_Group | _Forget] = deque()
        self._wakeup = asyncio.Event()
        self._busy = False
        self._dropped_unlogged = 0
        self._listeners: list[DecisionListener] = []
        #: Devices met in readings, for events about a device the registry no longer has.
        self._devices: dict[str, Device] = {}
        self.stats = RulesStats()

    @property
    def rules(self) -> tuple[RuleConfig, ...]:
        return self.engine.rules

    def add_listener(self, listener: DecisionListener) -> None:
        """Called with every batch of decisions after it is committed."""
        self._listeners.append(listener)

    @property
    def idle(self) -> bool:
        """Nothing waiting to be evaluated or stored."""
        return not self._backlog and not self._busy

    # ----------------------------------------------------------------------- start-up

    async def start(self) -> None:
        """Restore the engine from the store (one writer transaction); call once, first."""
        now = self._clock()

        async def restore(conn: aiosqlite.Connection) -> tuple[int, int, int]:
            rows = await store.open_alerts(conn)
            by_key = {(row.rule, row.device): row for row in rows}
            orphans = self.engine.restore_alerts(row.open_alert() for row in rows)
            for orphan in orphans:
                row = by_key[(orphan.rule, orphan.device)]
                message = f"{row.rule} closed on {row.device}: rule no longer configured"
                await store.clear_alert(
                    conn, rule=row.rule, device=row.device, at=now, message=message
                )
                body = _alert_body("cleared", row.id, _row_event(row, now, message))
                body["reason"] = "rule_removed"
                await relay_events.record_event(
                    conn,
                    kind="alert",
                    device=self._device_of(row.device, row.device_type),
                    at=now,
                    body=body,
                )
            items = await store.list_items(conn)
            self.engine.restore_shopping_lists(items)
            async with conn.execute("SELECT name, type FROM devices") as cursor:
                devices = await cursor.fetchall()
            for name, device_type in devices:
                self.engine.seen(name, device_type, now)
            return len(rows) - len(orphans), len(orphans), len(items)

        restored, closed, items = await self._writer.transaction(restore)
        self._registry.add_listener(self._on_registry)
        log.info(
            "rules.started",
            rules=len(self.engine.rules),
            open_alerts=restored,
            closed_alerts=closed,
            list_items=items,
        )

    # ----------------------------------------------------------------------- inputs

    def on_commit(self, readings: Sequence[StoredReading]) -> None:
        """Commit listener: queue the committed readings; never blocks, never raises."""
        groups: dict[tuple[int, float, float | None], _Group] = {}
        for reading in readings:
            key = (reading.device.id, reading.received_at, reading.device_time)
            group = groups.get(key)
            if group is None:
                group = groups[key] = _Group(reading.device, {}, reading.received_at)
            group.values[reading.measurement] = reading.value
        for group in groups.values():
            self._devices[group.device.name] = group.device
            self._enqueue(group)

    def _on_registry(self, event: RegistryEvent) -> None:
        device = event.device
        self._devices[device.name] = device
        if event.kind in ("registered", "updated"):
            self.engine.seen(device.name, device.type, self._clock())
        elif event.kind == "removed":
            # Deregistered on purpose: its alerts clear and its list items go. An expired
            # registration is different: a silent device is what the silence rule is for.
            self._enqueue(_Forget(device, self._clock()))

    def _enqueue(self, item: _Group | _Forget) -> None:
        if len(self._backlog) >= self._max_backlog:
            self._backlog.popleft()
            self.stats.dropped += 1
            self._dropped_unlogged += 1
        self._backlog.append(item)
        self.stats.backlog = len(self._backlog)
        self._wakeup.set()

    # ----------------------------------------------------------------------- tasks

    async def run_evaluator(self) -> None:
        """Drain the backlog into the engine and store the decisions. Runs until cancelled."""
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._backlog:
                if self._dropped_unlogged:
                    log.warning(
                        "rules.backlog_dropped",
                        dropped=self._dropped_unlogged,
                        total_dropped=self.stats.dropped,
                        bound=self._max_backlog,
                    )
                    self._dropped_unlogged = 0
                self._busy = True
                try:
                    decisions: list[Decision] = []
                    for _ in range(min(len(self._backlog), MAX_GROUPS_PER_BATCH)):
                        item = self._backlog.popleft()
                        decisions.extend(self._evaluate(item))
                    self.stats.backlog = len(self._backlog)
                    if decisions:
                        await self._persist(decisions)
                finally:
                    self._busy = False

    def _evaluate(self, item: _Group | _Forget) -> list[Decision]:
        if isinstance(item, _Forget):
            return self.engine.forget_device(item.device.name, item.at)
        self.stats.evaluated += 1
        try:
            return self.engine.evaluate(item.values, item.device.name, item.device.type, item.at)
        except Exception:
            log.exception("rules.evaluate_failed", device=item.device.name)
            return []

    async def run_ticker(self) -> None:
        """Advance the engine's time once per `tick_interval`. Runs until cancelled."""
        while True:
            await asyncio.sleep(self._tick_interval)
            try:
                await self.tick()
            except Exception:
                log.exception("rules.tick_failed")

    async def tick(self) -> int:
        """One tick at the clock's time, its decisions stored; how many decisions it made."""
        decisions = self.engine.tick(self._clock())
        if decisions:
            await self._persist(decisions)
        return len(decisions)

    # ----------------------------------------------------------------------- output

    async def _persist(self, decisions: list[Decision]) -> None:
        plan = self._plan(decisions)
        for attempt in range(1, PERSIST_ATTEMPTS + 1):
            try:
                await self._writer.transaction(lambda conn: self._write(conn, plan))
                break
            except OverloadedError as exc:
                if attempt == PERSIST_ATTEMPTS:
                    self._lost(decisions, str(exc))
                    return
                await asyncio.sleep(min(float(exc.max_age), 0.2 * attempt))
            except StoreError as exc:
                self._lost(decisions, str(exc))
                return
        self.stats.decisions += len(decisions)
        for decision in decisions:
            _log_decision(decision)
        for listener in self._listeners:
            try:
                listener(decisions)
            except Exception:
                log.exception("rules.listener_failed", listener=repr(listener))

    def _lost(self, decisions: Sequence[Decision], error: str) -> None:
        self.stats.persist_failures += 1
        log.error("rules.persist_failed", decisions=len(decisions), error=error)

    def _plan(self, decisions: list[Decision]) -> _Plan:
        """Snapshot, before any await, what the transaction will write."""
        devices: dict[str, Device] = {}
        lists: dict[str, tuple[ListItem, ...]] = {}
        for decision in decisions:
            if isinstance(decision, ShoppingListChanged):
                lists[decision.list_name] = tuple(self.engine.shopping_list(decision.list_name))
                known = self._devices.get(decision.device)
                devices[decision.device] = self._device_of(
                    decision.device, known.type if known else "generic"
                )
            else:
                devices[decision.device] = self._device_of(decision.device, decision.device_type)
        return _Plan(tuple(decisions), devices, lists)

    def _device_of(self, name: str, device_type: str) -> Device:
        device = self._registry.device(name) or self._devices.get(name)
        return device if device is not None else Device(0, name, device_type)

    async def _write(self, conn: aiosqlite.Connection, plan: _Plan) -> None:
        for decision in plan.decisions:
            device = plan.devices[decision.device]
            device_id = device.id or None
            if isinstance(decision, ShoppingListChanged):
                await relay_events.record_event(
                    conn, kind="event", device=device, at=decision.at, body=_list_body(decision)
                )
                continue
            alert_id: int | None
            if isinstance(decision, AlertRaised):
                alert_id = await store.insert_alert(conn, decision, device_id=device_id)
                event = "raised"
            elif isinstance(decision, AlertRenotified):
                alert_id = await store.renotify_alert(conn, decision)
                if alert_id is None:  # its raise was never stored: store it now
                    alert_id = await store.insert_alert(conn, decision, device_id=device_id)
                event = "renotified"
            else:
                alert_id = await store.clear_alert(
                    conn,
                    rule=decision.rule,
                    device=decision.device,
                    at=decision.at,
                    message=decision.message,
                )
                event = "cleared"
            await relay_events.record_event(
                conn,
                kind="alert",
                device=device,
                at=decision.at,
                body=_alert_body(event, alert_id, decision),
            )
        for list_name, items in plan.lists.items():
            await store.replace_list(conn, list_name, items)


def _row_event(row: store.AlertRow, at: float, message: str) -> AlertCleared:
    return AlertCleared(
        rule=row.rule,
        kind=row.kind,
        device=row.device,
        device_type=row.device_type,
        severity=row.severity,
        at=at,
        value=row.value,
        threshold=row.threshold,
        message=message,
        raised_at=row.raised_at,
    )


def _alert_body(event: str, alert_id: int | None, alert: AlertEvent) -> dict[str, Any]:
    body: dict[str, Any] = {
        "event": event,
        "id": alert_id,
        "rule": alert.rule,
        "kind": alert.kind,
        "device": alert.device,
        "device_type": alert.device_type,
        "severity": alert.severity,
        "at": alert.at,
        "raised_at": alert.raised_at,
        "value": alert.value,
        "threshold": alert.threshold,
        "message": alert.message,
    }
    if isinstance(alert, AlertRenotified):
        body["count"] = alert.count
    return body


def _list_body(change: ShoppingListChanged) -> dict[str, Any]:
    return {
        "event": f"shopping_list.{change.action}",
        "list": change.list_name,
        "item": change.item,
        "level": change.level,
        "minimum": change.minimum,
        "device": change.device,
        "at": change.at,
    }


def _log_decision(decision: Decision) -> None:
    if isinstance(decision, ShoppingListChanged):
        log.info(
            "rules.list_changed",
            list=decision.list_name,
            item=decision.item,
            action=decision.action,
            level=decision.level,
            device=decision.device,
        )
        return
    if isinstance(decision, AlertRaised):
        name = "rules.alert_raised"
    elif isinstance(decision, AlertRenotified):
        name = "rules.alert_renotified"
    else:
        name = "rules.alert_cleared"
    loud = decision.severity == "critical" and not isinstance(decision, AlertCleared)
    (log.warning if loud else log.info)(
        name,
        rule=decision.rule,
        device=decision.device,
        severity=decision.severity,
        value=decision.value,
        alert_message=decision.message,
    )
