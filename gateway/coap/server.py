"""The CoAP server: the site of resources and the aiocoap context, as one context manager.

aiocoap's `Context` has no `async with`; `CoapServer` wraps its creation and shutdown so the
gateway's exit stack can own it like any other long-lived part.

Two choices here are about speed, measured with bench/ (docs/performance.md):
- `RoutingSite` dispatches like aiocoap's `Site` but strips the matched path from the request
  in place; `Site` builds the full request URI (for its `_original_request_uri`) and copies
  the whole message for every request, which costs more than the rest of the dispatch.
- The transport: aiocoap's `udp6` reads ancillary data (the local address) for every
  datagram, which a server bound to one address does not need; `simplesocketserver` reads
  plain datagrams, but cannot bind the any-address. `server.transport = "auto"` picks
  `udp6` for `::` / `0.0.0.0` and `simplesocketserver` for a specific address.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import structlog
from aiocoap import Context, resource
from aiocoap.transports.simplesocketserver import (
    MessageInterfaceSimpleServer,
    _DatagramServerSocketSimple,
)
from aiocoap.transports.udp6 import MessageInterfaceUDP6
from aiocoap.util import hostportjoin
from aiocoap.util.linkformat import Link, LinkFormat

from gateway import eventloop
from gateway.coap.base import route
from gateway.coap.dedup import CompactDeduplication
from gateway.coap.fastlane import ReadingsFastLane
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


ANY_ADDRESSES = ("::", "0.0.0.0", "")


def choose_transport(bind: str, configured: str = "auto") -> str:
    """The aiocoap server transport for a bind address (see the module docstring)."""
    if configured != "auto":
        return configured
    return "udp6" if bind in ANY_ADDRESSES else "simplesocketserver"


# Linux values, as aiocoap's own udp6 transport uses them (not every Python exposes them).
IP_RECVERR = getattr(socket, "IP_RECVERR", 11)
IPV6_RECVERR = getattr(socket, "IPV6_RECVERR", 25)
MSG_ERRQUEUE = getattr(socket, "MSG_ERRQUEUE", 8192)


def report_icmp_errors(context: Any) -> int:
    """Let a `simplesocketserver` context learn of ICMP errors, as `udp6` does.

    Without this, a CON to a peer that has gone (port unreachable) is retransmitted until
    it times out (about 90 s), and an observer that went away keeps its observation that
    long. With IP(V6)_RECVERR the kernel queues such errors with the address they concern;
    when the socket reports one, the queue is read and the error is dispatched for that
    peer, which ends its exchanges and observations at once. Only the rare error path pays
    for this: plain datagrams are still read without ancillary data. Returns how many
    sockets were set up (0 on platforms without RECVERR).

    Only a socket the event loop hands out (asyncio's selector loops) is set up. Under
    uvloop, libuv reads the socket itself and, seeing RECVERR, reads the error queue too,
    then hands uvloop the negated errno as an unsigned length: uvloop copies that many
    bytes (4 GB) and the process dies of a segmentation fault at the first peer that has
    gone. There such errors stay ignored, as by `simplesocketserver` itself (and see
    `ignore_icmp_errors` for `udp6`).
    """
    if not sys.platform.startswith("linux"):
        return 0
    count = 0
    for message_interface in _message_interfaces(context):
        server_socket = getattr(message_interface, "_pool", None)
        transport = getattr(server_socket, "_transport", None)
        if transport is None or not hasattr(server_socket, "_Address"):
            continue
        # asyncio hands out a wrapper without recvmsg; the socket itself is `_sock`. uvloop
        # hands out a stand-in with no socket behind it: leave that socket alone (above).
        sock = getattr(transport.get_extra_info("socket"), "_sock", None)
        if not isinstance(sock, socket.socket):
            continue
        _receive_errors(sock, True)
        server_socket.error_received = _errqueue_reader(server_socket, message_interface, sock)  # type: ignore[union-attr]
        count += 1
    return count


def ignore_icmp_errors(context: Any) -> int:
    """Turn off IP(V6)_RECVERR, which aiocoap's `udp6` sets, on the context's sockets.

    For uvloop: `udp6` reads its socket from a reader (`add_reader`), and libuv stops
    watching a descriptor for good once it reports POLLERR, which a queued ICMP error
    does. The first peer that had gone (port unreachable) then left the gateway deaf to
    every device. Without RECVERR the kernel queues no such errors for an unconnected
    socket: a CON to a peer that has gone is retransmitted until it times out, as with
    `simplesocketserver`. Returns how many sockets were changed.
    """
    count = 0
    for message_interface in _message_interfaces(context):
        transport = getattr(message_interface, "transport", None)
        sock = transport.get_extra_info("socket") if transport is not None else None
        if not isinstance(sock, socket.socket):
            continue
        _receive_errors(sock, False)
        count += 1
    return count


def _receive_errors(sock: socket.socket, on: bool) -> None:
    """IP(V6)_RECVERR on or off: an IPv6 socket also carries IPv4 (mapped) peers."""
    if sock.family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVERR, int(on))
    sock.setsockopt(socket.IPPROTO_IP, IP_RECVERR, int(on))


def _message_interfaces(context: Any) -> Iterator[Any]:
    """The message layer of each of the context's transports (where it has one)."""
    for interface in context.request_interfaces:
        manager = getattr(interface, "token_interface", None)
        message_interface = getattr(manager, "message_interface", None)
        if message_interface is not None:
            yield message_interface


def _errqueue_reader(server_socket: Any, message_interface: Any, sock: Any) -> Any:
    def error_received(exception: Exception) -> None:
        while True:
            try:
                _, ancdata, _, address = sock.recvmsg(1, 1024, MSG_ERRQUEUE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            number = exception.errno if isinstance(exception, OSError) else None
            for _, _, data in ancdata:
                if len(data) >= 4:
                    (number,) = struct.unpack_from("=I", data)  # sock_extended_err.ee_errno
            error = OSError(number or 0, f"{os.strerror(number or 0)} (ICMP, errqueue)")
            message_interface._received_exception(
                server_socket._Address(server_socket, address), error
            )

    return error_received


class RoutingSite(resource.Site):  # type: ignore[misc]
    """aiocoap's `Site`, routing without building the request URI or copying the request.

    The matched prefix is removed from the request's Uri-Path in place (the request belongs
    to this exchange alone) and remembered in `routed_path`, so routing the same request
    again (aiocoap asks for block-wise and observation decisions separately) finds the same
    child with the same remainder.
    """

    def _find_child_and_pathstripped_message(self, request: Any) -> tuple[Any, Any]:
        path = getattr(request, "routed_path", None)
        if path is None:
            path = tuple(request.opt.uri_path)
        child = self._resources.get(path)
        remainder: tuple[str, ...] = ()
        if child is None:
            # Longest registered prefix that leaves at least one segment, as Site does.
            for cut in range(len(path) - 1, 0, -1):
                child = self._subsites.get(path[:cut])
                if child is not None:
                    remainder = path[cut:]
                    break
            else:
                raise KeyError(path)
            if remainder == ("",):
                remainder = ()  # sub-sites see their root resource like sites
        route(request, path, remainder)
        return child, request


class GatewaySite:
    """Builds the aiocoap Site and remembers what /.well-known/core announces."""

    def __init__(self) -> None:
        self.site = RoutingSite()
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


async def serve_socket(root: Any, sock: socket.socket, transport: str) -> Any:
    """An aiocoap server context on a socket bound already, with the named transport.

    aiocoap binds its own sockets; this builds what `Context.create_server_context` would,
    with the same message and token layers, around the given socket instead.
    """
    loop = asyncio.get_running_loop()
    context = Context(loop=loop, serversite=root)
    sock.setblocking(False)
    if transport == "udp6":

        async def udp6(manager: Any) -> Any:
            return await MessageInterfaceUDP6._create_transport_endpoint(
                sock, manager, context.log, loop
            )

        await context._append_tokenmanaged_messagemanaged_transport(udp6)
    else:
        interface = _adopting_simple_server(sock)
        host, port = sock.getsockname()[:2]

        async def simple(manager: Any) -> Any:
            return await interface.create_server((host, port), manager, log=context.log, loop=loop)

        await context._append_tokenmanaged_messagemanaged_transport(simple)
    return context


def _adopting_simple_server(sock: socket.socket) -> Any:
    """aiocoap's `simplesocketserver` interface, serving `sock` instead of binding one."""

    class AdoptedSocket(_DatagramServerSocketSimple):  # type: ignore[misc]
        @classmethod
        async def create(cls, bind: Any, log: Any, loop: Any, message_interface: Any) -> Any:
            ready = loop.create_future()
            _, protocol = await loop.create_datagram_endpoint(
                lambda: cls(ready.set_result, message_interface, log), sock=sock
            )
            protocol.hostinfo_local = hostportjoin(bind[0], bind[1])
            server_socket = await ready
            server_socket._loop = loop
            return server_socket

    class AdoptingServer(MessageInterfaceSimpleServer):  # type: ignore[misc]
        _serversocket = AdoptedSocket

    return AdoptingServer


class CoapServer:
    def __init__(
        self,
        site: GatewaySite,
        *,
        bind: str,
        port: int,
        transport: str = "auto",
        root: Any = None,
        extra_transports: tuple[str, ...] = (),
        server_credentials: Any = None,
        fast_lane: ReadingsFastLane | None = None,
        sock: socket.socket | None = None,
    ) -> None:
        self._site = site
        #: What the context serves: the site itself, or a wrapper around it (security).
        self._root = site.site if root is None else root
        self._transports = [choose_transport(bind, transport), *extra_transports]
        self._server_credentials = server_credentials
        self._bind = bind
        self._port = port
        self._fast_lane = fast_lane
        #: A socket bound already (a worker's seat in a SO_REUSEPORT group), served instead
        #: of binding `bind`:`port`.
        self._sock = sock
        self.context: Any = None
        #: One per message manager of the context (UDP and DTLS), while it serves.
        self.deduplication: list[CompactDeduplication] = []

    async def __aenter__(self) -> CoapServer:
        if self._sock is not None:
            self.context = await serve_socket(self._root, self._sock, self._transports[0])
        else:
            self.context = await Context.create_server_context(
                self._root,
                bind=(self._bind, self._port),
                transports=self._transports,
                server_credentials=self._server_credentials,
            )
        # udp6 reports ICMP errors by itself, simplesocketserver where set up here; neither
        # can on uvloop (see the two functions).
        if eventloop.running() == "uvloop":
            ignore_icmp_errors(self.context)
            icmp_errors = False
        else:
            icmp_errors = "simplesocketserver" not in self._transports or bool(
                report_icmp_errors(self.context)
            )
        self.deduplication = CompactDeduplication.install(self.context)
        if self._fast_lane is not None:
            self._fast_lane.install(self.context)
        log.info(
            "coap.listening",
            bind=self._bind,
            port=self._port,
            transports=self._transports,
            icmp_errors=icmp_errors,
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._fast_lane is not None:
            await self._fast_lane.aclose()
        for deduplication in self.deduplication:
            deduplication.close()
        self.deduplication = []
        if self.context is not None:
            await self.context.shutdown()
            self.context = None
            log.info("coap.stopped")
