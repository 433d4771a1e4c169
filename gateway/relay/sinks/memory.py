"""A sink that keeps what it is given: the fake for unit tests and for dry runs.

It can be set down (every publish raises `TransientSinkError`), fail the n-th call, fail
chosen message ids, or hang until released (to test cancellation of a worker).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Literal

from gateway.errors import SinkError
from gateway.relay.sinks.base import Delivery, Result, SinkBase

FailureKind = Literal["transient", "permanent"]


class MemorySink(SinkBase):
    def __init__(self, name: str = "memory") -> None:
        super().__init__(name)
        #: Every confirmed delivery, in the order it was confirmed.
        self.delivered: list[Delivery] = []
        #: Number of `publish` calls so far.
        self.calls = 0
        self.is_down = False
        self._fail_calls: dict[int, FailureKind] = {}
        self._fail_ids: dict[str, FailureKind] = {}
        self._released = asyncio.Event()
        self._released.set()
        self._changed = asyncio.Condition()

    async def _open(self) -> None:
        self._connected = not self.is_down

    def set_down(self, down: bool = True) -> None:
        self.is_down = down
        self._connected = not down

    def fail_call(self, number: int, kind: FailureKind = "transient") -> None:
        """Make the `number`-th call (1-based, counting from creation) fail as a whole."""
        self._fail_calls[number] = kind

    def fail_message(self, message_id: str, kind: FailureKind = "permanent") -> None:
        """Fail this message id on every call until `clear_failures`."""
        self._fail_ids[message_id] = kind

    def clear_failures(self) -> None:
        self._fail_calls.clear()
        self._fail_ids.clear()

    def hang(self) -> None:
        """Calls from now on block until `release()` (or cancellation)."""
        self._released.clear()

    def release(self) -> None:
        self._released.set()

    @property
    def message_ids(self) -> list[str]:
        return [d.message_id for d in self.delivered]

    async def wait_for(self, count: int, within: float = 5.0) -> list[Delivery]:
        """Wait until at least `count` deliveries were confirmed."""
        async with asyncio.timeout(within), self._changed:
            await self._changed.wait_for(lambda: len(self.delivered) >= count)
        return list(self.delivered)

    def _error(self, kind: FailureKind, why: str, delivery: Delivery | None) -> SinkError:
        if kind == "transient":
            return self.transient(why, delivery)
        return self.permanent(why, delivery)

    async def publish(self, batch: Sequence[Delivery]) -> Sequence[Result]:
        self.calls += 1
        await self._released.wait()
        if self.is_down:
            raise self.down(self.transient("memory sink is down"))
        kind = self._fail_calls.pop(self.calls, None)
        if kind is not None:
            raise self._error(kind, f"call {self.calls} fails on purpose", None)
        results: list[Result] = []
        for delivery in batch:
            kind = self._fail_ids.get(delivery.message_id)
            if kind is not None:
                results.append(self._error(kind, f"{delivery.message_id} fails", delivery))
                continue
            try:
                self.body(delivery)  # an unencodable message fails here as on a real wire
            except SinkError as exc:
                results.append(exc)
                continue
            self.delivered.append(delivery)
            results.append(None)
        self._connected = True
        async with self._changed:
            self._changed.notify_all()
        return self.record(results)
