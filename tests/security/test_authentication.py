"""Authenticated mode end to end: OSCORE clients against a real gateway on loopback."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiocoap
import cbor2
import pytest
from aiocoap.message import Direction
from aiocoap.numbers.codes import Code
from aiocoap.numbers.types import Type
from aiocoap.oscore import FilesystemSecurityContext, NotAProtectedMessage

from device_sim.credentials import client_context
from gateway.app import Gateway
from gateway.config import GatewayConfig
from tests.support.gateway import base_url, post, wait_until
from tests.support.gateway import gateway_config as make_config
from tests.support.security import provision, revoke

READING = cbor2.dumps({"temp": 4.5, "door": False})


@pytest.fixture
def gateway_config(tmp_path: Path) -> GatewayConfig:
    return make_config(tmp_path, security={"mode": "authenticated", "reload_interval": 0.1})


@pytest.fixture
def creds_dir(tmp_path: Path) -> Path:
    return tmp_path / "credentials"


async def count_readings(gateway: Gateway, device: str | None = None) -> int:
    sql = "SELECT count(*) FROM readings r JOIN devices d ON d.id = r.device_id"
    args: tuple[Any, ...] = ()
    if device is not None:
        sql += " WHERE d.name = ?"
        args = (device,)
    async with gateway.reader.execute(sql, args) as cursor:
        row = await cursor.fetchone()
    assert row is not None
    return int(row[0])


async def wait_for_contexts(gateway: Gateway, n: int) -> None:
    await wait_until(lambda: len(gateway.security.contexts) == n, within=5)


class Device:
    """A device client holding its own OSCORE credentials."""

    def __init__(self, name: str, url: str, context: aiocoap.Context) -> None:
        self.name, self.url, self.context = name, url, context

    async def register(self, name: str | None = None) -> aiocoap.Message:
        uri = f"{self.url}/rd?ep={name or self.name}&et=fridge&lt=300"
        request = aiocoap.Message(code=Code.POST, uri=uri)
        return await answer(self.context.request(request).response)

    async def post(self, name: str | None = None, payload: bytes = READING) -> aiocoap.Message:
        return await answer(post(self.context, self.url, f"r/{name or self.name}", payload))


async def answer(pending: Any) -> aiocoap.Message:
    """The response; an unprotected one (the gateway knows no context) as it came."""
    try:
        response: aiocoap.Message = await pending
    except NotAProtectedMessage as exc:
        response = exc.plain_message
    return response


@pytest.fixture
async def device_factory(
    gateway: Gateway, gateway_config: GatewayConfig, creds_dir: Path
) -> AsyncIterator[Any]:
    contexts: list[aiocoap.Context] = []

    async def make(name: str, *, role: str = "device") -> Device:
        path = await provision(gateway_config.store.path, name, creds_dir, role=role)  # type: ignore[arg-type]
        context = await client_context(path)
        contexts.append(context)
        await wait_until(lambda: any(name in k for k in gateway.security.contexts.credentials))
        return Device(name, base_url(gateway_config), context)

    yield make
    for context in contexts:
        await context.shutdown()


async def test_unauthenticated_post_gets_401_and_nothing_is_stored(
    gateway: Gateway, gateway_url: str, coap_client: aiocoap.Context
) -> None:
    request = aiocoap.Message(code=Code.POST, uri=f"{gateway_url}/rd?ep=fr1&et=fridge&lt=300")
    response = await coap_client.request(request).response
    assert response.code == Code.UNAUTHORIZED

    response = await post(coap_client, gateway_url, "r/fr1", READING)
    assert response.code == Code.UNAUTHORIZED
    assert await count_readings(gateway) == 0
    assert gateway.registry.device("fr1") is None


async def test_discovery_stays_open(
    gateway: Gateway, gateway_url: str, coap_client: aiocoap.Context
) -> None:
    request = aiocoap.Message(code=Code.GET, uri=f"{gateway_url}/.well-known/core")
    response = await coap_client.request(request).response
    assert response.code == Code.CONTENT
    assert b"</rd>" in response.payload


async def test_provisioned_device_registers_and_posts(
    gateway: Gateway, device_factory: Any
) -> None:
    device = await device_factory("fr1")
    assert (await device.register()).code == Code.CREATED
    assert (await device.post()).code == Code.CHANGED
    assert await count_readings(gateway, "fr1") == 2


async def test_device_cannot_act_as_another(gateway: Gateway, device_factory: Any) -> None:
    alice = await device_factory("alice")
    bob = await device_factory("bob")
    assert (await bob.register()).code == Code.CREATED
    assert (await alice.register("bob")).code == Code.FORBIDDEN
    assert (await alice.post("bob")).code == Code.FORBIDDEN
    assert await count_readings(gateway) == 0
    assert (await bob.post()).code == Code.CHANGED


async def test_commands_need_an_operator(
    gateway: Gateway, gateway_url: str, coap_client: aiocoap.Context, device_factory: Any
) -> None:
    device = await device_factory("fr1")
    assert (await device.register()).code == Code.CREATED
    operator = await device_factory("ops", role="operator")
    anonymous = await coap_client.request(
        aiocoap.Message(code=Code.POST, uri=f"{gateway_url}/cmd/fr1", payload=b"x")
    ).response
    assert anonymous.code == Code.UNAUTHORIZED
    as_device = await device.context.request(
        aiocoap.Message(code=Code.POST, uri=f"{gateway_url}/cmd/fr1", payload=b"x")
    ).response
    assert as_device.code == Code.FORBIDDEN
    command = cbor2.dumps({"path": "/setpoint", "method": "PUT", "payload": 4})
    as_operator = await operator.context.request(
        aiocoap.Message(
            code=Code.POST, uri=f"{gateway_url}/cmd/fr1", payload=command, content_format=60
        )
    ).response
    assert as_operator.code == Code.CREATED, as_operator.payload


async def test_revoked_credentials_stop_working_at_once(
    gateway: Gateway, gateway_config: GatewayConfig, device_factory: Any
) -> None:
    device = await device_factory("fr1")
    assert (await device.register()).code == Code.CREATED
    assert (await device.post()).code == Code.CHANGED
    await revoke(gateway_config.store.path, "fr1")
    await wait_for_contexts(gateway, 0)
    response = await device.post()
    assert response.code == Code.UNAUTHORIZED
    assert await count_readings(gateway, "fr1") == 2


async def test_rotation_replaces_the_old_key(
    gateway: Gateway, gateway_config: GatewayConfig, tmp_path: Path, device_factory: Any
) -> None:
    old = await device_factory("fr1")
    assert (await old.register()).code == Code.CREATED
    # The new key goes to a fresh directory: the old client still holds its context open.
    path = await provision(gateway_config.store.path, "fr1", tmp_path / "rotated", rotate=True)
    await wait_until(lambda: any("#2" in key for key in gateway.security.contexts.credentials))
    assert (await old.post()).code == Code.UNAUTHORIZED
    new_context = await client_context(path)
    try:
        new = Device("fr1", old.url, new_context)
        assert (await new.post()).code == Code.CHANGED
    finally:
        await new_context.shutdown()
    assert await count_readings(gateway, "fr1") == 2


async def test_key_material_is_private(
    gateway: Gateway, gateway_config: GatewayConfig, creds_dir: Path, device_factory: Any
) -> None:
    await device_factory("fr1")
    device_side = creds_dir / "fr1"
    for path in (device_side / "credentials.json", device_side / "oscore" / "secret.json"):
        assert path.stat().st_mode & 0o777 == 0o600, path
    assert device_side.stat().st_mode & 0o777 == 0o700
    gateway_side = Path(gateway_config.store.path).parent / "oscore"
    secrets = list(gateway_side.glob("*/secret.json"))
    assert secrets and all(p.stat().st_mode & 0o777 == 0o600 for p in secrets)


class RawClient(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.received: asyncio.Queue[bytes] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.received.put_nowait(data)


async def test_replayed_oscore_message_is_rejected(
    gateway: Gateway, gateway_config: GatewayConfig, creds_dir: Path
) -> None:
    path = await provision(gateway_config.store.path, "fr1", creds_dir)
    await wait_for_contexts(gateway, 1)
    (entry,) = json.loads(path.read_text()).values()
    context = FilesystemSecurityContext(entry["oscore"]["basedir"])

    def protect(code: Code, path: tuple[str, ...], query: tuple[str, ...] = ()) -> Any:
        plain = aiocoap.Message(code=code, uri_path=path, uri_query=query, payload=READING)
        plain.opt.content_format = 60 if path[0] == "r" else None
        plain.payload = READING if path[0] == "r" else b""
        plain.direction = Direction.OUTGOING
        protected, _ = context.protect(plain)
        protected.mtype = Type.CON
        protected.token = b"\x01\x02"
        return protected

    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_datagram_endpoint(
        RawClient, remote_addr=("127.0.0.1", gateway_config.server.port), family=socket.AF_INET
    )

    async def exchange(message: Any, mid: int) -> Code:
        message.mid = mid
        transport.sendto(message.encode())
        return aiocoap.Message.decode(await asyncio.wait_for(protocol.received.get(), 5)).code

    try:
        registration = protect(Code.POST, ("rd",), ("ep=fr1", "et=fridge", "lt=300"))
        # An OSCORE response's outer code is 2.04 whatever the inner one is.
        assert await exchange(registration, 999) == Code.CHANGED
        assert gateway.registry.device("fr1") is not None
        reading = protect(Code.POST, ("r", "fr1"))
        # Distinct message ids: a replay, not a CoAP-layer retransmission.
        codes = [await exchange(reading, 1000), await exchange(reading, 1001)]
    finally:
        transport.close()
        context._destroy()
    assert codes == [Code.CHANGED, Code.UNAUTHORIZED]
    assert await count_readings(gateway, "fr1") == 2
