"""`/alerts` and `/lists/NAME`: open alerts and shopping lists, both observable.

Both read the store (after the commit that changed it) and are re-rendered for observers
when the rules service says something changed. Observe is latest-value: an observer sees
the open alerts or the list as they are now; every single change is carried by the relay.

CBOR (60) by default, JSON (50) on request; anything else is 4.06.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import aiosqlite
import cbor2
from aiocoap import Message, resource
from aiocoap.numbers.codes import Code

from gateway.coap.base import GatewayResource
from gateway.core.readings import CF_CBOR, CF_JSON
from gateway.core.rules import Decision, ShoppingListChanged
from gateway.errors import NotAcceptableError
from gateway.store import alerts as store

FORMATS = (CF_CBOR, CF_JSON)


def _content_format(request: Message) -> int:
    accept = request.opt.accept
    content_format = CF_CBOR if accept is None else int(accept)
    if content_format not in FORMATS:
        raise NotAcceptableError(f"accept {content_format} not available; use 60 or 50")
    return content_format


def _encode(document: Any, content_format: int) -> Message:
    if content_format == CF_JSON:
        payload = json.dumps(document, separators=(",", ":")).encode()
    else:
        payload = cbor2.dumps(document)
    return Message(code=Code.CONTENT, payload=payload, content_format=content_format)


def _query(request: Message) -> dict[str, str]:
    pairs = (item.partition("=") for item in request.opt.uri_query)
    return {key: value for key, _, value in pairs}


class AlertsResource(GatewayResource, resource.ObservableResource):  # type: ignore[misc]
    """GET /alerts[?device=NAME]: the open alerts, newest first."""

    event = "alerts"

    def __init__(self, reader: aiosqlite.Connection) -> None:
        super().__init__()
        self._reader = reader

    def on_decisions(self, decisions: Sequence[Decision]) -> None:
        if any(not isinstance(decision, ShoppingListChanged) for decision in decisions):
            self.updated_state()

    async def render_get(self, request: Message) -> Message:
        content_format = _content_format(request)
        device = _query(request).get("device")
        rows = await store.open_alerts(self._reader, device=device)
        return _encode([row.as_dict() for row in rows], content_format)


class ListNamesResource(GatewayResource, resource.ObservableResource):  # type: ignore[misc]
    """GET /lists: the names of the lists that have items (observable)."""

    event = "lists"

    def __init__(self, reader: aiosqlite.Connection) -> None:
        super().__init__()
        self._reader = reader

    def on_decisions(self, decisions: Sequence[Decision]) -> None:
        if any(isinstance(decision, ShoppingListChanged) for decision in decisions):
            self.updated_state()

    async def render_get(self, request: Message) -> Message:
        content_format = _content_format(request)
        return _encode(await store.list_names(self._reader), content_format)


class ListsResource(GatewayResource, resource.ObservableResource, resource.PathCapable):  # type: ignore[misc]
    """GET /lists/NAME: the list's items (observable).

    Observations are kept per list, so a change to one list notifies only its observers.
    An unknown list is an empty one: a phone may observe a list before anything is low.
    """

    event = "lists"

    def __init__(self, reader: aiosqlite.Connection) -> None:
        super().__init__()
        self._reader = reader
        self._by_list: dict[str, set[Any]] = {}

    def get_link_description(self) -> None:
        return None  # published by the site with its own attributes

    async def add_observation(self, request: Message, serverobservation: Any) -> None:
        name = "/".join(request.opt.uri_path)
        observers = self._by_list.setdefault(name, set())
        observers.add(serverobservation)

        def cancel() -> None:
            observers.discard(serverobservation)
            if not observers:
                self._by_list.pop(name, None)

        serverobservation.accept(cancel)

    def on_decisions(self, decisions: Sequence[Decision]) -> None:
        changed = {d.list_name for d in decisions if isinstance(d, ShoppingListChanged)}
        for name in changed:
            for observation in list(self._by_list.get(name, ())):
                observation.trigger()

    def trigger_all(self) -> None:
        """Some list changed, which one is not known (another worker process changed it)."""
        for observers in list(self._by_list.values()):
            for observation in list(observers):
                observation.trigger()

    async def render_get(self, request: Message) -> Message:
        content_format = _content_format(request)
        name = "/".join(request.opt.uri_path)
        if not name:
            return _encode(await store.list_names(self._reader), content_format)
        items = await store.list_items(self._reader, name)
        return _encode(
            {"list": name, "items": [store.item_dict(item) for item in items]}, content_format
        )
