"""A gateway with the example rules and a clock the test moves."""

from __future__ import annotations

import tomllib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiocoap
import cbor2
import pytest

from gateway.app import Gateway
from gateway.config import GatewayConfig
from gateway.relay import events as relay_events
from tests.support.gateway import base_url, gateway_config, post, register, wait_until

EXAMPLE = Path(__file__).resolve().parents[2] / "docs" / "examples" / "gateway.toml"
#: A fixed start, so every run sees the same times.
T0 = 1_700_000_000.0


class Clock:
    """The gateway's clock; the test sets the time."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now


def example_rules() -> list[dict[str, Any]]:
    with EXAMPLE.open("rb") as fh:
        rules: list[dict[str, Any]] = tomllib.load(fh)["rules"]
    return rules


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def relayed(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Events handed to the relay, recorded as the real `record_event` is called."""
    calls: list[dict[str, Any]] = []
    real = relay_events.record_event

    async def record(conn: Any, **kwargs: Any) -> int:
        calls.append(kwargs)
        return await real(conn, **kwargs)

    monkeypatch.setattr(relay_events, "record_event", record)
    return calls


@pytest.fixture
def rules_config(tmp_path: Path) -> GatewayConfig:
    return gateway_config(tmp_path, rules=example_rules())  # type: ignore[arg-type]


@pytest.fixture
async def rules_gateway(rules_config: GatewayConfig, clock: Clock) -> AsyncIterator[Gateway]:
    async with Gateway(rules_config, clock=clock) as running:
        yield running


class Devices:
    """Registers devices and posts their readings at the clock's time, like a device would."""

    def __init__(self, gateway: Gateway, client: aiocoap.Context, clock: Clock) -> None:
        self.gateway = gateway
        self.client = client
        self.clock = clock
        self.url = base_url(gateway.config)

    async def register(self, name: str, device_type: str) -> None:
        await register(self.client, self.url, name, device_type)

    async def send(self, name: str, values: dict[str, Any], *, at: float | None = None) -> None:
        """POST one reading at `at` (default: now) and wait until the rules have judged it."""
        if at is not None:
            self.clock.now = at
        response = await post(self.client, self.url, f"r/{name}", cbor2.dumps(values))
        assert response.code == aiocoap.numbers.codes.Code.CHANGED, response.payload
        await self.settled()

    async def settled(self) -> None:
        rules = self.gateway.rules
        await wait_until(lambda: rules.idle)

    async def tick(self, at: float) -> int:
        self.clock.now = at
        return await self.gateway.rules.tick()


@pytest.fixture
def devices(rules_gateway: Gateway, coap_client: aiocoap.Context, clock: Clock) -> Devices:
    return Devices(rules_gateway, coap_client, clock)


Query = Callable[[str], Awaitable[list[Any]]]
