"""A stand-in gateway that acknowledges everything: for measuring the simulator alone.

It answers ``POST /rd`` with 2.01 and a location, ``POST /rd/<id>`` with 2.04 and
``POST /r/<name>`` with 2.04, and counts what it got. It stores nothing and checks nothing
beyond the CoAP layer's own deduplication.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from typing import Any

from aiocoap import Message
from aiocoap.numbers.codes import Code

from device_sim.coap import Addr, Endpoint


class Sink:
    def __init__(self, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self._bind = (host, port)
        self.counts: Counter[str] = Counter()
        self.endpoint: Endpoint | None = None

    async def __aenter__(self) -> Sink:
        loop = asyncio.get_running_loop()
        endpoint = Endpoint(rng=random.Random(0), handler=self._handle)
        await loop.create_datagram_endpoint(lambda: endpoint, local_addr=self._bind)
        self.endpoint = endpoint
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.endpoint is not None:
            self.endpoint.close()

    @property
    def address(self) -> Addr:
        assert self.endpoint is not None
        return self.endpoint.local_address

    def _handle(self, request: Any, peer: Addr) -> Any:
        path = request.opt.uri_path
        if request.code == Code.POST and path == ("rd",):
            self.counts["registrations"] += 1
            return Message(code=Code.CREATED, location_path=("rd", f"{peer[1]}"))
        if request.code == Code.POST and len(path) == 2 and path[0] == "rd":
            self.counts["refreshes"] += 1
            return Message(code=Code.CHANGED)
        if request.code == Code.DELETE and len(path) == 2 and path[0] == "rd":
            return Message(code=Code.DELETED)
        if request.code == Code.POST and len(path) == 2 and path[0] == "r":
            self.counts["readings"] += 1
            return Message(code=Code.CHANGED)
        return Message(code=Code.NOT_FOUND)
