"""Interoperability with libcoap's coap-client, a CoAP implementation nobody here wrote."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

import cbor2
import pytest

from gateway.app import Gateway

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
