"""A shorter way through aiocoap for the gateway's most common request: a plain reading.

aiocoap's message layer (deduplication, piggybacked or empty ACK, retransmission of a
separate response) hands every request to its token layer, which builds a pipe and a task
named after the request and runs the whole root chain: OSCORE wrapper, guard, site,
Observe and block-wise handling, resource. For a POST to `/r/NAME` that carries no
block-wise, Observe or OSCORE option and no authenticated claim, none of that chain but the
guard and the resource has anything to do, yet it costs more than the reading's own
decoding and validation (docs/performance.md).

The fast lane takes such requests at the token layer. It runs the same guard admission and
amplification bound (`Guard.render_plain`) and the same resource's `render`, then hands the
answer back to the message layer exactly as the token layer does, so piggybacking, the
empty ACK of a slow answer, the separate response's retransmission and the answer kept for
duplicates are all aiocoap's own. Every other request goes the usual way.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from aiocoap import Message
from aiocoap.error import RenderableError
from aiocoap.numbers.codes import Code
from aiocoap.numbers.optionnumbers import OptionNumber

from gateway.coap.base import internal_error, route

log = structlog.get_logger("gateway.coap")

#: Options a plain reading POST may carry; any other (block-wise, Observe, OSCORE, a query,
#: No-Response, or one unknown) sends the request the generic way.
PLAIN_OPTIONS = frozenset(
    int(number)
    for number in (
        OptionNumber.URI_HOST,
        OptionNumber.URI_PORT,
        OptionNumber.URI_PATH,
        OptionNumber.CONTENT_FORMAT,
    )
)

#: Seconds that answers already being prepared get at shutdown before they are cancelled.
DRAIN_TIMEOUT = 2.0

PlainRenderer = Callable[[Message, Callable[[Message], Awaitable[Message]]], Awaitable[Message]]


def _no_interest() -> None:
    """The token layer's "stop" for a request nobody else holds on to."""


class ReadingsFastLane:
    """Serves plain reading POSTs of `prefix/NAME` with `resource`, through `admit`."""

    def __init__(self, admit: PlainRenderer, resource: Any, prefix: str = "r") -> None:
        self._admit = admit
        self._resource = resource
        self._prefix = prefix
        self._tasks: set[asyncio.Task[None]] = set()
        #: Requests served by the fast lane since start.
        self.served = 0

    def takes(self, request: Message) -> bool:
        if request.code != Code.POST:
            return False
        opt = request.opt
        # One look at which options are there, rather than one lookup per option to rule
        # out: aiocoap (pinned below 0.5) keeps them in `_options`, keyed by number.
        if not PLAIN_OPTIONS.issuperset(opt._options):
            return False
        path = opt.uri_path
        if len(path) != 2 or path[0] != self._prefix or not path[1]:
            return False
        return not getattr(request.remote, "authenticated_claims", None)

    def install(self, context: Any) -> int:
        """Put the lane in front of each of the context's token layers; how many it found."""
        count = 0
        for manager in context.request_interfaces:
            generic = getattr(manager, "process_request", None)
            if generic is None or not hasattr(manager, "token_interface"):
                continue
            manager.process_request = self._router(manager, generic)
            count += 1
        return count

    def _router(self, manager: Any, generic: Callable[[Message], None]) -> Callable[..., None]:
        def process_request(request: Message) -> None:
            if not self.takes(request):
                generic(request)
                return
            self.served += 1
            task = asyncio.get_running_loop().create_task(self._serve(manager, request))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        return process_request

    async def _serve(self, manager: Any, request: Message) -> None:
        try:
            response = await self._admit(request, self._render)
        except RenderableError as exc:
            response = exc.to_message()
        except Exception:
            log.exception("reading.failed", outcome="error", path="/".join(request.opt.uri_path))
            response = internal_error()
        # As the token layer does for the first (and here only) response of a request.
        response.token = request.token
        response.remote = request.remote.as_response_address()
        response.request = request
        manager.token_interface.send_message(response, _no_interest)

    async def _render(self, request: Message) -> Message:
        path = tuple(request.opt.uri_path)
        route(request, path, path[1:])  # as RoutingSite would, to the path-capable resource
        response: Message = await self._resource.render(request)
        return response

    async def aclose(self) -> None:
        """Let answers being prepared go out, briefly; cancel what is left."""
        if not self._tasks:
            return
        _, pending = await asyncio.wait(set(self._tasks), timeout=DRAIN_TIMEOUT)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)
