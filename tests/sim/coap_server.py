"""A tiny gateway stand-in on aiocoap: /rd, /rd/<id> and /r/<name>, recording what arrives."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aiocoap
import cbor2
from aiocoap import resource
from aiocoap.numbers.codes import Code

from device_sim.codec import decode_senml
from tests.support.downstreams import free_udp_port


@dataclass
class Recorder:
    registrations: list[dict[str, Any]] = field(default_factory=list)
    #: (device, seq, values) for every reading request processed (duplicates included)
    readings: list[tuple[str, int | None, dict[str, Any]]] = field(default_factory=list)
    #: device names whose registration the server "forgets" once (answers 4.04 to next reading)
    forget: set[str] = field(default_factory=set)
    #: seconds to take before answering a reading (makes aiocoap send an empty ACK first)
    slow: float = 0.0
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    devices: dict[str, str] = field(default_factory=dict)

    def seqs(self, device: str) -> list[int | None]:
        return [seq for name, seq, _ in self.readings if name == device]


class Root(resource.Resource, resource.PathCapable):
    def __init__(self, recorder: Recorder) -> None:
        super().__init__()
        self.rec = recorder

    async def render(self, request: Any) -> Any:
        path = request.opt.uri_path
        rec = self.rec
        if path == ("rd",) and request.code == Code.POST:
            query = dict(q.partition("=")[::2] for q in request.opt.uri_query)
            reg_id = f"x{len(rec.registrations)}"
            rec.registrations.append(
                {"query": query, "links": request.payload.decode(), "id": reg_id}
            )
            rec.devices[reg_id] = query["ep"]
            return aiocoap.Message(code=Code.CREATED, location_path=("rd", reg_id))
        if len(path) == 2 and path[0] == "rd" and request.code == Code.POST:
            ok = path[1] in rec.devices and rec.devices[path[1]] not in rec.forget
            return aiocoap.Message(code=Code.CHANGED if ok else Code.NOT_FOUND)
        if len(path) == 2 and path[0] == "r" and request.code == Code.POST:
            name = path[1]
            if name in rec.forget:
                rec.forget.discard(name)
                for reg_id, dev in list(rec.devices.items()):
                    if dev == name:
                        del rec.devices[reg_id]
                return aiocoap.Message(code=Code.NOT_FOUND)
            if rec.slow:
                await asyncio.sleep(rec.slow)
            if request.opt.content_format == 112:
                values, bt, seq = decode_senml(request.payload)
                values = {**values, "ts": bt}
            else:
                values = cbor2.loads(request.payload)
                seq = values.pop("seq", None)
            rec.readings.append((name, seq, values))
            rec.arrived.set()
            return aiocoap.Message(code=Code.CHANGED)
        return aiocoap.Message(code=Code.NOT_FOUND)


@asynccontextmanager
async def coap_server() -> AsyncIterator[tuple[tuple[str, int], Recorder]]:
    rec = Recorder()
    port = free_udp_port()
    ctx = await aiocoap.Context.create_server_context(Root(rec), bind=("127.0.0.1", port))
    try:
        yield ("127.0.0.1", port), rec
    finally:
        await ctx.shutdown()


async def wait_for(predicate: Any, within: float = 5.0) -> None:
    """Poll ``predicate`` until true, failing after ``within`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)
