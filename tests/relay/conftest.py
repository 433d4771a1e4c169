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

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiocoap
import aiocoap.resource
import pytest
from aiohttp import web

from tests.relay.brokers import Mosquitto, NatsServer
from tests.relay.downstreams import CoapUpstream, WebhookServer, free_udp_port


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    workdir = tmp_path / "mosquitto"
    workdir.mkdir()
    broker = Mosquitto(workdir)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    workdir = tmp_path / "nats"
    workdir.mkdir()
    broker = NatsServer(workdir)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


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
    port = free_udp_port()
    context = await aiocoap.Context.create_server_context(site, bind=("127.0.0.1", port))
    upstream.url = f"coap://127.0.0.1:{port}/ingest"
    try:
        yield upstream
    finally:
        await context.shutdown()
