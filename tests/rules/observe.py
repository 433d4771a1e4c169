"""An aiocoap client observation that collects every notification."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import aiocoap
import cbor2
from aiocoap.numbers.codes import Code


class Observation:
    def __init__(self) -> None:
        self.documents: list[Any] = []

    @property
    def latest(self) -> Any:
        return self.documents[-1]


@contextlib.asynccontextmanager
async def observing(client: aiocoap.Context, uri: str) -> AsyncIterator[Observation]:
    request = client.request(aiocoap.Message(code=Code.GET, uri=uri, observe=0))
    first = await request.response
    assert first.code == Code.CONTENT, (first.code, first.payload)
    assert first.opt.observe is not None, "the resource did not accept the observation"
    observation = Observation()
    observation.documents.append(cbor2.loads(first.payload))

    async def collect() -> None:
        async for notification in request.observation:
            observation.documents.append(cbor2.loads(notification.payload))

    task = asyncio.create_task(collect(), name="test.observe")
    try:
        yield observation
    finally:
        request.observation.cancel()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
