"""Relay configuration: sinks, routes, the [relay] section and the sink factory."""

from __future__ import annotations

import tomllib
from typing import Any

import pytest

from gateway.core.outbox import RetryPolicy
from gateway.errors import ConfigError
from gateway.relay.config import (
    RouteConfig,
    SinkConfig,
    relay_setup_from_mapping,
    routes_for,
    sink_from_config,
)
from gateway.relay.sinks.coap import CoapSink
from gateway.relay.sinks.memory import MemorySink
from gateway.relay.sinks.mqtt import MqttSink
from gateway.relay.sinks.nats import NatsSink
from gateway.relay.sinks.webhook import WebhookSink

EXAMPLE = """
[relay]
max_outbox = 5000
policy = "drop_oldest"
[relay.retry]
base_delay = 0.5
max_attempts = 4

[[sinks]]
name = "broker"
type = "mqtt"
url = "mqtt://127.0.0.1:1883"
qos = 1
mqtt_version = "5"
password = "hunter2"

[[sinks]]
name = "js"
type = "nats"
url = "nats://127.0.0.1:4222"
stream = "READINGS"
create_stream = true

[[sinks]]
name = "hook"
type = "webhook"
url = "https://example.invalid/in"
secret = "k"
headers = { Authorization = "Bearer x" }

[[sinks]]
name = "up"
type = "coap"
url = "coap://127.0.0.1/ingest"
mode = "batch"

[[routes]]
sink = "broker"

[[routes]]
sink = "hook"
kinds = ["reading", "alert"]
device_types = ["fridge"]
devices = ["fridge-*"]
encoding = "senml+cbor"
"""


def load(text: str) -> Any:
    return relay_setup_from_mapping(tomllib.loads(text))


def test_example_loads() -> None:
    setup = load(EXAMPLE)
    assert setup.relay.max_outbox == 5000 and setup.relay.policy == "drop_oldest"
    assert setup.relay.retry == RetryPolicy(base_delay=0.5, max_attempts=4)
    assert [s.type for s in setup.sinks] == ["mqtt", "nats", "webhook", "coap"]
    assert setup.sinks[2].headers == {"Authorization": "Bearer x"}
    assert setup.routes[0] == RouteConfig(sink="broker")
    assert "hunter2" not in repr(setup.sinks[0])


def test_defaults_without_any_relay_keys() -> None:
    setup = relay_setup_from_mapping({})
    assert setup.sinks == () and setup.routes == () and setup.relay.policy == "refuse"


def test_route_matching() -> None:
    setup = load(EXAMPLE)
    matched = routes_for(setup.routes, kind="reading", device="fridge-7", device_type="fridge")
    assert [r.sink for r in matched] == ["broker", "hook"]
    lamp = routes_for(setup.routes, kind="reading", device="lamp-1", device_type="streetlight")
    assert [r.sink for r in lamp] == ["broker"]
    assert routes_for(setup.routes, kind="event", device="fridge-7", device_type="fridge") == []


def edit(old: str, new: str) -> str:
    assert old in EXAMPLE
    return EXAMPLE.replace(old, new, 1)


@pytest.mark.parametrize(
    ("text", "key"),
    [
        (edit('type = "mqtt"', 'type = "kafka"'), "sinks[0].type"),
        (edit('sink = "broker"', 'sink = "nowhere"'), "routes[0].sink"),
        (edit('encoding = "senml+cbor"', 'encoding = "xml"'), "routes[1].encoding"),
        (edit('kinds = ["reading", "alert"]', 'kinds = ["gossip"]'), "routes[1].kinds"),
        (edit("qos = 1", "qos = 2"), "sinks[0].qos"),
        (edit("qos = 1", "qos = 1\nmax_in_flight = -1"), "sinks[0].max_in_flight"),
        (edit('url = "mqtt://127.0.0.1:1883"', 'url = "http://x"'), "sinks[0].url"),
        (edit('name = "js"', 'name = "broker"'), "sinks[1].name"),
        (edit('stream = "READINGS"\n', ""), "sinks[1].stream"),
        (edit('mode = "batch"', 'topic = "{nope}"'), "sinks[3].topic"),
        (edit("max_outbox = 5000", "max_outbox = 0"), "relay.max_outbox"),
        (edit('policy = "drop_oldest"', 'policy = "panic"'), "relay.policy"),
        (
            edit("max_outbox = 5000", "max_outbox = 5000\ncatch_up_batch_size = 50"),
            "relay.catch_up_batch_size",
        ),
        (edit("max_attempts = 4", "max_attempts = -1"), "relay.retry"),
        (edit("max_attempts = 4", "max_tries = 4"), "relay.retry.max_tries"),
        (edit("qos = 1", "qos = 1\ncolour = 2"), "sinks[0].colour"),
    ],
)
def test_bad_config_names_the_key(text: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(text)
    assert info.value.key == key


def test_factory_builds_each_sink_without_network() -> None:
    setup = load(EXAMPLE)
    kinds: list[type] = [type(sink_from_config(s)) for s in setup.sinks]
    assert kinds == [MqttSink, NatsSink, WebhookSink, CoapSink]
    memory = sink_from_config(SinkConfig(name="dry", type="memory"))
    assert isinstance(memory, MemorySink) and memory.name == "dry"


@pytest.mark.parametrize(
    ("version", "configured", "expected"),
    [("3.1.1", 0, 100), ("5", 0, None), ("5", 16, 16), ("3.1.1", 500, 500)],
)
def test_mqtt_publishes_in_flight_follow_the_protocol_version(
    version: str, configured: int, expected: int | None
) -> None:
    config = SinkConfig(
        name="m",
        type="mqtt",
        url="mqtt://127.0.0.1",
        mqtt_version=version,  # type: ignore[arg-type]
        max_in_flight=configured,
    )
    assert MqttSink(config)._in_flight == expected
