"""`/cmd/NAME`: upstream systems queue commands for a device and read their status.

`POST /cmd/NAME` with a CBOR command description -> 2.01, Location-Path `cmd/NAME/<id>`.
`GET /cmd/NAME/<id>` -> the command and its state; `GET /cmd/NAME` -> the device's latest
commands. Bodies are CBOR (60) or JSON (50, with Accept); see docs/api.md "Commands".
"""

from __future__ import annotations

import json
from typing import Any

import aiosqlite
import cbor2
import structlog
from aiocoap import Message, resource
from aiocoap.numbers.codes import Code

from gateway.coap.base import GatewayResource
from gateway.commands import store
from gateway.commands.dispatcher import CommandDispatcher
from gateway.core.commands import parse_command_description
from gateway.core.readings import CF_CBOR, CF_JSON
from gateway.errors import NotAcceptableError, UnknownDeviceError

log = structlog.get_logger("gateway.coap")

LIST_LIMIT = 50


def _encode(document: Any, request: Message) -> Message:
    accept = request.opt.accept
    content_format = CF_CBOR if accept is None else int(accept)
    if content_format == CF_CBOR:
        payload = cbor2.dumps(document)
    elif content_format == CF_JSON:
        payload = json.dumps(document, separators=(",", ":"), default=_json_default).encode()
    else:
        raise NotAcceptableError("accept 60 (CBOR) or 50 (JSON)")
    return Message(code=Code.CONTENT, payload=payload, content_format=content_format)


def _json_default(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.hex()
    raise TypeError(type(value).__name__)


class CommandsResource(GatewayResource, resource.PathCapable):  # type: ignore[misc]
    event = "command"

    def __init__(self, dispatcher: CommandDispatcher, reader: aiosqlite.Connection) -> None:
        super().__init__()
        self._dispatcher = dispatcher
        self._reader = reader

    def get_link_description(self) -> None:
        return None

    async def render_post(self, request: Message) -> Message:
        path = request.opt.uri_path
        if len(path) != 1 or not path[0]:
            raise UnknownDeviceError("expected POST /cmd/NAME")
        device = str(path[0])
        with structlog.contextvars.bound_contextvars(device=device):
            command = parse_command_description(request.payload, request.opt.content_format)
            command_id = await self._dispatcher.submit(device, command, origin="coap")
        return Message(code=Code.CREATED, location_path=("cmd", device, str(command_id)))

    async def render_get(self, request: Message) -> Message:
        path = request.opt.uri_path
        if len(path) == 1 and path[0]:
            rows = await store.list_commands(self._reader, device=path[0], limit=LIST_LIMIT)
            return _encode([row.as_dict() for row in rows], request)
        if len(path) == 2 and path[1].isdigit():
            command = await store.get_command(self._reader, int(path[1]))
            if command is None or command.device != path[0]:
                raise UnknownDeviceError(f"no command {path[1]} for {path[0]!r:.70}")
            return _encode(command.as_dict(), request)
        raise UnknownDeviceError("expected /cmd/NAME or /cmd/NAME/<id>")
