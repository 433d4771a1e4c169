"""`gateway devices add|rotate-credentials|revoke` against a running gateway."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import cbor2
import pytest
from aiocoap.numbers.codes import Code
from aiocoap.oscore import NotAProtectedMessage

from device_sim.credentials import client_context
from gateway.app import Gateway
from gateway.config import GatewayConfig
from tests.support.gateway import REPO_ROOT, post, register, wait_until
from tests.support.gateway import gateway_config as make_config


@pytest.fixture
def gateway_config(tmp_path: Path) -> GatewayConfig:
    return make_config(tmp_path, security={"mode": "authenticated", "reload_interval": 0.1})


async def cli(*args: str) -> subprocess.CompletedProcess[str]:
    """The CLI in its own process, while this test's event loop (and the gateway on it)
    keeps running: blocked, it could hold a write transaction open past the CLI's
    busy timeout."""
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "gateway", *args],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        capture_output=True,
        text=True,
        timeout=30,
    )


async def test_add_then_revoke_from_another_process(
    gateway: Gateway, gateway_config: GatewayConfig, gateway_url: str, tmp_path: Path
) -> None:
    db = gateway_config.store.path
    out = tmp_path / "creds"
    added = await cli(
        "devices",
        "add",
        "fr1",
        "--type",
        "fridge",
        "--credentials",
        "oscore",
        "--db",
        db,
        "--out",
        str(out),
        "--json",
    )
    assert added.returncode == 0, added.stderr
    document = json.loads(added.stdout)
    secret = (out / "fr1" / "oscore" / "secret.json").read_text()
    secret_hex = json.loads(secret)["secret_hex"]
    assert secret_hex not in added.stdout + added.stderr
    assert Path(db).stat().st_mode & 0o777 == 0o600

    await wait_until(lambda: "fr1" in gateway.security.contexts.provisioned)
    client = await client_context(document["credentials"])
    try:
        await register(client, gateway_url, "fr1")
        response = await post(client, gateway_url, "r/fr1", cbor2.dumps({"temp": 3.0}))
        assert response.code == Code.CHANGED

        revoked = await cli("devices", "revoke", "fr1", "--db", db)
        assert revoked.returncode == 0, revoked.stderr
        await wait_until(lambda: "fr1" not in gateway.security.contexts.provisioned, within=2)
        with pytest.raises(NotAProtectedMessage) as refused:
            await post(client, gateway_url, "r/fr1", cbor2.dumps({"temp": 3.0}))
        assert refused.value.plain_message.code == Code.UNAUTHORIZED
    finally:
        await client.shutdown()

    again = await cli("devices", "revoke", "fr1", "--db", db)
    assert again.returncode == 3
