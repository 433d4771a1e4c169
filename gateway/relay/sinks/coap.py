"""CoAP forward sink (aiocoap client): confirmable POSTs to an upstream CoAP server.

`mode = "per_reading"` POSTs each message on its own; `mode = "batch"` POSTs up to
`batch_size` messages of one encoding in one body (an array of envelopes, or one SenML
pack). A 2.xx answer confirms. 4.xx is permanent, except 4.08 and 4.29 which are worth
another try; 5.xx, lost requests and network errors are transient. Requests go out one
after another in batch order; after a transient failure the rest of the batch is not sent
(it would only wait for the same dead upstream) and is retried later.

After a failure to reach the upstream the client context (its socket) is replaced: on
uvloop, aiocoap's client stops reading its socket for good after an ICMP error (libuv
stops watching a descriptor that reports POLLERR), so an upstream that came back would
never be heard again.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import aiocoap
import aiocoap.error

from gateway.errors import SinkError, TransientSinkError
from gateway.relay.config import SinkConfig
from gateway.relay.sinks.base import Delivery, Result, SinkBase, runs_by_encoding

_RETRYABLE_4XX = frozenset({aiocoap.Code.REQUEST_ENTITY_INCOMPLETE, aiocoap.Code.TOO_MANY_REQUESTS})


class CoapSink(SinkBase):
    def __init__(self, config: SinkConfig) -> None:
        super().__init__(config.name)
        self._config = config
        self._context: Any = None

    async def _open(self) -> None:
        # Binds a local UDP socket only; the upstream is first contacted by publish.
        self._context = await aiocoap.Context.create_client_context()

    async def _close(self) -> None:
        context, self._context = self._context, None
        if context is not None:
            await context.shutdown()

    async def _renew(self) -> None:
        """A fresh client context (see the module doc)."""
        await self._close()
        await self._open()

    async def publish(self, batch: Sequence[Delivery]) -> Sequence[Result]:
        size = 1 if self._config.mode == "per_reading" else self._config.batch_size
        results: list[Result] = []
        error: SinkError | None = None
        for run in runs_by_encoding(batch, size):
            if isinstance(error, TransientSinkError):
                results.extend([error] * len(run))
                continue
            try:
                body = self.body(run[0]) if size == 1 else self.batch_body(run)
                await self._post(run[0], body)
                error = None
            except SinkError as exc:
                error = exc
            results.extend([error] * len(run))
        return self.record(results)

    async def _post(self, first: Delivery, body: bytes) -> None:
        if self._context is None:
            raise RuntimeError("CoapSink used outside `async with`")
        request = aiocoap.Message(
            code=aiocoap.POST,
            transport_tuning=aiocoap.Reliable,  # CON: the upstream must acknowledge
            uri=self._config.url,
            payload=body,
            content_format=first.encoding.content_format,
        )
        try:
            # On timeout the awaited response future is cancelled, which stops retransmitting.
            # Not wait_for: on Python 3.11 it returns a response that arrives together with a
            # cancellation and drops the cancellation, so a stopping worker kept running.
            async with asyncio.timeout(self._config.timeout):
                response = await self._context.request(request).response
        except (TimeoutError, aiocoap.error.Error) as exc:
            await self._renew()
            reason = "did not answer" if isinstance(exc, TimeoutError) else f"unreachable: {exc}"
            raise self.down(self.transient(f"CoAP upstream {reason}", first)) from exc
        self._connected = True
        code = response.code
        if code.is_successful():
            return
        if code.class_ == 4 and code not in _RETRYABLE_4XX:
            raise self.permanent(f"CoAP upstream answered {code.dotted}", first)
        raise self.transient(f"CoAP upstream answered {code.dotted}", first)
