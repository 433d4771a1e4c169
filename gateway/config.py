"""One typed configuration object, loaded once: TOML file, then environment, then flags.

Every section is a frozen dataclass; `load_config` returns a `GatewayConfig` and nothing else
reads configuration. Environment variables override the file as `GATEWAY_<SECTION>_<KEY>`
(for example `GATEWAY_STORE_PATH=/data/gw.db`, `GATEWAY_INGEST_AUTO_REGISTER=true`); values
are parsed as TOML values when they parse, else taken as strings. `docs/configuration.md`
lists every key.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import msgspec

from gateway import eventloop
from gateway.core.rules import RuleConfig, check_rules
from gateway.errors import ConfigError
from gateway.relay.config import RelayConfig, RouteConfig, SinkConfig, check_relay

DEFAULT_DB_PATH = "var/gateway.db"
ENV_PREFIX = "GATEWAY_"


@dataclass(frozen=True)
class ServerConfig:
    bind: str = "::"
    port: int = 5683
    #: Name of this gateway in relayed messages and topics.
    name: str = "gw1"
    #: aiocoap server transport: "auto" takes "udp6" for the any-address ("::", "0.0.0.0")
    #: and the cheaper "simplesocketserver" for a specific address.
    transport: Literal["auto", "udp6", "simplesocketserver"] = "auto"
    #: Plain reading POSTs skip aiocoap's generic request pipeline (same admission, same
    #: answers; see gateway/coap/fastlane.py). Off: every request goes the generic way.
    fast_lane: bool = True
    #: Worker processes serving the port (SO_REUSEPORT, each peer always to the same one;
    #: see docs/deployment.md). 1 is a single process.
    workers: int = 1
    #: With several workers: seconds between looks at what the other workers committed
    #: (the delay an observer served by one worker may see for a device posting to another).
    feed_interval: float = 0.05
    #: The event loop `gateway serve` runs on: "uvloop" (libuv; about a quarter less CPU
    #: per request, docs/performance.md change 20), "asyncio" (the standard library's), or
    #: "auto": uvloop where it is installed.
    event_loop: eventloop.EventLoopChoice = "auto"


@dataclass(frozen=True)
class StoreConfig:
    path: str = DEFAULT_DB_PATH
    #: "full" survives power loss; "normal" (WAL) survives a killed process only.
    synchronous: Literal["full", "normal"] = "full"
    #: WAL pages after which a commit also checkpoints them into the database file. The
    #: commit that does it waits for it (tens of ms), so fewer, larger checkpoints make
    #: fewer slow answers; the WAL file grows to about this many 4 KB pages.
    wal_autocheckpoint: int = 10_000
    #: Group commit: at most this many write requests share one transaction.
    max_batch: int = 512
    #: Bound on write requests waiting for the writer; past it ingest answers 5.03.
    max_pending: int = 10_000
    #: Readings older than this many days are pruned (0 keeps them forever).
    retention_days: float = 0
    #: At most this many readings are kept, oldest pruned first (0 for no limit).
    retention_max_rows: int = 0
    prune_interval: float = 60.0


@dataclass(frozen=True)
class IngestConfig:
    #: Largest accepted request payload in bytes; larger ones get 4.13 with Size1.
    max_payload: int = 1024
    #: Accept readings from devices that never registered, creating them as type "generic".
    auto_register: bool = False
    #: Most measurements in one request.
    max_fields: int = 64
    #: Longest measurement name and string value.
    max_name_length: int = 64
    max_string_length: int = 256


@dataclass(frozen=True)
class RegistryConfig:
    default_lifetime: int = 86_400
    min_lifetime: int = 10
    max_lifetime: int = 31_536_000
    #: How often expired registrations are looked for, in seconds.
    expiry_interval: float = 5.0
    max_links_size: int = 1024


@dataclass(frozen=True)
class ObserveConfig:
    """Observe both ways: the gateway's own observable resources, and devices it observes."""

    #: Max-Age (seconds) of notifications from /r/NAME and /devices.
    max_age: int = 60
    #: Every this many notifications to one observer, one is confirmable, so an observer
    #: that went away is noticed (RFC 7641 §4.5) ...
    con_every: int = 20
    #: ... and at least one every this many seconds.
    con_interval: float = 86_400.0
    #: Notifications handed to the CoAP stack per step before the notifier yields to ingest.
    #: Small on purpose: the event loop reads one datagram per turn, so each yield is one
    #: more request read; with 200, a device observed 1,000 times could post only as fast
    #: as its observers were notified (docs/performance.md, change 19).
    fanout_batch: int = 10
    #: Per device type, which of its resource paths the gateway observes. A type not listed
    #: gets every link its registration marked `obs`; an empty list observes nothing.
    paths: dict[str, tuple[str, ...]] = field(default_factory=dict)
    #: An observation silent this long (seconds) is re-established; a shorter Max-Age on
    #: the device's notifications shortens it to Max-Age + `grace`.
    reestablish_after: float = 600.0
    grace: float = 5.0
    #: Seconds to wait for a device's first answer to an observe request, and before trying
    #: again after a failed one.
    request_timeout: float = 15.0
    retry_after: float = 5.0


@dataclass(frozen=True)
class CommandsConfig:
    #: Seconds after a queue-mode device's registration update or reading during which its
    #: queued commands are sent; per device type in `wake_windows`.
    wake_window: float = 5.0
    wake_windows: dict[str, float] = field(default_factory=dict)
    #: How often the queue is looked at for commands written by another process (the CLI)
    #: and for expired TTLs, in seconds.
    poll_interval: float = 0.5
    #: Seconds to wait for the device's response to a command.
    response_timeout: float = 30.0
    #: Sends without any answer before a command is failed.
    max_attempts: int = 3
    #: Devices being sent commands at the same time.
    max_in_flight: int = 64
    #: Unsettled (queued or sent) commands one device may have; more are refused (5.03).
    max_queued_per_device: int = 100
    #: Max-Age (seconds) of that refusal: when the sender should try again.
    queue_full_retry_after: int = 60

    def window(self, device_type: str) -> float:
        return self.wake_windows.get(device_type, self.wake_window)


@dataclass(frozen=True)
class LoggingConfig:
    level: Literal["debug", "info", "warning", "error"] = "info"
    #: "auto" renders for people on a TTY and JSON lines otherwise.
    format: Literal["auto", "json", "console"] = "auto"


@dataclass(frozen=True)
class SecurityConfig:
    #: "open": anyone who can reach the port may register and post (demo only);
    #: "authenticated": OSCORE credentials required (docs/security.md).
    mode: Literal["open", "authenticated"] = "open"
    #: Per device type override of `mode`, e.g. {streetlight = "authenticated"}.
    type_modes: dict[str, Literal["open", "authenticated"]] = field(default_factory=dict)
    #: First path segments that only operators may use in authenticated mode.
    admin_prefixes: tuple[str, ...] = ("cmd",)
    #: Where the gateway keeps its side of the OSCORE contexts (sequence numbers, replay
    #: windows); "" means `oscore/` beside the database.
    contexts_dir: str = ""
    #: How often the credentials table is checked for rotations and revocations (seconds).
    reload_interval: float = 0.5
    #: Token buckets: requests per second and burst, per source address (host:port)...
    source_rate: float = 50.0
    source_burst: float = 100.0
    #: ...and per device (the authenticated identity, else the device the request names).
    device_rate: float = 20.0
    device_burst: float = 40.0
    #: Bound on remembered buckets of each kind; the longest idle is forgotten first.
    max_tracked: int = 10_000
    #: Most registered devices; a registration of a new name past it gets 5.03.
    max_devices: int = 10_000
    #: Most concurrent observations per peer and in total; past them 5.03.
    max_observers_per_peer: int = 16
    max_observers: int = 1_000
    #: Longest accepted URI path segment or query item, in bytes (4.00 beyond).
    max_option_length: int = 255
    #: Also serve CoAP over DTLS 1.2 with pre-shared keys on server.port + 1 (needs the
    #: optional DTLSSocket package: `pip install coap-gateway[dtls]`).
    dtls: bool = False
    #: RFC 7252 §11.3: answers to unauthenticated peers stay within this factor of the
    #: request size (block-wise for larger ones). 0 disables the limit.
    amplification_factor: float = 3.0


@dataclass(frozen=True)
class GatewayConfig:
    server: ServerConfig = field(default_factory=ServerConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    relay: RelayConfig = field(default_factory=RelayConfig)
    sinks: tuple[SinkConfig, ...] = ()
    routes: tuple[RouteConfig, ...] = ()
    rules: tuple[RuleConfig, ...] = ()
    security: SecurityConfig = field(default_factory=SecurityConfig)
    observe: ObserveConfig = field(default_factory=ObserveConfig)
    commands: CommandsConfig = field(default_factory=CommandsConfig)

    def replace(self, section: str, **changes: Any) -> GatewayConfig:
        """A copy with some keys of one section changed (used for command-line flags)."""
        current = getattr(self, section)
        return dataclasses.replace(self, **{section: dataclasses.replace(current, **changes)})


def _parse_env_value(raw: str) -> Any:
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def env_overrides(environ: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """Nested overrides from `GATEWAY_<SECTION>_<KEY>` variables; unknown sections fail."""
    sections = {f.name for f in dataclasses.fields(GatewayConfig)}
    overrides: dict[str, dict[str, Any]] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        rest = name[len(ENV_PREFIX) :].lower()
        section = next((s for s in sections if rest.startswith(s + "_")), None)
        if section is None:
            continue
        key = rest[len(section) + 1 :]
        overrides.setdefault(section, {})[key] = _parse_env_value(raw)
    return overrides


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(dict(merged[key]), value)
        else:
            merged[key] = value
    return merged


def _reject_unknown_keys(data: Mapping[str, Any], cls: type[Any], prefix: str) -> None:
    """A misspelt key is an error, not a silently ignored setting."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key, value in data.items():
        if key not in fields:
            raise ConfigError(f"unknown configuration key: {prefix}{key}", key=f"{prefix}{key}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint) and isinstance(value, Mapping):
            _reject_unknown_keys(value, hint, f"{prefix}{key}.")  # type: ignore[arg-type]
        elif typing.get_origin(hint) in (list, tuple) and isinstance(value, list):
            (item_type, *_) = typing.get_args(hint)
            if dataclasses.is_dataclass(item_type):
                for index, item in enumerate(value):
                    if isinstance(item, Mapping):
                        _reject_unknown_keys(item, item_type, f"{prefix}{key}[{index}].")  # type: ignore[arg-type]


def config_from_mapping(data: Mapping[str, Any]) -> GatewayConfig:
    """Validate a plain mapping (parsed TOML) into the typed config, naming a bad key."""
    _reject_unknown_keys(data, GatewayConfig, "")
    try:
        return msgspec.convert(dict(data), GatewayConfig)
    except msgspec.ValidationError as exc:
        # msgspec says e.g. "Expected `int`, got `str` - at `$.store.max_batch`".
        text = str(exc)
        key = text.rsplit("at `$.", 1)[1].rstrip("`") if "at `$." in text else None
        raise ConfigError(f"invalid configuration: {text}", key=key) from exc


def load_config(
    path: str | Path | None = None,
    *,
    environ: Mapping[str, str] | None = None,
) -> GatewayConfig:
    """Load TOML (if given), apply environment overrides, validate everything."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except FileNotFoundError as exc:
            raise ConfigError(f"configuration file not found: {path}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    data = _merge(data, env_overrides(os.environ if environ is None else environ))
    config = config_from_mapping(data)
    check_config(config)
    return config


def check_config(config: GatewayConfig) -> None:
    """Cross-field checks that types alone cannot express."""
    eventloop.resolve(config.server.event_loop)
    if not 0 <= config.server.port <= 65535:
        raise ConfigError("server.port must be 0..65535", key="server.port")
    if config.ingest.max_payload < 16:
        raise ConfigError("ingest.max_payload must be at least 16 bytes", key="ingest.max_payload")
    if config.store.max_batch < 1:
        raise ConfigError("store.max_batch must be at least 1", key="store.max_batch")
    if config.store.wal_autocheckpoint < 1:
        # 0 would turn checkpoints off and let the WAL grow without bound.
        raise ConfigError(
            "store.wal_autocheckpoint must be at least 1 page", key="store.wal_autocheckpoint"
        )
    check_workers(config.server, config.security)
    check_relay(config.sinks, config.routes, config.relay)
    check_rules(config.rules)
    check_security(config.security)
    check_observe_commands(config.observe, config.commands)
    reg = config.registry
    if not reg.min_lifetime <= reg.default_lifetime <= reg.max_lifetime:
        raise ConfigError(
            "registry lifetimes must satisfy min_lifetime <= default_lifetime <= max_lifetime",
            key="registry.default_lifetime",
        )


def check_workers(server: ServerConfig, security: SecurityConfig) -> None:
    if server.workers < 1:
        raise ConfigError("server.workers must be at least 1", key="server.workers")
    if server.feed_interval <= 0:
        raise ConfigError("server.feed_interval must be positive", key="server.feed_interval")
    if server.workers == 1:
        return
    # OSCORE replay windows and sequence numbers, and DTLS sessions, live in one process:
    # shared by several, a nonce could be reused or a replay accepted.
    authenticated = security.mode == "authenticated" or "authenticated" in (
        security.type_modes.values()
    )
    if authenticated or security.dtls:
        raise ConfigError(
            'server.workers > 1 needs security.mode = "open" without authenticated type'
            " modes and without DTLS (OSCORE and DTLS state is per process)",
            key="server.workers",
        )


def check_security(security: SecurityConfig) -> None:
    for key in ("source_rate", "source_burst", "device_rate", "device_burst", "reload_interval"):
        if getattr(security, key) < 0:
            raise ConfigError(f"security.{key} must not be negative", key=f"security.{key}")
    for key in ("max_tracked", "max_devices", "max_observers_per_peer", "max_observers"):
        if getattr(security, key) < 1:
            raise ConfigError(f"security.{key} must be at least 1", key=f"security.{key}")
    if security.amplification_factor and security.amplification_factor < 1:
        raise ConfigError(
            "security.amplification_factor must be 0 (off) or at least 1",
            key="security.amplification_factor",
        )


def check_observe_commands(observe: ObserveConfig, commands: CommandsConfig) -> None:
    if observe.con_every < 1:
        raise ConfigError("observe.con_every must be at least 1", key="observe.con_every")
    if observe.max_age < 0 or observe.con_interval <= 0 or observe.fanout_batch < 1:
        raise ConfigError("observe timings must be positive", key="observe")
    if commands.max_attempts < 1 or commands.max_in_flight < 1:
        raise ConfigError("commands.max_attempts and max_in_flight must be at least 1")
    if commands.max_queued_per_device < 1 or commands.queue_full_retry_after < 0:
        raise ConfigError(
            "commands.max_queued_per_device must be at least 1, queue_full_retry_after >= 0",
            key="commands.max_queued_per_device",
        )
    windows = [commands.wake_window, *commands.wake_windows.values()]
    if any(w <= 0 for w in windows) or commands.poll_interval <= 0:
        raise ConfigError("commands windows and poll_interval must be positive", key="commands")
