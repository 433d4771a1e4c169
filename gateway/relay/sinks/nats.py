"""NATS JetStream sink (nats-py): publish with `Nats-Msg-Id`, confirmed by the PubAck.

Each message carries its stable id as the `Nats-Msg-Id` header, so a retry of a message the
stream already stored (its ack was lost) is dropped by the stream's duplicate window rather
than stored twice. A batch is published in order without waiting, then every PubAck is
awaited within the sink's timeout.

The client does not reconnect by itself: a broken connection fails the batch (transient)
and the next `publish` connects afresh, which keeps every wait bounded. With
`create_stream`, a missing stream is created (subjects from the template, duplicate window
from the config); an existing stream is left as the operator configured it.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import ssl
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext

from gateway.errors import SinkError, TransientSinkError
from gateway.relay.config import SinkConfig
from gateway.relay.envelope import AddressTemplate, nats_safe
from gateway.relay.sinks.base import Delivery, Result, SinkBase

MSG_ID_HEADER = "Nats-Msg-Id"


def stream_subjects(config: SinkConfig) -> list[str]:
    """The subjects a created stream listens on: the template with `*` for each field."""
    if config.stream_subjects:
        return list(config.stream_subjects)
    tokens = config.subject.split(".")
    return [".".join("*" if "{" in token else token for token in tokens)]


def _tls(config: SinkConfig) -> ssl.SSLContext | None:
    uses_tls = config.tls or any(urlsplit(u).scheme == "tls" for u in config.server_list)
    if not uses_tls:
        return None
    context = ssl.create_default_context(cafile=config.ca_file)
    if config.cert_file:
        context.load_cert_chain(config.cert_file, config.key_file)
    return context


_SERVER_PASSWORD = re.compile(r"//[^@/]*@")


class NatsSink(SinkBase):
    def __init__(self, config: SinkConfig) -> None:
        super().__init__(config.name)
        self._config = config
        self._subjects = AddressTemplate(config.subject, nats_safe)
        self._nc: NatsClient | None = None
        self._js: JetStreamContext | None = None

    async def _close(self) -> None:
        await self._disconnect()

    def subject(self, delivery: Delivery) -> str:
        return self._subjects.render(delivery.message)

    async def _on_error(self, exc: Exception) -> None:
        self._log.debug("sink.nats_error", error=str(exc))

    async def _on_disconnected(self) -> None:
        self._connected = False

    async def _connect(self) -> JetStreamContext:
        if self._js is not None and self._nc is not None and self._nc.is_connected:
            return self._js
        await self._disconnect()
        config = self._config
        options: dict[str, Any] = {}
        if config.credentials:
            options["user_credentials"] = config.credentials
        if config.username:
            options["user"] = config.username
            options["password"] = config.password
        servers = list(config.server_list)
        try:
            async with asyncio.timeout(config.timeout):
                nc = await nats.connect(
                    servers,
                    name=f"coap-gw relay {config.name}",
                    allow_reconnect=False,
                    connect_timeout=max(1, round(config.timeout)),
                    tls=_tls(config),
                    error_cb=self._on_error,
                    disconnected_cb=self._on_disconnected,
                    **options,
                )
        except (nats.errors.Error, OSError, TimeoutError) as exc:
            where = ", ".join(_SERVER_PASSWORD.sub("//", s) for s in servers)
            raise self.down(self.transient(f"cannot connect to {where}: {exc!r}")) from exc
        js = nc.jetstream(timeout=config.timeout)
        self._nc, self._js = nc, js
        try:
            if config.create_stream and config.stream:
                await self._ensure_stream(js, config.stream)
        except BaseException:
            await self._disconnect()
            raise
        self._connected = True
        self._log.info("sink.connected", servers=len(servers))
        return js

    async def _ensure_stream(self, js: JetStreamContext, name: str) -> None:
        try:
            await js.stream_info(name)
            return
        except nats.js.errors.NotFoundError:
            pass
        except (nats.errors.Error, TimeoutError) as exc:
            raise self.down(self.transient(f"cannot look up stream {name}: {exc!r}")) from exc
        try:
            await js.add_stream(
                name=name,
                subjects=stream_subjects(self._config),
                duplicate_window=self._config.duplicate_window,
            )
        except (nats.errors.Error, TimeoutError) as exc:
            raise self.down(self.transient(f"cannot create stream {name}: {exc!r}")) from exc
        self._log.info("sink.stream_created", stream=name)

    async def _disconnect(self) -> None:
        nc, self._nc, self._js = self._nc, None, None
        self._connected = False
        if nc is not None and not nc.is_closed:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1.0):
                    await nc.close()

    def _error(self, exc: BaseException, delivery: Delivery) -> SinkError:
        if isinstance(exc, nats.js.errors.BadRequestError):
            return self.permanent(f"stream refused {delivery.message_id}: {exc}", delivery)
        if isinstance(exc, nats.errors.MaxPayloadError):
            return self.permanent(f"{delivery.message_id} too large: {exc}", delivery)
        if isinstance(exc, nats.js.errors.NoStreamResponseError):
            return self.transient(f"no stream takes {self.subject(delivery)}", delivery)
        return self.transient(f"publish failed: {exc!r}", delivery)

    async def publish(self, batch: Sequence[Delivery]) -> Sequence[Result]:
        js = await self._connect()
        results: list[Result] = [None] * len(batch)
        futures: list[asyncio.Future[Any] | None] = []
        stream = self._config.stream
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._config.timeout
        try:
            # One deadline for handing over the batch and for its PubAcks. No `wait_stall`:
            # with it nats-py wraps every publish in `asyncio.wait_for`, a task and a trip
            # through the event loop per message, so each message went out in a socket write
            # of its own. Without it the batch is written in few writes; a full pending
            # window (publish_async_max_pending) still makes a publish wait, within this
            # deadline.
            async with asyncio.timeout_at(deadline):
                for index, delivery in enumerate(batch):
                    try:
                        body = self.body(delivery)
                    except SinkError as exc:
                        results[index] = exc
                        futures.append(None)
                        continue
                    futures.append(
                        await js.publish_async(
                            self.subject(delivery),
                            body,
                            stream=stream,
                            headers={
                                MSG_ID_HEADER: delivery.message_id,
                                "Content-Type": delivery.encoding.content_type,
                            },
                        )
                    )
            pending = [f for f in futures if f is not None]
            if pending:
                await asyncio.wait(pending, timeout=max(0.0, deadline - loop.time()))
        except BaseException as exc:
            for future in futures:
                if future is not None and not future.done():
                    future.cancel()
            # TimeoutError (the deadline passed while publishing) is an OSError.
            if isinstance(exc, nats.errors.Error | OSError):
                await self._disconnect()
                raise self.down(self.transient(f"publish failed: {exc!r}")) from exc
            raise
        for index, (delivery, future) in enumerate(zip(batch, futures, strict=False)):
            if future is None:
                continue
            if not future.done():
                future.cancel()
                results[index] = self.transient("no PubAck in time", delivery)
            elif future.exception() is not None:
                results[index] = self._error(future.exception() or Exception(), delivery)
        if any(isinstance(r, TransientSinkError) for r in results):
            await self._disconnect()
        return self.record(results)
