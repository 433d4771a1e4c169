"""`/r/NAME`: POST readings, GET the latest value of each measurement."""

from __future__ import annotations

import aiosqlite
import structlog
from aiocoap import Message, resource
from aiocoap.numbers.codes import Code

from gateway.coap.base import GatewayResource, LogContext, peer_of, single_path_segment
from gateway.core.readings import CF_CBOR, CF_JSON, CF_SENML_CBOR, CF_SENML_JSON, encode_latest
from gateway.errors import NotAcceptableError, UnknownDeviceError
from gateway.ingest import Ingest
from gateway.store.queries import latest_values

log = structlog.get_logger("gateway.coap")

LATEST_FORMATS = (CF_CBOR, CF_JSON, CF_SENML_CBOR, CF_SENML_JSON)


class ReadingsResource(GatewayResource, resource.PathCapable):  # type: ignore[misc]
    event = "reading"

    def __init__(self, ingest: Ingest, reader: aiosqlite.Connection) -> None:
        super().__init__()
        self._ingest = ingest
        self._reader = reader

    def get_link_description(self) -> None:
        return None

    async def needs_blockwise_assembly(self, request: Message) -> bool:
        # A POST without block options is complete, and its answer (empty, or a short
        # diagnostic) fits one message: skipping aiocoap's block-wise layer saves building a
        # cache key for every reading. Block-wise POSTs and every GET still go through it.
        return not (
            request.code == Code.POST and request.opt.block1 is None and request.opt.block2 is None
        )

    async def render_post(self, request: Message) -> Message:
        device = single_path_segment(request, "r")
        with LogContext(device=device):
            result = await self._ingest.post(
                device, request.payload, request.opt.content_format, address=peer_of(request)
            )
            log.debug("reading.stored", outcome="stored", measurements=result.measurements)
        return Message(code=Code.CHANGED)

    async def render_get(self, request: Message) -> Message:
        name = single_path_segment(request, "r")
        accept = request.opt.accept
        content_format = CF_CBOR if accept is None else int(accept)
        if content_format not in LATEST_FORMATS:
            raise NotAcceptableError(
                f"accept {content_format} not available; use 60, 50, 112 or 110", device=name
            )
        device = await self._ingest.known_device(name)
        if device is None:
            raise UnknownDeviceError(f"unknown device {name!r:.70}", device=name)
        values = await latest_values(self._reader, device.id)
        return Message(
            code=Code.CONTENT,
            payload=encode_latest(name, values, content_format),
            content_format=content_format,
        )
