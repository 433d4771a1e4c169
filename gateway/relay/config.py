"""Typed configuration of the relay: `[[sinks]]`, `[[routes]]` and the `[relay]` section.

These frozen dataclasses are fields of the gateway's one config object (`sinks`, `routes`,
`relay`); msgspec fills them from TOML, and `check_relay` does the checks types cannot,
raising `ConfigError` with the offending key (`sinks[1].url`, `routes[0].sink`).
`relay_setup_from_mapping` does both for the relay part alone (tests, dry runs).

Route globs (`devices`, `device_types`) use shell-style, case-sensitive matching, which is
what SQLite's GLOB does, so the relay's statements (the readings' stream, the events trigger)
and `RouteConfig.matches` agree.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING, Any, Literal, get_args
from urllib.parse import urlsplit

from gateway.core.outbox import RetryPolicy
from gateway.errors import ConfigError
from gateway.relay.envelope import KINDS, Encoding, check_template

if TYPE_CHECKING:
    from gateway.relay.sinks.base import Sink

SinkType = Literal["mqtt", "nats", "webhook", "coap", "memory"]
EncodingName = Literal["json", "cbor", "senml+json", "senml+cbor"]

DEFAULT_MQTT_TOPIC = "coap-gw/{gateway}/{type}/{device}/readings"
DEFAULT_NATS_SUBJECT = "coapgw.{type}.{device}.readings"

_URL_SCHEMES: dict[str, tuple[str, ...]] = {
    "mqtt": ("mqtt", "mqtts"),
    "nats": ("nats", "tls"),
    "webhook": ("http", "https"),
    "coap": ("coap",),
}


@dataclass(frozen=True)
class SinkConfig:
    """One downstream. Keys that do not apply to `type` are ignored by that sink."""

    name: str
    type: SinkType
    #: mqtt[s]://host[:port], nats://host[:port], http[s]://..., coap://host[:port]/path.
    url: str = ""
    #: Seconds to wait for a connection, and for the downstream to confirm a batch.
    timeout: float = 10.0
    # --- MQTT
    qos: int = 1
    retain: bool = False
    topic: str = DEFAULT_MQTT_TOPIC
    mqtt_version: Literal["3.1.1", "5"] = "3.1.1"
    #: QoS 1/2 publishes awaiting acknowledgement at once; 0: 100 over MQTT 3.1.1, paho's 20
    #: over MQTT 5 (lowered to the broker's Receive Maximum where that is less).
    max_in_flight: int = 0
    client_id: str | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    #: TLS (also implied by mqtts:// and tls://); the system trust store unless `ca_file`.
    tls: bool = False
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    # --- NATS JetStream
    #: Several NATS servers; `url` alone is one server.
    servers: tuple[str, ...] = ()
    subject: str = DEFAULT_NATS_SUBJECT
    stream: str | None = None
    create_stream: bool = False
    #: Subjects of a stream we create; by default the subject template with `*` per field.
    stream_subjects: tuple[str, ...] = ()
    #: JetStream drops a message whose Nats-Msg-Id it saw within this many seconds.
    duplicate_window: float = 120.0
    #: Path of a NATS .creds file (JWT and NKey seed).
    credentials: str | None = None
    # --- HTTP webhook
    #: Most messages in one request body (and in one CoAP batch).
    batch_size: int = 100
    headers: dict[str, str] = field(default_factory=dict)
    #: HMAC-SHA256 key; the body's signature goes in `X-Signature-SHA256: sha256=<hex>`.
    secret: str | None = field(default=None, repr=False)
    # --- CoAP forward
    mode: Literal["per_reading", "batch"] = "per_reading"

    @property
    def server_list(self) -> tuple[str, ...]:
        return self.servers or ((self.url,) if self.url else ())


@dataclass(frozen=True)
class RouteConfig:
    """Which messages go to `sink`, and in which encoding."""

    sink: str
    kinds: tuple[str, ...] = ("reading",)
    device_types: tuple[str, ...] = ("*",)
    #: Device name globs.
    devices: tuple[str, ...] = ("*",)
    encoding: EncodingName = "json"

    def matches(self, *, kind: str, device: str, device_type: str) -> bool:
        return (
            kind in self.kinds
            and any(fnmatchcase(device_type, p) for p in self.device_types)
            and any(fnmatchcase(device, p) for p in self.devices)
        )


@dataclass(frozen=True)
class RelayConfig:
    """The `[relay]` section: the outbox bound, its policy, and the retry policy."""

    #: Most unfinished outbox entries of one sink.
    max_outbox: int = 100_000
    #: At the bound: "refuse" new readings (5.03 with Max-Age = `retry_after`), or
    #: "drop_oldest" pending entries of that sink (counted and logged as `relay.dropped`).
    policy: Literal["refuse", "drop_oldest"] = "refuse"
    retry_after: int = 30
    #: Entries a sink worker claims and publishes at once.
    batch_size: int = 100
    #: Entries claimed at once while a sink's outbox holds at least this many (a backlog
    #: after an outage); None: `batch_size`. Larger batches drain faster but hold up
    #: ingest longer per batch, so devices' latency grows while the backlog drains.
    catch_up_batch_size: int | None = None
    #: How often an idle worker looks at the outbox when nothing wakes it sooner.
    poll_interval: float = 1.0
    #: Seconds a worker that keeps up waits before each round, so that readings committed
    #: meanwhile go out in the same round: a round is a transaction of its own, and one
    #: per reading or two cost more than the readings (docs/performance.md, change 20).
    #: Adds up to this much to a reading's way downstream; 0 sends at once.
    linger: float = 0.01
    #: How often the running gateway writes its live relay figures for `gateway relay status`.
    status_interval: float = 2.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)


@dataclass(frozen=True)
class RelaySetup:
    """The relay's three parts of the config file, for loading them on their own."""

    sinks: tuple[SinkConfig, ...] = ()
    routes: tuple[RouteConfig, ...] = ()
    relay: RelayConfig = field(default_factory=RelayConfig)


def routes_for(
    routes: Sequence[RouteConfig], *, kind: str, device: str, device_type: str
) -> list[RouteConfig]:
    return [r for r in routes if r.matches(kind=kind, device=device, device_type=device_type)]


def _check_sink(sink: SinkConfig, key: str) -> None:
    def fail(name: str, message: str) -> ConfigError:
        return ConfigError(f"{key}.{name}: {message}", key=f"{key}.{name}")

    if sink.type not in get_args(SinkType):
        raise fail("type", f"unknown sink type {sink.type!r} (one of {get_args(SinkType)})")
    if sink.timeout <= 0:
        raise fail("timeout", "must be positive")
    if sink.batch_size < 1:
        raise fail("batch_size", "must be at least 1")
    schemes = _URL_SCHEMES.get(sink.type)
    if schemes is not None:
        urls = sink.server_list if sink.type == "nats" else (sink.url,)
        if not urls or not all(urls):
            raise fail("url", f"a {sink.type} sink needs a url")
        for url in urls:
            parts = urlsplit(url)
            if parts.scheme not in schemes or not parts.hostname:
                wanted = " or ".join(f"{s}://" for s in schemes)
                raise fail("url", f"{url!r} is not a {wanted} URL")
    if sink.type == "mqtt":
        if sink.qos not in (0, 1):
            raise fail("qos", "must be 0 or 1")
        if sink.mqtt_version not in ("3.1.1", "5"):
            raise fail("mqtt_version", 'must be "3.1.1" or "5"')
        if sink.max_in_flight < 0:
            raise fail("max_in_flight", "must be 0 (the default for the version) or more")
    if sink.type == "nats":
        if sink.create_stream and not sink.stream:
            raise fail("stream", "create_stream needs a stream name")
        if sink.duplicate_window <= 0:
            raise fail("duplicate_window", "must be positive")
    if sink.type == "coap" and sink.mode not in ("per_reading", "batch"):
        raise fail("mode", 'must be "per_reading" or "batch"')
    for name in ("topic", "subject"):
        try:
            check_template(getattr(sink, name))
        except ValueError as exc:
            raise fail(name, str(exc)) from exc


def _check_route(route: RouteConfig, key: str, sinks: set[str]) -> None:
    def fail(name: str, message: str) -> ConfigError:
        return ConfigError(f"{key}.{name}: {message}", key=f"{key}.{name}")

    if route.sink not in sinks:
        raise fail("sink", f"no sink named {route.sink!r}")
    if route.encoding not in {e.value for e in Encoding}:
        raise fail("encoding", f"unknown encoding {route.encoding!r}")
    for name in ("kinds", "device_types", "devices"):
        if not getattr(route, name):
            raise fail(name, 'must not be empty (use ["*"] for all)')
    unknown = set(route.kinds) - KINDS
    if unknown:
        raise fail("kinds", f"unknown kinds {sorted(unknown)} (one of {sorted(KINDS)})")


def check_relay(
    sinks: Sequence[SinkConfig], routes: Sequence[RouteConfig], relay: RelayConfig
) -> None:
    """Cross-field checks; raise `ConfigError` naming the first bad key."""
    names: set[str] = set()
    for index, sink in enumerate(sinks):
        key = f"sinks[{index}]"
        if not sink.name:
            raise ConfigError(f"{key}.name: must not be empty", key=f"{key}.name")
        if sink.name in names:
            raise ConfigError(f"{key}.name: duplicate sink {sink.name!r}", key=f"{key}.name")
        names.add(sink.name)
        _check_sink(sink, key)
    for index, route in enumerate(routes):
        _check_route(route, f"routes[{index}]", names)
    if relay.max_outbox < 1:
        raise ConfigError("relay.max_outbox must be at least 1", key="relay.max_outbox")
    if relay.policy not in ("refuse", "drop_oldest"):
        raise ConfigError('relay.policy must be "refuse" or "drop_oldest"', key="relay.policy")
    if relay.batch_size < 1:
        raise ConfigError("relay.batch_size must be at least 1", key="relay.batch_size")
    catch_up = relay.catch_up_batch_size
    if catch_up is not None and catch_up < relay.batch_size:
        raise ConfigError(
            "relay.catch_up_batch_size must be at least relay.batch_size",
            key="relay.catch_up_batch_size",
        )
    if relay.poll_interval <= 0:
        raise ConfigError("relay.poll_interval must be positive", key="relay.poll_interval")
    if not 0 <= relay.linger <= 1:
        raise ConfigError("relay.linger must be between 0 and 1 s", key="relay.linger")
    if relay.status_interval <= 0:
        raise ConfigError("relay.status_interval must be positive", key="relay.status_interval")
    if relay.retry_after < 0:
        raise ConfigError("relay.retry_after must not be negative", key="relay.retry_after")


def relay_setup_from_mapping(data: Mapping[str, Any]) -> RelaySetup:
    """Validate the `sinks`, `routes` and `relay` keys of a parsed TOML mapping."""
    from gateway.config import config_from_mapping

    relevant = {k: data[k] for k in ("sinks", "routes", "relay") if k in data}
    config = config_from_mapping(relevant)
    check_relay(config.sinks, config.routes, config.relay)
    return RelaySetup(config.sinks, config.routes, config.relay)


def sink_from_config(config: SinkConfig) -> Sink:
    """Build the sink for one `[[sinks]]` entry; no network traffic happens here."""
    # Imported here so a gateway without, say, NATS sinks never imports nats-py.
    if config.type == "mqtt":
        from gateway.relay.sinks.mqtt import MqttSink

        return MqttSink(config)
    if config.type == "nats":
        from gateway.relay.sinks.nats import NatsSink

        return NatsSink(config)
    if config.type == "webhook":
        from gateway.relay.sinks.webhook import WebhookSink

        return WebhookSink(config)
    if config.type == "coap":
        from gateway.relay.sinks.coap import CoapSink

        return CoapSink(config)
    if config.type == "memory":
        from gateway.relay.sinks.memory import MemorySink

        return MemorySink(config.name)
    raise ConfigError(f"unknown sink type {config.type!r}", key="type")
