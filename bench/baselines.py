"""Baseline servers the gateway is measured against, each meant to run in its own process.

- `aiocoap`: a bare aiocoap server with the default transport and a `Site`, whose `/r/NAME`
  resource only decodes the CBOR payload and answers 2.04: what aiocoap costs by itself
  (its `/rd` answers 2.01 and stores nothing, a baseline for registration rates).
- `aiocoap-observe`: a bare aiocoap server for the Observe figures. `POST /rd?ep=NAME`
  adds a stock `aiocoap.resource.ObservableResource` at `/r/NAME` (2.01; a second
  registration of the name keeps it); its `GET` answers 2.05 with the last reading's CBOR
  payload and can be observed; its `POST` keeps the payload and calls `updated_state()`,
  so each observer gets a notification rendered by `GET`. Notifications are aiocoap's
  default: confirmable, as the observe requests were. `aiocoap-observe-non` is the same
  with non-confirmable notifications (`transport_tuning=aiocoap.Unreliable`; the first
  answer still goes piggybacked in the ACK), as the gateway sends most of them.
- `minimal`: an asyncio UDP responder answering every CON with a piggybacked, empty 2.04
  ACK: the ceiling for Python on this machine.
- `aiocoap-uvloop`: `aiocoap` on uvloop, the event loop the gateway runs on by default: how
  much of the gateway's lead is the loop's.

- `mqtt-publish` / `mqtt-link-publish` / `jetstream-publish`: not servers but clients:
  publish COUNT messages of the relay's size, 100 in flight at a time as the relay's batches
  are, and print the rate: the ceiling for draining an outbox. MQTT at QoS 1 with stock
  aiomqtt (the usual asyncio client) and with the MQTT sink's own connection alone
  (`MqttLink`: paho on the event loop, quick ACKs); JetStream with nats-py, as the sink.

`python bench/baselines.py KIND PORT [CPU]` serves until SIGTERM, pinned to CPU when given.
It prints `ready` on stdout once it listens. `python bench/baselines.py mqtt-publish PORT
COUNT [CPU]` prints `rate N` (messages per second) and exits.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from typing import Any


def pin(cpu: int | None) -> None:
    if cpu is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {cpu})


class MinimalResponder(asyncio.DatagramProtocol):
    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if len(data) < 4 or data[0] & 0x30:  # only CON gets an answer
            return
        tkl = data[0] & 0x0F
        self.transport.sendto(bytes((0x60 | tkl, 0x44)) + data[2 : 4 + tkl], addr)


async def serve_minimal(port: int, stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(
        MinimalResponder, local_addr=("127.0.0.1", port)
    )
    print("ready", flush=True)
    await stop.wait()
    transport.close()


async def serve_aiocoap(port: int, stop: asyncio.Event) -> None:
    import aiocoap
    import aiocoap.resource
    import cbor2

    class Readings(aiocoap.resource.Resource, aiocoap.resource.PathCapable):  # type: ignore[misc]
        async def render_post(self, request: aiocoap.Message) -> aiocoap.Message:
            cbor2.loads(request.payload)
            return aiocoap.Message(code=aiocoap.CHANGED)

    class Directory(aiocoap.resource.Resource):  # type: ignore[misc]
        async def render_post(self, request: aiocoap.Message) -> aiocoap.Message:
            return aiocoap.Message(code=aiocoap.CREATED, location_path=("rd", "x"))

    site = aiocoap.resource.Site()
    site.add_resource(("r",), Readings())
    site.add_resource(("rd",), Directory())
    context = await aiocoap.Context.create_server_context(site, bind=("127.0.0.1", port))
    print("ready", flush=True)
    await stop.wait()
    await context.shutdown()


async def serve_aiocoap_observe(port: int, stop: asyncio.Event, *, confirmable: bool) -> None:
    import aiocoap
    import aiocoap.resource
    import cbor2

    class Device(aiocoap.resource.ObservableResource):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.latest = cbor2.dumps({})

        async def render_get(self, request: aiocoap.Message) -> aiocoap.Message:
            tuning = aiocoap.Reliable if confirmable else aiocoap.Unreliable
            return aiocoap.Message(
                code=aiocoap.CONTENT,
                payload=self.latest,
                content_format=60,
                transport_tuning=tuning,
            )

        async def render_post(self, request: aiocoap.Message) -> aiocoap.Message:
            cbor2.loads(request.payload)
            self.latest = request.payload
            self.updated_state()
            return aiocoap.Message(code=aiocoap.CHANGED)

    class Directory(aiocoap.resource.Resource):  # type: ignore[misc]
        async def render_post(self, request: aiocoap.Message) -> aiocoap.Message:
            query = dict(item.partition("=")[::2] for item in request.opt.uri_query)
            name = query.get("ep")
            if not name:
                return aiocoap.Message(code=aiocoap.BAD_REQUEST)
            if name not in devices:
                devices[name] = Device()
                site.add_resource(("r", name), devices[name])
            return aiocoap.Message(code=aiocoap.CREATED, location_path=("rd", name))

    devices: dict[str, Device] = {}
    site = aiocoap.resource.Site()
    site.add_resource(("rd",), Directory())
    context = await aiocoap.Context.create_server_context(site, bind=("127.0.0.1", port))
    print("ready", flush=True)
    await stop.wait()
    await context.shutdown()


PAYLOAD = bytes(range(100)) + b"relay-sized message"  # about an encoded reading
BATCH = 100


async def publish_mqtt(port: int, count: int) -> float:
    """Stock aiomqtt."""
    import logging

    import aiomqtt

    # aiomqtt warns about every publish beyond 10 pending; printing those would be the cost.
    logging.getLogger("mqtt").setLevel(logging.ERROR)
    async with aiomqtt.Client("127.0.0.1", port) as client:
        loop = asyncio.get_running_loop()
        started = loop.time()
        for first in range(0, count, BATCH):
            await asyncio.gather(
                *(
                    client.publish(f"baseline/dev{i % 100}", PAYLOAD, qos=1)
                    for i in range(first, min(count, first + BATCH))
                )
            )
        return count / (loop.time() - started)


async def publish_mqtt_link(port: int, count: int) -> float:
    """The MQTT sink's connection alone: no outbox, no envelopes, no topic templates."""
    from gateway.relay.sinks.mqtt_link import MqttLink

    link = MqttLink("127.0.0.1", port, max_in_flight=BATCH)
    await link.connect(10.0)
    loop = asyncio.get_running_loop()
    try:
        started = loop.time()
        for first in range(0, count, BATCH):
            size = min(count, first + BATCH) - first
            left = size
            done = loop.create_future()

            def acknowledged(reason: Any, done: asyncio.Future[None] = done) -> None:
                nonlocal left
                left -= 1
                if not left:
                    done.set_result(None)

            for i in range(first, first + size):
                link.publish(
                    f"baseline/dev{i % 100}",
                    PAYLOAD,
                    qos=1,
                    retain=False,
                    properties=None,
                    acknowledged=acknowledged,
                )
            await done
        return count / (loop.time() - started)
    finally:
        await link.aclose()


async def publish_jetstream(port: int, count: int) -> float:
    import nats

    client = await nats.connect(f"nats://127.0.0.1:{port}")
    try:
        js = client.jetstream()
        await js.add_stream(name="BASELINE", subjects=["baseline.>"])
        loop = asyncio.get_running_loop()
        started = loop.time()
        for first in range(0, count, BATCH):
            await asyncio.gather(
                *(
                    js.publish(f"baseline.dev{i % 100}", PAYLOAD, headers={"Nats-Msg-Id": str(i)})
                    for i in range(first, min(count, first + BATCH))
                )
            )
        return count / (loop.time() - started)
    finally:
        await client.close()


async def main(kind: str, port: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    if kind == "minimal":
        await serve_minimal(port, stop)
    elif kind in ("aiocoap", "aiocoap-uvloop"):
        await serve_aiocoap(port, stop)
    elif kind in ("aiocoap-observe", "aiocoap-observe-non"):
        await serve_aiocoap_observe(port, stop, confirmable=kind == "aiocoap-observe")
    else:
        raise SystemExit(
            f"unknown baseline {kind!r}: use minimal, aiocoap, aiocoap-uvloop,"
            " aiocoap-observe or aiocoap-observe-non"
        )


if __name__ == "__main__":
    publishers = {
        "mqtt-publish": publish_mqtt,
        "mqtt-link-publish": publish_mqtt_link,
        "jetstream-publish": publish_jetstream,
    }
    if sys.argv[1] in publishers:
        pin(int(sys.argv[4]) if len(sys.argv) > 4 else None)
        publish = publishers[sys.argv[1]]
        print(f"rate {asyncio.run(publish(int(sys.argv[2]), int(sys.argv[3]))):.1f}", flush=True)
    else:
        pin(int(sys.argv[3]) if len(sys.argv) > 3 else None)
        if sys.argv[1].endswith("-uvloop"):
            import uvloop

            uvloop.run(main(sys.argv[1], int(sys.argv[2])))
        else:
            asyncio.run(main(sys.argv[1], int(sys.argv[2])))
