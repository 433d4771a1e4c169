"""The CoAP server: the site of resources and the aiocoap context, as one context manager.

aiocoap's `Context` has no `async with`; `CoapServer` wraps its creation and shutdown so the
gateway's exit stack can own it like any other long-lived part.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import structlog
from aiocoap import Context, resource
from aiocoap.util.linkformat import Link, LinkFormat

from gateway.core.readings import CF_CBOR, CF_JSON, CF_LINK_FORMAT, CF_SENML_CBOR, CF_SENML_JSON

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class PublishedResource:
    """One entry of /.well-known/core: path and link attributes."""

    path: tuple[str, ...]
    attributes: dict[str, str | None] = field(default_factory=dict)

    def link(self) -> Any:
        return Link("/" + "/".join(self.path), **self.attributes)


READING_CT = f"{CF_CBOR} {CF_SENML_CBOR} {CF_JSON} {CF_SENML_JSON}"

CORE_LINKS = (
    PublishedResource(("rd",), {"rt": "core.rd", "ct": str(CF_LINK_FORMAT)}),
    PublishedResource(("r",), {"rt": "coapgw.readings", "ct": READING_CT, "obs": None}),
)


RULES_LINKS = (
    PublishedResource(
        ("alerts",), {"rt": "coapgw.alerts", "obs": None, "ct": f"{CF_CBOR} {CF_JSON}"}
    ),
    PublishedResource(
        ("lists",), {"rt": "coapgw.lists", "obs": None, "ct": f"{CF_CBOR} {CF_JSON}"}
    ),
)


class GatewaySite:
    """Builds the aiocoap Site and remembers what /.well-known/core announces."""

    def __init__(self) -> None:
        self.site = resource.Site()
        self._published: list[PublishedResource] = []
        self.site.add_resource(
            (".well-known", "core"), resource.WKCResource(self._links, impl_info=None)
        )

    def add(
        self, path: tuple[str, ...], res: Any, published: PublishedResource | None = None
    ) -> None:
        self.site.add_resource(path, res)
        if published is not None:
            self._published.append(published)

    def _links(self) -> Any:
        return LinkFormat([entry.link() for entry in self._published])


class CoapServer:
    def __init__(
        self,
        site: GatewaySite,
        *,
        bind: str,
        port: int,
        transport: str = "udp6",
        root: Any = None,
        extra_transports: tuple[str, ...] = (),
        server_credentials: Any = None,
    ) -> None:
        self._site = site
        #: What the context serves: the site itself, or a wrapper around it (security).
        self._root = site.site if root is None else root
        self._transports = [transport, *extra_transports]
        self._server_credentials = server_credentials
        self._bind = bind
        self._port = port
        self._transport = transport
        self.context: Any = None

    async def __aenter__(self) -> CoapServer:
        self.context = await Context.create_server_context(
            self._root,
            bind=(self._bind, self._port),
            transports=self._transports,
            server_credentials=self._server_credentials,
        )
        log.info("coap.listening", bind=self._bind, port=self._port, transports=self._transports)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.context is not None:
            await self.context.shutdown()
            self.context = None
            log.info("coap.stopped")
