"""Downstream servers the relay tests publish to (their fixtures are in conftest)."""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass, field
from typing import Any

import aiocoap
import aiocoap.resource
from aiohttp import web


@dataclass
class Recorded:
    body: bytes
    headers: dict[str, str]


@dataclass
class WebhookServer:
    url: str = ""
    requests: list[Recorded] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)
    stall: asyncio.Event = field(default_factory=asyncio.Event)
    arrived: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        async with self.arrived:
            self.requests.append(Recorded(body, dict(request.headers)))
            self.arrived.notify_all()
        await self.stall.wait()
        status = self.statuses.pop(0) if self.statuses else 200
        return web.Response(status=status)

    async def wait_for(self, count: int, within: float = 5.0) -> list[Recorded]:
        async with asyncio.timeout(within), self.arrived:
            await self.arrived.wait_for(lambda: len(self.requests) >= count)
        return self.requests


@dataclass
class CoapRequest:
    payload: bytes
    content_format: int | None


class CoapUpstream(aiocoap.resource.Resource):  # type: ignore[misc]
    def __init__(self) -> None:
        super().__init__()
        self.url = ""
        self.requests: list[CoapRequest] = []
        self.codes: list[Any] = []
        self.arrived = asyncio.Condition()

    async def render_post(self, request: Any) -> Any:
        cf = request.opt.content_format
        async with self.arrived:
            self.requests.append(CoapRequest(request.payload, None if cf is None else int(cf)))
            self.arrived.notify_all()
        code = self.codes.pop(0) if self.codes else aiocoap.CHANGED
        return aiocoap.Message(code=code)

    async def wait_for(self, count: int, within: float = 5.0) -> list[CoapRequest]:
        async with asyncio.timeout(within), self.arrived:
            await self.arrived.wait_for(lambda: len(self.requests) >= count)
        return self.requests


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
