"""The webhook sink against a real aiohttp server."""

from __future__ import annotations

import hmac
import json

import pytest

from gateway.errors import PermanentSinkError, TransientSinkError
from gateway.relay.config import SinkConfig
from gateway.relay.envelope import Encoding, decode_batch
from gateway.relay.sinks.base import publish_batch
from gateway.relay.sinks.webhook import SIGNATURE_HEADER, WebhookSink, signature
from tests.relay.brokers import free_port
from tests.relay.downstreams import WebhookServer
from tests.relay.messages import deliveries


def sink_config(url: str, **kw: object) -> SinkConfig:
    return SinkConfig(name="hook", type="webhook", url=url, **kw)  # type: ignore[arg-type]


async def test_batch_is_one_signed_json_array(webhook: WebhookServer) -> None:
    config = sink_config(webhook.url, secret="s3cret", headers={"X-Tenant": "acme"})
    batch = deliveries(3, devices=("fridge-1", "fridge-2"))
    async with WebhookSink(config) as sink:
        assert await publish_batch(sink, batch) == [None, None, None]
        assert sink.connected and sink.last_error is None
    (request,) = webhook.requests
    body = json.loads(request.body)
    assert [m["id"] for m in body] == ["r-1", "r-2", "r-3"]
    assert [m["device"] for m in body] == ["fridge-1", "fridge-2", "fridge-1"]
    assert request.headers["Content-Type"] == "application/json"
    assert request.headers["X-Tenant"] == "acme"
    expected = "sha256=" + hmac.new(b"s3cret", request.body, "sha256").hexdigest()
    assert hmac.compare_digest(request.headers[SIGNATURE_HEADER], expected)
    assert signature("s3cret", request.body) == expected


async def test_batch_size_and_encoding_split_requests(webhook: WebhookServer) -> None:
    batch = deliveries(5, encoding=Encoding.SENML_CBOR)
    async with WebhookSink(sink_config(webhook.url, batch_size=2)) as sink:
        assert await publish_batch(sink, batch) == [None] * 5
    assert [len(decode_batch(r.body, Encoding.SENML_CBOR)) for r in webhook.requests] == [2, 2, 1]
    assert webhook.requests[0].headers["Content-Type"] == "application/senml+cbor"
    assert SIGNATURE_HEADER not in webhook.requests[0].headers


@pytest.mark.parametrize(
    ("status", "error"),
    [(500, TransientSinkError), (503, TransientSinkError), (429, TransientSinkError),
     (400, PermanentSinkError), (404, PermanentSinkError), (301, PermanentSinkError)],
)  # fmt: skip
async def test_status_decides_retry_or_dead_letter(
    webhook: WebhookServer, status: int, error: type[Exception]
) -> None:
    webhook.statuses.append(status)
    async with WebhookSink(sink_config(webhook.url)) as sink:
        results = await publish_batch(sink, deliveries(2))
        assert all(isinstance(r, error) for r in results)
        assert sink.last_error is results[0]
        # the next batch goes through: nothing sticks
        assert await publish_batch(sink, deliveries(1)) == [None]
        assert sink.last_error is None


async def test_after_a_transient_failure_the_rest_waits(webhook: WebhookServer) -> None:
    webhook.statuses.append(502)
    async with WebhookSink(sink_config(webhook.url, batch_size=1)) as sink:
        results = await publish_batch(sink, deliveries(3, devices=("a", "b", "c")))
    assert all(isinstance(r, TransientSinkError) for r in results)
    assert len(webhook.requests) == 1


async def test_a_stalled_webhook_times_out(webhook: WebhookServer) -> None:
    webhook.stall.clear()
    async with WebhookSink(sink_config(webhook.url, timeout=0.3)) as sink:
        (result,) = await publish_batch(sink, deliveries(1))
        assert isinstance(result, TransientSinkError)
        assert not sink.connected


async def test_unreachable_webhook_is_transient() -> None:
    url = f"http://127.0.0.1:{free_port()}/hook"
    async with WebhookSink(sink_config(url, timeout=2)) as sink:
        (result,) = await publish_batch(sink, deliveries(1))
    assert isinstance(result, TransientSinkError)
    assert isinstance(result.__cause__, Exception)
