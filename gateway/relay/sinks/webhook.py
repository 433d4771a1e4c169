"""HTTP webhook sink: POST batches of messages, confirmed by a 2xx answer.

The body is an array of envelopes (or one SenML pack) of at most `batch_size` messages, all
in one encoding. With a `secret`, `X-Signature-SHA256: sha256=<hex>` carries the
HMAC-SHA256 of the exact body bytes. 5xx, 408, 429, timeouts and connection failures are
transient; any other 4xx (and a redirect, which a webhook URL should not need) is
permanent. A request is all-or-nothing for the messages in it.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence

import aiohttp

from gateway.errors import SinkError, TransientSinkError
from gateway.relay.config import SinkConfig
from gateway.relay.sinks.base import Delivery, Result, SinkBase, runs_by_encoding

SIGNATURE_HEADER = "X-Signature-SHA256"
_RETRYABLE_4XX = frozenset({408, 425, 429})


def signature(secret: str, body: bytes) -> str:
    """The `X-Signature-SHA256` header value for `body`; receivers compare it in constant time."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


class WebhookSink(SinkBase):
    def __init__(self, config: SinkConfig) -> None:
        super().__init__(config.name)
        self._config = config
        self._session: aiohttp.ClientSession | None = None

    async def _open(self) -> None:
        # Creating the session opens no connection; an unreachable URL shows up in publish.
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self._config.timeout),
            headers=self._config.headers,
        )

    async def _close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def publish(self, batch: Sequence[Delivery]) -> Sequence[Result]:
        results: list[Result] = []
        error: SinkError | None = None
        for run in runs_by_encoding(batch, self._config.batch_size):
            if isinstance(error, TransientSinkError):
                # The downstream is failing; the rest waits for the retry instead of a timeout.
                results.extend([error] * len(run))
                continue
            try:
                await self._post(run)
                error = None
            except SinkError as exc:
                error = exc
            results.extend([error] * len(run))
        return self.record(results)

    async def _post(self, run: Sequence[Delivery]) -> None:
        if self._session is None:
            raise RuntimeError("WebhookSink used outside `async with`")
        body = self.batch_body(run)
        headers = {"Content-Type": run[0].encoding.content_type}
        if self._config.secret:
            headers[SIGNATURE_HEADER] = signature(self._config.secret, body)
        try:
            async with self._session.post(
                self._config.url, data=body, headers=headers, allow_redirects=False
            ) as response:
                status = response.status
                # Read the answer so the connection can be reused.
                await response.read()
        except TimeoutError as exc:
            raise self.down(self.transient("webhook timed out", run[0])) from exc
        except aiohttp.ClientError as exc:
            raise self.down(self.transient(f"webhook unreachable: {exc}", run[0])) from exc
        self._connected = True
        if 200 <= status < 300:
            return
        if status >= 500 or status in _RETRYABLE_4XX:
            raise self.transient(f"webhook answered {status}", run[0])
        raise self.permanent(f"webhook answered {status}", run[0])
