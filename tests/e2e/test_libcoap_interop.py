"""Interoperability with libcoap's coap-client, a CoAP implementation nobody here wrote."""

from __future__ import annotations

import asyncio
import os
import shutil
import sqlite3
from pathlib import Path

import cbor2
import pytest

from gateway.app import Gateway
from tests.support.gateway import GatewayProcess, gateway_config

COAP_CLIENT = shutil.which("coap-client-notls") or shutil.which("coap-client")

# CI installs libcoap3-bin, so there a missing client is a failure, not a skip.
pytestmark = pytest.mark.skipif(
    COAP_CLIENT is None and not os.environ.get("CI"),
    reason="libcoap's coap-client is not installed (Debian libcoap3-bin)",
)


async def coap_client_run(*args: str) -> tuple[int, str]:
    assert COAP_CLIENT is not None
    process = await asyncio.create_subprocess_exec(
        COAP_CLIENT,
        "-B",
        "5",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), timeout=20)
    return process.returncode or 0, output.decode(errors="replace")


async def test_discovery_registration_post_and_get(
    gateway: Gateway, gateway_url: str, tmp_path: Path
) -> None:
    _, links = await coap_client_run("-m", "get", f"{gateway_url}/.well-known/core")
    assert 'rt="core.rd"' in links

    _, output = await coap_client_run(
        "-m",
        "post",
        "-t",
        "40",
        "-e",
        '</state>;rt="light";obs',
        "-v",
        "7",
        f"{gateway_url}/rd?ep=lamp-9&et=streetlight&lt=120",
    )
    assert "2.01" in output and "Location-Path:rd" in output, output

    reading = tmp_path / "reading.cbor"
    reading.write_bytes(cbor2.dumps({"on": True, "dim": 70, "lux": 3.5, "seq": 1}))
    _, output = await coap_client_run(
        "-m", "post", "-t", "60", "-f", str(reading), "-v", "7", f"{gateway_url}/r/lamp-9"
    )
    assert "2.04" in output, output

    _, latest = await coap_client_run("-m", "get", "-A", "50", f"{gateway_url}/r/lamp-9")
    assert '"dim":{"v":70' in latest and '"on":{"v":true' in latest, latest

    _, error = await coap_client_run(
        "-m", "post", "-t", "60", "-e", "garbage", f"{gateway_url}/r/lamp-9"
    )
    assert "4.00" in error and "malformed CBOR" in error


async def test_coap_client_against_two_workers(tmp_path: Path) -> None:
    """Each coap-client run talks from a new port, so the runs land on either worker."""
    process = GatewayProcess(gateway_config(tmp_path), workers=2)
    process.start()
    try:
        _, output = await coap_client_run(
            "-m", "post", "-v", "7", f"{process.url}/rd?ep=lamp-1&et=streetlight&lt=120"
        )
        assert "2.01" in output, output
        reading = tmp_path / "reading.cbor"
        for seq in range(6):
            reading.write_bytes(cbor2.dumps({"dim": 10 * seq, "seq": seq}))
            _, output = await coap_client_run(
                "-m", "post", "-t", "60", "-f", str(reading), "-v", "7", f"{process.url}/r/lamp-1"
            )
            assert "2.04" in output, output
        _, output = await coap_client_run("-m", "get", "-A", "50", f"{process.url}/r/lamp-1")
        assert '"dim"' in output and "50" in output, output
        with sqlite3.connect(process.config.store.path) as conn:
            assert conn.execute("SELECT count(*) FROM readings").fetchone() == (6,)
    finally:
        process.stop()
