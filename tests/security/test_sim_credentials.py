"""`device-sim run --credentials DIR` against an authenticated gateway."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import pytest

from gateway.app import Gateway
from gateway.config import GatewayConfig
from tests.support.gateway import REPO_ROOT, wait_until
from tests.support.gateway import gateway_config as make_config
from tests.support.security import provision

FLEET = ("sim-fridge-1", "sim-fridge-2")


@pytest.fixture
def gateway_config(tmp_path: Path) -> GatewayConfig:
    return make_config(tmp_path, security={"mode": "authenticated", "reload_interval": 0.1})


async def simulate(port: int, *extra: str) -> tuple[int, dict[str, object]]:
    process = await asyncio.create_subprocess_exec(
        *[sys.executable, "-m", "device_sim", "run", "--gateway", f"coap://127.0.0.1:{port}"],
        *["--fridges", "2", "--fridge-interval", "0.5", "--duration", "2", "--drain", "2"],
        *["--seed", "1", "--json", "--no-progress", *extra],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert out, err.decode()
    return process.returncode or 0, json.loads(out)


async def test_fleet_with_credentials_is_served_and_without_is_refused(
    gateway: Gateway, gateway_config: GatewayConfig, tmp_path: Path
) -> None:
    creds = tmp_path / "creds"
    for name in FLEET:
        await provision(gateway_config.store.path, name, creds)
    await wait_until(lambda: gateway.security.contexts.provisioned >= set(FLEET))
    port = gateway_config.server.port

    code, summary = await simulate(port, "--credentials", str(creds))
    assert code == 0, summary
    assert summary["devices_up"] == 2
    acknowledged = summary["acknowledged"]
    assert isinstance(acknowledged, int) and acknowledged >= 4
    async with gateway.reader.execute(
        "SELECT count(DISTINCT r.seq || d.name) FROM readings r JOIN devices d"
        " ON d.id = r.device_id"
    ) as cursor:
        row = await cursor.fetchone()
    assert row is not None and row[0] == acknowledged

    code, summary = await simulate(port)
    assert code == 1
    assert summary["devices_up"] == 0
