"""The one interface every sink implements, and what the relay worker calls.

Contract of `Sink.publish(batch)`:

- It returns one result per delivery, in batch order: `None` once the downstream confirmed
  that delivery (MQTT PUBACK for QoS 1, JetStream PubAck, HTTP 2xx, CoAP 2.xx), or the
  `TransientSinkError` / `PermanentSinkError` that delivery earned. Per-item results let
  one poisoned message become one dead letter instead of dead-lettering its whole batch.
- It may instead raise a `SinkError` when the whole batch failed alike (broker down);
  that means the same error for every delivery.
- It never sleeps to retry: retries are rows in the database. It bounds every wait with
  the sink's timeout, so a dead downstream gives a `TransientSinkError`, never a hang.
- Library exceptions are translated at this boundary, with the cause chained.
- Entering the sink does no network I/O that can fail: the gateway must start and serve
  devices while a downstream is unreachable. Sinks connect lazily inside `publish`.

The worker calls `publish_batch`, which normalises both forms and applies the ordering
rule: after a transient failure, later deliveries of the same device in the batch are
reported transient too (even if they went out), so they are retried after, never before,
the earlier one.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import TracebackType
from typing import NamedTuple, Protocol, Self

import structlog

from gateway.errors import PermanentSinkError, SinkError, TransientSinkError
from gateway.relay.envelope import Encoding, EnvelopeError, RelayMessage, encode, encode_batch

log = structlog.get_logger(__name__)

Result = SinkError | None


class Delivery(NamedTuple):
    """One message for one sink, as the worker hands it over."""

    message: RelayMessage
    encoding: Encoding = Encoding.JSON
    #: 1 on the first try; goes into the sink's errors and logs.
    attempt: int = 1
    #: The outbox entry this came from, for the worker's own bookkeeping.
    entry_id: int | None = None

    @property
    def device(self) -> str:
        return self.message.device

    @property
    def message_id(self) -> str:
        return self.message.message_id


class Sink(Protocol):
    """A downstream. An async context manager; `publish` as described in the module doc."""

    @property
    def name(self) -> str: ...

    @property
    def connected(self) -> bool:
        """True while the sink believes its downstream is reachable (for status output)."""
        ...

    @property
    def last_error(self) -> SinkError | None:
        """The most recent failure, cleared by the next fully confirmed batch."""
        ...

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...

    async def publish(self, batch: Sequence[Delivery]) -> Sequence[Result]: ...


def hold_back_after_failure(batch: Sequence[Delivery], results: Sequence[Result]) -> list[Result]:
    """Keep per-device order: nothing of a device counts as delivered after its first
    transient failure in this batch. A permanent failure leaves the stream (dead letter),
    so it holds nothing back."""
    failed: dict[str, TransientSinkError] = {}
    out: list[Result] = []
    for delivery, result in zip(batch, results, strict=True):
        earlier = failed.get(delivery.device)
        if earlier is not None and result is None:
            result = TransientSinkError(
                f"held back behind {earlier.args[0]!r}", sink=earlier.sink, attempt=earlier.attempt
            )
        if isinstance(result, TransientSinkError):
            failed.setdefault(delivery.device, result)
        out.append(result)
    return out


async def publish_batch(sink: Sink, batch: Sequence[Delivery]) -> list[Result]:
    """What the worker calls: always one result per delivery, order rule applied."""
    if not batch:
        return []
    try:
        results = list(await sink.publish(batch))
    except SinkError as exc:
        results = [exc] * len(batch)
    except Exception as exc:
        # A bug in a sink must not lose messages: retry (and finally dead-letter) them.
        log.exception("relay.sink_bug", sink=sink.name)
        error = TransientSinkError(f"unexpected {type(exc).__name__}: {exc}", sink=sink.name)
        error.__cause__ = exc
        results = [error] * len(batch)
    if len(results) != len(batch):
        raise RuntimeError(f"sink {sink.name} returned {len(results)} results for {len(batch)}")
    return hold_back_after_failure(batch, results)


class SinkBase:
    """State shared by the real sinks: name, the connected flag, the last error."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._connected = False
        self._last_error: SinkError | None = None
        self._log = log.bind(sink=name)

    @property
    def name(self) -> str:
        return self._name

    @property
    def connected(self) -> bool:
        return self._connected

    @property
    def last_error(self) -> SinkError | None:
        return self._last_error

    async def __aenter__(self) -> Self:
        await self._open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._connected = False
        await self._close()

    async def _open(self) -> None:
        """Prepare local resources. Never contact the downstream here: a sink must enter
        even when its downstream is down, and connects lazily in `publish`."""

    async def _close(self) -> None:
        """Release whatever `_open` or `publish` acquired."""

    def transient(self, message: str, delivery: Delivery | None = None) -> TransientSinkError:
        return TransientSinkError(
            message, sink=self._name, attempt=None if delivery is None else delivery.attempt
        )

    def permanent(self, message: str, delivery: Delivery | None = None) -> PermanentSinkError:
        return PermanentSinkError(
            message, sink=self._name, attempt=None if delivery is None else delivery.attempt
        )

    def body(self, delivery: Delivery) -> bytes:
        """The encoded message; an unencodable one is a permanent failure."""
        try:
            return encode(delivery.message, delivery.encoding)
        except EnvelopeError as exc:
            raise self.permanent(str(exc), delivery) from exc

    def batch_body(self, batch: Sequence[Delivery]) -> bytes:
        encoding = batch[0].encoding
        try:
            return encode_batch([d.message for d in batch], encoding)
        except EnvelopeError as exc:
            raise self.permanent(str(exc), batch[0]) from exc

    def record(self, results: Sequence[Result]) -> Sequence[Result]:
        """Note the outcome for `connected` / `last_error` and the log."""
        errors = [r for r in results if r is not None]
        if not errors:
            self._last_error = None
        else:
            self._last_error = errors[0]
            self._log.warning(
                "delivery.failed",
                outcome="transient" if isinstance(errors[0], TransientSinkError) else "permanent",
                failed=len(errors),
                batch=len(results),
                error=str(errors[0]),
            )
        return results

    def down(self, error: TransientSinkError) -> TransientSinkError:
        """The downstream is unreachable: remember it and hand back the error to raise."""
        self._connected = False
        self._last_error = error
        self._log.warning("sink.down", error=str(error))
        return error


def runs_by_encoding(batch: Sequence[Delivery], size: int) -> list[list[Delivery]]:
    """Split a batch into consecutive chunks of one encoding and at most `size` items."""
    runs: list[list[Delivery]] = []
    for delivery in batch:
        if runs and runs[-1][0].encoding is delivery.encoding and len(runs[-1]) < size:
            runs[-1].append(delivery)
        else:
            runs.append([delivery])
    return runs
