"""The one place where a request is admitted or refused before any resource sees it.

`Guard` wraps the gateway's aiocoap site; aiocoap's `OscoreSiteWrapper` wraps the guard, so a
request reaching the guard is either plain or already unprotected, and in the latter case
carries the authenticated claim of its security context. For each request the guard:

1. bounds the options it will look at (long path segments or queries: 4.00);
2. takes a token from the source address's bucket (4.29 with Max-Age when empty);
3. works out the identity (OSCORE claim) and the device the request is about, and asks
   `gateway.core.access.authorize` (4.01 / 4.03);
4. takes a token from that device's bucket (4.29), so a flooding device never slows others;
5. bounds registrations (5.03) and observations (falls back to a plain GET, RFC 7641 §4.1);
6. keeps answers to unauthenticated peers within `amplification_factor` times the request
   size (RFC 7252 §11.3): on reads it asks the resource for Block2 blocks small enough
   (RFC 7959 lets the server pick a smaller block size than the client), it cuts the
   diagnostic of an error answer to what fits, and answers 4.01 (authenticate first)
   when even that is not enough. Block2 continuations are not charged to the buckets.

Every refusal is answered with its code and counted; log lines are at most one per second
per kind, carrying the count, so a flood cannot flood the log.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from aiocoap import Message, interfaces
from aiocoap.numbers.codes import Code
from aiocoap.optiontypes import BlockOption

from gateway.coap.base import error_response, peer_of
from gateway.config import SecurityConfig
from gateway.core.access import Identity, Subject, authorize, identity_from_claims, subject_device
from gateway.core.ratelimit import RateLimiter, max_age_for
from gateway.errors import (
    BadRequestError,
    DeviceError,
    OverloadedError,
    TooManyRequestsError,
    UnauthorizedError,
)
from gateway.registry import Registry

log = structlog.get_logger("gateway.security")

#: Bytes of a block-wise response besides its payload and token: header (4), Content-Format
#: (up to 3), Block2 (up to 4), payload marker (1). Anything more (an ETag, say) and the
#: final size check answers 4.01 instead.
RESPONSE_OVERHEAD = 4 + 3 + 4 + 1
MIN_BLOCK_EXP, MAX_BLOCK_EXP = 0, 6

OwnerLookup = Callable[[str], Awaitable[tuple[str, str] | None]]


def message_size(message: Message, token: bytes = b"") -> int:
    """Bytes on the wire of a message over UDP (header, token, options, payload)."""
    size = 4 + len(token or message.token or b"") + len(message.opt.encode())
    if message.payload:
        size += 1 + len(message.payload)
    return size


def block_exponent_for(budget: int, token_length: int) -> int | None:
    """Largest Block2 size exponent whose blocks fit `budget`; None if even 16 bytes do not."""
    room = budget - RESPONSE_OVERHEAD - token_length
    for exponent in range(MAX_BLOCK_EXP, MIN_BLOCK_EXP - 1, -1):
        if 2 ** (exponent + 4) <= room:
            return exponent
    return None


class _LogThrottle:
    """At most one log line per event per second; each line carries the running count."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self.counts: Counter[str] = Counter()
        self._last: dict[str, float] = {}
        self._suppressed: Counter[str] = Counter()

    def hit(self, event: str, **fields: Any) -> None:
        self.counts[event] += 1
        now = self._clock()
        if now - self._last.get(event, -1e9) < 1.0:
            self._suppressed[event] += 1
            return
        self._last[event] = now
        log.warning(
            event,
            count=self.counts[event],
            suppressed=self._suppressed.pop(event, 0),
            **fields,
        )


class _ShapedPipe:
    """The caller's pipe, with a different request and its first response passed through
    `shape`. Later responses are Observe notifications: RFC 7641 §4.5 bounds those (aiocoap
    sends one confirmable now and then and drops an observer that does not acknowledge),
    together with the observer bounds, so they are not shaped."""

    def __init__(self, pipe: Any, request: Message, shape: Callable[[Message], Message]) -> None:
        self._pipe = pipe
        self.request = request
        self._shape = shape
        self._first = True
        self._ended = False

    def add_response(self, response: Message, is_last: bool = False) -> None:
        if self._ended:
            return
        if self._first:
            self._first = False
            shaped = self._shape(response)
            if shaped is not response and not shaped.code.is_successful():
                is_last = True  # an observation refused for size ends here
            response = shaped
        self._ended = is_last
        self._pipe.add_response(response, is_last=is_last)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pipe, name)


class Guard(interfaces.Resource):  # type: ignore[misc]
    def __init__(
        self,
        inner: Any,
        config: SecurityConfig,
        *,
        registry: Registry,
        provisioned: Callable[[], frozenset[str]],
        owner_of: OwnerLookup,
        is_live: Callable[[str], bool] = lambda key: True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._inner = inner
        self._config = config
        self._registry = registry
        self._provisioned = provisioned
        self._owner_of = owner_of
        self._is_live = is_live
        self._clock = clock
        self.sources = RateLimiter(
            rate=config.source_rate, burst=config.source_burst, max_keys=config.max_tracked
        )
        self.devices = RateLimiter(
            rate=config.device_rate, burst=config.device_burst, max_keys=config.max_tracked
        )
        self._observers: Counter[str] = Counter()
        #: Kept beside the per-peer counts: summing them on every new observation would
        #: cost one step per observing peer (10,000 devices, 10,000 steps each).
        self._observers_total = 0
        self.events = _LogThrottle(clock)

    # aiocoap asks these of whatever serves a context.
    def get_resources_as_linkheader(self) -> Any:
        return self._inner.get_resources_as_linkheader()

    async def render(self, request: Message) -> Message:
        raise RuntimeError("Guard is used through render_to_pipe only")

    async def needs_blockwise_assembly(self, request: Message) -> bool:
        raise RuntimeError("Guard is used through render_to_pipe only")

    @property
    def observers(self) -> int:
        return self._observers_total

    async def render_to_pipe(self, pipe: Any) -> None:
        request: Message = pipe.request
        claims = getattr(request.remote, "authenticated_claims", None) or ()
        identity = identity_from_claims(list(claims))
        source = peer_of(request) or "?"
        # Answers to unauthenticated peers are bounded (RFC 7252 §11.3).
        limited = identity is None and bool(self._config.amplification_factor)
        refusal = await self._refusal(request, claims, identity, source, limited)
        if refusal is not None:
            pipe.add_response(refusal, is_last=True)
            return
        if request.opt.observe == 0 and request.code == Code.GET:
            self._admit_observer(pipe, request, source)
            # aiocoap cuts only plain GET answers into Block2 blocks; an Observe registration
            # is bounded instead by the observer limits and by its confirmable notifications,
            # which end the observation of a (spoofed) peer that does not acknowledge them.
            if request.opt.observe == 0:
                limited = False
        if limited:
            # Only reads answer with a representation worth cutting into blocks; any other
            # answer is a code and at most a short diagnostic, cut to the budget in _shape.
            # Asking for blocks on every POST would route each reading through aiocoap's
            # block-wise cache, about a quarter of the ingest path's CPU.
            budget: int | None = None
            if request.code in (Code.GET, Code.FETCH):
                budget = self._budget(request)  # before the request grows a Block2 option
                request = self._ask_for_small_blocks(request, budget)
            pipe = _ShapedPipe(pipe, request, lambda r: self._shape(r, request, budget))
        await self._inner.render_to_pipe(pipe)

    async def render_plain(
        self, request: Message, render: Callable[[Message], Awaitable[Message]]
    ) -> Message:
        """`render_to_pipe` for a request with no claims, no Observe and no block options,
        answered once by `render`: the readings fast lane (gateway.coap.fastlane) comes in
        here, past the OSCORE wrapper and aiocoap's pipes, and gets the same admission and
        the same bound on the answer's size."""
        limited = bool(self._config.amplification_factor)
        refusal = await self._refusal(request, (), None, peer_of(request) or "?", limited)
        if refusal is not None:
            return refusal
        response = await render(request)
        return self._shape(response, request) if limited else response

    async def _refusal(
        self,
        request: Message,
        claims: Any,
        identity: Identity | None,
        source: str,
        limited: bool,
    ) -> Message | None:
        """The answer refusing `request`, or None when it is admitted."""
        try:
            self._check_live(claims, source)
            await self._admit(request, identity, source)
        except DeviceError as exc:
            response = error_response(exc)
            return self._shape(response, request) if limited else response
        return None

    # --- admission -------------------------------------------------------------------------

    def _check_live(self, claims: Any, source: str) -> None:
        """A DTLS session outlives the removal of its key from the map; refuse it here.

        (OSCORE needs no such check: every message is looked up in the live map.)
        """
        for claim in claims:
            if isinstance(claim, str) and claim.startswith(":") and not self._is_live(claim):
                self.events.hit("security.revoked_session", peer=source, outcome="refused")
                raise UnauthorizedError("credentials revoked")

    async def _admit(self, request: Message, identity: Identity | None, source: str) -> None:
        config = self._config
        path = tuple(str(p) for p in request.opt.uri_path)
        query = tuple(str(q) for q in request.opt.uri_query)
        for item in path + query:
            if len(item.encode("utf-8")) > config.max_option_length:
                self.events.hit("security.option_too_long", peer=source)
                raise BadRequestError(f"path or query item longer than {config.max_option_length}")
        now = self._clock()
        # Block2 continuations are served from aiocoap's response cache and never reach a
        # handler; charging them would make a large answer cost a whole burst.
        continuation = request.opt.block2 is not None and request.opt.block2.block_number > 0
        wait = 0.0 if continuation else self.sources.check(source, now)
        if wait:
            self.events.hit("ratelimit.source_limited", peer=source, outcome="limited")
            raise TooManyRequestsError(
                "too many requests from this address", max_age=max_age_for(wait)
            )
        subject = await self._subject(path, query)
        method = str(request.code)
        try:
            authorize(
                identity=identity,
                method=method,
                path=path,
                subject=subject,
                mode=config.mode,
                type_modes=config.type_modes,
                admin_prefixes=config.admin_prefixes,
            )
        except DeviceError as exc:
            event = (
                "security.unauthorized"
                if exc.coap_code == Code.UNAUTHORIZED
                else "security.forbidden"
            )
            self.events.hit(
                event,
                peer=source,
                device=subject.device,
                identity=identity.name if identity else None,
                method=method,
                path="/" + "/".join(path),
                outcome="refused",
            )
            raise
        device_key = identity.name if identity is not None else subject.device
        if device_key is not None and not continuation:
            wait = self.devices.check(device_key, now)
            if wait:
                self.events.hit("ratelimit.device_limited", device=device_key, outcome="limited")
                raise TooManyRequestsError(
                    "too many requests for this device",
                    max_age=max_age_for(wait),
                    device=device_key,
                )
        if (
            path == ("rd",)
            and request.code == Code.POST
            and subject.device is not None
            and self._registry.device(subject.device) is None
            and len(self._registry) >= config.max_devices
        ):
            self.events.hit("security.devices_full", device=subject.device, outcome="refused")
            raise OverloadedError("device table full", max_age=60, device=subject.device)

    async def _subject(self, path: tuple[str, ...], query: tuple[str, ...]) -> Subject:
        name, device_type = subject_device(path, query)
        if name is None and len(path) == 2 and path[0] == "rd":
            owner = await self._owner_of(path[1])
            if owner is not None:
                name, device_type = owner
        if name is None:
            return Subject()
        known = self._registry.device(name)
        if known is not None:
            device_type = known.type
        return Subject(name, device_type, name in self._provisioned())

    def _admit_observer(self, pipe: Any, request: Message, source: str) -> None:
        config = self._config
        if (
            self._observers[source] >= config.max_observers_per_peer
            or self.observers >= config.max_observers
        ):
            # RFC 7641 §4.1: a server unwilling to add an observer answers as to a plain GET.
            request.opt.observe = None
            self.events.hit("security.observers_full", peer=source, outcome="refused")
            return
        self._observers[source] += 1
        self._observers_total += 1

        def release() -> None:
            self._observers[source] -= 1
            self._observers_total -= 1
            if self._observers[source] <= 0:
                del self._observers[source]

        pipe.on_interest_end(release)

    # --- amplification ---------------------------------------------------------------------

    def _budget(self, request: Message) -> int:
        return int(self._config.amplification_factor * message_size(request))

    def _ask_for_small_blocks(self, request: Message, budget: int) -> Message:
        exponent = block_exponent_for(budget, len(request.token or b""))
        if exponent is None or exponent >= MAX_BLOCK_EXP:
            return request
        block2 = request.opt.block2
        if block2 is None:
            request.opt.block2 = BlockOption.BlockwiseTuple(0, False, exponent)
        elif block2.size_exponent > exponent:
            request.opt.block2 = block2.reduced_to(exponent)
        return request

    def _shape(self, response: Message, request: Message, budget: int | None = None) -> Message:
        token = request.token or b""
        size = message_size(response, token)
        if budget is None:
            # Most answers (an empty 2.04) are no larger than a request with no options at
            # all, so the request's options need not be encoded to know they fit.
            least = 4 + len(token) + (1 + len(request.payload) if request.payload else 0)
            if size <= self._config.amplification_factor * least:
                return response
            budget = self._budget(request)
        if size <= budget:
            return response
        if response.code is not None and not response.code.is_successful() and response.payload:
            # The diagnostic is cut to what fits (on a character boundary), not dropped.
            diagnostic, response.payload = response.payload, b""
            room = budget - message_size(response, token) - 1  # 1: the payload marker
            if room > 0:
                response.payload = diagnostic[:room].decode("utf-8", "ignore").encode("utf-8")
            if message_size(response, token) <= budget:
                return response
        self.events.hit(
            "security.amplification_limited",
            peer=peer_of(request),
            code=str(response.code),
            size=message_size(response, token),
            budget=budget,
        )
        return Message(code=Code.UNAUTHORIZED)
