"""One simulated device: a pure model driven over a real CoAP endpoint.

The node registers with the gateway's resource directory, refreshes the registration
before its lifetime runs out, and posts a reading on a fixed schedule, each as a
confirmable request. A 4.04 to a reading or a refresh means the gateway forgot the
registration: the node registers again and resends the reading once, with the same ``seq``
so the gateway can recognise it. Between reports it serves its resources (GET, Observe,
PUT for commands); a sleepy node (queue mode) switches its radio off between reports and
listens only for ``listen_window`` seconds after each one.

Model time is ``epoch0 + (loop time - loop0)`` at the *scheduled* report time, not the time
the loop happened to wake, so a seed gives the same readings however busy the process is.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

import cbor2
from aiocoap import Message
from aiocoap.numbers.codes import Code

from device_sim import codec
from device_sim.coap import Addr, Endpoint, Impairment, RequestError, Result, Transmission
from device_sim.credentials import OscoreSession
from device_sim.models.base import CommandError, DeviceModel, ResourceSpec

REGISTER_BACKOFF_MAX = 60.0

T = TypeVar("T")


@dataclass(frozen=True)
class NodeConfig:
    name: str
    gateway: Addr
    #: Seconds between readings (a sleepy node's wake interval).
    interval: float = 30.0
    #: Registration lifetime in seconds; refreshed at ``refresh_at`` of it.
    lifetime: int = 300
    refresh_at: float = 0.75
    payload_format: codec.PayloadFormat = "cbor"
    sleepy: bool = False
    #: How long a sleepy node stays awake after reporting, to take queued commands.
    listen_window: float = 2.0
    #: Delay before the first registration, to spread a fleet's start.
    phase: float = 0.0
    bind_host: str = "127.0.0.1"
    #: OSCORE credentials: a credentials.json, or a directory holding NAME/credentials.json
    #: (as `gateway devices add NAME --credentials oscore --out DIR` writes them).
    credentials: str | None = None


@dataclass
class NodeStats:
    #: Readings posted (counted once however often retransmitted).
    sent: int = 0
    #: Readings answered 2.xx.
    acknowledged: int = 0
    #: Readings that got an error code or no answer at all.
    failed: int = 0
    timeouts: int = 0
    #: Retransmissions of readings (requests sent again for want of an ACK).
    retransmissions: int = 0
    separate_responses: int = 0
    registrations: int = 0
    reregistrations: int = 0
    refreshes: int = 0
    commands: int = 0
    notifications: int = 0
    codes: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    #: seq of every reading the gateway acknowledged.
    acked_seqs: list[int] = field(default_factory=list)
    #: device time (``ts`` / SenML ``bt``) of every reading the gateway acknowledged.
    acked_times: list[float] = field(default_factory=list)


class Node:
    """A device. ``async with Node(...)`` binds its socket; `run` lives until `stop`."""

    def __init__(
        self,
        config: NodeConfig,
        model: DeviceModel[Any],
        *,
        seed: str | int,
        epoch0: float,
        impairment: Impairment | None = None,
        transmission: Transmission | None = None,
    ) -> None:
        self.config = config
        self.model = model
        self._model_rng = random.Random(f"model:{seed}")
        self._net_rng = random.Random(f"net:{seed}")
        self._impairment = impairment
        self._transmission = transmission
        self._epoch0 = epoch0
        self._loop0 = 0.0
        self.stats = NodeStats()
        self.endpoint: Endpoint | None = None
        self.state: Any = None
        self.seq = 0
        self.registered = asyncio.Event()
        self.location: tuple[str, ...] | None = None
        self._registered_at = 0.0
        self._resources: dict[str, ResourceSpec] = {r.path: r for r in model.resources}
        # path -> {(peer, token)}
        self._observers: dict[str, dict[tuple[Addr, bytes], None]] = {}
        self._observe_seq = 0
        self.on_event: Callable[[str, Any], None] | None = None
        self.stopping = False
        self.busy = False
        self._oscore: OscoreSession | None = None

    async def __aenter__(self) -> Node:
        loop = asyncio.get_running_loop()
        self._loop0 = loop.time()
        self.state = self.model.initial(self._epoch0, self._model_rng)
        endpoint = Endpoint(
            rng=self._net_rng,
            handler=self._handle,
            impairment=self._impairment,
            transmission=self._transmission,
        )
        await loop.create_datagram_endpoint(lambda: endpoint, local_addr=(self.config.bind_host, 0))
        self.endpoint = endpoint
        if self.config.credentials is not None:
            try:
                self._oscore = OscoreSession.load(self.config.credentials, self.config.name)
            except BaseException:
                endpoint.close()
                raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.endpoint is not None:
            self.endpoint.close()
        if self._oscore is not None:
            self._oscore.close()
            self._oscore = None

    async def _request(self, message: Any) -> Result:
        """Send a request to the gateway, OSCORE-protected when the node has credentials."""
        assert self.endpoint is not None
        if self._oscore is None:
            return await self.endpoint.request(message, self.config.gateway)
        protected, request_id = self._oscore.protect(message)
        result = await self.endpoint.request(protected, self.config.gateway)
        result.response = self._oscore.unprotect(result.response, request_id)
        return result

    @property
    def address(self) -> Addr:
        assert self.endpoint is not None
        return self.endpoint.local_address

    def epoch(self, loop_time: float) -> float:
        return self._epoch0 + (loop_time - self._loop0)

    # the device's life

    async def run(self) -> None:
        """Register, then report every ``interval`` until `stop` is called.

        A request on the wire when `stop` is called is finished first (``busy`` is true
        meanwhile); a node that is only waiting can be cancelled at once.
        """
        assert self.endpoint is not None
        loop = asyncio.get_running_loop()
        cfg = self.config
        await asyncio.sleep(cfg.phase)
        backoff = 1.0
        while not await self._busy(self.register()):
            await asyncio.sleep(backoff * self._net_rng.uniform(1.0, 1.5))
            backoff = min(backoff * 2, REGISTER_BACKOFF_MAX)
        # Reports stay on the grid loop0 + phase + k * interval, whenever registration ended.
        due = self._loop0 + cfg.phase
        while not self.stopping:
            self._radio(True)
            await self._busy(self._report_and_refresh(self.epoch(due)))
            if self.stopping:
                return
            if cfg.sleepy:
                await asyncio.sleep(cfg.listen_window)
            due += cfg.interval
            now = loop.time()
            if due < now - cfg.interval:
                # Far behind (slow registration, an overloaded loop): skip whole slots
                # rather than burst.
                due += math.ceil((now - due) / cfg.interval - 1) * cfg.interval
            self._radio(not cfg.sleepy)
            await asyncio.sleep(due - now)

    def stop(self) -> bool:
        """Ask the node to stop; True if it is idle and may be cancelled right away."""
        self.stopping = True
        return not self.busy

    async def _busy(self, work: Coroutine[Any, Any, T]) -> T:
        self.busy = True
        try:
            return await work
        finally:
            self.busy = False

    async def _report_and_refresh(self, now: float) -> None:
        cfg = self.config
        if asyncio.get_running_loop().time() - self._registered_at >= cfg.lifetime * cfg.refresh_at:
            await self._refresh()
        await self._report(now)

    def _radio(self, on: bool) -> None:
        assert self.endpoint is not None
        self.endpoint.radio_on = on

    def link_format(self) -> str:
        return ",".join(spec.link() for spec in self.model.resources)

    async def register(self) -> bool:
        """POST /rd; True when the gateway answered 2.01 with a location."""
        assert self.endpoint is not None
        cfg = self.config
        query = [f"ep={cfg.name}", f"et={self.model.device_type}", f"lt={cfg.lifetime}"]
        if cfg.sleepy:
            query.append("q")
        msg = Message(
            code=Code.POST,
            uri_path=("rd",),
            uri_query=tuple(query),
            payload=self.link_format().encode(),
            content_format=40,
        )
        self._radio(True)
        try:
            result = await self._request(msg)
        except RequestError:
            self.stats.codes["timeout"] += 1
            return False
        response = result.response
        if response.code != Code.CREATED:
            self.stats.codes[response.code.dotted] += 1
            return False
        self.location = tuple(response.opt.location_path) or None
        self.stats.registrations += 1
        self._registered_at = asyncio.get_running_loop().time()
        self.registered.set()
        self._emit("registered", self.location)
        return True

    async def _refresh(self) -> None:
        assert self.endpoint is not None
        if self.location is None:
            await self.register()
            return
        msg = Message(code=Code.POST, uri_path=self.location)
        try:
            result = await self._request(msg)
        except RequestError:
            return  # try again before the next reading
        code = result.response.code
        if code == Code.NOT_FOUND:
            self.stats.reregistrations += 1
            await self.register()
        elif code.is_successful():
            self.stats.refreshes += 1
            self._registered_at = asyncio.get_running_loop().time()

    async def deregister(self) -> None:
        assert self.endpoint is not None
        if self.location is None:
            return
        self._radio(True)
        with contextlib.suppress(RequestError):
            await self._request(Message(code=Code.DELETE, uri_path=self.location))
        self.location = None

    async def _report(self, now: float) -> None:
        self.state, events = self.model.step(self.state, now, self._model_rng)
        for event in events:
            self._emit(event.kind, event)
        reported = getattr(self.model, "reported", None)
        if reported is not None:
            self.state = reported(self.state)
        values = self.model.measurements(self.state)
        self.seq += 1
        senml = self.config.payload_format == "senml"
        payload, content_format = codec.encode(
            self.config.payload_format,
            values,
            ts=round(now, 3),
            # The gateway identifies a SenML pack by its absolute base time instead.
            seq=None if senml else self.seq,
            base_name=f"{self.config.name}:",
            units=self.model.units,
        )
        self.stats.sent += 1
        code = await self._post_reading(payload, content_format)
        if code == Code.NOT_FOUND:
            # The gateway no longer knows us: register again, then resend the same reading.
            self.stats.reregistrations += 1
            if await self.register():
                code = await self._post_reading(payload, content_format)
        if code is not None and code.is_successful():
            self.stats.acknowledged += 1
            self.stats.acked_seqs.append(self.seq)
            self.stats.acked_times.append(round(now, 3))
        else:
            self.stats.failed += 1
        self._notify_observers()

    async def _post_reading(self, payload: bytes, content_format: int) -> Any:
        assert self.endpoint is not None
        msg = Message(
            code=Code.POST,
            uri_path=("r", self.config.name),
            payload=payload,
            content_format=content_format,
        )
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            result = await self._request(msg)
        except RequestError as exc:
            self.stats.retransmissions += exc.retransmissions
            self.stats.timeouts += 1
            self.stats.codes["timeout"] += 1
            return None
        self.stats.retransmissions += result.retransmissions
        self.stats.separate_responses += result.separate
        code = result.response.code
        self.stats.codes[code.dotted] += 1
        if code.is_successful():
            self.stats.latencies.append(loop.time() - started)
        return code

    def _emit(self, kind: str, detail: Any) -> None:
        if self.on_event is not None:
            self.on_event(kind, detail)

    # the device's own resources

    def _value(self, spec: ResourceSpec) -> Any:
        values = self.model.measurements(self.state)
        return values if spec.measurement is None else values.get(spec.measurement)

    def _handle(self, request: Any, peer: Addr) -> Any:
        path = "/".join(request.opt.uri_path)
        if path == ".well-known/core" and request.code == Code.GET:
            return Message(
                code=Code.CONTENT, payload=self.link_format().encode(), content_format=40
            )
        spec = self._resources.get(path)
        if spec is None:
            return Message(code=Code.NOT_FOUND)
        if request.code == Code.GET:
            response = Message(
                code=Code.CONTENT,
                payload=cbor2.dumps(self._value(spec)),
                content_format=codec.CONTENT_FORMAT_CBOR,
            )
            observe = request.opt.observe
            if spec.observable and observe == 0:
                self._observers.setdefault(path, {})[(peer, request.token)] = None
                response.opt.observe = self._observe_seq
            elif observe == 1:
                self._observers.get(path, {}).pop((peer, request.token), None)
            return response
        if request.code == Code.PUT:
            return self._put(spec, request)
        return Message(code=Code.METHOD_NOT_ALLOWED)

    def _put(self, spec: ResourceSpec, request: Any) -> Any:
        if not spec.writable or spec.measurement is None:
            return Message(code=Code.METHOD_NOT_ALLOWED)
        if request.opt.content_format not in (None, codec.CONTENT_FORMAT_CBOR):
            return Message(code=Code.UNSUPPORTED_CONTENT_FORMAT)
        try:
            value = cbor2.loads(request.payload)
        except Exception:
            return Message(code=Code.BAD_REQUEST, payload=b"payload is not CBOR")
        try:
            self.state = self.model.command(self.state, spec.measurement, value)
        except CommandError as exc:
            return Message(code=Code.UNPROCESSABLE_ENTITY, payload=str(exc).encode())
        self.stats.commands += 1
        self._emit("command", (spec.measurement, value))
        asyncio.get_running_loop().call_soon(self._notify_observers)
        return Message(code=Code.CHANGED)

    def _notify_observers(self) -> None:
        if self.endpoint is None or not self.endpoint.radio_on:
            return
        self._observe_seq = (self._observe_seq + 1) & 0xFFFFFF
        for path, observers in self._observers.items():
            spec = self._resources[path]
            payload = cbor2.dumps(self._value(spec))
            for peer, token in list(observers):

                def gone(path: str = path, key: tuple[Addr, bytes] = (peer, token)) -> None:
                    self._observers.get(path, {}).pop(key, None)

                msg = Message(
                    code=Code.CONTENT,
                    payload=payload,
                    content_format=codec.CONTENT_FORMAT_CBOR,
                    observe=self._observe_seq,
                )
                self.endpoint.notify(msg, peer, token, on_gone=gone)
                self.stats.notifications += 1
