"""`/rd` and `/rd/<id>`: the RFC 9176 registration interface, as thin adapters."""

from __future__ import annotations

import structlog
from aiocoap import Message, resource
from aiocoap.numbers.codes import Code

from gateway.coap.base import GatewayResource, peer_of, single_path_segment
from gateway.config import RegistryConfig
from gateway.core.readings import CF_LINK_FORMAT
from gateway.core.registration import LifetimeBounds, parse_registration, parse_update
from gateway.errors import UnsupportedFormatError
from gateway.registry import Registry

log = structlog.get_logger("gateway.coap")


def lifetime_bounds(config: RegistryConfig) -> LifetimeBounds:
    return LifetimeBounds(config.default_lifetime, config.min_lifetime, config.max_lifetime)


class RegistrationCollection(GatewayResource):
    """`POST /rd?ep=NAME&et=TYPE&lt=SECONDS[&q]`, link-format payload optional."""

    event = "registration"
    rt = "core.rd"
    ct = CF_LINK_FORMAT

    def __init__(self, registry: Registry, config: RegistryConfig) -> None:
        super().__init__()
        self._registry = registry
        self._config = config

    async def render_post(self, request: Message) -> Message:
        cf = request.opt.content_format
        if request.payload and cf not in (None, CF_LINK_FORMAT):
            raise UnsupportedFormatError("registration payload must be link-format (40)")
        parsed = parse_registration(
            request.opt.uri_query,
            request.payload,
            bounds=lifetime_bounds(self._config),
            max_links_size=self._config.max_links_size,
        )
        peer = peer_of(request)
        registration = await self._registry.register(parsed, address=peer)
        log.info(
            "registration.created",
            outcome="created",
            device=parsed.endpoint,
            type=parsed.device_type,
            registration=registration.id,
            lifetime=parsed.lifetime,
            queue_mode=parsed.queue_mode,
            resources=len(parsed.resources),
        )
        return Message(code=Code.CREATED, location_path=("rd", registration.id))


class RegistrationEntries(GatewayResource, resource.PathCapable):  # type: ignore[misc]
    """`POST /rd/<id>` refreshes (2.04); `DELETE /rd/<id>` removes (2.02)."""

    event = "registration"

    def __init__(self, registry: Registry, config: RegistryConfig) -> None:
        super().__init__()
        self._registry = registry
        self._config = config

    def get_link_description(self) -> None:
        return None

    async def render_post(self, request: Message) -> Message:
        registration_id = single_path_segment(request, "rd")
        lifetime = parse_update(request.opt.uri_query, bounds=lifetime_bounds(self._config))
        registration = await self._registry.update(
            registration_id, lifetime=lifetime, address=peer_of(request)
        )
        log.debug(
            "registration.updated",
            outcome="updated",
            device=registration.device.name,
            registration=registration_id,
        )
        return Message(code=Code.CHANGED)

    async def render_delete(self, request: Message) -> Message:
        registration_id = single_path_segment(request, "rd")
        device = await self._registry.remove(registration_id)
        log.info(
            "registration.removed",
            outcome="removed",
            device=device.name,
            registration=registration_id,
        )
        return Message(code=Code.DELETED)
