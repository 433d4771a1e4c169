"""Helpers for the end-to-end relay tests: devices that keep posting, subscribers that
survive a broker restart, and config files for gateway processes."""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import json
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiocoap
import aiomqtt
import cbor2
from aiocoap.numbers.codes import Code

from gateway.relay.envelope import Encoding, RelayMessage, decode
from tests.support.brokers import Mosquitto
from tests.support.gateway import post

FAST_RETRY = {"base_delay": 0.2, "max_delay": 1.0, "jitter": 0.1, "max_attempts": 0}


class PersistentMosquitto(Mosquitto):
    """Mosquitto that saves its sessions every second, so a durable subscriber's
    subscription survives a kill and messages published before it reconnects wait for it."""

    def command(self) -> list[str]:
        command = super().command()
        config = Path(command[-1])
        text = config.read_text().replace("persistence false\n", "")
        config.write_text(
            text
            + f"persistence true\npersistence_location {self.workdir}/\nautosave_interval 1\n"
            # Started as root, mosquitto would switch to a user who cannot write our workdir.
            + f"user {getpass.getuser()}\n"
        )
        return command

    @property
    def saved(self) -> bool:
        return (self.workdir / "mosquitto.db").exists()

    def stop(self) -> None:
        """Stop it with SIGTERM, on which mosquitto saves its sessions before it exits.

        mosquitto acknowledges a QoS 1 PUBLISH before it writes it to disk (every
        `autosave_interval`), so a SIGKILL can lose messages the broker had already
        acknowledged to the gateway and not yet handed to the subscriber: the gateway's
        at-least-once ends at the broker's PUBACK, and these tests check the gateway's.
        """
        process = self.process
        if process is not None and process.poll() is None:
            process.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=5)
        super().stop()


@dataclass
class MqttCollector:
    """A QoS 1 subscriber with a persistent session that reconnects until stopped."""

    port: int
    topic: str = "coap-gw/#"
    messages: list[tuple[str, RelayMessage]] = field(default_factory=list)
    subscribed: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> None:
        collector = self

        class RecordOnReceipt(asyncio.Queue[aiomqtt.Message]):
            """aiomqtt's incoming queue, noting each message as paho hands it over, before
            paho acknowledges it: aiomqtt drops what is still queued when the connection
            drops, and the broker would not send it again."""

            def put_nowait(self, message: aiomqtt.Message) -> None:
                collector.record(message)

        while True:
            try:
                async with aiomqtt.Client(
                    "127.0.0.1",
                    self.port,
                    identifier="e2e-collector",
                    clean_session=False,
                    queue_type=RecordOnReceipt,
                ) as client:
                    await client.subscribe(self.topic, qos=1)
                    self.subscribed.set()
                    async for _ in client.messages:
                        pass  # nothing is queued: this only ends when the connection drops
            except aiomqtt.MqttError:
                await asyncio.sleep(0.05)  # the broker is away: try again shortly

    def record(self, message: aiomqtt.Message) -> None:
        body = message.payload
        assert isinstance(body, bytes)
        self.messages.append((str(message.topic), decode(body, Encoding.JSON)))

    def ids(self) -> set[str]:
        return {message.message_id for _, message in self.messages}


@contextlib.asynccontextmanager
async def collecting(collector: MqttCollector) -> Any:
    task = asyncio.create_task(collector.run(), name="mqtt-collector")
    try:
        async with asyncio.timeout(10):
            await collector.subscribed.wait()
        yield collector
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@dataclass
class Device:
    """A device posting numbered readings; remembers which were acknowledged (2.04)."""

    name: str
    acked: list[int] = field(default_factory=list)
    refused: int = 0
    seq: int = 0

    async def post_one(self, client: aiocoap.Context, url: str) -> Code:
        self.seq += 1
        body = cbor2.dumps({"temp": 4.0 + self.seq % 10, "seq": self.seq})
        try:
            response = await post(client, url, f"r/{self.name}", body)
        except aiocoap.error.Error:
            return Code.EMPTY
        if response.code == Code.CHANGED:
            self.acked.append(self.seq)
        else:
            self.refused += 1
        return response.code

    async def keep_posting(self, client: aiocoap.Context, url: str, interval: float) -> None:
        while True:
            await self.post_one(client, url)
            await asyncio.sleep(interval)  # the device's own rhythm, not a synchronisation


def toml(data: Mapping[str, Any]) -> str:
    """Enough TOML for gateway config files: tables, arrays of tables, scalars, lists."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return repr(v)
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, list | tuple):
            return "[" + ", ".join(value(x) for x in v) + "]"
        raise TypeError(v)

    lines: list[str] = []

    def table(prefix: str, body: Mapping[str, Any], header: str) -> None:
        lines.append(header)
        nested = []
        for key, v in body.items():
            if isinstance(v, Mapping):
                nested.append((key, v))
            else:
                lines.append(f"{key} = {value(v)}")
        for key, v in nested:
            table(f"{prefix}.{key}", v, f"[{prefix}.{key}]")

    for key, v in data.items():
        if isinstance(v, Mapping):
            table(key, v, f"[{key}]")
        elif isinstance(v, list) and v and isinstance(v[0], Mapping):
            for item in v:
                table(key, item, f"[[{key}]]")
        else:
            lines.insert(0, f"{key} = {value(v)}")
    return "\n".join(lines) + "\n"
