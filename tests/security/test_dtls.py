"""DTLS 1.2 with pre-shared keys (optional: needs the DTLSSocket package)."""

from __future__ import annotations

import os
from pathlib import Path

import aiocoap
import cbor2
import pytest
from aiocoap.numbers.codes import Code

from device_sim.credentials import client_context
from gateway.app import Gateway
from gateway.config import GatewayConfig
from tests.support.gateway import gateway_config as make_config
from tests.support.gateway import post, wait_until
from tests.support.security import provision, revoke

if not os.environ.get("CI"):  # CI installs the extra: there a missing package is a failure
    pytest.importorskip("DTLSSocket", reason="DTLS needs the optional DTLSSocket package")

READING = cbor2.dumps({"temp": 4.0})


@pytest.fixture
def gateway_config(tmp_path: Path) -> GatewayConfig:
    return make_config(
        tmp_path, security={"mode": "authenticated", "reload_interval": 0.1, "dtls": True}
    )


async def test_psk_device_is_bound_to_its_name_and_revocation_ends_its_session(
    gateway: Gateway, gateway_config: GatewayConfig, tmp_path: Path
) -> None:
    creds = tmp_path / "creds"
    for name in ("fr1", "fr2"):
        await provision(gateway_config.store.path, name, creds, kind="dtls")
    await wait_until(lambda: len(gateway.security.contexts) == 2)
    url = f"coaps://127.0.0.1:{gateway_config.server.port + 1}"
    client = await client_context(creds, "fr1")
    try:
        register = aiocoap.Message(code=Code.POST, uri=f"{url}/rd?ep=fr1&et=fridge&lt=60")
        assert (await client.request(register).response).code == Code.CREATED
        assert (await post(client, url, "r/fr1", READING)).code == Code.CHANGED
        assert (await post(client, url, "r/fr2", READING)).code == Code.FORBIDDEN

        await revoke(gateway_config.store.path, "fr1")
        await wait_until(lambda: len(gateway.security.contexts) == 1)
        # The DTLS session is still up, but its key is gone: refused at once.
        assert (await post(client, url, "r/fr1", READING)).code == Code.UNAUTHORIZED
    finally:
        await client.shutdown()
    async with gateway.reader.execute("SELECT count(*) FROM readings") as cursor:
        row = await cursor.fetchone()
    assert row is not None and row[0] == 1


async def test_plain_coap_is_still_refused(
    gateway: Gateway, gateway_url: str, coap_client: aiocoap.Context
) -> None:
    assert (await post(coap_client, gateway_url, "r/fr1", READING)).code == Code.UNAUTHORIZED
