"""One sink's worker: claim due outbox entries and the readings after the sink's cursor,
publish them, settle each one.

A round is one writer transaction, run in a single trip to the database thread: it writes
the outcomes of the batch just published (delivered entries are deleted, transient failures
rescheduled with backoff, the rest moved to the dead letters; of the readings, those that
failed or were held back are queued in the outbox and the cursor moves past them all),
reads the sink's unfinished entries in order as far as the pure planner needs to pick what
may go now without breaking per-device order, claims those (pending -> in_flight), loads
their messages, and while the batch has room reads the routed readings after the cursor.
The worker then publishes them with `publish_batch`, and the next round settles them. Once
nothing is due it waits for a commit (the `wake` event), the earliest retry, or
`poll_interval`.

Cancelled (shutdown) or failed mid-round, the worker puts its claimed entries back to
pending, shielded from the cancellation, and re-raises; a crash leaves them in flight, and
the next start puts them back.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import structlog

from gateway.core.outbox import (
    DeliveryState,
    Outcome,
    Random,
    Settlement,
    check_transition,
    settle,
)
from gateway.errors import GatewayError, PermanentSinkError
from gateway.relay import store
from gateway.relay.config import RelayConfig
from gateway.relay.sinks.base import Delivery, Sink, publish_batch
from gateway.store.writer import StoreWriter

log = structlog.get_logger(__name__)

_DEAD = check_transition(DeliveryState.IN_FLIGHT, DeliveryState.DEAD)
#: How many unfinished entries a round looks at, at least (see `plan_batch` on windows).
MIN_WINDOW = 1_000


@dataclass
class SinkStats:
    """A sink's running figures; `depth` is kept from commits and settlements and
    resynchronised from the database now and then."""

    depth: int = 0
    sent: int = 0
    retries: int = 0
    dead: int = 0
    dropped: int = 0
    sent_per_s: float = 0.0
    last_error: str | None = None
    last_error_at: float | None = None


class SinkWorker:
    def __init__(
        self,
        sink: Sink,
        *,
        config: RelayConfig,
        gateway: str,
        writer: StoreWriter,
        stats: SinkStats,
        clock: Callable[[], float] = time.time,
        rng: Random,
    ) -> None:
        self.sink = sink
        self.stats = stats
        #: Set when something was committed that this sink may have to send.
        self.wake = asyncio.Event()
        self._config = config
        self._gateway = gateway
        self._writer = writer
        self._clock = clock
        self._rng = rng
        self._window = max(MIN_WINDOW, self._largest_batch * 10)
        self._was_connected: bool | None = None
        self._log = log.bind(sink=sink.name)

    async def run(self) -> None:
        while True:
            self.wake.clear()
            try:
                wait = await self.step()
            except (GatewayError, sqlite3.Error):
                self._log.exception("relay.worker_failed")
                wait = self._config.poll_interval
            if wait > 0:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await self.wake.wait()

    async def step(self) -> float:
        """Rounds while entries are due; then the seconds to wait before looking again.

        A round is one trip to the database thread, which settles the batch just sent and
        claims the next in one transaction, and the publishing of a batch. After a full
        batch (a backlog), and whenever outcomes are still to be written, the next trip
        runs while a batch is published, so the database work overlaps the wait for the
        downstream's confirmations. Order per device holds: a trip claims nothing of a
        device with outbox entries in flight, and settles the batch before; readings it
        read after the cursor meanwhile are held back (queued behind) if their device
        failed in the batch that was on its way.
        """
        settled = store.NO_OUTCOMES
        claimed: store.Claimed | None = None
        failed: frozenset[int] = frozenset()
        while True:
            if claimed is None:
                # Woken by a commit, or after a batch that was not full: let more gather.
                await self._linger(settled)
                now = self._clock()
                claimed = await self._settle_and_claim(settled, now, None)
                settled = store.NO_OUTCOMES
                if claimed.empty:
                    if claimed.wake_at is None:
                        return self._config.poll_interval
                    return min(self._config.poll_interval, max(0.0, claimed.wake_at - now))
            ahead: asyncio.Task[store.Claimed] | None = None
            # Unwritten outcomes always go with the next trip, so none are carried over.
            if settled or len(claimed.entries) + len(claimed.streamed) >= self._config.batch_size:
                ahead = asyncio.create_task(
                    self._settle_and_claim(settled, self._clock(), claimed.stream_to)
                )
                settled = store.NO_OUTCOMES
            try:
                outcomes = await self._send(claimed, failed)
            except BaseException:
                await self._release([entry.id for entry in claimed.entries])
                if ahead is not None:
                    await self._abandon(ahead)
                raise
            failed = _failed_devices(outcomes)
            if ahead is None:
                settled, claimed = outcomes, None
                continue
            try:
                after = await asyncio.shield(ahead)
            except BaseException:
                # Cancelled, or the trip ahead failed: this batch was published all the
                # same, so its outcomes are written on their own.
                await self._settle_alone(outcomes, ahead)
                raise
            # Nothing claimed ahead (perhaps only this batch's devices had more): the next
            # trip settles this batch before it looks again.
            settled, claimed = outcomes, None if after.empty else after

    @property
    def _largest_batch(self) -> int:
        return max(self._config.batch_size, self._config.catch_up_batch_size or 0)

    def _batch_limit(self) -> int:
        """How many entries the next claim may take: more while a backlog drains."""
        catch_up = self._config.catch_up_batch_size
        if catch_up is not None and self.stats.depth >= catch_up:
            return catch_up
        return self._config.batch_size

    async def _linger(self, settled: store.Settled) -> None:
        """Wait `linger` before a round; cancelled meanwhile, write `settled` first."""
        if self._config.linger <= 0:
            return
        try:
            await asyncio.sleep(self._config.linger)
        except BaseException:
            if settled:
                await self._settle_alone(settled, None)
            raise

    async def _abandon(self, ahead: asyncio.Task[store.Claimed]) -> None:
        """Let a trip run ahead finish, then put back what it claimed. Not cancelled: it
        also settles the batch before, which must be written (or put back if it fails).
        Readings it read after the cursor need nothing: the cursor did not pass them."""
        await asyncio.wait([ahead])
        if not ahead.cancelled() and ahead.exception() is None:
            await self._release([entry.id for entry in ahead.result().entries])

    async def _settle_alone(
        self, settled: store.Settled, ahead: asyncio.Task[store.Claimed] | None
    ) -> None:
        """Cancelled or failed while a trip ran ahead (or while lingering): let the trip
        finish and put back what it claimed, then write `settled` on its own (or put its
        entries back)."""
        if ahead is not None:
            await self._abandon(ahead)
        now, sink = self._clock(), self.sink.name
        settling = asyncio.ensure_future(
            self._writer.run_in_transaction(lambda conn: store.settle(conn, sink, settled, now=now))
        )
        await asyncio.wait([settling])
        if not settling.cancelled() and settling.exception() is None:
            self._account(settled, now)
        else:
            await self._release([outcome.entry.id for outcome in settled.outcomes])

    async def _settle_and_claim(
        self, settled: store.Settled, now: float, stream_from: int | None
    ) -> store.Claimed:
        """Write the outcomes of the last batch and claim the next, in one transaction."""
        sink, gateway, window = self.sink.name, self._gateway, self._window
        limit = self._batch_limit()

        def round_trip(conn: sqlite3.Connection) -> store.Claimed:
            store.settle(conn, sink, settled, now=now)
            return store.claim_next(
                conn,
                sink,
                now=now,
                limit=limit,
                window=window,
                gateway=gateway,
                stream_from=stream_from,
            )

        trip = asyncio.ensure_future(self._writer.run_in_transaction(round_trip))
        try:
            claimed = await asyncio.shield(trip)
        except asyncio.CancelledError:
            # The trip is queued and may still commit: once it has, count what it settled
            # and put back what it claimed; if it did not, put back the unsettled batch.
            await asyncio.wait([trip])
            if not trip.cancelled() and trip.exception() is None:
                self._account(settled, now)
                await self._release([entry.id for entry in trip.result().entries])
            else:
                await self._release([outcome.entry.id for outcome in settled.outcomes])
            raise
        except BaseException:
            # Rolled back: the last batch is still in flight (its readings still after the
            # cursor). Sent again later, which at-least-once allows.
            await self._release([outcome.entry.id for outcome in settled.outcomes])
            raise
        self._account(settled, now)
        return claimed

    async def _release(self, ids: Sequence[int]) -> None:
        if not ids:
            return
        try:
            await asyncio.shield(
                self._writer.run_in_transaction(lambda conn: store.release(conn, ids))
            )
        except (GatewayError, sqlite3.Error) as exc:
            # The writer is closing; the next start puts in-flight entries back.
            self._log.warning("relay.release_failed", entries=len(ids), error=str(exc))
        else:
            self._log.info("relay.released", entries=len(ids))

    async def _send(self, claimed: store.Claimed, failed: frozenset[int]) -> store.Settled:
        """Publish a claimed batch: its outbox entries, then its readings read after the
        cursor, but for those held back (an earlier entry of the device is queued, or the
        device failed in the batch before, `failed`) and those too old to send."""
        now = self._clock()
        policy = self._config.retry
        entries, messages = claimed.entries, claimed.messages
        outcomes: list[store.Outcome] = []
        streamed: list[store.StreamOutcome] = []
        batch: list[Delivery] = []
        for entry in entries:
            message = messages.get(entry.id)
            if message is None:
                outcomes.append(self._dead(entry, "source_missing", "source row was deleted"))
            elif policy.max_age and now - entry.first_at >= policy.max_age:
                outcomes.append(self._dead(entry, "max_age", "too old before it could be sent"))
            else:
                batch.append(Delivery(message, entry.encoding, entry.attempt + 1, entry.id))
        # Readings from the stream go after, keyed -1, -2, ... (outbox ids are positive).
        by_key: dict[int, store.Streamed] = {}
        for index, reading in enumerate(claimed.streamed):
            if reading.held or reading.device_id in failed:
                streamed.append(store.StreamOutcome(reading, None, None))
            elif policy.max_age and now - reading.first_at >= policy.max_age:
                settlement = Settlement(_DEAD, 0, None, "max_age")
                error = "too old before it could be sent"
                streamed.append(store.StreamOutcome(reading, settlement, error))
            else:
                by_key[-1 - index] = reading
                batch.append(Delivery(reading.message, reading.encoding, 1, -1 - index))
        results = await publish_batch(self.sink, batch)
        now = self._clock()
        by_id = {entry.id: entry for entry in entries}
        for delivery, result in zip(batch, results, strict=True):
            assert delivery.entry_id is not None
            if result is None:
                outcome = Outcome.CONFIRMED
            elif isinstance(result, PermanentSinkError):
                outcome = Outcome.PERMANENT
            else:
                outcome = Outcome.TRANSIENT
            failure = None if result is None else str(result)
            if delivery.entry_id < 0:
                reading = by_key[delivery.entry_id]
                settlement = self._settlement(outcome, 0, reading.first_at, now)
                streamed.append(store.StreamOutcome(reading, settlement, failure))
            else:
                entry = by_id[delivery.entry_id]
                settlement = self._settlement(outcome, entry.attempt, entry.first_at, now)
                outcomes.append(store.Outcome(entry, settlement, failure))
        self._note_connection()
        return store.Settled(outcomes, streamed, claimed.stream_to)

    def _settlement(
        self, outcome: Outcome, attempt: int, first_at: float, now: float
    ) -> Settlement:
        policy, rng = self._config.retry, self._rng
        return settle(outcome, attempt=attempt, first_at=first_at, policy=policy, now=now, rng=rng)

    def _dead(self, entry: store.Entry, reason: str, error: str) -> store.Outcome:
        return store.Outcome(entry, Settlement(_DEAD, entry.attempt, None, reason), error)

    def _note_connection(self) -> None:
        connected = self.sink.connected
        if connected == self._was_connected:
            return
        if connected:
            self._log.info("relay.connected")
        elif self._was_connected is not None:
            self._log.warning("relay.disconnected", error=self.stats.last_error)
        self._was_connected = connected

    def _account(self, settled: store.Settled, now: float) -> None:
        stats = self.stats
        delivered = retried = finished = 0
        retry_at: float | None = None
        first_error: str | None = None
        attempt = 0
        either: list[store.Outcome | store.StreamOutcome] = [*settled.outcomes, *settled.streamed]
        for outcome in either:
            settlement = outcome.settlement
            if settlement is None:
                continue  # held back: queued, still to send
            if outcome.error is not None:
                first_error = first_error or outcome.error
                stats.last_error, stats.last_error_at = outcome.error, now
            if settlement.state is DeliveryState.DELIVERED:
                delivered += 1
            elif settlement.state is DeliveryState.PENDING:
                retried += 1
                attempt = max(attempt, settlement.attempt)
                assert settlement.next_attempt_at is not None
                retry_at = min(retry_at or settlement.next_attempt_at, settlement.next_attempt_at)
            else:
                finished += 1
                stats.dead += 1
                entry = outcome.entry
                if isinstance(entry, store.Streamed):
                    message_id = store.message_id("reading", entry.reading_id)
                else:
                    message_id = store.message_id(entry.kind, entry.ref_id)
                self._log.warning(
                    "relay.dead_letter",
                    message_id=message_id,
                    device_id=entry.device_id,
                    reason=settlement.reason,
                    attempt=settlement.attempt,
                    error=outcome.error,
                )
        stats.sent += delivered
        stats.retries += retried
        stats.depth = max(0, stats.depth - delivered - finished)
        if delivered:
            self._log.debug("relay.delivered", entries=delivered)
        if retried:
            assert retry_at is not None
            self._log.warning(
                "relay.retry",
                entries=retried,
                attempt=attempt,
                retry_in=round(max(0.0, retry_at - now), 3),
                error=first_error,
            )


def _failed_devices(settled: store.Settled) -> frozenset[int]:
    """Devices of the readings from the stream that failed transiently (or were held back)
    in a batch: their readings read meanwhile must queue behind."""
    return frozenset(
        outcome.entry.device_id
        for outcome in settled.streamed
        if outcome.settlement is None or outcome.settlement.state is DeliveryState.PENDING
    )
