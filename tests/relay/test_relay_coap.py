"""The CoAP forward sink against a real aiocoap server."""

from __future__ import annotations

import time

import aiocoap
import aiocoap.resource

from gateway.errors import PermanentSinkError, TransientSinkError
from gateway.relay.config import SinkConfig
from gateway.relay.envelope import Encoding, decode, decode_batch
from gateway.relay.sinks.base import publish_batch
from gateway.relay.sinks.coap import CoapSink
from tests.relay.messages import deliveries
from tests.support.downstreams import CoapUpstream, free_udp_port


def sink_config(url: str, **kw: object) -> SinkConfig:
    kw.setdefault("timeout", 2.0)
    return SinkConfig(name="up", type="coap", url=url, **kw)  # type: ignore[arg-type]


async def test_one_post_per_reading(coap_upstream: CoapUpstream) -> None:
    batch = deliveries(3, encoding=Encoding.CBOR)
    async with CoapSink(sink_config(coap_upstream.url)) as sink:
        assert await publish_batch(sink, batch) == [None] * 3
        assert sink.connected
    assert [r.content_format for r in coap_upstream.requests] == [60] * 3
    got = [decode(r.payload, Encoding.CBOR) for r in coap_upstream.requests]
    assert got == [d.message for d in batch]


async def test_batch_mode_posts_one_senml_pack(coap_upstream: CoapUpstream) -> None:
    batch = deliveries(4, devices=("a", "b"), encoding=Encoding.SENML_CBOR)
    async with CoapSink(sink_config(coap_upstream.url, mode="batch", batch_size=3)) as sink:
        assert await publish_batch(sink, batch) == [None] * 4
    assert [r.content_format for r in coap_upstream.requests] == [112, 112]
    first = decode_batch(coap_upstream.requests[0].payload, Encoding.SENML_CBOR)
    assert [m.message_id for m in first] == ["r-1", "r-2", "r-3"]


async def test_client_error_is_permanent_and_the_rest_still_goes(
    coap_upstream: CoapUpstream,
) -> None:
    coap_upstream.codes.append(aiocoap.BAD_REQUEST)
    async with CoapSink(sink_config(coap_upstream.url)) as sink:
        results = await publish_batch(sink, deliveries(3))
    assert isinstance(results[0], PermanentSinkError) and "4.00" in str(results[0])
    assert results[1:] == [None, None]


async def test_server_error_is_transient_and_holds_the_rest(coap_upstream: CoapUpstream) -> None:
    coap_upstream.codes.append(aiocoap.SERVICE_UNAVAILABLE)
    async with CoapSink(sink_config(coap_upstream.url)) as sink:
        results = await publish_batch(sink, deliveries(3, devices=("a", "b", "c")))
    assert all(isinstance(r, TransientSinkError) for r in results)
    assert len(coap_upstream.requests) == 1


async def test_no_upstream_is_transient_not_a_hang() -> None:
    url = f"coap://127.0.0.1:{free_udp_port()}/ingest"
    async with CoapSink(sink_config(url, timeout=1.0)) as sink:
        started = time.monotonic()
        (result,) = await publish_batch(sink, deliveries(1))
        assert time.monotonic() - started < 2.5
        assert not sink.connected
    assert isinstance(result, TransientSinkError)


async def test_an_upstream_back_after_being_unreachable_gets_the_next_batch() -> None:
    """The first POST finds the port closed (ICMP port unreachable); once a server listens
    there, the next batch is delivered. On uvloop aiocoap's client stops reading its socket
    after such an error, so the sink must not keep that socket."""
    port = free_udp_port()
    url = f"coap://127.0.0.1:{port}/ingest"
    async with CoapSink(sink_config(url, timeout=1.0)) as sink:
        (down,) = await publish_batch(sink, deliveries(1))
        assert isinstance(down, TransientSinkError)
        upstream = CoapUpstream()
        site = aiocoap.resource.Site()
        site.add_resource(["ingest"], upstream)
        server = await aiocoap.Context.create_server_context(site, bind=("127.0.0.1", port))
        try:
            assert await publish_batch(sink, deliveries(2)) == [None, None]
            assert sink.connected
        finally:
            await server.shutdown()
    assert len(upstream.requests) == 2
