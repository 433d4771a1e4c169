"""Notifying the gateway's observers (RFC 7641 server side), off the commit path.

The store's commit listener and the registry's listener only *mark* a key (a device name,
or the registry) as changed: a set insert and an event, never an await, so ingest never
waits for observers. One task, the fan-out, takes the marked keys, renders each key's
payload once per Content-Format in use, and hands one message per observer to aiocoap.
Observe is latest-value: a key marked again before its notification went out is notified
once, with the newest state; intermediate states may be skipped (the outbox is the durable
path). The fan-out yields to the event loop every `fanout_batch` observers.

Notifications are non-confirmable, except every `con_every`-th one to an observer and at
least one every `con_interval` seconds (RFC 7641 §4.5): aiocoap ends an observation when
such a confirmable notification is answered with RST or never acknowledged, so an observer
that went away is dropped within `con_every` notifications. A GET without Observe (or with
Observe: 1) on the same token ends the observation too (aiocoap replaces the request).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import structlog
from aiocoap import CON, NON, Message
from aiocoap.numbers.codes import Code

from gateway.config import ObserveConfig
from gateway.core.readings import CF_TEXT

log = structlog.get_logger(__name__)

#: Renders a key's current state: {content_format: payload} for the formats asked, or None
#: when the key is gone (its observers are then told 4.04 and dropped).
Render = Callable[[str, frozenset[int]], Awaitable[dict[int, bytes] | None]]


@dataclass(eq=False, slots=True)
class Observer:
    key: str
    observation: Any  # aiocoap's ServerObservation
    content_format: int
    peer: str | None
    last_con: float
    since_con: int = 0


@dataclass(slots=True)
class FanoutStats:
    rounds: int = 0
    notifications: int = 0
    confirmable: int = 0
    render_failures: int = 0
    observers_added: int = 0
    observers_ended: int = 0
    keys: dict[str, int] = field(default_factory=dict)


class Fanout:
    def __init__(
        self,
        name: str,
        config: ObserveConfig,
        render: Render,
        *,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.name = name
        self._rng = rng or random.Random()
        self._config = config
        self._render = render
        self._clock = clock
        self._observers: dict[str, set[Observer]] = {}
        self._dirty: dict[str, None] = {}  # insertion-ordered set
        self._wake = asyncio.Event()
        self.stats = FanoutStats()

    # --- observers ----------------------------------------------------------------------

    def add(self, key: str, observation: Any, content_format: int, peer: str | None) -> Observer:
        # Each observer starts at its own point of the CON cycle: observers that came
        # together (a fleet after a restart) would otherwise all get their confirmable
        # notification in the same round, and their ACKs arrive as one burst that overflows
        # the socket's receive buffer, taking readings with it.
        observer = Observer(
            key,
            observation,
            content_format,
            peer,
            last_con=self._clock() - self._rng.uniform(0, self._config.con_interval),
            since_con=self._rng.randrange(self._config.con_every),
        )
        self._observers.setdefault(key, set()).add(observer)
        self.stats.observers_added += 1

        def cancelled() -> None:
            observers = self._observers.get(key)
            if observers is not None:
                observers.discard(observer)
                if not observers:
                    del self._observers[key]
            self.stats.observers_ended += 1
            log.debug("observe.ended", resource=self.name, key=key, peer=peer)

        observation.accept(cancelled)
        log.debug("observe.started", resource=self.name, key=key, peer=peer)
        return observer

    def observed(self, key: str) -> bool:
        return key in self._observers

    def count(self, key: str | None = None) -> int:
        if key is not None:
            return len(self._observers.get(key, ()))
        return sum(len(observers) for observers in self._observers.values())

    def keys(self) -> Iterable[str]:
        return self._observers.keys()

    def end(self, key: str, diagnostic: str) -> int:
        """Tell every observer of `key` it is gone (a final 4.04, RFC 7641 §3.2) and so end
        their observations; returns how many were told. Observers that arrive later are not
        affected. Confirmable, so the observer learns it even if one datagram is lost."""
        observers = list(self._observers.get(key, ()))
        for observer in observers:
            message = Message(
                code=Code.NOT_FOUND, payload=diagnostic.encode("utf-8"), content_format=CF_TEXT
            )
            message.mtype = CON
            observer.observation.trigger(message, is_last=True)
        self._dirty.pop(key, None)
        return len(observers)

    # --- changes ------------------------------------------------------------------------

    def mark(self, key: str) -> None:
        """`key` changed; its observers will be notified. Safe to call from any callback."""
        if key in self._observers:
            self._dirty[key] = None
            self._wake.set()

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            dirty, self._dirty = self._dirty, {}
            self.stats.rounds += 1
            for key in dirty:
                try:
                    await self._notify(key)
                except Exception:
                    self.stats.render_failures += 1
                    log.exception("observe.notify_failed", resource=self.name, key=key)

    async def _notify(self, key: str) -> None:
        observers = self._observers.get(key)
        if not observers:
            return
        formats = frozenset(observer.content_format for observer in observers)
        payloads = await self._render(key, formats)
        # Observers may have come or gone while rendering; notify those there now.
        current = list(self._observers.get(key, ()))
        now = self._clock()
        for index, observer in enumerate(current):
            if payloads is None:
                observer.observation.trigger(
                    Message(code=Code.NOT_FOUND, payload=b"gone"), is_last=True
                )
                continue
            payload = payloads.get(observer.content_format)
            if payload is None:
                continue  # a format added while rendering: it gets the next change
            observer.observation.trigger(self._message(observer, payload, now))
            if index % self._config.fanout_batch == self._config.fanout_batch - 1:
                await asyncio.sleep(0)  # let ingest and the CoAP stack run between batches

    def _message(self, observer: Observer, payload: bytes, now: float) -> Message:
        message = Message(code=Code.CONTENT, payload=payload)
        message.opt.content_format = observer.content_format
        message.opt.max_age = self._config.max_age
        observer.since_con += 1
        confirmable = (
            observer.since_con >= self._config.con_every
            or now - observer.last_con >= self._config.con_interval
        )
        if confirmable:
            observer.since_con = 0
            observer.last_con = now
            self.stats.confirmable += 1
        message.mtype = CON if confirmable else NON
        self.stats.notifications += 1
        return message
