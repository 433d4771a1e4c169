"""Downstream servers the relay tests publish to (their fixtures are in conftest)."""

from __future__ import annotations

import asyncio
import random
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
    return free_port(socket.SOCK_DGRAM)


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    """A port of `kind` (TCP by default) free on 127.0.0.1, below the kernel's ephemeral range.

    A port the kernel handed out (bind to 0) goes back to its pool when the socket closes,
    and the next client socket of another test may get it before the caller binds it.
    Below that range only ports bound on purpose are taken, and this one was free."""
    low = _ephemeral_low()
    for _ in range(100):
        port = random.randrange(max(1024, low - 12_000), low)
        with socket.socket(socket.AF_INET, kind) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as ranges:
            return max(int(ranges.read().split()[0]), 2048)
    except (OSError, ValueError, IndexError):
        return 32_768
