"""Devices played by aiocoap servers on loopback, for observe and command tests.

A `FakeDevice` hosts an observable `/state` (a CBOR map of its measurements) and a `/light`
that applies a CBOR map PUT to it (as a street light's dim command would); it registers and
posts from its own endpoint, so the gateway sees the device's real address and port.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiocoap
import aiocoap.resource
import cbor2
from aiocoap.numbers.codes import Code

from tests.support.downstreams import free_udp_port


class StateResource(aiocoap.resource.ObservableResource):  # type: ignore[misc]
    def __init__(self, device: FakeDevice) -> None:
        super().__init__()
        self.device = device

    async def render_get(self, request: aiocoap.Message) -> aiocoap.Message:
        self.device.gets += 1
        message = aiocoap.Message(payload=cbor2.dumps(self.device.state), content_format=60)
        message.opt.max_age = self.device.max_age
        return message


class LightResource(aiocoap.resource.Resource):  # type: ignore[misc]
    def __init__(self, device: FakeDevice) -> None:
        super().__init__()
        self.device = device

    async def _apply(self, request: aiocoap.Message) -> aiocoap.Message:
        self.device.commands.append((str(request.code), request.payload))
        self.device.received.set()
        if not self.device.answer:
            await asyncio.Event().wait()  # asleep: never answers
        changes = cbor2.loads(request.payload) if request.payload else {}
        self.device.set(**changes)
        return aiocoap.Message(
            code=Code.CHANGED, payload=cbor2.dumps({"ok": True}), content_format=60
        )

    render_put = _apply
    render_post = _apply


class FakeDevice:
    def __init__(self, name: str, device_type: str, state: dict[str, Any]) -> None:
        self.name = name
        self.type = device_type
        self.state = dict(state)
        self.max_age = 60
        self.gets = 0
        self.commands: list[tuple[str, bytes]] = []
        self.received = asyncio.Event()
        self.answer = True
        self.context: Any = None
        self.port = 0
        self.registration: str | None = None
        self._state = StateResource(self)

    @property
    def observers(self) -> int:
        return len(self._state._observations)

    async def start(self, port: int | None = None) -> FakeDevice:
        site = aiocoap.resource.Site()
        site.add_resource(["state"], self._state)
        site.add_resource(["light"], LightResource(self))
        for attempt in range(5):
            self.port = port or free_udp_port()
            try:
                self.context = await aiocoap.Context.create_server_context(
                    site, bind=("127.0.0.1", self.port)
                )
                break
            except OSError:
                # A port found free may be taken before aiocoap binds it (other sockets).
                if port is not None or attempt == 4:
                    raise
        return self

    async def stop(self) -> None:
        if self.context is not None:
            await self.context.shutdown()
            self.context = None

    async def restart_on_new_port(self) -> None:
        """A reboot behind NAT: same device, new source port, observers forgotten."""
        await self.stop()
        self._state = StateResource(self)
        await self.start()

    async def restart_on_same_port(self) -> None:
        """A reboot that keeps the address: observers forgotten, nobody told."""
        await self.stop()
        self._state = StateResource(self)
        await self.start(self.port)

    def set(self, **changes: Any) -> None:
        self.state.update(changes)
        self._state.updated_state()

    async def request(
        self, code: Code, url: str, payload: bytes = b"", cf: int | None = None, query: str = ""
    ) -> aiocoap.Message:
        message = aiocoap.Message(code=code, uri=url + query, payload=payload)
        if cf is not None:
            message.opt.content_format = cf
        return await self.context.request(message).response

    async def register(
        self,
        gateway_url: str,
        *,
        queue_mode: bool = False,
        lifetime: int = 300,
        links: bytes = b'</state>;rt="state";obs,</light>',
    ) -> str:
        query = f"?ep={self.name}&et={self.type}&lt={lifetime}" + ("&q" if queue_mode else "")
        response = await self.request(Code.POST, f"{gateway_url}/rd", links, 40, query)
        assert response.code == Code.CREATED, (response.code, response.payload)
        self.registration = "/".join(response.opt.location_path)
        return self.registration

    async def update(self, gateway_url: str) -> aiocoap.Message:
        assert self.registration is not None
        return await self.request(Code.POST, f"{gateway_url}/{self.registration}")

    async def post_reading(self, gateway_url: str, values: dict[str, Any]) -> aiocoap.Message:
        return await self.request(
            Code.POST, f"{gateway_url}/r/{self.name}", cbor2.dumps(values), 60
        )
