"""Downstreams for relay tests: real brokers, an HTTP webhook and a CoAP upstream.

Fixtures (all function-scoped, all cleaned up):
- `mosquitto` -> brokers.Mosquitto: `.url`, `.port`, `.stop()`, `.start()` (same port).
- `nats_server` -> brokers.NatsServer with JetStream: same interface.
- `webhook` -> WebhookServer: aiohttp server on 127.0.0.1; `.url`, `.requests`,
  `.statuses` (answers to give, in order; 200 once empty), `.stall` (an Event; while clear,
  requests hang, to test timeouts), `await .wait_for(n)`.
- `coap_upstream` -> CoapUpstream: aiocoap server with POST /ingest; `.url`, `.requests`,
  `.codes` (answers to give; 2.04 once empty), `await .wait_for(n)`.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiocoap
import aiocoap.resource
import pytest
import structlog
from aiohttp import web

from gateway.app import Gateway
from gateway.config import GatewayConfig
from tests.support.brokers import Mosquitto, NatsServer
from tests.support.downstreams import CoapUpstream, WebhookServer, free_udp_port
from tests.support.gateway import ON_UVLOOP, GatewayProcess, base_url
from tests.support.gateway import gateway_config as make_gateway_config

if ON_UVLOOP:
    import uvloop

    # pytest-asyncio makes every test's loop from the process-wide policy.
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


@pytest.fixture(autouse=True, scope="session")
def logs_bound_to_the_process_stderr() -> None:
    """In-process gateways log while in-process CLI commands run beside them.

    CliRunner swaps sys.stdout and sys.stderr, and structlog's default logger writes to
    whichever sys.stdout is current, so a relay warning could land inside a command's
    `--json` output. The log stream is bound once here, as `gateway serve` binds its own.
    """
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.__stderr__))


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    with Mosquitto.running_in(tmp_path, "mosquitto") as broker:
        yield broker


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    with NatsServer.running_in(tmp_path, "nats") as broker:
        yield broker


@pytest.fixture
async def webhook() -> AsyncIterator[WebhookServer]:
    server = WebhookServer()
    server.stall.set()
    app = web.Application()
    app.router.add_post("/hook", server.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    server.url = f"http://127.0.0.1:{port}/hook"
    try:
        yield server
    finally:
        server.stall.set()
        await runner.cleanup()


@pytest.fixture
async def coap_upstream() -> AsyncIterator[CoapUpstream]:
    upstream = CoapUpstream()
    site = aiocoap.resource.Site()
    site.add_resource(["ingest"], upstream)
    for attempt in range(5):
        # A port found free may be taken before aiocoap binds it (other tests' sockets).
        port = free_udp_port()
        try:
            context = await aiocoap.Context.create_server_context(site, bind=("127.0.0.1", port))
            break
        except OSError:
            if attempt == 4:
                raise
    upstream.url = f"coap://127.0.0.1:{port}/ingest"
    try:
        yield upstream
    finally:
        await context.shutdown()


# --- gateways ------------------------------------------------------------------------------


@pytest.fixture
def gateway_config(tmp_path: Path) -> GatewayConfig:
    """Config of the test's gateway: loopback, free port, database in tmp_path."""
    return make_gateway_config(tmp_path)


@pytest.fixture
async def gateway(gateway_config: GatewayConfig) -> AsyncIterator[Gateway]:
    """An in-process gateway serving on `gateway_url`."""
    async with Gateway(gateway_config) as running:
        yield running


@pytest.fixture
def gateway_url(gateway_config: GatewayConfig) -> str:
    return base_url(gateway_config)


@pytest.fixture
async def coap_client() -> AsyncIterator[aiocoap.Context]:
    client = await aiocoap.Context.create_client_context(transports=["udp6"])
    try:
        yield client
    finally:
        await client.shutdown()


@pytest.fixture
def gateway_process(gateway_config: GatewayConfig) -> Iterator[GatewayProcess]:
    """A gateway as a real child process (not started: call `.start()`), stopped afterwards."""
    process = GatewayProcess(gateway_config)
    try:
        yield process
    finally:
        process.stop()
